// C++ CPU kernel of the one-pass ASLoss core, weighted_pair_sums_with_grad:
//   t_in  = sum_i w_in[i]  S_in[i]  = sum_{i<j, y_i == y_j} (w_in[i]  + w_in[j])  D(x_i, x_j)
//   t_out = sum_i w_out[i] S_out[i] = sum_{i<j, y_i != y_j} (w_out[i] + w_out[j]) D(x_i, x_j)
// and their gradients dt_in/dx, dt_out/dx, in one pass over the upper triangle
// of row tiles: each unordered pair's distance is computed once and updates
// both of its rows. The weights are the loss's dL/dS (known before the pass).
// The same pass without weights and gradients is the forward of
// intra_inter_sums (pair_row_sums: each distance added to both rows' sums).
//
// Gram metrics (euclidean, sqeuclidean, cosine). Cosine is half the squared
// euclidean distance of the unit rows, so all three use one Gram form
// |a - b|^2 = |a|^2 + |b|^2 - 2 a.b. Its rounding error grows with |a|^2 + |b|^2,
// so the rows are sorted by label and every tile pair is shifted by the mean of
// its row tile: within a class tile the operands are then as small as the
// class's spread and close pairs of a clustered (trained) embedding stay on the
// fast path. Pairs the Gram form still cannot resolve (d^2 <= (|a|^2+|b|^2)/16
// after the shift, duplicates among them, and cosine's eps branch) are
// recomputed exactly with the shared per-pair math.
//
// Deterministic: each tile pair runs on one thread (its exact pairs serially)
// and the pairs that touch a tile run in a fixed order (run_tile_pairs), so a
// row's additions come in the same order whatever the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <thread>
#include <vector>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/gram_operands.h"
#include "confusion_kernels/pair_math.h"
#include "confusion_kernels/sorted_rows.h"
#include "pair_pass.h"
#include "parallel_jobs.h"
#include "simd.h"
#include "tile_pairs.h"

namespace confusion_kernels {
namespace {

// Rows per tile: N / 4 rounded up to a multiple of 64, within [128, 512]. Large
// batches take 512 (a tile pair's products run at the full single-thread product
// rate there); a batch of a few tiles takes smaller ones, so that a round of the
// schedule holds two tile pairs and both threads of a 2-core machine work: at
// N = 1024, four tiles of 256 run the pass in 0.7x the time of two tiles of 512
// (docs/design.md, "ASLoss and intra_inter_sums"). The size depends on N only,
// never on the thread count (the order of additions stays fixed).
constexpr int64_t kMaxTile = 512, kMinTile = 128;
int64_t tile_rows(int64_t n) {
  return std::min(kMaxTile, std::max(kMinTile, (n / 4 + 63) / 64 * 64));
}

struct TileGrads {
  at::Tensor same;   // [N, D] gradient of t_in in operand space
  at::Tensor other;  // [N, D] gradient of t_out in operand space
};

// grad_R += rowsum(W) * A - W B and grad_C += colsum(W) * B - W^T A for the
// coefficients W [rt, ct] of rows A (shifted row operands) and columns B. Any
// common shift of A and B gives the same result in exact arithmetic.
void add_tile_gradient(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b,
                       at::Tensor& grad, int64_t r0, int64_t c0) {
  at::Tensor gr = grad.narrow(0, r0, a.size(0));
  gr.addcmul_(w.sum(1).unsqueeze(1), a).addmm_(w, b, 1, -1);
  at::Tensor gc = grad.narrow(0, c0, b.size(0));
  gc.addcmul_(w.sum(0).unsqueeze(1), b).addmm_(w.t(), a, 1, -1);
}

// [begin, end) offsets of the runs of equal class ids in cls[0, len) (sorted).
std::vector<std::pair<int64_t, int64_t>> class_runs(const int32_t* cls, int64_t len) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t s = 0; s < len;) {
    int64_t e = s + 1;
    while (e < len && cls[e] == cls[s]) ++e;
    runs.emplace_back(s, e);
    s = e;
  }
  return runs;
}

