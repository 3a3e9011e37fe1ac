// Launchers of the N-Centroids epilogue kernels (n_centroids_kernels.cuh),
// callable from host C++; T is float or double. Instantiated in
// n_centroids_kernels.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace confusion_kernels {
namespace n_centroids {

template <typename T>
void launch_direct(const T* x, const T* c, const int64_t* index, const T* weight, int64_t n,
                   int64_t d, int64_t metric, T* dist, T* grad_x, cudaStream_t stream);

template <typename T>
void launch_pairs(const T* g, const T* x_r, const T* xn2_r, const T* c_t, const T* cn2_t,
                  const int64_t* lab_r, const T* weight_r, int64_t rt, int64_t ct, int64_t c0,
                  int64_t d, int64_t metric, T* dist, uint8_t* exact, T* coef, T* x_coef,
                  cudaStream_t stream);

template <typename T>
void launch_exact_grad(const T* x_r, const T* c_t, const int64_t* lab_r, const T* weight_r,
                       const uint8_t* exact, int64_t rt, int64_t ct, int64_t c0, int64_t d,
                       int64_t metric, T* grad_x_r, cudaStream_t stream);

}  // namespace n_centroids
}  // namespace confusion_kernels
