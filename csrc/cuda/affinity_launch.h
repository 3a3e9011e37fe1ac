// Launchers of the affinity epilogue kernels (affinity_kernels.cuh), callable
// from host C++; T is float or double. Instantiated in affinity_kernels.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace confusion_kernels {
namespace affinity {

template <typename T>
void launch_true_class(const T* f, const T* w, const T* f_norms, const T* w_norms,
                       const int64_t* labels, int64_t n, int64_t d, int64_t m, T sigma,
                       int64_t kind, T* d_true, int64_t* arg, cudaStream_t stream);

template <typename T>
void launch_similarity(const T* g, const T* fn_r, const T* wn_t, int64_t rt, int64_t ct, int64_t m,
                       T sigma, int64_t kind, T* d_tile, int64_t* arg_tile, cudaStream_t stream);

template <typename T>
void launch_hinge(const T* d_tile, const int64_t* arg_tile, int64_t rt, int64_t ct, int64_t m,
                  int64_t c0, const int64_t* lab_r, const T* d_true_r, T sigma, T margin,
                  int64_t kind, const T* g_r, const T* own_active_r, T* h_tile, T* on_tile, T* a,
                  cudaStream_t stream);

}  // namespace affinity
}  // namespace confusion_kernels
