// The tile the nearest_neighbors CUDA kernels (nearest_neighbors_kernels.cuh) work on and the
// sizes of their shared-memory lists, shared with the host code that launches them
// (nearest_neighbors_cuda.cpp, nearest_neighbors_kernels.cu); CUDA-free.
#pragma once

#include <cstddef>
#include <cstdint>

#include "confusion_kernels/neighbor_math.h"

namespace confusion_kernels {
namespace neighbors {

constexpr int kNeighborThreads = 256;    // threads of a query's block
constexpr int64_t kMaxNeighbors = 1024;  // K kept per query: a list of 2048 entries at most

// One tile: queries [rt] (row i of the tile) against references c0 .. c0 + ct - 1.
template <typename T>
struct NeighborTile {
  const T* gram;       // [rt, ct]: gram[i * ct + j] = q_i . r_{c0 + j}
  const T* ref_sq;     // [ct]: |r_{c0 + j}|^2 (unused for cosine)
  int64_t rt, ct, c0;  // rows, columns, first reference index
  int64_t self_delta;  // with has_self, query i's own reference is column i + self_delta
  bool has_self;
  int64_t metric;  // NeighborMetric
};

// Entries of a query's list in shared memory: the K kept and one round of entrants, rounded up
// to a power of two (bitonic sort).
CK_HOST_DEVICE int64_t list_capacity(int64_t k, int64_t threads) {
  int64_t p = 2;
  while (p < k + threads) p *= 2;
  return p;
}

// Dynamic shared memory of a list of p entries: indices, keys, then the fill counter.
CK_HOST_DEVICE size_t list_bytes(int64_t p, size_t key_bytes) {
  return size_t(p) * (sizeof(int64_t) + key_bytes) + sizeof(int);
}

CK_HOST_DEVICE int pow2_at_least(int n) {
  int p = 2;
  while (p < n) p *= 2;
  return p;
}

}  // namespace neighbors
}  // namespace confusion_kernels
