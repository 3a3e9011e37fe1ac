#pragma once
// CUDA kernels of intra_inter_sums (SPEC section 2), exact per-pair form.
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
#include "intra_inter_sums_launch.h"

namespace confusion_kernels {
namespace detail {

constexpr int kRows = 128;  // rows per block = threads per block
constexpr int kCols = 32;   // columns per shared-memory tile
constexpr int kDims = 32;   // dimensions per chunk

// Loads rows [r0, r0 + rows) x dims [k0, k0 + kDims) into tile (zero padded).
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(T (*tile)[kDims + 1], const T* __restrict__ x,
                                          int64_t n, int64_t d, int64_t r0, int64_t k0) {
  for (int e = threadIdx.x; e < ROWS * kDims; e += blockDim.x) {
    const int r = e / kDims, k = e % kDims;
    const int64_t row = r0 + r, dim = k0 + k;
    tile[r][k] = (row < n && dim < d) ? x[row * d + dim] : T(0);
  }
}

// Per-pair accumulators of one row against one column tile, over all of D.
// acc[j] ends as the sum of per-dimension terms; for cosine, where x holds the
// unit rows, acc[j] = |a/|a| - b/|b||^2 and dot[j] = cos(a, b).
template <typename T, int64_t M>
__device__ __forceinline__ void accumulate_pairs(T (*as)[kDims + 1], T (*bs)[kDims + 1],
                                                 const T* __restrict__ x, int64_t n, int64_t d,
                                                 int64_t r0, int64_t c0, T* acc, T* dot) {
#pragma unroll
  for (int j = 0; j < kCols; ++j) acc[j] = dot[j] = T(0);
  for (int64_t k0 = 0; k0 < d; k0 += kDims) {
    __syncthreads();
    load_tile<T, kRows>(as, x, n, d, r0, k0);
    load_tile<T, kCols>(bs, x, n, d, c0, k0);
    __syncthreads();
    // Only the dimensions that exist (D = 2 must not pay for 32).
    const int kmax = d - k0 < kDims ? int(d - k0) : kDims;
    for (int k = 0; k < kmax; ++k) {
      const T a = as[threadIdx.x][k];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const T b = bs[j][k];
        if (M == kCosine) {
          const T t = a - b;
          acc[j] += t * t;
          dot[j] += a * b;
        } else {
          acc[j] += direct_term<T>(M, a - b);
        }
      }
    }
  }
}

// For cosine `dot` is cos(a, b); a.b = |a||b| cos(a, b) on the eps branch.
template <typename T, int64_t M>
__device__ __forceinline__ T finish_distance(T acc, T dot, T norm_a, T norm_b) {
  if (M == kCosine)
    return cosine_norms_regular(norm_a, norm_b) ? T(0.5) * acc
                                                : T(1) - norm_a * norm_b * dot / T(kCosineEps);
  return direct_finalize<T>(M, acc);
}

template <typename T>
__device__ __forceinline__ T safe_inverse(T v) {
  return v > T(0) ? T(1) / v : T(0);
}



template <typename T, int64_t M>
__global__ void __launch_bounds__(kRows)
    forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ labels,
                   const T* __restrict__ norms, int64_t n, int64_t d, T* __restrict__ s_in,
                   T* __restrict__ s_out) {
  __shared__ T as[kRows][kDims + 1];
  __shared__ T bs[kCols][kDims + 1];
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int64_t i = r0 + threadIdx.x;
  const bool row_ok = i < n;
  const int64_t li = row_ok ? labels[i] : 0;
  const T na = (M == kCosine && row_ok) ? norms[i] : T(0);
  T in = 0, out = 0;
  T acc[kCols], dot[kCols];
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    accumulate_pairs<T, M>(as, bs, x, n, d, r0, c0, acc, dot);
    if (!row_ok) continue;
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t col = c0 + j;
      if (col >= n || col == i) continue;
      const T nb = M == kCosine ? norms[col] : T(0);
      const T dist = finish_distance<T, M>(acc[j], dot[j], na, nb);
      if (labels[col] == li) in += dist; else out += dist;
    }
  }
  if (row_ok) {
    s_in[i] = in;
    s_out[i] = out;
  }
}