// The same-class pairs of a tile pair, as blocks of the tile (row begin, row end,
// column begin, column end; tile-local offsets). Rows are sorted by class, so an
// off-diagonal tile pair has at most one (the last class of the row tile meeting
// the first class of the column tile) and a diagonal one a chain of diagonal
// blocks (classes with at least two rows).
struct SameClassBlock {
  int64_t r0, r1, c0, c1;
  int32_t cls;
};

std::vector<SameClassBlock> same_class_blocks(const int32_t* cls, int64_t r0, int64_t rt,
                                              int64_t c0, int64_t ct) {
  std::vector<SameClassBlock> blocks;
  if (r0 == c0) {
    for (const auto& run : class_runs(cls + r0, rt))
      if (run.second - run.first > 1)
        blocks.push_back({run.first, run.second, run.first, run.second, cls[r0 + run.first]});
  } else if (cls[r0 + rt - 1] == cls[c0]) {
    int64_t rs = rt - 1, ce = 1;
    while (rs > 0 && cls[r0 + rs - 1] == cls[c0]) --rs;
    while (ce < ct && cls[c0 + ce] == cls[c0]) ++ce;
    blocks.push_back({rs, rt, 0, ce, cls[c0]});
  }
  return blocks;
}

// Row tiles of the label-sorted rows, as boundaries 0 = b_0 < b_1 < ... = n.
// A class of more than `tile` rows is cut into near-equal tiles of its own; the
// other classes are packed whole into tiles of at most `tile` rows.
std::vector<int64_t> tile_bounds(const int32_t* cls, int64_t n, int64_t tile) {
  std::vector<int64_t> bounds{0};
  int64_t packed = 0;  // rows in the open tile
  for (const auto& run : class_runs(cls, n)) {
    const int64_t len = run.second - run.first;
    if (len > tile) {
      if (packed) bounds.push_back(run.first);
      packed = 0;
      const int64_t pieces = (len + tile - 1) / tile;
      for (int64_t k = 1; k <= pieces; ++k) bounds.push_back(run.first + len * k / pieces);
    } else {
      if (packed + len > tile) {
        bounds.push_back(run.first);
        packed = 0;
      }
      packed += len;
    }
  }
  if (bounds.back() != n) bounds.push_back(n);
  return bounds;
}

// Columns [begin, end) of add_column_sums. Not inlined on purpose: inlined into
// the OpenMP region of at::parallel_for, GCC 12 left this `omp simd` loop scalar
// (seen in the disassembly); on its own it becomes AVX2 code.
template <typename acc_t>
__attribute__((noinline)) void column_block_sums(const acc_t* wp, int64_t ld, int64_t rt,
                                                 const int32_t* rcls, const int32_t* ccls,
                                                 int64_t begin, int64_t end,
                                                 acc_t* __restrict__ col_in,
                                                 acc_t* __restrict__ col_out) {
  for (int64_t ii = 0; ii < rt; ++ii) {
    const int32_t ci = rcls[ii];
    const acc_t* __restrict__ wrow = wp + ii * ld;
#pragma omp simd
    for (int64_t jj = begin; jj < end; ++jj) {
      const bool same = ccls[jj] == ci;
      col_in[jj] += same ? wrow[jj] : acc_t(0);
      col_out[jj] += same ? acc_t(0) : wrow[jj];
    }
  }
}

// Column sums of one tile's distances W (zero where a pair is not counted),
// split by class: col_in[jj] / col_out[jj] += the same-class / other-class part
// of column jj. Each thread owns a block of columns and walks the rows in order
// (deterministic, contiguous inner loop).
template <typename acc_t>
void add_column_sums(const acc_t* wp, int64_t ld, int64_t rt, int64_t ct, const int32_t* rcls,
                     const int32_t* ccls, acc_t* col_in, acc_t* col_out) {
  parallel_rows(0, ct, 64, [&](int64_t begin, int64_t end) {
    column_block_sums(wp, ld, rt, rcls, ccls, begin, end, col_in, col_out);
  });
}

