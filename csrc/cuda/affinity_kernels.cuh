#pragma once
// CUDA epilogues of the affinity loss tiles (see affinity_tiles.h): the
// per-pair math of affinity_math.h, one thread per row (true class) or per
// (row, class) pair of a tile. Sums over a row are left to ATen reductions,
// so nothing here needs atomics: deterministic. The Gram tiles themselves come
// from cuBLAS. Torch-free, so tests/cuda_emulation runs these bodies on the CPU.
#include <cstdint>

#ifndef CK_CUDA_HOST_EMULATION
#include <cuda_runtime.h>
#endif

#include "confusion_kernels/affinity_math.h"

namespace confusion_kernels {
namespace affinity {

constexpr int kEpilogueThreads = 256;

// d_true[i] = sim(min_t |f_i - w_{y_i t}|^2) and its first arg-min t, from
// direct dot products (N m D work, next to the N P D of the tiles).
template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads)
    true_class_kernel(const T* __restrict__ f, const T* __restrict__ w,
                      const T* __restrict__ f_norms, const T* __restrict__ w_norms,
                      const int64_t* __restrict__ labels, int64_t n, int64_t d, int64_t m, T sigma,
                      int64_t kind, T* __restrict__ d_true, int64_t* __restrict__ arg) {
  const int64_t i = int64_t(blockIdx.x) * kEpilogueThreads + threadIdx.x;
  if (i >= n) return;
  const int64_t base = labels[i] * m;
  T best = T(0);
  int64_t best_t = 0;
  for (int64_t t = 0; t < m; ++t) {
    const T* wt = w + (base + t) * d;
    const T* fi = f + i * d;
    T dot = T(0);
    for (int64_t k = 0; k < d; ++k) dot += fi[k] * wt[k];
    keep_first_min(affinity_sq_distance(f_norms[i], w_norms[base + t], dot), t, &best, &best_t);
  }
  d_true[i] = affinity_similarity(kind, best, sigma);
  arg[i] = best_t;
}

// Per (row, class) of a tile: the min over the class's m Gram entries
// g[ii, jj m + t] -> d = sim(s_min) and the first arg-min.
template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads)
    similarity_kernel(const T* __restrict__ g, const T* __restrict__ fn_r,
                      const T* __restrict__ wn_t, int64_t rt, int64_t ct, int64_t m, T sigma,
                      int64_t kind, T* __restrict__ d_tile, int64_t* __restrict__ arg_tile) {
  const int64_t e = int64_t(blockIdx.x) * kEpilogueThreads + threadIdx.x;
  if (e >= rt * ct) return;
  const int64_t ii = e / ct, jj = e % ct;
  int64_t best_t;
  const T best = class_min(g + e * m, wn_t + jj * m, fn_r[ii], m, &best_t);
  d_tile[e] = affinity_similarity(kind, best, sigma);
  arg_tile[e] = best_t;
}

// Per (row, class) of a tile: the hinge relu(margin + d - d_true) of the other
// classes into h_tile (and 1 into on_tile where active), when given; and the
// coefficient g_i * w * dd/ds at the class's arg-min slot of `a` [rt, ct m]
// (when given) with w = 1 for an active hinge, 0 otherwise, and -own_active_i
// for the own class (0 when own_active is null).
template <typename T>
__global__ void __launch_bounds__(kEpilogueThreads)
    hinge_kernel(const T* __restrict__ d_tile, const int64_t* __restrict__ arg_tile, int64_t rt,
                 int64_t ct, int64_t m, int64_t c0, const int64_t* __restrict__ lab_r,
                 const T* __restrict__ d_true_r, T sigma, T margin, int64_t kind,
                 const T* __restrict__ g_r, const T* __restrict__ own_active_r,
                 T* __restrict__ h_tile, T* __restrict__ on_tile, T* __restrict__ a) {
  const int64_t e = int64_t(blockIdx.x) * kEpilogueThreads + threadIdx.x;
  if (e >= rt * ct) return;
  const int64_t ii = e / ct, jj = e % ct;
  const T d = d_tile[e];
  const bool own = c0 + jj == lab_r[ii];
  bool on;
  const T h = affinity_hinge(margin, d, d_true_r[ii], &on);
  on = on && !own;
  if (h_tile != nullptr) {
    h_tile[e] = on ? h : T(0);
    on_tile[e] = on ? T(1) : T(0);
  }
  if (a != nullptr) {
    const T weight =
        own ? (own_active_r != nullptr ? -own_active_r[ii] : T(0)) : (on ? T(1) : T(0));
    const T g = g_r != nullptr ? g_r[ii] : T(1);
    a[e * m + arg_tile[e]] = affinity_coefficient(kind, g, weight, d, sigma);
  }
}

}  // namespace affinity
}  // namespace confusion_kernels
