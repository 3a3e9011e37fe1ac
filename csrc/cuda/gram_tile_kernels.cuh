#pragma once
// Gram-form tiled CUDA kernels of intra_inter_sums for euclidean, sqeuclidean
// and cosine, accumulating in fp32 (docs/math.md, "ASLoss").
//
// Tiling, as in flash-attention: a block of 256 threads owns 64 rows and
// streams tiles of 64 columns. For each tile it forms the 64 x 64 Gram block
// G = X_rows X_cols^T over all of D, 32 dimensions at a time in shared memory,
// either on tensor cores (WMMA: fp16, bf16, or tf32 for fp32 input when
// allowed) or in exact fp32 on CUDA cores (FmaGram). The epilogue turns each
// entry into a distance with gram_distance (pair_math.h, shared with the CPU
// kernel); pairs the Gram form cannot resolve (near-identical rows, cosine
// with |a||b| <= eps) are recomputed exactly from the fp32 rows, so identical
// rows get distance 0 and gradient 0.
//
// Forward writes S_in / S_out for its rows. Backward (grid.y = blocks of 128
// dimensions of dL/dx) recomputes G per column tile, turns it into per-pair
// coefficients and accumulates
//   dL/dx_i = sigma_i op(x_i) + sum_j W_ij op(x_j) + sum_j E_ij (op(x_i) - op(x_j))
// where op(x) is x (euclidean, sqeuclidean) or x/|x| (cosine), W the Gram
// pairs' coefficients and E the exact pairs' (pair_grad_exact_coefficients).
// Every output element is written by exactly one thread and every sum has a
// fixed order: no atomics, bitwise-deterministic results. Memory O(N * D).
//
// The kernel bodies use only threadIdx / blockIdx, shared memory,
// __syncthreads(_or) and WMMA, so tests/cuda_emulation can run them on the CPU.
#include <cstdint>

#ifndef CK_CUDA_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#define CK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define CK_HAS_SM80_MMA 1
#else
#define CK_HAS_SM80_MMA 0
#endif
#endif

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {
namespace gram {

constexpr int kThreads = 256;
constexpr int kRows = 64;           // rows per block
constexpr int kCols = 64;           // columns per streamed tile
constexpr int kChunk = 32;          // dimensions per shared-memory chunk of the Gram
constexpr int kGradDims = 128;      // dimensions of dL/dx per backward block (grid.y)
constexpr int kSub = 32;            // dimensions per step of the backward product
constexpr int kGPitch = kCols + 4;  // row pitch of the Gram / coefficient tiles
constexpr int kXPitch = kSub + 4;   // row pitch of the column-row tile of the product

// ---------------------------------------------------------------------------
// Storage types and conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__).
// ---------------------------------------------------------------------------
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to(float v) { return v; }
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half(v); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16(v); }
};

// ---------------------------------------------------------------------------
// How the Gram block is multiplied. kPad keeps shared rows bank-conflict free
// (FmaGram) or at the pitch WMMA needs (a multiple of 16 bytes with 32-byte
// aligned fragment pointers).
// ---------------------------------------------------------------------------
struct FmaGram {  // exact fp32 on CUDA cores
  using in_t = float;
  static constexpr bool kTensorCores = false;
  static constexpr int kPad = 1;
};
struct Tf32Gram {  // fp32 input, tf32 tensor cores (only when torch allows tf32)
  using in_t = float;
#if CK_HAS_SM80_MMA
  using frag_t = nvcuda::wmma::precision::tf32;
#else
  using frag_t = float;  // never multiplied: the host picks tensor cores on sm_80+ only
#endif
  static constexpr bool kTensorCores = true;
  static constexpr int kPad = 4;
  static constexpr int kK = 8;
};
template <typename T>
struct Wmma16Gram {  // 16-bit input (m16n16k16), fp32 accumulation
  using in_t = T;
  using frag_t = T;
  static constexpr bool kTensorCores = true;
  static constexpr int kPad = 8;
  static constexpr int kK = 16;
};
using HalfGram = Wmma16Gram<__half>;
using Bf16Gram = Wmma16Gram<__nv_bfloat16>;

// fp32 -> tf32 for the WMMA fragments and the values multiplied with them;
// the identity for fp16 / bf16 values, which tf32 holds exactly.
__device__ __forceinline__ float round_tf32(float v) {
#if CK_HAS_SM80_MMA
  return nvcuda::wmma::__float_to_tf32(v);
#else
  return v;
#endif
}