// What the row loop of one tile pair reads and writes (see one_pass).
template <typename acc_t>
struct TileView {
  const acc_t* gram;  // [rt, ct] Gram tile (same-class entries around the class mean)
  int64_t ct, r0, c0;
  bool diagonal;
  const int32_t* cls;    // class ids of all rows
  const acc_t *na, *nb;  // squared norms of the tile's shifted rows / columns
  const acc_t* nc;       // every row's squared distance to its class mean
  const acc_t* sq;       // cosine: |x|^2 of every row
  const acc_t *wi, *wo;  // Grad: the weights of every row
  acc_t* w;              // [rt, ld] out: coefficients (Grad) or distances
  int64_t ld;
  uint8_t* exact;  // [rt, ld] in: all 0; out: 1 where the pair takes the exact form
  acc_t *t_in, *t_out;
};

// Row i's constants and its slices of a tile pair's columns.
template <typename acc_t>
struct RowSlice {
  int32_t ci;
  acc_t ni, nci, sqi, wii, woi;
  const acc_t* gram;  // row i of the Gram tile
  const int32_t* cls;
  const acc_t *nb, *nc, *sq, *wi, *wo;  // the columns' values (wi, wo: Grad only)
  acc_t* w;                             // row i of the coefficients / distances
};

// Columns [jj, jj + L::kWidth) of row i: the Gram-form distances, their
// weighted sum added to tin / tout (same class / other class), the gradient
// coefficient (Grad) or distance (not Grad) of each pair stored in w (0 where
// the pair is not counted here). Returns the lanes whose pair the Gram form
// cannot resolve (bit k: column jj + k), which the caller recomputes exactly.
template <int64_t M, bool Grad, typename L, typename acc_t>
inline uint32_t row_lanes(const RowSlice<acc_t>& r, int64_t jj, typename L::V& tin,
                          typename L::V& tout) {
  using V = typename L::V;
  const V zero = L::zero();
  const auto same = L::class_eq(r.cls + jj, r.ci);
  // same-class entries of the Gram tile are around the class mean
  const V nsum =
      L::select(same, L::set1(r.nci) + L::load(r.nc + jj), L::set1(r.ni) + L::load(r.nb + jj));
  const V d2 = L::max0(nsum - L::set1(acc_t(2)) * L::load(r.gram + jj));
  auto exact = L::le(d2, L::set1(acc_t(kGramExactFraction)) * nsum);
  if constexpr (M == kCosine) {  // !cosine_norms_regular_sq(|x_i|^2, |x_j|^2), per lane
    const V eps2 = L::set1(acc_t(kCosineEps) * acc_t(kCosineEps));
    exact = L::m_or(exact, L::m_not(L::gt(L::set1(r.sqi) * L::load(r.sq + jj), eps2)));
  }
  const auto use = L::m_not(exact);
  V dist = d2;
  if constexpr (M == kEuclidean) dist = L::sqrt(d2);
  if constexpr (M == kCosine) dist = L::set1(acc_t(0.5)) * d2;
  V wd;
  if constexpr (Grad) {
    const V pw =
        L::select(same, L::set1(r.wii) + L::load(r.wi + jj), L::set1(r.woi) + L::load(r.wo + jj));
    // dD/d(operand of row i) = coef * (a_i - b_j)
    V coef = pw;
    if constexpr (M == kEuclidean) coef = L::select(L::gt(dist, zero), pw / dist, zero);
    if constexpr (M == kSqEuclidean) coef = L::set1(acc_t(2)) * pw;
    L::store(r.w + jj, L::select(use, coef, zero));
    wd = L::select(use, pw * dist, zero);
  } else {
    wd = L::select(use, dist, zero);
    L::store(r.w + jj, wd);  // the column sums read it back
  }
  tin = tin + L::select(same, wd, zero);
  tout = tout + L::select(same, zero, wd);
  return L::bits(exact);
}

