#pragma once
// CUDA kernels of the pair losses (Contrastive, SupCon, NT-Xent, Multi-Similarity) on one tile
// of rows x [rt, D] against references r [ct, D] whose Gram tile g = x r^T [rt, ct] comes
// from cuBLAS (pair_losses_cuda.cpp). The per-pair math is pair_loss_math.h's, the pair
// value pair_math.h's (the euclidean Gram form, from differences where it cancels). Every
// sum has one thread or one block that owns it, in a fixed order: deterministic, no
// atomics. Torch-free, so tests/cuda_emulation runs these bodies on the CPU.
#include <cstdint>

#include "confusion_kernels/pair_loss_math.h"
#include "kernel_prelude.cuh"
#include "pair_loss_tile.h"

namespace confusion_kernels {
namespace pair_losses {

constexpr int kRowThreads = 256;   // threads of a row's block (stats_kernel)
constexpr int kPairThreads = 256;  // threads of the one-thread-per-pair / per-row kernels
// Resident blocks per SM the kernels are compiled for: up to 64 registers a thread. With the
// thread count alone ptxas aimed at 8 blocks (32 registers) and spilled (sm_90).
constexpr int kMinBlocks = 4;

// Row statistics (one thread per row): pair_loss_init, pair_loss_finish_first, and the rows'
// outputs pair_loss_rows, by `step` (0, 1, 2).
template <typename T>
__global__ void __launch_bounds__(kPairThreads, kMinBlocks)
    row_step_kernel(PairLossParams<T> p, int64_t n, int step, T* __restrict__ stats,
                    T* __restrict__ rows) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T* st = stats + i * kPairLossStats;
  if (step == 0) {
    pair_loss_init(p, st);
  } else if (step == 1) {
    pair_loss_finish_first(p, st);
  } else {
    pair_loss_rows(p, st, rows + i * pair_loss_outputs(p.kind));
  }
}

// One block per row of the tile: its threads take the columns in turn, each into its own
// partial (pair_loss_add, or with `second` NT-Xent's positives against lse_Q), the partials
// merged by a tree in shared memory (blockDim.x a power of two) and the result merged into
// the row's statistics stats[i] (the tiles in stream order). Dynamic shared memory:
// blockDim.x * 4 * sizeof(T).
template <typename T>
__global__ void __launch_bounds__(kRowThreads, kMinBlocks)
    stats_kernel(PairTile<T> t, PairLossParams<T> p, bool second, T* __restrict__ stats) {
  CK_DYNAMIC_SMEM(smem);
  T* parts = reinterpret_cast<T*>(smem);
  const int64_t i = blockIdx.x;
  T* row = stats + i * kPairLossStats;
  T st[kPairLossStats];
  if (second) {
    st[0] = row[0];  // lse_Q
    st[1] = st[2] = st[3] = T(0);
  } else {
    pair_loss_init_partial(p, st);
  }
  for (int64_t j = threadIdx.x; j < t.ct; j += blockDim.x) {
    if (t.left_out(i, j)) continue;
    const bool same = t.lab[i] == t.rlab[j];
    if (second && !same) continue;
    bool exact;
    const T m = t.value(i, j, &exact);
    if (second)
      ntxent_accumulate_positive(p, m, st);
    else
      pair_loss_add(p, m, same, st);
  }
  T* mine = parts + threadIdx.x * kPairLossStats;
  for (int k = 0; k < kPairLossStats; ++k) mine[k] = st[k];
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half)
      pair_loss_merge(p, parts + (threadIdx.x + half) * kPairLossStats, second, mine);
    __syncthreads();
  }
  if (threadIdx.x == 0) pair_loss_merge(p, parts, second, row);
}

// One thread per pair of the tile: dL/dm_ij (pair_loss_coefficient_from_exp from the rows'
// statistics st [rt, 4] and upstream gradients grad_rows [rt, R]), over m for the euclidean
// distance (dm/dx_i = (x_i - r_j) / m, 0 for a duplicate). Pairs taken from differences go
// to `near` (their coef 0), the others to `coef`; a left-out pair gets 0 in both.
template <typename T>
__global__ void __launch_bounds__(kPairThreads, kMinBlocks)
    coefficient_kernel(PairTile<T> t, PairLossParams<T> p, const T* __restrict__ st,
                       const T* __restrict__ grad_rows, T* __restrict__ coef,
                       T* __restrict__ near) {
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= t.rt * t.ct) return;
  const int64_t i = q / t.ct, j = q % t.ct;
  coef[q] = near[q] = T(0);
  if (t.left_out(i, j)) return;
  const bool same = t.lab[i] == t.rlab[j];
  bool exact;
  const T m = t.value(i, j, &exact);
  const T* row = st + i * kPairLossStats;
  const T e = p.kind == kContrastive ? T(0) : std::exp(pair_loss_exponent(p, m, same, row));
  T c =
      pair_loss_coefficient_from_exp(p, m, same, row, grad_rows + i * pair_loss_outputs(p.kind), e);
  if (!t.cosine) c = m > T(0) ? c / m : T(0);
  (exact ? near : coef)[q] = c;
}

// dL/dx of the close pairs from differences, one thread per row of the tile:
// grad_x[i] += sum_j near_ij (x_i - r_j), the columns in order.
template <typename T>
__global__ void __launch_bounds__(kPairThreads, kMinBlocks)
    near_rows_kernel(PairTile<T> t, const T* __restrict__ near, T* __restrict__ grad_x) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= t.rt) return;
  for (int64_t j = 0; j < t.ct; ++j) {
    const T w = near[i * t.ct + j];
    if (w == T(0)) continue;
    for (int64_t k = 0; k < t.d; ++k)
      grad_x[i * t.d + k] += w * (t.x[i * t.d + k] - t.r[j * t.d + k]);
  }
}

// dL/dr of the close pairs, one thread per reference of the tile:
// grad_r[j] += sum_i near_ij (r_j - x_i), the rows in order.
template <typename T>
__global__ void __launch_bounds__(kPairThreads, kMinBlocks)
    near_refs_kernel(PairTile<T> t, const T* __restrict__ near, T* __restrict__ grad_r) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= t.ct) return;
  for (int64_t i = 0; i < t.rt; ++i) {
    const T w = near[i * t.ct + j];
    if (w == T(0)) continue;
    for (int64_t k = 0; k < t.d; ++k)
      grad_r[j * t.d + k] += w * (t.r[j * t.d + k] - t.x[i * t.d + k]);
  }
}

}  // namespace pair_losses
}  // namespace confusion_kernels
