// nearest_neighbors kernels (nearest_neighbors_kernels.cuh), fp32 and fp64.
#include "launch_checks.h"
#include "nearest_neighbors_kernels.cuh"
#include "nearest_neighbors_launch.h"

namespace confusion_kernels {
namespace neighbors {

template <typename T>
void launch_offer(const NeighborTile<T>& tile, int64_t k, T* keys, int64_t* index, int64_t* count,
                  cudaStream_t stream) {
  if (tile.rt * tile.ct == 0) return;
  const int64_t p = list_capacity(k, kNeighborThreads);
  offer_kernel<T>
      <<<static_cast<unsigned>(tile.rt), kNeighborThreads, list_bytes(p, sizeof(T)), stream>>>(
          tile, k, p, keys, index, count);
  check_launch("nearest_neighbors list kernel");
}

template <typename T>
void launch_finish(const T* q, const T* q_sq, const T* r, const T* r_sq, int64_t n, int64_t d,
                   int64_t k, int64_t metric, const int64_t* index, T* dist, int64_t* out_index,
                   cudaStream_t stream) {
  if (n * k == 0) return;
  const size_t smem = list_bytes(pow2_at_least(static_cast<int>(k)), sizeof(T));
  finish_kernel<T><<<static_cast<unsigned>(n), kNeighborThreads, smem, stream>>>(
      q, q_sq, r, r_sq, d, k, metric, index, dist, out_index);
  check_launch("nearest_neighbors distance kernel");
}

#define CK_INSTANTIATE_NEIGHBORS(T)                                                        \
  template void launch_offer<T>(const NeighborTile<T>&, int64_t, T*, int64_t*, int64_t*,   \
                                cudaStream_t);                                             \
  template void launch_finish<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, \
                                 int64_t, int64_t, const int64_t*, T*, int64_t*, cudaStream_t);
CK_INSTANTIATE_NEIGHBORS(float)
CK_INSTANTIATE_NEIGHBORS(double)

}  // namespace neighbors
}  // namespace confusion_kernels