// Row ii of a tile pair (pairs j > i only on the diagonal tile): row_lanes over
// its columns, AVX2 lanes for the body and one lane for the tail (simd.h: GCC
// 12 left the `omp simd` form of this loop scalar for the gradient rows). The
// pairs to recompute exactly are marked in v.exact. Returns 1 if it marked any.
template <int64_t M, bool Grad, typename acc_t>
int32_t tile_row(const TileView<acc_t>& v, int64_t ii) {
  using L = simd::Widest<acc_t>;
  using S = simd::Scalar<acc_t>;
  const int64_t i = v.r0 + ii, ct = v.ct, c0 = v.c0;
  const RowSlice<acc_t> r{v.cls[i],
                          v.na[ii],
                          v.nc[i],
                          v.sq[i],
                          Grad ? v.wi[i] : acc_t(0),
                          Grad ? v.wo[i] : acc_t(0),
                          v.gram + ii * ct,
                          v.cls + c0,
                          v.nb,
                          v.nc + c0,
                          v.sq + c0,
                          Grad ? v.wi + c0 : nullptr,
                          Grad ? v.wo + c0 : nullptr,
                          v.w + ii * v.ld};
  uint8_t* erow = v.exact + ii * v.ld;
  const int64_t first = v.diagonal ? ii + 1 : 0;
  std::fill(r.w, r.w + first, acc_t(0));
  typename L::V tin = L::zero(), tout = L::zero();
  acc_t tin_tail = 0, tout_tail = 0;
  uint32_t any = 0;
  int64_t jj = first;
  for (; jj + L::kWidth <= ct; jj += L::kWidth) {
    uint32_t bits = row_lanes<M, Grad, L>(r, jj, tin, tout);
    any |= bits;
    for (; bits; bits &= bits - 1) erow[jj + __builtin_ctz(bits)] = 1;
  }
  for (; jj < ct; ++jj) {
    const uint32_t bit = row_lanes<M, Grad, S>(r, jj, tin_tail, tout_tail);
    any |= bit;
    if (bit) erow[jj] = 1;
  }
  v.t_in[i] += L::hsum(tin) + tin_tail;
  v.t_out[i] += L::hsum(tout) + tout_tail;
  return any ? 1 : 0;
}

// A worker's scratch for its tile pairs: the coefficients / distances W, which
// pairs take the exact form (marked in the row loop, all 0 again after the
// exact pass) and which rows have any.
struct TileScratch {
  at::Tensor w_all;  // [tile, tile]
  std::vector<uint8_t> exact;
  std::vector<int32_t> flagged;
  TileScratch(int64_t tile, const at::TensorOptions& opt)
      : w_all(at::empty({tile, tile}, opt)), exact(tile * tile, 0), flagged(tile) {}
};

// A row tile's operands, shared by all its tile pairs: the rows shifted by the
// tile's mean (a one-class tile by its class mean; then the tile's same-class
// pairs need nothing more) and their squared norms.
struct RowTile {
  int64_t r0 = 0, rt = 0;
  bool one_class = false;
  at::Tensor shift, a, na;
};

// What every tile pair of one pass reads and writes.
template <typename acc_t>
struct PassData {
  const acc_t* xp;  // sorted rows (exact pairs)
  int64_t d, tile;
  const int32_t* cls;
  const acc_t *sq, *nc, *wi, *wo;
  acc_t *t_in_rows, *t_out_rows;
  TileGrads* g;
  acc_t *gxi, *gxo;
  at::Tensor zs, class_centred;
};

