// Pair-loss kernels (pair_loss_kernels.cuh), fp32 and fp64.
#include "launch_checks.h"
#include "pair_loss_kernels.cuh"
#include "pair_loss_launch.h"

namespace confusion_kernels {
namespace pair_losses {

template <typename T>
void launch_row_step(const PairLossParams<T>& p, int64_t n, int step, T* stats, T* rows,
                     cudaStream_t stream) {
  if (n == 0) return;
  row_step_kernel<T>
      <<<blocks_for(n, kPairThreads), kPairThreads, 0, stream>>>(p, n, step, stats, rows);
  check_launch("pair loss row kernel");
}

template <typename T>
void launch_stats(const PairTile<T>& tile, const PairLossParams<T>& p, bool second, T* stats,
                  cudaStream_t stream) {
  if (tile.rt * tile.ct == 0) return;
  const size_t smem = size_t(kRowThreads) * kPairLossStats * sizeof(T);
  stats_kernel<T>
      <<<static_cast<unsigned>(tile.rt), kRowThreads, smem, stream>>>(tile, p, second, stats);
  check_launch("pair loss statistics kernel");
}

template <typename T>
void launch_coefficients(const PairTile<T>& tile, const PairLossParams<T>& p, const T* stats,
                         const T* grad_rows, T* coef, T* near, cudaStream_t stream) {
  if (tile.rt * tile.ct == 0) return;
  coefficient_kernel<T><<<blocks_for(tile.rt * tile.ct, kPairThreads), kPairThreads, 0, stream>>>(
      tile, p, stats, grad_rows, coef, near);
  check_launch("pair loss coefficient kernel");
}

template <typename T>
void launch_near_grads(const PairTile<T>& tile, const T* near, T* grad_x, T* grad_r,
                       cudaStream_t stream) {
  if (tile.rt * tile.ct == 0 || tile.cosine) return;
  near_rows_kernel<T>
      <<<blocks_for(tile.rt, kPairThreads), kPairThreads, 0, stream>>>(tile, near, grad_x);
  check_launch("pair loss close-pair kernel (rows)");
  near_refs_kernel<T>
      <<<blocks_for(tile.ct, kPairThreads), kPairThreads, 0, stream>>>(tile, near, grad_r);
  check_launch("pair loss close-pair kernel (references)");
}

#define CK_INSTANTIATE_PAIR_LOSSES(T)                                                             \
  template void launch_row_step<T>(const PairLossParams<T>&, int64_t, int, T*, T*, cudaStream_t); \
  template void launch_stats<T>(const PairTile<T>&, const PairLossParams<T>&, bool, T*,           \
                                cudaStream_t);                                                    \
  template void launch_coefficients<T>(const PairTile<T>&, const PairLossParams<T>&, const T*,    \
                                       const T*, T*, T*, cudaStream_t);                           \
  template void launch_near_grads<T>(const PairTile<T>&, const T*, T*, T*, cudaStream_t);
CK_INSTANTIATE_PAIR_LOSSES(float)
CK_INSTANTIATE_PAIR_LOSSES(double)

}  // namespace pair_losses
}  // namespace confusion_kernels
