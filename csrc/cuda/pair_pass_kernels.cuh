#pragma once
// The pair pass in CUDA C++ (euclidean, sqeuclidean, cosine): the
// one-pass ASLoss core weighted_pair_sums_with_grad,
//   t_in = sum_{i<j, same class} (w_in[i] + w_in[j]) D(x_i, x_j), t_out likewise,
// and their gradients, each unordered pair of rows computed once.
//
// Schedule (as in confusion_kernels/triton/pair_pass.py): the rows are sorted by
// label and cut into T blocks of kBlock rows; the off-diagonal block pairs are
// visited in the rounds of a round-robin tournament (one launch per round; in a
// round every block meets exactly one other, so the CUDA blocks of a launch
// update disjoint rows with plain loads and stores), then the diagonal blocks.
// Every output element is written by one thread per launch and every sum has a
// fixed order: no atomics, bitwise-deterministic. Memory O(N * D).
//
// A block pair's operands are shifted by the mean of its row block (host side)
// before the Gram form |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, formed in exact FMA
// arithmetic over 32-dimension shared-memory chunks. Pairs the Gram form
// cannot resolve (pair_math.h: gram test, cosine eps branch) take the exact
// per-pair math for their distance and explicit differences for their
// gradient. Cosine works on unit rows (the host projects the gradient back).
//
// The kernel body uses only threadIdx / blockIdx, shared memory and
// __syncthreads(_or), so tests/cuda_emulation runs it on the CPU.
#include <cstdint>