// One tile pair (row tile `rtile`, columns [c0, c0 + ct), c0 >= its rows): the
// Gram tile, the row loop, the exact pairs, then the gradient products (Grad)
// or the column sums. Writes only the rows of its two tiles.
template <int64_t M, bool Grad, typename acc_t>
void tile_pair(const PassData<acc_t>& p, const RowTile& rtile, int64_t c0, int64_t ct,
               TileScratch& s) {
  const int64_t r0 = rtile.r0, rt = rtile.rt, d = p.d, tile = p.tile;
  const int32_t* cls = p.cls;
  const bool diagonal = c0 == r0;
  const at::Tensor& a = rtile.a;
  const at::Tensor b = diagonal ? a : (p.zs.narrow(0, c0, ct) - rtile.shift).contiguous();
  const at::Tensor nb = diagonal ? rtile.na : (b * b).sum(1);
  at::Tensor gram = at::mm(a, b.t()).contiguous();
  // Same-class blocks of a tile holding several classes: their Gram entries
  // again, around the class mean (a small product per block), so that a tight
  // class far from its tile's mean keeps its digits.
  const std::vector<SameClassBlock> blocks = same_class_blocks(cls, r0, rt, c0, ct);
  std::vector<std::pair<at::Tensor, at::Tensor>> block_ops;  // class-centred rows, columns
  for (const SameClassBlock& blk : blocks) {
    if (rtile.one_class) {
      block_ops.emplace_back(a.narrow(0, blk.r0, blk.r1 - blk.r0),
                             b.narrow(0, blk.c0, blk.c1 - blk.c0));
      continue;
    }
    const at::Tensor sa = p.class_centred.narrow(0, r0 + blk.r0, blk.r1 - blk.r0);
    const at::Tensor sb = p.class_centred.narrow(0, c0 + blk.c0, blk.c1 - blk.c0);
    gram.narrow(0, blk.r0, blk.r1 - blk.r0)
        .narrow(1, blk.c0, blk.c1 - blk.c0)
        .copy_(at::mm(sa, sb.t()));
    block_ops.emplace_back(sa, sb);
  }
  at::Tensor w = s.w_all.narrow(0, 0, rt).narrow(1, 0, ct);
  acc_t* wp = s.w_all.template data_ptr<acc_t>();
  uint8_t* ep = s.exact.data();
  const TileView<acc_t> view{gram.data_ptr<acc_t>(),
                             ct,
                             r0,
                             c0,
                             diagonal,
                             cls,
                             rtile.na.data_ptr<acc_t>(),
                             nb.data_ptr<acc_t>(),
                             p.nc,
                             p.sq,
                             p.wi,
                             p.wo,
                             wp,
                             tile,
                             ep,
                             p.t_in_rows,
                             p.t_out_rows};
  parallel_rows(0, rt, 8, [&](int64_t begin, int64_t end) {
    for (int64_t ii = begin; ii < end; ++ii) s.flagged[ii] = tile_row<M, Grad, acc_t>(view, ii);
  });
  // The pairs the Gram form cannot resolve, exactly and serially (they update two rows).
  for (int64_t ii = 0; ii < rt; ++ii) {
    if (!s.flagged[ii]) continue;
    const int64_t i = r0 + ii;
    for (int64_t jj = 0; jj < ct; ++jj) {
      if (!ep[ii * tile + jj]) continue;
      ep[ii * tile + jj] = 0;
      const int64_t j = c0 + jj;
      const bool same = cls[j] == cls[i];
      const acc_t dist = pair_distance_exact<acc_t, acc_t>(M, p.xp + i * d, p.xp + j * d, d);
      acc_t* rows = same ? p.t_in_rows : p.t_out_rows;
      if constexpr (Grad) {
        const acc_t pw = same ? p.wi[i] + p.wi[j] : p.wo[i] + p.wo[j];
        rows[i] += pw * dist;
        acc_t* gx = same ? p.gxi : p.gxo;
        pair_grad_exact_accumulate<acc_t, acc_t>(M, p.xp + i * d, p.xp + j * d, d, pw, gx + i * d);
        pair_grad_exact_accumulate<acc_t, acc_t>(M, p.xp + j * d, p.xp + i * d, d, pw, gx + j * d);
      } else {
        rows[i] += dist;
        rows[j] += dist;
      }
    }
  }
  if constexpr (Grad) {
    // same-class blocks on their class-centred operands, then the rest of W
    for (size_t k = 0; k < blocks.size(); ++k) {
      const SameClassBlock& blk = blocks[k];
      at::Tensor sub = w.narrow(0, blk.r0, blk.r1 - blk.r0).narrow(1, blk.c0, blk.c1 - blk.c0);
      add_tile_gradient(sub, block_ops[k].first, block_ops[k].second, p.g->same, r0 + blk.r0,
                        c0 + blk.c0);
      sub.zero_();
    }
    const bool all_same = cls[r0] == cls[c0 + ct - 1];  // one class covers both tiles
    if (!all_same) add_tile_gradient(w, a, b, p.g->other, r0, c0);
  } else {
    add_column_sums<acc_t>(wp, tile, rt, ct, cls + r0, cls + c0, p.t_in_rows + c0,
                           p.t_out_rows + c0);
  }
}

