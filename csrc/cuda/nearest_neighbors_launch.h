// Launchers of the nearest_neighbors kernels (nearest_neighbors_kernels.cuh), callable from
// host C++; T is float or double. Instantiated in nearest_neighbors_kernels.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "nearest_neighbors_tile.h"

namespace confusion_kernels {
namespace neighbors {

// Merges one tile into the lists of its rt queries (keys / index [rt, k], count [rt]).
template <typename T>
void launch_offer(const NeighborTile<T>& tile, int64_t k, T* keys, int64_t* index, int64_t* count,
                  cudaStream_t stream);

// The n queries' k neighbours in the order of (distance, index).
template <typename T>
void launch_finish(const T* q, const T* q_sq, const T* r, const T* r_sq, int64_t n, int64_t d,
                   int64_t k, int64_t metric, const int64_t* index, T* dist, int64_t* out_index,
                   cudaStream_t stream);

}  // namespace neighbors
}  // namespace confusion_kernels