#ifndef CK_CUDA_HOST_EMULATION
#include <cuda_runtime.h>
#define CK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {
namespace pair_pass {

constexpr int kThreads = 256;
constexpr int kBlock = 32;  // rows per block: a block pair is a 32 x 32 tile of pairs
constexpr int kChunk = 32;  // dimensions per shared-memory chunk
constexpr int kPitch = kBlock + 1;

template <typename T>
struct Smem {
  T a[kBlock][kChunk + 1];   // row block chunk, shifted
  T b[kBlock][kChunk + 1];   // column block chunk, shifted
  T w_same[kBlock][kPitch];  // Gram pairs' gradient coefficients, same class
  T w_other[kBlock][kPitch];
  T e[kBlock][kPitch];  // per-pair scratch: distances, weighted distances, exact coefficients
  T rs_same[kBlock], rs_other[kBlock], cs_same[kBlock], cs_other[kBlock];
  T na[kBlock], nb[kBlock];
  int32_t lab_r[kBlock], lab_c[kBlock];
};

// (p, q), p <= q, of CUDA block k: round `round` of the circle method over
// t_even blocks (block t_even - 1 fixed), or (k, k) in the diagonal launch.
CK_HOST_DEVICE void block_pair(int64_t k, int64_t round, int64_t t_even, bool diagonal, int64_t* p,
                               int64_t* q) {
  int64_t a = k, b = k;
  if (!diagonal) {
    const int64_t ring = t_even - 1;
    if (k == 0) {
      a = round;
      b = t_even - 1;
    } else {
      a = (round + k) % ring;
      b = (round - k + ring) % ring;
    }
  }
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// dst[rr][kk] = z[row0 + rr, k0 + kk] - m[k0 + kk] (0 outside the matrix).
template <typename T>
__device__ __forceinline__ void load_shifted(T (*dst)[kChunk + 1], const T* __restrict__ z,
                                             const T* __restrict__ m, int64_t row0, int64_t n,
                                             int64_t d, int64_t k0) {
  for (int e = threadIdx.x; e < kBlock * kChunk; e += kThreads) {
    const int rr = e / kChunk, kk = e % kChunk;
    const int64_t row = row0 + rr, dim = k0 + kk;
    dst[rr][kk] = (row < n && dim < d) ? z[row * d + dim] - m[dim] : T(0);
  }
}

// g[i, :] += sum_c coef[r][c] * (v[i, :] - v[j, :]) over the pairs of row r
// (as_row) or of column c (not as_row), one thread per row; scratch s.e holds
// the coefficients, labels pick g_same / g_other. With `linear`, the term is
// coef * v[j, :] instead (the cosine eps branch, v = the rows).
template <typename T>
__device__ void pairs_by_difference(const Smem<T>& s, int idx, bool as_row, int64_t r0, int64_t c0,
                                    int64_t n, int64_t d, const T* __restrict__ v,
                                    T* __restrict__ g_same, T* __restrict__ g_other, bool linear) {
  const int64_t own = as_row ? r0 + idx : c0 + idx;
  if (own >= n) return;
  for (int o = 0; o < kBlock; ++o) {
    const T coef = as_row ? s.e[idx][o] : s.e[o][idx];
    if (coef == T(0)) continue;
    const int64_t other = as_row ? c0 + o : r0 + o;
    const bool same = as_row ? s.lab_r[idx] == s.lab_c[o] : s.lab_r[o] == s.lab_c[idx];
    T* g = (same ? g_same : g_other) + own * d;
    const T* vo = v + own * d;
    const T* vp = v + other * d;
    for (int64_t k = 0; k < d; ++k) g[k] += linear ? coef * vp[k] : coef * (vo[k] - vp[k]);
  }
}

// One block pair (see the file comment). Grad: t_in / t_out are per-row totals of
// w * D and g_* the gradients; otherwise t_in / t_out are the row sums S_in / S_out.
template <typename T, int64_t M, bool Grad, bool Diagonal>
__global__ void __launch_bounds__(kThreads, 1)
    pair_pass_kernel(const T* __restrict__ z, const T* __restrict__ xr, const T* __restrict__ shift,
                     const int32_t* __restrict__ labels, const T* __restrict__ sq,
                     const T* __restrict__ w_in, const T* __restrict__ w_out, T* __restrict__ t_in,
                     T* __restrict__ t_out, T* __restrict__ g_in, T* __restrict__ g_out,
                     T* __restrict__ gx_in, T* __restrict__ gx_out, int64_t n, int64_t d,
                     int64_t round, int64_t t, int64_t t_even) {
  CK_DYNAMIC_SMEM(smem_raw);
  Smem<T>& s = *reinterpret_cast<Smem<T>*>(smem_raw);
  int64_t p = 0, q = 0;
  block_pair(blockIdx.x, round, t_even, Diagonal, &p, &q);
  if (q >= t) return;  // a pair with the padding block: the whole block leaves
  const int64_t r0 = p * kBlock, c0 = q * kBlock;
  const int tid = threadIdx.x;
  const int r = tid / 8, cb = tid % 8;  // this thread's pairs: (r, cb + 8 u), u < 4
  if (tid < kBlock) {
    s.lab_r[tid] = r0 + tid < n ? labels[r0 + tid] : -1;
  } else if (tid < 2 * kBlock) {
    s.lab_c[tid - kBlock] = c0 + tid - kBlock < n ? labels[c0 + tid - kBlock] : -2;
  }
  // Gram form of the shifted operands and their squared norms
  T dot[4] = {T(0), T(0), T(0), T(0)};
  T norm = T(0);
  const T* m = shift + p * d;
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    __syncthreads();
    load_shifted(s.a, z, m, r0, n, d, k0);
    load_shifted(s.b, z, m, c0, n, d, k0);
    __syncthreads();
    for (int kk = 0; kk < kChunk; ++kk) {
      const T av = s.a[r][kk];
#pragma unroll
      for (int u = 0; u < 4; ++u) dot[u] += av * s.b[cb + 8 * u][kk];
    }
    if (tid < kBlock) {
      for (int kk = 0; kk < kChunk; ++kk) norm += s.a[tid][kk] * s.a[tid][kk];
    } else if (tid < 2 * kBlock) {
      for (int kk = 0; kk < kChunk; ++kk) norm += s.b[tid - kBlock][kk] * s.b[tid - kBlock][kk];
    }
  }
  if (tid < kBlock)
    s.na[tid] = norm;
  else if (tid < 2 * kBlock)
    s.nb[tid - kBlock] = norm;
  __syncthreads();

  // Per pair: distance (exact form where needed) and, with Grad, coefficients.
  T e_coef[4], eps_coef[4];
  int rare = 0;
  const int64_t i = r0 + r;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int c = cb + 8 * u;
    const int64_t j = c0 + c;
    const bool valid = i < n && j < n && (!Diagonal || c > r);
    const bool same = s.lab_r[r] == s.lab_c[c];
    const T nsum = s.na[r] + s.nb[c];
    const T d2 = gram_sq_distance(s.na[r], s.nb[c], dot[u]);
    bool exact = d2 <= T(kGramExactFraction) * nsum;
    bool regular = true;
    if (M == kCosine && valid) {
      regular = cosine_norms_regular_sq(sq[i], sq[j]);
      exact = exact || !regular;
    }
    T dist = M == kEuclidean ? ck_sqrt(d2) : (M == kSqEuclidean ? d2 : T(0.5) * d2);
    if (valid && exact) dist = pair_distance_exact<T, T>(M, xr + i * d, xr + j * d, d);
    if (!valid) dist = T(0);
    e_coef[u] = eps_coef[u] = T(0);
    if (!Grad) {
      s.e[r][c] = dist;
      continue;
    }
    const T pw = !valid ? T(0) : (same ? w_in[i] + w_in[j] : w_out[i] + w_out[j]);
    s.e[r][c] = pw * dist;
    T coef = M == kEuclidean     ? (dist > T(0) ? pw / dist : T(0))
             : M == kSqEuclidean ? T(2) * pw
                                 : (regular ? pw : T(0));
    if (valid && exact) {
      e_coef[u] = coef;  // gradient from explicit differences below
      coef = T(0);
      if (!regular) eps_coef[u] = -pw / T(kCosineEps);  // dD/dx_i = -x_j / eps
      rare = 1;
    }
    s.w_same[r][c] = same ? coef : T(0);
    s.w_other[r][c] = same ? T(0) : coef;
  }
  __syncthreads();