// Per class (a run of the sorted rows) the mean of its finite rows (zeros where
// none is finite) into means [classes, d], every row minus its class mean into
// centred and that difference's squared norm into nc. Serial, O(N D).
template <typename acc_t>
void class_centred_rows(const acc_t* z, const bool* finite, const int32_t* cls, int64_t n,
                        int64_t d, acc_t* means, acc_t* centred, acc_t* nc) {
  for (const auto& run : class_runs(cls, n)) {
    acc_t* mean = means + int64_t(cls[run.first]) * d;
    int64_t count = 0;
    for (int64_t i = run.first; i < run.second; ++i) {
      if (!finite[i]) continue;
      ++count;
      for (int64_t k = 0; k < d; ++k) mean[k] += z[i * d + k];
    }
    const acc_t divisor = acc_t(std::max<int64_t>(count, 1));
    for (int64_t k = 0; k < d; ++k) mean[k] /= divisor;
    for (int64_t i = run.first; i < run.second; ++i) {
      acc_t sq = 0;
      for (int64_t k = 0; k < d; ++k) {
        const acc_t c = z[i * d + k] - mean[k];
        centred[i * d + k] = c;
        sq += c * c;
      }
      nc[i] = sq;
    }
  }
}

// The pass over the upper triangle of tile pairs, scheduled by
// tile_pair_schedule and run_tile_pairs: one parallel region for all of them,
// each tile pair on one thread. With Grad, the pair (i, j) adds w * D(x_i, x_j) to
// row i's total (w = w_i + w_j of its kind) and w * dD/dx to both rows'
// gradients; without Grad it adds D(x_i, x_j) to the row sums of both i and j
// (S_in / S_out in t_in_rows / t_out_rows).
template <int64_t M, bool Grad, typename acc_t>
void one_pass(const at::Tensor& xs, const at::Tensor& zs, const acc_t* sq, const int32_t* cls,
              const acc_t* wi, const acc_t* wo, acc_t* t_in_rows, acc_t* t_out_rows, TileGrads* g,
              acc_t* gxi, acc_t* gxo) {
  const int64_t n = xs.size(0), d = xs.size(1);
  const int64_t tile = std::min(tile_rows(n), n);
  const std::vector<int64_t> bounds = tile_bounds(cls, n, tile);
  const int64_t tiles = static_cast<int64_t>(bounds.size()) - 1;
  // Class means (of the finite rows) and every row's squared distance to its
  // class mean: same-class pairs take their Gram form around the class mean.
  const int64_t classes = n ? int64_t(cls[n - 1]) + 1 : 0;
  const at::Tensor means = at::zeros({classes, d}, zs.options());
  const at::Tensor class_centred = at::empty_like(zs);
  const at::Tensor nc = at::empty({n}, zs.options());
  class_centred_rows<acc_t>(zs.data_ptr<acc_t>(), finite_rows(zs).data_ptr<bool>(), cls, n, d,
                            means.data_ptr<acc_t>(), class_centred.data_ptr<acc_t>(),
                            nc.data_ptr<acc_t>());
  std::vector<RowTile> row_tiles(tiles);
  run_jobs(tiles, [&](int64_t t, int64_t) {
    RowTile& rtile = row_tiles[t];
    rtile.r0 = bounds[t];
    rtile.rt = bounds[t + 1] - rtile.r0;
    const at::Tensor zr = zs.narrow(0, rtile.r0, rtile.rt);
    rtile.one_class = cls[rtile.r0] == cls[rtile.r0 + rtile.rt - 1];
    rtile.shift = rtile.one_class ? means.narrow(0, cls[rtile.r0], 1) : finite_row_mean(zr, 0);
    rtile.a = (zr - rtile.shift).contiguous();
    rtile.na = (rtile.a * rtile.a).sum(1);
  });
  const PassData<acc_t> data{
      xs.data_ptr<acc_t>(), d, tile, cls, sq, nc.data_ptr<acc_t>(), wi, wo, t_in_rows,
      t_out_rows,           g, gxi,  gxo, zs, class_centred};
  const std::vector<TilePair> pairs = tile_pair_schedule(tiles);
  std::vector<TileScratch> scratch;
  for (int64_t k = 0; k < job_workers(static_cast<int64_t>(pairs.size())); ++k)
    scratch.emplace_back(tile, xs.options());
  run_tile_pairs(pairs, tiles, [&](const TilePair& tp, int64_t worker) {
    const int64_t c0 = bounds[tp.c], ct = bounds[tp.c + 1] - c0;
    tile_pair<M, Grad, acc_t>(data, row_tiles[tp.r], c0, ct, scratch[worker]);
  });
}

}  // namespace

