// Launchers of the CUDA kernels of intra_inter_sums, callable from host C++
// without CUDA-specific headers beyond the runtime API. T is float or double
// (inputs are converted to the accumulation type by the caller). One
// instantiation per metric lives in intra_inter_sums_<metric>.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "confusion_kernels/pair_sides.h"

namespace confusion_kernels {

// The difference-form kernels (intra_inter_sums_kernels.cuh): S_in / S_out of
// the rows of a against the columns of b, and sum_j c_ij dD(a_i, b_j)/da_i
// (pair_sides.h; shift = kNoSelfPair leaves no pair out).
template <typename T, int64_t M>
void launch_forward_for_metric(const PairSide<T>& a, const PairSide<T>& b, int64_t d, int64_t shift,
                               T* s_in, T* s_out, cudaStream_t stream);

template <typename T, int64_t M>
void launch_backward_for_metric(const PairSide<T>& a, const PairSide<T>& b, int64_t d,
                                int64_t shift, T* grad, cudaStream_t stream);

// Gram-form kernels (gram_tile_kernels.cuh) for euclidean, sqeuclidean and
// cosine: fp32 accumulation, operands `rows` of the given type (for cosine the
// unit rows), `exact_rows` = x in fp32 for the pairs recomputed exactly,
// sq_norms[i] = |x_i|^2 in fp32. One instantiation per metric in gram_<metric>.cu.
enum class GramOperands : int {
  kFp32Exact = 0,  // float rows, fp32 FMA on CUDA cores
  kTf32 = 1,       // float rows, tf32 tensor cores (torch's allow_tf32 is on)
  kFp16 = 2,       // __half rows, fp16 tensor cores
  kBf16 = 3,       // __nv_bfloat16 rows, bf16 tensor cores
};

// The Gram-form kernels take D > kDirectMaxDim (spec.h); the difference form the rest.

template <int64_t M>
void launch_gram_forward(GramOperands ops, const void* rows, const float* exact_rows,
                         const int64_t* labels, const float* sq_norms, int64_t n, int64_t d,
                         float* s_in, float* s_out, cudaStream_t stream);

template <int64_t M>
void launch_gram_backward(GramOperands ops, const void* rows, const float* exact_rows,
                          const int64_t* labels, const float* sq_norms, const float* g_in,
                          const float* g_out, int64_t n, int64_t d, float* grad,
                          cudaStream_t stream);

}  // namespace confusion_kernels