  if (!Grad) {  // row and column sums of the distances, split by class
    if (tid < kBlock) {
      T in = T(0), out = T(0);
      for (int c = 0; c < kBlock; ++c) (s.lab_r[tid] == s.lab_c[c] ? in : out) += s.e[tid][c];
      s.rs_same[tid] = in;
      s.rs_other[tid] = out;
    } else if (tid < 2 * kBlock) {
      const int c = tid - kBlock;
      T in = T(0), out = T(0);
      for (int rr = 0; rr < kBlock; ++rr) (s.lab_r[rr] == s.lab_c[c] ? in : out) += s.e[rr][c];
      s.cs_same[c] = in;
      s.cs_other[c] = out;
    }
    __syncthreads();
    if (tid < kBlock && r0 + tid < n) {
      const T add_in = Diagonal ? s.rs_same[tid] + s.cs_same[tid] : s.rs_same[tid];
      const T add_out = Diagonal ? s.rs_other[tid] + s.cs_other[tid] : s.rs_other[tid];
      t_in[r0 + tid] += add_in;
      t_out[r0 + tid] += add_out;
    } else if (!Diagonal && tid >= kBlock && tid < 2 * kBlock && c0 + tid - kBlock < n) {
      t_in[c0 + tid - kBlock] += s.cs_same[tid - kBlock];
      t_out[c0 + tid - kBlock] += s.cs_other[tid - kBlock];
    }
    return;
  }

