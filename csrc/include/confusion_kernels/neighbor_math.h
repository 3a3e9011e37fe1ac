// Per-pair math of the nearest-neighbour op (nearest_neighbors; readable definition:
// confusion_kernels/reference/retrieval.py), shared by the CPU and CUDA kernels.
//
// The references of query q are ranked by a key that differs from the distance by a
// per-query constant, from one Gram entry g = q . r and the reference's squared norm:
//   euclidean, sqeuclidean   key = |r|^2 - 2 g      (|q - r|^2 = key + |q|^2)
//   cosine                   key = -g               (q, r unit rows: 1 - q . r = key + 1)
// Order: (key, index), the lower index first between equal keys. The distances of the
// neighbours kept are computed again from the rows' difference (neighbor_distance): the Gram
// form cancels for close pairs, and duplicates then tie exactly.
#pragma once

#include <cmath>
#include <cstdint>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

enum NeighborMetric : int64_t {
  kNeighborEuclidean = 0,
  kNeighborSqEuclidean = 1,
  kNeighborCosine = 2
};

template <typename T>
CK_HOST_DEVICE T neighbor_key(T gram, T ref_sq, int64_t metric) {
  return metric == kNeighborCosine ? -gram : ref_sq - T(2) * gram;
}

// Whether (key a, index ia) comes before (key b, index ib).
template <typename T>
CK_HOST_DEVICE bool neighbor_before(T a, int64_t ia, T b, int64_t ib) {
  return a < b || (a == b && ia < ib);
}

// The distance from the squared difference s = |q - r|^2 of the rows. Cosine takes unit or
// zero rows (q_sq, r_sq: their squared norms): 1 - q . r = |q - r|^2 / 2 for unit rows,
// without the cancellation of 1 - q . r for near-parallel ones, and 1 when a row is zero.
template <typename T>
CK_HOST_DEVICE T neighbor_distance(T s, int64_t metric, T q_sq, T r_sq) {
  if (metric == kNeighborCosine) return q_sq == T(0) || r_sq == T(0) ? T(1) : s / T(2);
  return metric == kNeighborEuclidean ? std::sqrt(s) : s;
}

}  // namespace confusion_kernels
