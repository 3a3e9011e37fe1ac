#pragma once
// CUDA kernels of nearest_neighbors (readable definition: confusion_kernels/reference/
// retrieval.py; per pair neighbor_math.h). The host (nearest_neighbors_cuda.cpp) walks tiles of
// queries [rt] x references [ct] in order, the Gram tile g = q r^T [rt, ct] from cuBLAS, and
// keeps each query's list of its K best so far in global memory (keys, indices, count; K <=
// kMaxNeighbors), sorted by (key, index):
//
//   offer_kernel   one block per query: the list in shared memory, the tile's columns in
//                  rounds of blockDim.x, a column entering (atomic slot) while the list is
//                  short or when its key is below the K-th kept; the list sorted (bitonic, in
//                  shared memory) and cut to K when the next round might not fit, and at the
//                  end of the tile when anything entered;
//   finish_kernel  one block per query: the K kept get their distances from the rows'
//                  difference (neighbor_distance) and are sorted by (distance, index).
//
// Entrants of one round land in any order, but the list is sorted by (key, index), a total
// order (indices differ): the result does not depend on the order. A later column whose key
// equals the K-th kept has a higher index, so the strict test keeps the lower index, as the
// reference does. Torch-free, so tests/cuda_emulation runs these bodies on the CPU.
#include <cstdint>
#include <limits>

#include "confusion_kernels/neighbor_math.h"
#include "kernel_prelude.cuh"
#include "nearest_neighbors_tile.h"

namespace confusion_kernels {
namespace neighbors {

// Sorts the first p entries (p a power of two) by (key, index), every thread of the block
// taking part; ends synchronised.
template <typename T>
__device__ __forceinline__ void sort_entries(T* key, int64_t* idx, int p) {
  for (int size = 2; size <= p; size *= 2)
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int t = threadIdx.x; t < p / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        if (neighbor_before(key[hi], idx[hi], key[lo], idx[lo]) == ascending) {
          const T tk = key[lo];
          key[lo] = key[hi];
          key[hi] = tk;
          const int64_t ti = idx[lo];
          idx[lo] = idx[hi];
          idx[hi] = ti;
        }
      }
      __syncthreads();
    }
}

// Sorts the n entries of the list (padded to a power of two with (+inf, INT64_MAX), which sort
// after every entry) and keeps the k best; returns min(n, k). n is the same in every thread.
template <typename T>
__device__ __forceinline__ int cut_entries(T* key, int64_t* idx, int* fill, int n, int k) {
  const int p = pow2_at_least(n);
  for (int s = n + threadIdx.x; s < p; s += blockDim.x) {
    key[s] = std::numeric_limits<T>::infinity();
    idx[s] = INT64_MAX;
  }
  __syncthreads();
  sort_entries(key, idx, p);
  const int kept = n < k ? n : k;
  if (threadIdx.x == 0) *fill = kept;
  __syncthreads();
  return kept;
}

// One block per query row i of the tile; keys / index [rt, k] and count [rt] hold the rows'
// lists (count 0 before the first tile). p = list_capacity(k, blockDim.x); dynamic shared
// memory list_bytes(p, sizeof(T)).
template <typename T>
__global__ void __launch_bounds__(kNeighborThreads)
    offer_kernel(NeighborTile<T> t, int64_t k, int64_t p, T* __restrict__ keys,
                 int64_t* __restrict__ index, int64_t* __restrict__ count) {
  CK_DYNAMIC_SMEM(smem);
  int64_t* sidx = reinterpret_cast<int64_t*>(smem);
  T* skey = reinterpret_cast<T*>(sidx + p);
  int* fill = reinterpret_cast<int*>(skey + p);
  const int64_t i = blockIdx.x;
  const int kk = static_cast<int>(k);
  T* row_keys = keys + i * k;
  int64_t* row_index = index + i * k;
  int n = static_cast<int>(count[i]);  // entries in the list, the same in every thread
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    skey[s] = row_keys[s];
    sidx[s] = row_index[s];
  }
  if (threadIdx.x == 0) *fill = n;
  __syncthreads();
  const T inf = std::numeric_limits<T>::infinity();
  T threshold = n == kk ? skey[kk - 1] : inf;  // the K-th kept key
  bool changed = false;
  const T* g = t.gram + i * t.ct;
  const int64_t self_j = t.has_self ? i + t.self_delta : -1;
  const bool cosine = t.metric == kNeighborCosine;
  for (int64_t base = 0; base < t.ct; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    if (j < t.ct && j != self_j) {
      T key = neighbor_key(g[j], cosine ? T(0) : t.ref_sq[j], t.metric);
      if (!(key == key)) key = inf;  // an overflowed Gram entry orders last
      if (n < kk || key < threshold) {
        const int s = atomicAdd(fill, 1);
        skey[s] = key;
        sidx[s] = t.c0 + j;
      }
    }
    __syncthreads();
    const int after = *fill;
    __syncthreads();  // every thread has read the count before the next round adds to it
    changed = changed || after != n;
    n = after;
    if (n + int(blockDim.x) > p) {  // the next round might not fit: n > k here
      n = cut_entries(skey, sidx, fill, n, kk);
      threshold = skey[kk - 1];
      changed = true;
    }
  }
  if (!changed) return;  // nothing entered: the list in global memory stands
  n = cut_entries(skey, sidx, fill, n, kk);
  for (int s = threadIdx.x; s < n; s += blockDim.x) {
    row_keys[s] = skey[s];
    row_index[s] = sidx[s];
  }
  if (threadIdx.x == 0) count[i] = n;
}

// One block per query i (of n, rows q [n, d]) and its k kept references index [n, k] into
// r [m, d]: dist / out_index [n, k] in the order of (distance, index), the distance from the
// rows' difference. q_sq, r_sq: the rows' squared norms (cosine: a zero row is at distance
// 1). Dynamic shared memory list_bytes(pow2_at_least(k), sizeof(T)).
template <typename T>
__global__ void __launch_bounds__(kNeighborThreads)
    finish_kernel(const T* __restrict__ q, const T* __restrict__ q_sq, const T* __restrict__ r,
                  const T* __restrict__ r_sq, int64_t d, int64_t k, int64_t metric,
                  const int64_t* __restrict__ index, T* __restrict__ dist,
                  int64_t* __restrict__ out_index) {
  CK_DYNAMIC_SMEM(smem);
  const int p = pow2_at_least(static_cast<int>(k));
  int64_t* sidx = reinterpret_cast<int64_t*>(smem);
  T* skey = reinterpret_cast<T*>(sidx + p);
  const int64_t i = blockIdx.x;
  const T* qi = q + i * d;
  for (int s = threadIdx.x; s < p; s += blockDim.x) {
    if (s < k) {
      const int64_t j = index[i * k + s];
      const T* rj = r + j * d;
      T sum = T(0);
      for (int64_t c = 0; c < d; ++c) {
        const T diff = qi[c] - rj[c];
        sum += diff * diff;
      }
      const T value = neighbor_distance(sum, metric, q_sq[i], r_sq[j]);
      skey[s] = value == value ? value : std::numeric_limits<T>::infinity();
      sidx[s] = j;
    } else {
      skey[s] = std::numeric_limits<T>::infinity();
      sidx[s] = INT64_MAX;
    }
  }
  __syncthreads();
  sort_entries(skey, sidx, p);
  for (int s = threadIdx.x; s < k; s += blockDim.x) {
    dist[i * k + s] = skey[s];
    out_index[i * k + s] = sidx[s];
  }
}

}  // namespace neighbors
}  // namespace confusion_kernels