PairSums pair_pass_with_grad(const at::Tensor& xa, const at::Tensor& labels, const at::Tensor& w_in,
                             const at::Tensor& w_out, int64_t metric) {
  const int64_t n = xa.size(0);
  const SortedRows r = sort_rows(xa, labels, metric);
  const at::Tensor wis = to_sorted(r, w_in), wos = to_sorted(r, w_out);
  at::Tensor t_in_rows = at::zeros({n}, r.xs.options());
  at::Tensor t_out_rows = at::zeros({n}, r.xs.options());
  TileGrads g{at::zeros_like(r.xs), at::zeros_like(r.xs)};
  at::Tensor gx_in = at::zeros_like(r.xs), gx_out = at::zeros_like(r.xs);
  AT_DISPATCH_FLOATING_TYPES(r.xs.scalar_type(), "pair_pass_with_grad", [&] {
    dispatch_gram_metric(metric, "pair_pass_with_grad", [&](auto m) {
      one_pass<decltype(m)::value, true, scalar_t>(
          r.xs, r.zs, r.sq.data_ptr<scalar_t>(), r.cls.data_ptr<int32_t>(),
          wis.data_ptr<scalar_t>(), wos.data_ptr<scalar_t>(), t_in_rows.data_ptr<scalar_t>(),
          t_out_rows.data_ptr<scalar_t>(), &g, gx_in.data_ptr<scalar_t>(),
          gx_out.data_ptr<scalar_t>());
    });
  });
  return {t_in_rows.sum(), t_out_rows.sum(), row_gradient(r, metric, g.same, gx_in),
          row_gradient(r, metric, g.other, gx_out)};
}

std::tuple<at::Tensor, at::Tensor> pair_row_sums(const at::Tensor& xa, const at::Tensor& labels,
                                                 int64_t metric) {
  const int64_t n = xa.size(0);
  const SortedRows r = sort_rows(xa, labels, metric);
  at::Tensor s_in = at::zeros({n}, r.xs.options()), s_out = at::zeros({n}, r.xs.options());
  AT_DISPATCH_FLOATING_TYPES(r.xs.scalar_type(), "pair_row_sums", [&] {
    dispatch_gram_metric(metric, "pair_row_sums", [&](auto m) {
      one_pass<decltype(m)::value, false, scalar_t>(
          r.xs, r.zs, r.sq.data_ptr<scalar_t>(), r.cls.data_ptr<int32_t>(), nullptr, nullptr,
          s_in.data_ptr<scalar_t>(), s_out.data_ptr<scalar_t>(), nullptr, nullptr, nullptr);
    });
  });
  return {to_input_order(r, s_in), to_input_order(r, s_out)};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weighted_pair_sums_with_grad_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_in, const at::Tensor& w_out,
    c10::string_view metric_name) {
  const NoAutocast no_autocast;
  const SerialAten serial;
  const RowSumsInputs in = prepare_pair_pass_inputs(x, labels, w_in, w_out, metric_name, c10::kCPU);
  const PairSums r = pair_pass_with_grad(in.x, in.labels, w_in, w_out, in.metric);
  return {r.t_in, r.t_out, r.grad_in.to(x.scalar_type()), r.grad_out.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("weighted_pair_sums_with_grad", &weighted_pair_sums_with_grad_cpu);
}

}  // namespace confusion_kernels