template <class Frag>
__device__ __forceinline__ void fragment_to_tf32(Frag& f) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = round_tf32(f.x[e]);
}

template <class P>
struct ChunkTiles {
  alignas(32) typename P::in_t a[kRows][kChunk + P::kPad];
  alignas(32) typename P::in_t b[kCols][kChunk + P::kPad];
};

template <class P>
struct ForwardSmem {
  ChunkTiles<P> chunk;
  alignas(32) float g[kRows][kGPitch];
  int64_t col_label[kCols];
  float col_norm[kCols];
  float part_in[kRows][4];
  float part_out[kRows][4];
};

template <class P>
struct BackwardSmem {
  // The Gram chunks and the product's column rows are never live together.
  union Stage {
    ChunkTiles<P> chunk;
    float x[kCols][kXPitch];
  };
  alignas(128) unsigned char stage[sizeof(Stage)];
  alignas(32) float g[kRows][kGPitch];  // G, then the W coefficients
  alignas(32) float e[kRows][kGPitch];  // E coefficients (exact pairs)
  int64_t col_label[kCols];
  float col_norm[kCols];
  float col_gin[kCols];
  float col_gout[kCols];
  float row_part[kRows][4];

  __device__ __forceinline__ ChunkTiles<P>& chunk() {
    return *reinterpret_cast<ChunkTiles<P>*>(stage);
  }
  using XRow = float[kXPitch];  // a row of the column-row tile of the product
  __device__ __forceinline__ XRow* x() { return reinterpret_cast<XRow*>(stage); }
};

// tile[r][k] = src[r0 + r, k0 + k], zero outside the matrix.
template <class P, int ROWS>
__device__ __forceinline__ void load_chunk(typename P::in_t (*tile)[kChunk + P::kPad],
                                           const typename P::in_t* __restrict__ src, int64_t n,
                                           int64_t d, int64_t r0, int64_t k0) {
  using C = Convert<typename P::in_t>;
  for (int e = threadIdx.x; e < ROWS * kChunk; e += kThreads) {
    const int r = e / kChunk, k = e % kChunk;
    const int64_t row = r0 + r, dim = k0 + k;
    tile[r][k] = (row < n && dim < d) ? src[row * d + dim] : C::from(0.f);
  }
}

// Stages dimensions [k0, k0 + kChunk) of the block's rows and columns, between
// barriers (the previous chunk's readers are done before it is overwritten).
template <class P>
__device__ __forceinline__ void stage_chunk(ChunkTiles<P>& t,
                                            const typename P::in_t* __restrict__ rows, int64_t n,
                                            int64_t d, int64_t r0, int64_t c0, int64_t k0) {
  __syncthreads();
  load_chunk<P, kRows>(t.a, rows, n, d, r0, k0);
  load_chunk<P, kCols>(t.b, rows, n, d, c0, k0);
  __syncthreads();
}

// g[r][c] = <rows[r0 + r], rows[c0 + c]> for the 64 x 64 block (zero rows
// outside the matrix). Starts and ends with __syncthreads().
template <class P>
__device__ __forceinline__ void gram_tile(ChunkTiles<P>& t, float (*g)[kGPitch],
                                          const typename P::in_t* __restrict__ rows, int64_t n,
                                          int64_t d, int64_t r0, int64_t c0) {
  if constexpr (!P::kTensorCores) {
    // Each thread: rows ty + 16p, columns tx + 16q (p, q < 4).
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[4][4];
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[p][q] = 0.f;
    for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
      stage_chunk<P>(t, rows, n, d, r0, c0, k0);
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          av[p] = t.a[ty + 16 * p][k];
          bv[p] = t.b[tx + 16 * p][k];
        }
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(av[p], bv[q], acc[p][q]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
      for (int q = 0; q < 4; ++q) g[ty + 16 * p][tx + 16 * q] = acc[p][q];
  } else {
#if CK_HAS_SM80_MMA
    namespace wmma = nvcuda::wmma;
    // Warp w: rows 16 (w % 4), columns 32 (w / 4) + {0, 16}.
    const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
    wmma::fragment<wmma::accumulator, 16, 16, P::kK, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
      stage_chunk<P>(t, rows, n, d, r0, c0, k0);
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += P::kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, P::kK, typename P::frag_t, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, &t.a[16 * wm][kk], kChunk + P::kPad);
        if constexpr (P::kK == 8) fragment_to_tf32(fa);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          // B = X_cols^T: element (k, c) at t.b[c][k], i.e. column-major.
          wmma::fragment<wmma::matrix_b, 16, 16, P::kK, typename P::frag_t, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, &t.b[32 * wn + 16 * q][kk], kChunk + P::kPad);
          if constexpr (P::kK == 8) fragment_to_tf32(fb);
          wmma::mma_sync(acc[q], fa, fb, acc[q]);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(&g[16 * wm][32 * wn + 16 * q], acc[q], kGPitch, wmma::mem_row_major);
