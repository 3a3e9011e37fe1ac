// Launchers of the pair-loss kernels (pair_loss_kernels.cuh), callable from host C++; T is
// float or double. Instantiated in pair_loss_kernels.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "confusion_kernels/pair_loss_math.h"
#include "pair_loss_tile.h"

namespace confusion_kernels {
namespace pair_losses {

// step 0: pair_loss_init, 1: pair_loss_finish_first, 2: pair_loss_rows into `rows`
template <typename T>
void launch_row_step(const PairLossParams<T>& p, int64_t n, int step, T* stats, T* rows,
                     cudaStream_t stream);

template <typename T>
void launch_stats(const PairTile<T>& tile, const PairLossParams<T>& p, bool second, T* stats,
                  cudaStream_t stream);

template <typename T>
void launch_coefficients(const PairTile<T>& tile, const PairLossParams<T>& p, const T* stats,
                         const T* grad_rows, T* coef, T* near, cudaStream_t stream);

template <typename T>
void launch_near_grads(const PairTile<T>& tile, const T* near, T* grad_x, T* grad_r,
                       cudaStream_t stream);

}  // namespace pair_losses
}  // namespace confusion_kernels