template <typename T, int64_t M>
__global__ void __launch_bounds__(kRows)
    backward_kernel(const T* __restrict__ x, const int64_t* __restrict__ labels,
                    const T* __restrict__ norms, const T* __restrict__ g_in,
                    const T* __restrict__ g_out, int64_t n, int64_t d, T* __restrict__ grad) {
  __shared__ T as[kRows][kDims + 1];
  __shared__ T bs[kCols][kDims + 1];
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int64_t k0 = int64_t(blockIdx.y) * kDims;
  const int64_t i = r0 + threadIdx.x;
  const bool row_ok = i < n;
  const int64_t li = row_ok ? labels[i] : 0;
  const T gi_in = row_ok ? g_in[i] : T(0), gi_out = row_ok ? g_out[i] : T(0);
  const T na = (M == kCosine && row_ok) ? norms[i] : T(0);
  const T inv_na = safe_inverse(na);
  constexpr bool kNeedsDistance = M == kEuclidean || M == kCosine;
  T g[kDims];
#pragma unroll
  for (int k = 0; k < kDims; ++k) g[k] = T(0);
  T acc[kCols], dot[kCols], scale[kCols], nb[kCols];
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    if (kNeedsDistance) accumulate_pairs<T, M>(as, bs, x, n, d, r0, c0, acc, dot);
    // scale[j]: the pair's upstream coefficient, times 1/dist for euclidean.
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t col = c0 + j;
      T coef = T(0);
      if (row_ok && col < n && col != i)
        coef = labels[col] == li ? gi_in + g_in[col] : gi_out + g_out[col];
      if (M == kEuclidean) {
        scale[j] = coef * safe_inverse(direct_finalize<T>(M, acc[j]));
      } else if (M == kCosine) {
        nb[j] = col < n ? norms[col] : T(0);
        // acc[j] becomes the distance, dot[j] flags the degenerate branch.
        acc[j] = finish_distance<T, M>(acc[j], dot[j], na, nb[j]);
        dot[j] = cosine_norms_regular(na, nb[j]) ? T(1) : T(0);
        scale[j] = coef;
      } else {
        scale[j] = coef;
      }
    }
    __syncthreads();
    load_tile<T, kRows>(as, x, n, d, r0, k0);
    load_tile<T, kCols>(bs, x, n, d, c0, k0);
    __syncthreads();
    const int kmax = d - k0 < kDims ? int(d - k0) : kDims;
#pragma unroll
    for (int k = 0; k < kDims; ++k) {
      if (k >= kmax) break;  // block-uniform; keeps g[k] in registers
      const T a = as[threadIdx.x][k];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        const T b = bs[j][k];
        if (M == kCosine) {  // a, b are unit rows (pair_math.h: exact cosine gradient)
          const T regular = -scale[j] * inv_na * ((b - a) + acc[j] * a);
          const T degenerate = -scale[j] * nb[j] * b / T(kCosineEps);
          g[k] += dot[j] != T(0) ? regular : degenerate;
        } else if (M == kEuclidean) {
          g[k] += scale[j] * (a - b);
        } else {
          g[k] += scale[j] * direct_grad_term<T>(M, a - b, T(0));
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
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace detail

template <typename T, int64_t M>
void launch_forward_for_metric(const T* x, const int64_t* labels, const T* norms, int64_t n,
                               int64_t d, T* s_in, T* s_out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + detail::kRows - 1) / detail::kRows));
  detail::forward_kernel<T, M><<<grid, detail::kRows, 0, stream>>>(x, labels, norms, n, d, s_in, s_out);
  detail::check_launch("intra_inter_sums forward kernel");
}

template <typename T, int64_t M>
void launch_backward_for_metric(const T* x, const int64_t* labels, const T* norms, const T* g_in,
                                const T* g_out, int64_t n, int64_t d, T* grad,
                                cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + detail::kRows - 1) / detail::kRows),
                  static_cast<unsigned>((d + detail::kDims - 1) / detail::kDims));
  detail::backward_kernel<T, M><<<grid, detail::kRows, 0, stream>>>(x, labels, norms, g_in, g_out, n, d, grad);
  detail::check_launch("intra_inter_sums backward kernel");
}

#define CK_INSTANTIATE_INTRA_INTER_SUMS(METRIC)                                                \
  template void launch_forward_for_metric<float, METRIC>(const float*, const int64_t*,          \
                                                         const float*, int64_t, int64_t, float*, \
                                                         float*, cudaStream_t);                 \
  template void launch_forward_for_metric<double, METRIC>(                                     \
      const double*, const int64_t*, const double*, int64_t, int64_t, double*, double*,         \
      cudaStream_t);                                                                            \
  template void launch_backward_for_metric<float, METRIC>(                                     \
      const float*, const int64_t*, const float*, const float*, const float*, int64_t, int64_t, \
      float*, cudaStream_t);                                                                    \
  template void launch_backward_for_metric<double, METRIC>(                                    \
      const double*, const int64_t*, const double*, const double*, const double*, int64_t,      \
      int64_t, double*, cudaStream_t);

}  // namespace confusion_kernels