#else
    __trap();  // the host selects tensor-core paths on sm_80+ only
#endif
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// Forward: s_in[i] = sum_{j != i, y_j = y_i} D(x_i, x_j), s_out[i] the rest.
// rows: the Gram operands op(x) in P::in_t (gram_operands.h: centred rows for
// euclidean / sqeuclidean, unit rows for cosine); sq_norms: |op row|^2 before
// normalisation, in fp32; exact_rows: the input rows in fp32, for the pairs
// computed exactly.
// ---------------------------------------------------------------------------
template <class P, int64_t M>
__global__ void __launch_bounds__(kThreads, 1)
    gram_forward_kernel(const typename P::in_t* __restrict__ rows,
                        const float* __restrict__ exact_rows, const int64_t* __restrict__ labels,
                        const float* __restrict__ sq_norms, int64_t n, int64_t d,
                        float* __restrict__ s_in, float* __restrict__ s_out) {
  CK_DYNAMIC_SMEM(smem_raw);
  ForwardSmem<P>& s = *reinterpret_cast<ForwardSmem<P>*>(smem_raw);
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  // Epilogue: thread owns row r and columns part + 4q of each tile.
  const int r = threadIdx.x / 4, part = threadIdx.x % 4;
  const int64_t i = r0 + r;
  const bool row_ok = i < n;
  const int64_t li = row_ok ? labels[i] : 0;
  const float na2 = row_ok ? sq_norms[i] : 0.f;
  float in = 0.f, out = 0.f;
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    __syncthreads();  // the previous epilogue is done with col_*
    if (threadIdx.x < kCols) {
      const int64_t col = c0 + threadIdx.x;
      s.col_label[threadIdx.x] = col < n ? labels[col] : 0;
      s.col_norm[threadIdx.x] = col < n ? sq_norms[col] : 0.f;
    }
    gram_tile<P>(s.chunk, s.g, rows, n, d, r0, c0);
    if (!row_ok) continue;
#pragma unroll 4
    for (int q = 0; q < kCols / 4; ++q) {
      const int j = part + 4 * q;
      const int64_t col = c0 + j;
      if (col >= n || col == i) continue;
      bool exact = false;
      float dist = gram_distance<float>(M, na2, s.col_norm[j], s.g[r][j], &exact);
      if (exact)
        dist = pair_distance_exact<float, float>(M, exact_rows + i * d, exact_rows + col * d, d);
      if (s.col_label[j] == li)
        in += dist;
      else
        out += dist;
    }
  }
  s.part_in[r][part] = in;
  s.part_out[r][part] = out;
  __syncthreads();
  if (part == 0 && row_ok) {
    s_in[i] = ((s.part_in[r][0] + s.part_in[r][1]) + s.part_in[r][2]) + s.part_in[r][3];
    s_out[i] = ((s.part_out[r][0] + s.part_out[r][1]) + s.part_out[r][2]) + s.part_out[r][3];
  }
}

