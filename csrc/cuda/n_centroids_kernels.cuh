#pragma once
// CUDA epilogues of the N-Centroids loss tiles (see n_centroids_tiles.h): the
// per-pair math of sphere_math.h, one thread per row (direct pairs, exact
// near-pair gradients) or per (row, centroid) pair of a tile. Minima and sums
// over a row are left to ATen reductions, so nothing here needs atomics:
// deterministic. The Gram tiles come from cuBLAS. Torch-free, so
// tests/cuda_emulation runs these bodies on the CPU.
#include <cstdint>

#ifndef CK_CUDA_HOST_EMULATION
#include <cuda_runtime.h>
#endif

#include "confusion_kernels/sphere_math.h"

namespace confusion_kernels {
namespace n_centroids {

constexpr int kSphereThreads = 256;

// dist[i] = d(x_i, c_{index_i}) from differences (0 where index_i < 0) and,
// with grad_x given, grad_x_i += weight_i dd/dx.
template <typename T>
__global__ void __launch_bounds__(kSphereThreads)
    direct_kernel(const T* __restrict__ x, const T* __restrict__ c,
                  const int64_t* __restrict__ index, const T* __restrict__ weight, int64_t n,
                  int64_t d, int64_t metric, T* __restrict__ dist, T* __restrict__ grad_x) {
  const int64_t i = int64_t(blockIdx.x) * kSphereThreads + threadIdx.x;
  if (i >= n) return;
  if (index[i] < 0) {
    dist[i] = T(0);
    return;
  }
  dist[i] = sphere_pair_direct(metric, x + i * d, c + index[i] * d, d,
                               weight != nullptr ? weight[i] : T(0),
                               grad_x != nullptr ? grad_x + i * d : nullptr);
}

// One thread per pair of a Gram tile g [rt, ct] (rows r0.., centroids c0..):
// dist (exact where the Gram form cancels, flagged in `exact`) and, with
// weight given, coef = w_i beta and x_coef = w_i alpha for the Gram pairs
// (0 for the own centroid and for exact pairs).
template <typename T>
__global__ void __launch_bounds__(kSphereThreads)
    pairs_kernel(const T* __restrict__ g, const T* __restrict__ x_r, const T* __restrict__ xn2_r,
                 const T* __restrict__ c_t, const T* __restrict__ cn2_t,
                 const int64_t* __restrict__ lab_r, const T* __restrict__ weight_r, int64_t rt,
                 int64_t ct, int64_t c0, int64_t d, int64_t metric, T* __restrict__ dist,
                 uint8_t* __restrict__ exact, T* __restrict__ coef, T* __restrict__ x_coef) {
  const int64_t p = int64_t(blockIdx.x) * kSphereThreads + threadIdx.x;
  if (p >= rt * ct) return;
  const int64_t i = p / ct, j = p % ct;
  T a2, b2, dot = g[p];
  const bool redo = sphere_chords_from_gram(metric, xn2_r[i], cn2_t[j], dot, &a2, &b2);
  if (redo) sphere_pair_exact(x_r + i * d, c_t + j * d, d, &a2, &b2, &dot);
  const T a = ck_sqrt(a2), b = ck_sqrt(b2);
  dist[p] = sphere_distance(metric, a, b, dot);
  exact[p] = redo;
  if (coef == nullptr) return;
  T alpha = T(0), beta = T(0);
  if (!redo && c0 + j != lab_r[i]) sphere_gram_coefficients(metric, a, b, &alpha, &beta);
  coef[p] = weight_r[i] * beta;
  x_coef[p] = weight_r[i] * alpha;
}

// One thread per row of a tile: grad_x_i += w_i dd/dx for the row's exact
// pairs other than its own centroid, in column order.
template <typename T>
__global__ void __launch_bounds__(kSphereThreads)
    exact_grad_kernel(const T* __restrict__ x_r, const T* __restrict__ c_t,
                      const int64_t* __restrict__ lab_r, const T* __restrict__ weight_r,
                      const uint8_t* __restrict__ exact, int64_t rt, int64_t ct, int64_t c0,
                      int64_t d, int64_t metric, T* __restrict__ grad_x_r) {
  const int64_t i = int64_t(blockIdx.x) * kSphereThreads + threadIdx.x;
  if (i >= rt) return;
  for (int64_t j = 0; j < ct; ++j) {
    if (!exact[i * ct + j] || c0 + j == lab_r[i]) continue;
    T a2, b2, dot;
    sphere_pair_exact(x_r + i * d, c_t + j * d, d, &a2, &b2, &dot);
    sphere_grad_exact_accumulate(metric, x_r + i * d, c_t + j * d, d, ck_sqrt(a2), ck_sqrt(b2),
                                 weight_r[i], grad_x_r + i * d);
  }
}

}  // namespace n_centroids
}  // namespace confusion_kernels
