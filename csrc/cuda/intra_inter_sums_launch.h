// Launchers of the CUDA kernels of intra_inter_sums, callable from host C++
// without CUDA-specific headers beyond the runtime API. T is float or double
// (inputs are converted to the accumulation type by the caller). One
// instantiation per metric lives in intra_inter_sums_<metric>.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace confusion_kernels {

// norms[i] = |x_i| (used by the cosine metric only; may be null otherwise).
template <typename T, int64_t M>
void launch_forward_for_metric(const T* x, const int64_t* labels, const T* norms, int64_t n,
                               int64_t d, T* s_in, T* s_out, cudaStream_t stream);

template <typename T, int64_t M>
void launch_backward_for_metric(const T* x, const int64_t* labels, const T* norms, const T* g_in,
                                const T* g_out, int64_t n, int64_t d, T* grad,
                                cudaStream_t stream);

}  // namespace confusion_kernels