// ---------------------------------------------------------------------------
// Backward: grad[i, k] for the block's 64 rows and dimensions
// [128 blockIdx.y, 128 blockIdx.y + 128), given the per-row upstream
// gradients g_in = dL/dS_in and g_out = dL/dS_out. The pair (i, j) enters
// row i's gradient with coefficient g_in[i] + g_in[j] (same class) or
// g_out[i] + g_out[j].
// ---------------------------------------------------------------------------
template <class P, int64_t M>
__global__ void __launch_bounds__(kThreads, 1)
    gram_backward_kernel(const typename P::in_t* __restrict__ rows,
                         const float* __restrict__ exact_rows, const int64_t* __restrict__ labels,
                         const float* __restrict__ sq_norms, const float* __restrict__ g_in,
                         const float* __restrict__ g_out, int64_t n, int64_t d,
                         float* __restrict__ grad) {
  using C = Convert<typename P::in_t>;
  CK_DYNAMIC_SMEM(smem_raw);
  BackwardSmem<P>& s = *reinterpret_cast<BackwardSmem<P>*>(smem_raw);
  const int64_t r0 = int64_t(blockIdx.x) * kRows;
  const int64_t dc0 = int64_t(blockIdx.y) * kGradDims;

  // Coefficient phase: thread owns row er and columns part + 4q of each tile.
  const int er = threadIdx.x / 4, part = threadIdx.x % 4;
  const int64_t ei = r0 + er;
  const bool erow_ok = ei < n;
  const int64_t li = erow_ok ? labels[ei] : 0;
  const float na2 = erow_ok ? sq_norms[ei] : 0.f;
  const float gi_in = erow_ok ? g_in[ei] : 0.f, gi_out = erow_ok ? g_out[ei] : 0.f;
  const float inv_na = (M == kCosine && na2 > 0.f) ? 1.f / ck_sqrt(na2) : 0.f;
  float sigma = 0.f;

  // Product phase: thread owns rows ty + 16a (a < 4) and dimensions
  // dc0 + tx + 16b (b < 8); sub-step c of the product covers b = 2c, 2c + 1.
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float xi[4][8];   // op(x) of the thread's rows and dimensions
  float acc[4][8];  // sum_j W_ij op(x_j) (CUDA-core path)
  float ex[4][8];   // sum_j E_ij (op(x_i) - op(x_j))
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const int64_t row = r0 + ty + 16 * a, dim = dc0 + tx + 16 * b;
      xi[a][b] = (row < n && dim < d) ? C::to(rows[row * d + dim]) : 0.f;
      acc[a][b] = 0.f;
      ex[a][b] = 0.f;
    }
#if CK_HAS_SM80_MMA
  namespace wmma = nvcuda::wmma;
  const int warp = threadIdx.x / 32, wm = warp % 4, wn = warp / 4;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> tc_acc[kGradDims / kSub];
  if constexpr (P::kTensorCores) {
#pragma unroll
    for (int c = 0; c < kGradDims / kSub; ++c) wmma::fill_fragment(tc_acc[c], 0.f);
  }
#endif

  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    __syncthreads();  // the previous product is done with col_*, g, e and the stage
    if (threadIdx.x < kCols) {
      const int64_t col = c0 + threadIdx.x;
      const bool ok = col < n;
      s.col_label[threadIdx.x] = ok ? labels[col] : 0;
      s.col_norm[threadIdx.x] = ok ? sq_norms[col] : 0.f;
      s.col_gin[threadIdx.x] = ok ? g_in[col] : 0.f;
      s.col_gout[threadIdx.x] = ok ? g_out[col] : 0.f;
    }
    gram_tile<P>(s.chunk(), s.g, rows, n, d, r0, c0);

    // G -> coefficients. W is rounded as the product will see it and sigma
    // takes the rounding error, so that sigma op(x_i) + W op(x_j) keeps the
    // difference form's accuracy (exact for euclidean / sqeuclidean).
    int local_exact = 0;
#pragma unroll 4
    for (int q = 0; q < kCols / 4; ++q) {
      const int j = part + 4 * q;
      const int64_t col = c0 + j;
      float w = 0.f, e = 0.f;
      if (erow_ok && col < n && col != ei) {
        const float coef = s.col_label[j] == li ? gi_in + s.col_gin[j] : gi_out + s.col_gout[j];
        const float dot = s.g[er][j];
        bool exact = false;
        const float dist = gram_distance<float>(M, na2, s.col_norm[j], dot, &exact);
        float self_c = 0.f, other_c = 0.f;
        if (!exact) {
          gram_grad_coefficients<float>(M, dot, dist, inv_na, &self_c, &other_c);
          self_c *= coef;
          other_c *= coef;
        } else {
          pair_grad_exact_coefficients<float, float>(M, exact_rows + ei * d, exact_rows + col * d,
                                                     d, coef, &self_c, &other_c, &e);
          local_exact |= e != 0.f;
        }
        w = P::kTensorCores ? round_tf32(other_c) : other_c;
        sigma += self_c + (other_c - w);
      }
      s.g[er][j] = w;
      s.e[er][j] = e;
    }
    const bool tile_exact = __syncthreads_or(local_exact) != 0;

