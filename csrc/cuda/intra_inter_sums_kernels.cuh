#pragma once
// CUDA kernels of intra_inter_sums and intra_inter_sums_rect, exact per-pair
// form: rows of one side against the columns of the other (pair_sides.h).
// Included by one translation unit per metric (intra_inter_sums_<metric>.cu)
// so that nvcc compiles them in parallel.
//
// Forward: a block owns 128 rows (one per thread) and streams tiles of 32
// columns through shared memory in chunks of 32 dimensions; each thread keeps
// the 32 per-pair partial sums of its row in registers and adds the finished
// distances to its S_in / S_out. Backward: grid (row blocks, dimension
// chunks); each thread recomputes the distances its gradient needs and
// accumulates dL/dx for its row and 32 dimensions in registers.
// Every output element is written by exactly one thread: no atomics, so two
// runs on the same input give bitwise-equal results. O(N*D) memory.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "confusion_kernels/pair_math.h"
#include "confusion_kernels/pair_sides.h"
#include "intra_inter_sums_launch.h"

namespace confusion_kernels {
namespace detail {

constexpr int kRows = 128;  // rows per block = threads per block
constexpr int kCols = 32;   // columns per shared-memory tile
constexpr int kDims = 32;   // dimensions per chunk

// Loads rows [r0, r0 + rows) x dims [k0, k0 + kDims) into tile (zero padded).
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T (*tile)[kDims + 1], const T* __restrict__ x, int64_t n,
                                          int64_t d, int64_t r0, int64_t k0) {
  for (int e = threadIdx.x; e < ROWS * kDims; e += blockDim.x) {
    const int r = e / kDims, k = e % kDims;
    const int64_t row = r0 + r, dim = k0 + k;
    tile[r][k] = (row < n && dim < d) ? x[row * d + dim] : T(0);
  }
}

// Per-pair accumulators of one row of a against one column tile of b, over all
// of D. acc[j] ends as the sum of per-dimension terms; for cosine, where the
// sides hold the unit rows, acc[j] = |a/|a| - b/|b||^2 and dot[j] = cos(a, b).
template <typename T, int64_t M, int COLS = kCols>
__device__ __forceinline__ void accumulate_pairs(T (*as)[kDims + 1], T (*bs)[kDims + 1],
                                                 const PairSide<T>& a, const PairSide<T>& b,
                                                 int64_t d, int64_t r0, int64_t c0, T* acc,
                                                 T* dot) {
#pragma unroll
  for (int j = 0; j < COLS; ++j) acc[j] = dot[j] = T(0);
  for (int64_t k0 = 0; k0 < d; k0 += kDims) {
    __syncthreads();
    load_tile<T, kRows>(as, a.rows, a.n, d, r0, k0);
    load_tile<T, COLS>(bs, b.rows, b.n, d, c0, k0);
    __syncthreads();
    // Only the dimensions that exist (D = 2 must not pay for 32).
    const int kmax = d - k0 < kDims ? int(d - k0) : kDims;
    for (int k = 0; k < kmax; ++k) {
      const T av = as[threadIdx.x][k];
#pragma unroll
      for (int j = 0; j < COLS; ++j) {
        const T bv = bs[j][k];
        if (M == kCosine) {
          const T t = av - bv;
          acc[j] += t * t;
          dot[j] += av * bv;
        } else {
          acc[j] += direct_term<T>(M, av - bv);
        }
      }
    }
  }
}

template <typename T, int64_t M>
__device__ __forceinline__ T finish_distance(T acc, T dot, T norm_a, T norm_b) {
  return M == kCosine ? unit_cosine_distance(acc, dot, norm_a, norm_b) : direct_finalize<T>(M, acc);
}

template <typename T>
__device__ __forceinline__ T safe_inverse(T v) {
  return v > T(0) ? T(1) / v : T(0);
}

// S_in / S_out of every row of a against the columns of b (pair_sides.h).
template <typename T, int64_t M>
__global__ void __launch_bounds__(kRows)
    forward_kernel(const PairSide<T> a, const PairSide<T> b, int64_t d, int64_t shift,
                   T* __restrict__ s_in, T* __restrict__ s_out) {
  __shared__ T as[kRows][kDims + 1];
  __shared__ T bs[kCols][kDims + 1];
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int64_t i = r0 + threadIdx.x;
  const bool row_ok = i < a.n;
  const int64_t li = row_ok ? a.labels[i] : 0;
  const T na = (M == kCosine && row_ok) ? a.norms[i] : T(0);
  T in = 0, out = 0;
  T acc[kCols], dot[kCols];
  for (int64_t c0 = 0; c0 < b.n; c0 += kCols) {
    accumulate_pairs<T, M>(as, bs, a, b, d, r0, c0, acc, dot);
    if (!row_ok) continue;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t col = c0 + j;
      if (col >= b.n || is_self_pair(i, col, shift)) continue;
      const T nb = M == kCosine ? b.norms[col] : T(0);
      const T dist = finish_distance<T, M>(acc[j], dot[j], na, nb);
      if (b.labels[col] == li)
        in += dist;
      else
        out += dist;
    }
  }
  if (row_ok) {
    s_in[i] = in;
    s_out[i] = out;
  }
}