  // t rows: w * D of each pair goes to its row (w = w_i + w_j covers both directions)
  if (tid < kBlock && r0 + tid < n) {
    T in = T(0), out = T(0);
    for (int c = 0; c < kBlock; ++c) (s.lab_r[tid] == s.lab_c[c] ? in : out) += s.e[tid][c];
    t_in[r0 + tid] += in;
    t_out[r0 + tid] += out;
  }
  if (__syncthreads_or(rare)) {  // exact pairs, then the cosine eps branch
    for (int pass = 0; pass < (M == kCosine ? 2 : 1); ++pass) {
#pragma unroll
      for (int u = 0; u < 4; ++u) s.e[r][cb + 8 * u] = pass == 0 ? e_coef[u] : eps_coef[u];
      __syncthreads();
      const T* v = pass == 0 ? z : xr;
      T* gs = pass == 0 ? g_in : gx_in;
      T* go = pass == 0 ? g_out : gx_out;
      if (tid < kBlock) {
        pairs_by_difference(s, tid, true, r0, c0, n, d, v, gs, go, pass == 1);
        // on the diagonal the row's column role is this thread's too
        if (Diagonal) pairs_by_difference(s, tid, false, r0, c0, n, d, v, gs, go, pass == 1);
      } else if (!Diagonal && tid < 2 * kBlock) {
        pairs_by_difference(s, tid - kBlock, false, r0, c0, n, d, v, gs, go, pass == 1);
      }
      __syncthreads();
    }
  }

  // Gram pairs: G[i] += rowsum(W) a_i - W b and G[j] += colsum(W) b_j - W^T a
  if (Diagonal) {  // one block: the symmetric coefficients, one update per row
    T sym_s[4], sym_o[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int c = cb + 8 * u;
      sym_s[u] = s.w_same[r][c] + s.w_same[c][r];
      sym_o[u] = s.w_other[r][c] + s.w_other[c][r];
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      s.w_same[r][cb + 8 * u] = sym_s[u];
      s.w_other[r][cb + 8 * u] = sym_o[u];
    }
    __syncthreads();
  }
  if (tid < kBlock) {
    T in = T(0), out = T(0);
    for (int c = 0; c < kBlock; ++c) {
      in += s.w_same[tid][c];
      out += s.w_other[tid][c];
    }
    s.rs_same[tid] = in;
    s.rs_other[tid] = out;
  } else if (tid < 2 * kBlock) {
    const int c = tid - kBlock;
    T in = T(0), out = T(0);
    for (int rr = 0; rr < kBlock; ++rr) {
      in += s.w_same[rr][c];
      out += s.w_other[rr][c];
    }
    s.cs_same[c] = in;
    s.cs_other[c] = out;
  }
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    __syncthreads();
    load_shifted(s.a, z, m, r0, n, d, k0);
    load_shifted(s.b, z, m, c0, n, d, k0);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int kk = cb + 8 * u;
      const int64_t dim = k0 + kk;
      if (dim >= d) continue;
      if (r0 + r < n) {  // row side: (row r, dimension kk)
        T gs = s.rs_same[r] * s.a[r][kk], go = s.rs_other[r] * s.a[r][kk];
        for (int c = 0; c < kBlock; ++c) {
          gs -= s.w_same[r][c] * s.b[c][kk];
          go -= s.w_other[r][c] * s.b[c][kk];
        }
        g_in[(r0 + r) * d + dim] += gs;
        g_out[(r0 + r) * d + dim] += go;
      }
      if (!Diagonal && c0 + r < n) {  // column side: (column r, dimension kk)
        T gs = s.cs_same[r] * s.b[r][kk], go = s.cs_other[r] * s.b[r][kk];
        for (int rr = 0; rr < kBlock; ++rr) {
          gs -= s.w_same[rr][r] * s.a[rr][kk];
          go -= s.w_other[rr][r] * s.a[rr][kk];
        }
        g_in[(c0 + r) * d + dim] += gs;
        g_out[(c0 + r) * d + dim] += go;
      }
    }
  }
}

}  // namespace pair_pass
}  // namespace confusion_kernels