#pragma unroll
    for (int c = 0; c < kGradDims / kSub; ++c) {
      const int64_t k0 = dc0 + c * kSub;
      if (k0 >= d) break;
      float (*xs)[kXPitch] = s.x();
      if (c > 0) __syncthreads();
      for (int el = threadIdx.x; el < kCols * kSub; el += kThreads) {
        const int jj = el / kSub, k = el % kSub;
        const int64_t col = c0 + jj, dim = k0 + k;
        xs[jj][k] = (col < n && dim < d) ? C::to(rows[col * d + dim]) : 0.f;
      }
      __syncthreads();
      if constexpr (P::kTensorCores) {
#if CK_HAS_SM80_MMA
#pragma unroll
        for (int kk = 0; kk < kCols; kk += 8) {
          wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, &s.g[16 * wm][kk], kGPitch);
          wmma::load_matrix_sync(fb, &xs[kk][16 * wn], kXPitch);
          fragment_to_tf32(fa);
          fragment_to_tf32(fb);
          wmma::mma_sync(tc_acc[c], fa, fb, tc_acc[c]);
        }
#endif
      } else {
#pragma unroll 4
        for (int j = 0; j < kCols; ++j) {
          float w[4];
#pragma unroll
          for (int a = 0; a < 4; ++a) w[a] = s.g[ty + 16 * a][j];
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const float xv = xs[j][tx + 16 * bb];
#pragma unroll
            for (int a = 0; a < 4; ++a) acc[a][2 * c + bb] = fmaf(w[a], xv, acc[a][2 * c + bb]);
          }
        }
      }
      if (tile_exact) {
        // op(x_i) - op(x_j) per dimension: from the input rows for euclidean /
        // sqeuclidean (the operands are centred, which would round it), from
        // the unit rows for cosine.
        float own[4][2];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const int64_t row = r0 + ty + 16 * a, dim = k0 + tx + 16 * bb;
            own[a][bb] = M == kCosine ? xi[a][2 * c + bb]
                                      : ((row < n && dim < d) ? exact_rows[row * d + dim] : 0.f);
          }
#pragma unroll 4
        for (int j = 0; j < kCols; ++j) {
          float e[4];
#pragma unroll
          for (int a = 0; a < 4; ++a) e[a] = s.e[ty + 16 * a][j];
#pragma unroll
          for (int bb = 0; bb < 2; ++bb) {
            const int64_t col = c0 + j, dim = k0 + tx + 16 * bb;
            const float xv = M == kCosine
                                 ? xs[j][tx + 16 * bb]
                                 : ((col < n && dim < d) ? exact_rows[col * d + dim] : 0.f);
#pragma unroll
            for (int a = 0; a < 4; ++a)
              ex[a][2 * c + bb] = fmaf(e[a], own[a][bb] - xv, ex[a][2 * c + bb]);
          }
        }
      }
    }
  }

  // sigma of each row, summed over its four coefficient threads in order.
  __syncthreads();
  s.row_part[er][part] = sigma;
  __syncthreads();
  float sig[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int rr = ty + 16 * a;
    sig[a] = ((s.row_part[rr][0] + s.row_part[rr][1]) + s.row_part[rr][2]) + s.row_part[rr][3];
  }
#pragma unroll
  for (int c = 0; c < kGradDims / kSub; ++c) {
    if (dc0 + c * kSub >= d) break;
    if constexpr (P::kTensorCores) {
#if CK_HAS_SM80_MMA
      // The tensor-core sums go through shared memory to the thread layout above.
      float (*os)[kXPitch] = s.x();
      __syncthreads();
      wmma::store_matrix_sync(&os[16 * wm][16 * wn], tc_acc[c], kXPitch, wmma::mem_row_major);
      __syncthreads();
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) acc[a][2 * c + bb] = os[ty + 16 * a][tx + 16 * bb];
#endif
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int bb = 0; bb < 2; ++bb) {
        const int b = 2 * c + bb;
        const int64_t row = r0 + ty + 16 * a, dim = dc0 + tx + 16 * b;
        if (row >= n || dim >= d) continue;
        const float self_x = P::kTensorCores ? round_tf32(xi[a][b]) : xi[a][b];
        grad[row * d + dim] = (sig[a] * self_x + acc[a][b]) + ex[a][b];
      }
  }
}

}  // namespace gram
}  // namespace confusion_kernels
