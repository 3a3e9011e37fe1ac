// The tile loop shared by the prototype-distance kernels (affinity_tiles.h,
// n_centroids_tiles.h): rows f [N, D] against prototypes w [P, D], one
// (row tile x prototype tile) block at a time, in a fixed order (deterministic
// accumulation). Each block's Gram tile f_r w_t^T comes from one matrix
// product (BLAS / cuBLAS) and goes to the caller's epilogue; nothing of size
// N x P is ever held.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

namespace confusion_kernels {

// The data of an optional tensor an epilogue receives (nullptr when undefined).
template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Rows r0 .. r0 + rt of an optional per-row tensor (undefined stays undefined).
inline at::Tensor rows_of(const at::Tensor& t, int64_t r0, int64_t rt) {
  return t.defined() ? t.narrow(0, r0, rt) : at::Tensor();
}

// tile(p0, pt, wt, g) for every prototype tile of one row tile fr, in order:
// wt = w[p0:p0+pt], g = fr wt^T (contiguous).
template <class Tile>
void for_each_column_tile(const at::Tensor& fr, const at::Tensor& w, int64_t proto_tile,
                          Tile&& tile) {
  const int64_t p = w.size(0);
  for (int64_t p0 = 0; p0 < p; p0 += proto_tile) {
    const int64_t pt = std::min(proto_tile, p - p0);
    const at::Tensor wt = w.narrow(0, p0, pt);
    tile(p0, pt, wt, at::mm(fr, wt.t()));
  }
}

// epilogue(r0, rt, p0, pt, g) for every block, g = f[r0:r0+rt] w[p0:p0+pt]^T.
template <class Epilogue>
void for_each_gram_tile(const at::Tensor& f, const at::Tensor& w, int64_t row_tile,
                        int64_t proto_tile, Epilogue&& epilogue) {
  const int64_t n = f.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += row_tile) {
    const int64_t rt = std::min(row_tile, n - r0);
    for_each_column_tile(f.narrow(0, r0, rt), w, proto_tile,
                         [&](int64_t p0, int64_t pt, const at::Tensor&, const at::Tensor& g) {
                           epilogue(r0, rt, p0, pt, g);
                         });
  }
}

}  // namespace confusion_kernels