// Columns per tile of the backward. Cosine keeps four per-column arrays in registers
// beside the gradient's 32 dimensions (accumulators, dot products, two coefficients) and
// euclidean three: at 32 columns both used a stack frame (scripts/cuda_resources.py);
// at 16 they fit.
template <int64_t M>
constexpr int backward_cols() {
  return M == kCosine || M == kEuclidean ? 16 : kCols;
}

// grad[i] = sum_j c_ij dD(a_i, b_j)/da_i for every row of a (pair_sides.h).
template <typename T, int64_t M>
__global__ void __launch_bounds__(kRows, 1)
    backward_kernel(const PairSide<T> a, const PairSide<T> b, int64_t d, int64_t shift,
                    T* __restrict__ grad) {
  constexpr int Cols = backward_cols<M>();
  __shared__ T as[kRows][kDims + 1];
  __shared__ T bs[Cols][kDims + 1];
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int64_t k0 = int64_t(blockIdx.y) * kDims;
  const int64_t i = r0 + threadIdx.x;
  const bool row_ok = i < a.n;
  const T na = (M == kCosine && row_ok) ? a.norms[i] : T(0);
  constexpr bool kNeedsDistance = M == kEuclidean || M == kCosine;
  T g[kDims];
#pragma unroll
  for (int k = 0; k < kDims; ++k) g[k] = T(0);
  // scale: the pair's coefficient (over the distance for euclidean; alpha for
  // cosine), extra: cosine's gamma; beta: cosine's sum of beta over the tile.
  T acc[Cols], dot[Cols], scale[Cols], extra[Cols];
  for (int64_t c0 = 0; c0 < b.n; c0 += Cols) {
    if (kNeedsDistance) accumulate_pairs<T, M, Cols>(as, bs, a, b, d, r0, c0, acc, dot);
    T beta = T(0);
#pragma unroll
    for (int j = 0; j < Cols; ++j) {
      const int64_t col = c0 + j;
      const T coef = (row_ok && col < b.n) ? pair_coefficient(a, b, i, col, shift) : T(0);
      extra[j] = T(0);
      if (M == kEuclidean) {
        scale[j] = coef * safe_inverse(direct_finalize<T>(M, acc[j]));
      } else if (M == kCosine) {
        const T nb = col < b.n ? b.norms[col] : T(0);
        T b_j;
        unit_cosine_grad_coefficients(coef, na, nb, finish_distance<T, M>(acc[j], dot[j], na, nb),
                                      &scale[j], &b_j, &extra[j]);
        beta += b_j;
      } else {
        scale[j] = coef;
      }
    }
    __syncthreads();
    load_tile<T, kRows>(as, a.rows, a.n, d, r0, k0);
    load_tile<T, Cols>(bs, b.rows, b.n, d, c0, k0);
    __syncthreads();
    const int kmax = d - k0 < kDims ? int(d - k0) : kDims;
#pragma unroll
    for (int k = 0; k < kDims; ++k) {
      if (k >= kmax) break;  // block-uniform; keeps g[k] in registers
      const T av = as[threadIdx.x][k];
      if (M == kCosine) g[k] += beta * av;  // a, b are unit rows
#pragma unroll
      for (int j = 0; j < Cols; ++j) {
        const T bv = bs[j][k];
        if (M == kCosine) {
          g[k] += scale[j] * (bv - av) + extra[j] * bv;
        } else if (M == kEuclidean) {
          g[k] += scale[j] * (av - bv);
        } else {
          g[k] += scale[j] * direct_grad_term<T>(M, av - bv, T(0));
        }
      }
    }
  }
  if (!row_ok) return;
#pragma unroll
  for (int k = 0; k < kDims; ++k)
    if (k0 + k < d) grad[i * d + k0 + k] = g[k];
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace detail

template <typename T, int64_t M>
void launch_forward_for_metric(const PairSide<T>& a, const PairSide<T>& b, int64_t d, int64_t shift,
                               T* s_in, T* s_out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n + detail::kRows - 1) / detail::kRows));
  detail::forward_kernel<T, M><<<grid, detail::kRows, 0, stream>>>(a, b, d, shift, s_in, s_out);
  detail::check_launch("intra_inter_sums forward kernel");
}

template <typename T, int64_t M>
void launch_backward_for_metric(const PairSide<T>& a, const PairSide<T>& b, int64_t d,
                                int64_t shift, T* grad, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.n + detail::kRows - 1) / detail::kRows),
                  static_cast<unsigned>((d + detail::kDims - 1) / detail::kDims));
  detail::backward_kernel<T, M><<<grid, detail::kRows, 0, stream>>>(a, b, d, shift, grad);
  detail::check_launch("intra_inter_sums backward kernel");
}

#define CK_INSTANTIATE_INTRA_INTER_SUMS_FOR(T, METRIC)                                        \
  template void launch_forward_for_metric<T, METRIC>(const PairSide<T>&, const PairSide<T>&,  \
                                                     int64_t, int64_t, T*, T*, cudaStream_t); \
  template void launch_backward_for_metric<T, METRIC>(const PairSide<T>&, const PairSide<T>&, \
                                                      int64_t, int64_t, T*, cudaStream_t);

#define CK_INSTANTIATE_INTRA_INTER_SUMS(METRIC)      \
  CK_INSTANTIATE_INTRA_INTER_SUMS_FOR(float, METRIC) \
  CK_INSTANTIATE_INTRA_INTER_SUMS_FOR(double, METRIC)

}  // namespace confusion_kernels
