// The tile the pair-loss CUDA kernels (pair_loss_kernels.cuh) work on, shared with the host
// code that fills it (pair_losses_cuda.cpp); CUDA-free.
#pragma once

#include <cstdint>

#include "confusion_kernels/pair_loss_math.h"

namespace confusion_kernels {
namespace pair_losses {

// A tile: rows x [rt, d] with squared norms xn, labels lab; references r [ct, d], rn, rlab;
// the Gram tile g [rt, ct]. Pair (i, j) of the tile is left out when `has_self` and
// j == i + self_delta (the caller's x_i is ref_{i + self_offset}).
template <typename T>
struct PairTile {
  const T* g;
  const T* x;
  const T* xn;
  const int64_t* lab;
  const T* r;
  const T* rn;
  const int64_t* rlab;
  int64_t rt, ct, d, self_delta;
  bool has_self, cosine;

  CK_HOST_DEVICE bool left_out(int64_t i, int64_t j) const {
    return has_self && j == i + self_delta;
  }
  // m_ij (pair_loss_value); *exact: a euclidean pair taken from differences.
  CK_HOST_DEVICE T value(int64_t i, int64_t j, bool* exact) const {
    return pair_loss_value(cosine, xn, rn, x, r, i, j, d, g[i * ct + j], exact);
  }
};

}  // namespace pair_losses
}  // namespace confusion_kernels
