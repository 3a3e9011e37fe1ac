// C++ CPU kernels of the pair losses (Contrastive, SupCon, NT-Xent, Multi-Similarity; per pair
// pair_loss_math.h): rows x [N, D] against references r [M, D], nothing of size N x M held.
//
// pair_loss_stats: one job per row tile, in one parallel region (parallel_jobs.h); each job
// walks the reference tiles in order with one single-threaded Gram product per tile
// (gram_tiles.h) and streams every pair into its row's statistics, the exps of a row's tile
// in a batch (NT-Xent walks them twice: its positives need the log-sum-exp over the
// negatives). pair_loss_backward recomputes the tiles: each coefficient tile C gives dL/dx
// (C r) and, into its group's partial, dL/dr (C^T x), the partials added in group order
// (backward_one_pass); with one row tile or partials over 64 MB, dL/dr by reference tiles
// instead. Every output is written in a fixed order: the same bits on any number of threads.
//
// m_ij is the cosine x_i . r_j of the rows as given (the caller normalises) or the euclidean
// |x_i - r_j|: from the Gram form, and from differences where that cancels (pair_math.h's
// gram_distance / pair_distance_exact, the pair pass's rule; duplicates get 0 and gradient 0).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/gram_tiles.h"
#include "confusion_kernels/pair_loss_args.h"
#include "confusion_kernels/pair_loss_math.h"
#include "parallel_jobs.h"
#include "simd.h"
#include "tile_pairs.h"

namespace confusion_kernels {
namespace {

constexpr int64_t kRowTile = 128;
constexpr int64_t kRefTile = 512;
constexpr int64_t kNoSelf = -1;

// The rows, references and their tables, and the pair value m of a Gram tile entry.
template <typename T>
struct PairLossTiles {
  at::Tensor x, ref;
  const T *xp, *rp;
  std::vector<T> x_sq, r_sq;
  const int64_t *lab, *rlab;
  std::vector<int32_t> lab_id, rlab_id;  // the labels as int32 class ids (lane compares)
  int64_t n, m, d, shift;
  bool cosine;

  PairLossTiles(const at::Tensor& x_in, const at::Tensor& labels, const at::Tensor& ref_in,
                const at::Tensor& ref_labels, c10::optional<int64_t> self_offset, bool cos)
      : x(x_in.contiguous()),
        ref(ref_in.contiguous()),
        xp(x.data_ptr<T>()),
        rp(ref.data_ptr<T>()),
        lab(labels.data_ptr<int64_t>()),
        rlab(ref_labels.data_ptr<int64_t>()),
        n(x.size(0)),
        m(ref.size(0)),
        d(x.size(1)),
        shift(self_offset.has_value() ? *self_offset : kNoSelf),
        cosine(cos) {
    if (!cosine) {
      x_sq = squares(xp, n);
      r_sq = squares(rp, m);
    }
    // a label's id: its rank among the distinct labels of both sets
    const at::Tensor ids = std::get<1>(at::_unique(at::cat({labels, ref_labels}), true, true));
    const at::Tensor ids32 = ids.to(at::kInt).contiguous();
    const int32_t* idp = ids32.data_ptr<int32_t>();
    lab_id.assign(idp, idp + n);
    rlab_id.assign(idp + n, idp + n + m);
  }

  std::vector<T> squares(const T* rows, int64_t count) const {
    std::vector<T> out(count);
    for (int64_t i = 0; i < count; ++i) {
      T s = 0;
      for (int64_t k = 0; k < d; ++k) s += rows[i * d + k] * rows[i * d + k];
      out[i] = s;
    }
    return out;
  }

  bool left_out(int64_t i, int64_t j) const { return shift != kNoSelf && j == i + shift; }

  // Row i's left-out column within the tile starting at c0 (-1 without one; it may lie
  // outside the tile).
  int64_t left_out_column(int64_t i, int64_t c0) const {
    return shift == kNoSelf ? -1 : i + shift - c0;
  }

  // m_ij from the Gram entry g (pair_loss_value); *exact: taken from differences.
  T value(int64_t i, int64_t j, T g, bool* exact) const {
    return pair_loss_value(cosine, x_sq.data(), r_sq.data(), xp, rp, i, j, d, g, exact);
  }

  // f(c0, ct, gram) for each reference tile of the row tile [r0, r0 + rt), in order.
  template <class F>
  void for_ref_tiles(int64_t r0, int64_t rt, const F& f) const {
    for_each_column_tile(x.narrow(0, r0, rt), ref, kRefTile,
                         [&](int64_t c0, int64_t ct, const at::Tensor&, const at::Tensor& gram) {
                           f(c0, ct, gram.template data_ptr<T>());
                         });
  }
};

// e^v for v in the normal range; 0 below it (as the affinity kernels flush), the largest
// normal exp above it (only NT-Xent's share 1 / (1 + e) can ask for it: it is 0 there either
// way). On simd lanes (float: the lane exp of simd.h; double: std::exp per lane) and one value.
template <typename T>
struct ExpRange {
  static constexpr T lo = sizeof(T) == 4 ? T(-87) : T(-708), hi = sizeof(T) == 4 ? T(88) : T(709);
};

template <class L, typename T>
typename L::V clamped_exp_lanes(typename L::V v) {
  const typename L::V lo = L::set1(ExpRange<T>::lo), hi = L::set1(ExpRange<T>::hi);
  const typename L::V clamped = L::select(L::gt(v, hi), hi, L::max(v, lo));
  return L::select(L::gt(v, lo), L::exp(clamped), L::zero());
}

template <typename T>
T clamped_exp(T v) {
  return v > ExpRange<T>::lo ? std::exp(std::min(v, ExpRange<T>::hi)) : T(0);
}

// clamped_exp of every v[k], in place.
template <typename T>
void exp_in_place(T* v, int64_t n) {
  using L = simd::Widest<T>;
  int64_t k = 0;
  for (; k + L::kWidth <= n; k += L::kWidth)
    L::store(v + k, clamped_exp_lanes<L, T>(L::load(v + k)));
  for (; k < n; ++k) v[k] = clamped_exp(v[k]);
}

// Adds the e^v[k], k < n, to the online log-sum-exp (mx, sum) (v is overwritten).
template <typename T>
void lse_add_tile(T* v, int64_t n, T* mx, T* sum) {
  if (n == 0) return;
  T tile_max = v[0];
  for (int64_t k = 1; k < n; ++k) tile_max = std::max(tile_max, v[k]);
  for (int64_t k = 0; k < n; ++k) v[k] -= tile_max;
  exp_in_place(v, n);
  T tile_sum = 0;
  for (int64_t k = 0; k < n; ++k) tile_sum += v[k];
  lse_merge(tile_max, tile_sum, mx, sum);
}

// Pairs on simd lanes: lanes k .. k + W of row i's tile (Gram entries gram[k * stride]) give
// the pair values m (cosine: g; euclidean: the Gram form, pair_loss_value's rule) and the
// same-label mask; for Contrastive (with_hinges) also the hinge masks of the positive and
// negative pairs. load(k) is false when the lanes must run pair by pair: the row's left-out
// column, or a euclidean pair the Gram form cannot give (taken from differences).
template <typename T, class L>
struct PairLanes {
  using V = typename L::V;
  using M = typename L::M;
  const PairLossTiles<T>& t;
  int64_t c0, skip;
  int32_t label;
  V xn, sign, a, b;
  const T* gram;
  int64_t stride;
  V m, hp, hn;
  M same, on_p, on_n;

  PairLanes(const PairLossTiles<T>& tiles, const PairLossParams<T>& p, int64_t i, int64_t c0_in,
            const T* g, int64_t st)
      : t(tiles),
        c0(c0_in),
        skip(tiles.left_out_column(i, c0_in)),
        label(tiles.lab_id[i]),
        xn(L::set1(tiles.cosine ? T(0) : tiles.x_sq[i])),
        sign(L::set1(p.sign)),
        a(L::set1(p.a)),
        b(L::set1(p.b)),
        gram(g),
        stride(st) {}

  bool load(int64_t k, bool with_hinges) {
    if (skip >= k && skip < k + L::kWidth) return false;
    const V g = stride == 1 ? L::load(gram + k) : L::gather(gram + k * stride, stride);
    if (t.cosine) {
      m = g;
    } else {
      const V rn = L::load(t.r_sq.data() + c0 + k);
      const V d2 = L::max0(xn + rn - (g + g));  // gram_sq_distance
      if (L::bits(L::le(d2, L::set1(T(kGramExactFraction)) * (xn + rn))) != 0) return false;
      m = L::sqrt(d2);
    }
    same = L::class_eq(t.rlab_id.data() + c0 + k, label);
    if (with_hinges) {
      hp = sign * (m - a);
      hn = sign * (b - m);
      on_p = L::m_and(same, L::gt(hp, L::zero()));
      on_n = L::m_and(L::m_not(same), L::gt(hn, L::zero()));
    }
    return true;
  }
};

// Contrastive's first pass for row i against the columns [c0, c0 + ct): the hinge sums and
// non-zero counts of its positive and negative pairs, on simd lanes where PairLanes
// can, pair by pair (stream_pair) elsewhere.
template <typename T, class StreamPair>
void stream_row_contrastive(const PairLossTiles<T>& t, const PairLossParams<T>& p, int64_t i,
                            int64_t c0, int64_t ct, const T* gram, int64_t stride, T* st,
                            const StreamPair& stream_pair) {
  using L = simd::Widest<T>;
  using V = typename L::V;
  PairLanes<T, L> lanes(t, p, i, c0, gram, stride);
  const V zero = L::zero(), one = L::set1(T(1));
  V sp = zero, cp = zero, sn = zero, cn = zero;
  int64_t k = 0;
  for (; k + L::kWidth <= ct; k += L::kWidth) {
    if (!lanes.load(k, true)) {
      for (int64_t kk = k; kk < k + L::kWidth; ++kk) stream_pair(kk);
      continue;
    }
    sp = sp + L::select(lanes.on_p, lanes.hp, zero);
    cp = cp + L::select(lanes.on_p, one, zero);
    sn = sn + L::select(lanes.on_n, lanes.hn, zero);
    cn = cn + L::select(lanes.on_n, one, zero);
  }
  for (; k < ct; ++k) stream_pair(k);
  st[0] += L::hsum(sp);
  st[1] += L::hsum(cp);
  st[2] += L::hsum(sn);
  st[3] += L::hsum(cn);
}

// Row i's first-pass pairs with the columns [c0, c0 + ct) (Gram entries gram[k * stride])
// into its statistics st: each pair's non-exp parts at once, its e^v in a batch (slot0 /
// slot2: scratch of ct values).
template <typename T>
void stream_row(const PairLossTiles<T>& t, const PairLossParams<T>& p, int64_t i, int64_t c0,
                int64_t ct, const T* gram, int64_t stride, T* st, T* slot0, T* slot2) {
  int64_t n0 = 0, n2 = 0;
  const auto stream_pair = [&](int64_t jj) {
    const int64_t j = c0 + jj;
    if (t.left_out(i, j)) return;
    bool exact;
    const T mij = t.value(i, j, gram[jj * stride], &exact);
    int slot;
    const T v = pair_loss_stream(p, mij, t.lab[i] == t.rlab[j], st, &slot);
    if (slot == 0) slot0[n0++] = v;
    if (slot == 2) slot2[n2++] = v;
  };
  if (p.kind == kContrastive) {  // no exps: every pair on lanes
    stream_row_contrastive(t, p, i, c0, ct, gram, stride, st, stream_pair);
    return;
  }
  for (int64_t jj = 0; jj < ct; ++jj) stream_pair(jj);
  lse_add_tile(slot0, n0, &st[0], &st[1]);
  lse_add_tile(slot2, n2, &st[2], &st[3]);
}

// NT-Xent's second pass for row i: its positives among the columns [c0, c0 + ct).
template <typename T>
void stream_row_positives(const PairLossTiles<T>& t, const PairLossParams<T>& p, int64_t i,
                          int64_t c0, int64_t ct, const T* gram, int64_t stride, T* st) {
  for (int64_t jj = 0; jj < ct; ++jj) {
    const int64_t j = c0 + jj;
    if (t.left_out(i, j) || t.lab[i] != t.rlab[j]) continue;
    bool exact;
    ntxent_accumulate_positive(p, t.value(i, j, gram[jj * stride], &exact), st);
  }
}

template <typename T>
void stats_kernel(const PairLossTiles<T>& t, const PairLossParams<T>& p, T* stats, T* rows) {
  const int64_t outputs = pair_loss_outputs(p.kind);
  run_jobs((t.n + kRowTile - 1) / kRowTile, [&](int64_t job, int64_t) {
    const int64_t r0 = job * kRowTile, rt = std::min(kRowTile, t.n - r0);
    std::vector<T> slot0(kRefTile), slot2(kRefTile);  // a row's exponents of one tile, by slot
    for (int64_t i = r0; i < r0 + rt; ++i) pair_loss_init(p, stats + i * kPairLossStats);
    t.for_ref_tiles(r0, rt, [&](int64_t c0, int64_t ct, const T* gram) {
      for (int64_t ii = 0; ii < rt; ++ii)
        stream_row(t, p, r0 + ii, c0, ct, gram + ii * ct, 1, stats + (r0 + ii) * kPairLossStats,
                   slot0.data(), slot2.data());
    });
    for (int64_t i = r0; i < r0 + rt; ++i) pair_loss_finish_first(p, stats + i * kPairLossStats);
    if (p.kind == kNTXent) {  // the positives, with the negatives' log-sum-exp known
      t.for_ref_tiles(r0, rt, [&](int64_t c0, int64_t ct, const T* gram) {
        for (int64_t ii = 0; ii < rt; ++ii)
          stream_row_positives(t, p, r0 + ii, c0, ct, gram + ii * ct, 1,
                               stats + (r0 + ii) * kPairLossStats);
      });
    }
    for (int64_t i = r0; i < r0 + rt; ++i)
      pair_loss_rows(p, stats + i * kPairLossStats, rows + i * outputs);
  });
}

// The self case (the rows are their own references: the same tensor and labels, each (i, i)
// left out): every unordered pair of row tiles once (tile_pairs.h), one Gram tile for both
// orders of its pairs, half the products of the general path. Each tile's rows receive their
// contributions in schedule order (run_tile_pairs): the same bits on any number of threads.
// Tiles of 256 rows; below 2048 rows tiles of 64, so that a small batch still has tile
// pairs for every thread (crossover measurement: with 256 at N = 256 and 512 the fused
// SupCon was slower than the dense reference).
inline int64_t self_tile(int64_t n) { return n >= 2048 ? 256 : 64; }

template <typename T>
bool is_self(const PairLossTiles<T>& t) {
  return t.shift == 0 && t.n == t.m && t.xp == t.rp && t.lab == t.rlab;
}

// The workers (worker < this) for_self_tile_pairs runs for n rows: run_tile_pairs's, one per
// scheduled pair at most.
inline int64_t self_pair_workers(int64_t n) {
  const int64_t tiles = (n + self_tile(n) - 1) / self_tile(n);
  return job_workers(tiles * (tiles + 1) / 2);
}

// A worker's buffer of tiles x [tile, tile] values; tile(k, rows, cols) views the
// k-th as a contiguous [rows, cols] tensor. The self schedule allocates nothing per tile pair:
// thousands of small temporaries on the pool's threads left glibc holding hundreds of MB of
// freed memory (N = 16384).
template <typename T>
struct SelfScratch {
  at::Tensor buf;
  SelfScratch(int64_t tiles, int64_t tile, const at::TensorOptions& opt)
      : buf(at::empty({tiles, tile * tile}, opt)) {}
  at::Tensor tile(int64_t k, int64_t rows, int64_t cols) const {
    return buf[k].narrow(0, 0, rows * cols).view({rows, cols});
  }
};

// One SelfScratch of `tiles` tiles per worker, each its own buffer (a vector filled with one
// SelfScratch would share a single tensor among the workers).
template <typename T>
std::vector<SelfScratch<T>> self_scratch(int64_t workers, int64_t tiles, int64_t tile,
                                         const at::TensorOptions& opt) {
  std::vector<SelfScratch<T>> out;
  out.reserve(workers);
  for (int64_t w = 0; w < workers; ++w) out.emplace_back(tiles, tile, opt);
  return out;
}

// job(r0, rt, c0, ct, gram [rt, ct], worker) for every unordered pair of row tiles (r0 <= c0);
// the Gram tile is written into tile 0 of scratch[worker].
template <typename T, class Job>
void for_self_tile_pairs(const PairLossTiles<T>& t, const std::vector<SelfScratch<T>>& scratch,
                         const Job& job) {
  const int64_t tile = self_tile(t.n), tiles = (t.n + tile - 1) / tile;
  run_tile_pairs(tile_pair_schedule(tiles), tiles, [&](const TilePair& tp, int64_t worker) {
    const int64_t r0 = tp.r * tile, rt = std::min(tile, t.n - r0);
    const int64_t c0 = tp.c * tile, ct = std::min(tile, t.n - c0);
    at::Tensor gram = scratch[worker].tile(0, rt, ct);
    at::mm_out(gram, t.x.narrow(0, r0, rt), t.x.narrow(0, c0, ct).t());
    job(r0, rt, c0, ct, gram.template data_ptr<T>(), worker);
  });
}

template <typename T>
void stats_self(const PairLossTiles<T>& t, const PairLossParams<T>& p, T* stats, T* rows) {
  const int64_t outputs = pair_loss_outputs(p.kind);
  for (int64_t i = 0; i < t.n; ++i) pair_loss_init(p, stats + i * kPairLossStats);
  const int64_t workers = self_pair_workers(t.n);
  std::vector<std::vector<T>> slots(workers, std::vector<T>(2 * self_tile(t.n)));
  const std::vector<SelfScratch<T>> scratch =
      self_scratch<T>(workers, 1, self_tile(t.n), t.x.options());
  for (const bool second : {false, true}) {
    if (second && p.kind != kNTXent) break;
    for_self_tile_pairs(
        t, scratch,
        [&](int64_t r0, int64_t rt, int64_t c0, int64_t ct, const T* gram, int64_t worker) {
          T* slot0 = slots[worker].data();
          T* slot2 = slot0 + self_tile(t.n);
          for (int64_t ii = 0; ii < rt; ++ii) {  // rows of tile r against tile c
            T* st = stats + (r0 + ii) * kPairLossStats;
            if (second)
              stream_row_positives(t, p, r0 + ii, c0, ct, gram + ii * ct, 1, st);
            else
              stream_row(t, p, r0 + ii, c0, ct, gram + ii * ct, 1, st, slot0, slot2);
          }
          if (c0 == r0) return;
          for (int64_t jj = 0; jj < ct; ++jj) {  // rows of tile c against tile r: Gram columns
            T* st = stats + (c0 + jj) * kPairLossStats;
            if (second)
              stream_row_positives(t, p, c0 + jj, r0, rt, gram + jj, ct, st);
            else
              stream_row(t, p, c0 + jj, r0, rt, gram + jj, ct, st, slot0, slot2);
          }
        });
    if (!second)
      for (int64_t i = 0; i < t.n; ++i) pair_loss_finish_first(p, stats + i * kPairLossStats);
  }
  for (int64_t i = 0; i < t.n; ++i)
    pair_loss_rows(p, stats + i * kPairLossStats, rows + i * outputs);
}

// row_coefficients for Contrastive: dL/dm is g+ sign on a positive pair with a non-zero
// hinge, -g- sign on such a negative pair (pair_loss_coefficient_from_exp), on simd lanes
// where PairLanes can, pair by pair elsewhere.
template <typename T, class Direct>
T row_coefficients_contrastive(const PairLossTiles<T>& t, const PairLossParams<T>& p, int64_t i,
                               int64_t c0, int64_t ct, const T* gram, int64_t stride, const T* st,
                               const T* g, T* c, const Direct& direct) {
  using L = simd::Widest<T>;
  using V = typename L::V;
  T own = 0;
  const auto pair = [&](int64_t k) {
    const int64_t j = c0 + k;
    c[k] = 0;
    if (t.left_out(i, j)) return;
    bool exact;
    const T m = t.value(i, j, gram[k * stride], &exact);
    T coef = pair_loss_coefficient_from_exp(p, m, t.lab[i] == t.rlab[j], st, g, T(0));
    if (!t.cosine) {  // dm/dx_i = (x_i - r_j) / m
      coef = m > T(0) ? coef / m : T(0);
      if (exact) {
        direct(j, coef);
        coef = 0;
      }
      own += coef;
    }
    c[k] = coef;
  };
  PairLanes<T, L> lanes(t, p, i, c0, gram, stride);
  const V zero = L::zero(), pos = L::set1(g[0] * p.sign), neg = L::set1(-g[1] * p.sign);
  V own_lanes = zero;
  int64_t k = 0;
  for (; k + L::kWidth <= ct; k += L::kWidth) {
    if (!lanes.load(k, true)) {
      for (int64_t kk = k; kk < k + L::kWidth; ++kk) pair(kk);
      continue;
    }
    V coef = L::select(lanes.on_p, pos, zero) + L::select(lanes.on_n, neg, zero);
    if (!t.cosine) {
      coef = L::select(L::gt(lanes.m, zero), coef / lanes.m, zero);
      own_lanes = own_lanes + coef;
    }
    L::store(c + k, coef);
  }
  for (; k < ct; ++k) pair(k);
  return own + L::hsum(own_lanes);
}

// The coefficients of one row against one tile: c[k] for columns k < ct of the tile (the
// Gram entries gram[k * stride]), the e^v of the tile's pairs in a batch. Euclidean: c / m,
// and the pairs taken from differences go to `direct` (their c left 0 here). Returns the
// sum of the c / m (euclidean) for the row's own term.
template <typename T, class Direct>
T row_coefficients(const PairLossTiles<T>& t, const PairLossParams<T>& p, int64_t i, int64_t c0,
                   int64_t ct, const T* gram, int64_t stride, const T* st, const T* g, T* c,
                   T* m_buf, uint8_t* flags, const Direct& direct) {
  if (p.kind == kContrastive)
    return row_coefficients_contrastive(t, p, i, c0, ct, gram, stride, st, g, c, direct);
  for (int64_t k = 0; k < ct; ++k) {
    const int64_t j = c0 + k;
    flags[k] = t.left_out(i, j) ? 4 : 0;
    if (flags[k]) continue;
    bool exact;
    const bool same = t.lab[i] == t.rlab[j];
    const T m = t.value(i, j, gram[k * stride], &exact);
    flags[k] = (same ? 1 : 0) | (exact ? 2 : 0);
    m_buf[k] = m;
    c[k] = pair_loss_exponent(p, m, same, st);
  }
  if (p.kind != kContrastive) exp_in_place(c, ct);
  T own = 0;
  for (int64_t k = 0; k < ct; ++k) {
    if (flags[k] & 4) {
      c[k] = 0;
      continue;
    }
    const T m = m_buf[k];
    T coef = pair_loss_coefficient_from_exp(p, m, (flags[k] & 1) != 0, st, g, c[k]);
    if (!t.cosine) {  // dm/dx_i = (x_i - r_j) / m
      coef = m > T(0) ? coef / m : T(0);
      if (flags[k] & 2) {
        direct(c0 + k, coef);
        coef = 0;
      }
      own += coef;
    }
    c[k] = coef;
  }
  return own;
}

// S = C1 + C2^T of a self tile pair (backward_self) in one pass over its Gram tile: a pair's
// coefficient needs only the pair and the two rows' statistics and upstream gradients, and
// its value enters the losses of both its rows, so
// S_ij = c_i(m_ij) + c_j(m_ij) (over m for euclidean), c_r the coefficient of row r's loss
// (pair_loss_coefficient_from_exp with row r's statistics and upstream gradient). A pair taken
// from differences goes to direct(i, j, w) instead, with S_ij = 0: w of both rows, or on a
// diagonal tile (both orders visited) each order its own row's. Lanes where PairLanes can,
// pair by pair elsewhere.
template <typename T, class Direct>
void self_coefficients(const PairLossTiles<T>& t, const PairLossParams<T>& p, int64_t r0,
                       int64_t rt, int64_t c0, int64_t ct, const T* gram, const T* stats,
                       const T* g, T* s, const Direct& direct) {
  using L = simd::Widest<T>;
  using V = typename L::V;
  using M = typename L::M;
  const bool diagonal = r0 == c0;
  const int64_t outputs = pair_loss_outputs(p.kind);
  const bool contrastive = p.kind == kContrastive;
  const auto side = [&](int64_t r, T m, bool same) {  // c_r(m), over m for euclidean
    const T* st = stats + r * kPairLossStats;
    const T e = contrastive ? T(0) : clamped_exp(pair_loss_exponent(p, m, same, st));
    const T c = pair_loss_coefficient_from_exp(p, m, same, st, g + r * outputs, e);
    return t.cosine ? c : m > T(0) ? c / m : T(0);
  };
  const V zero = L::zero(), sign = L::set1(p.sign), scale = L::set1(-p.sign / p.a);
  for (int64_t ii = 0; ii < rt; ++ii) {
    const int64_t i = r0 + ii;
    T* srow = s + ii * ct;
    const T* grow = gram + ii * ct;
    const T* sti = stats + i * kPairLossStats;
    const auto pair = [&](int64_t k) {
      const int64_t j = c0 + k;
      srow[k] = 0;
      if (t.left_out(i, j)) return;
      bool exact;
      const T m = t.value(i, j, grow[k], &exact);
      const bool same = t.lab[i] == t.rlab[j];
      const T wi = side(i, m, same), wj = side(j, m, same);
      if (exact)
        direct(i, j, diagonal ? wi : wi + wj);
      else
        srow[k] = wi + wj;
    };
    PairLanes<T, L> lanes(t, p, i, c0, grow, 1);
    // row i's upstream gradients (Contrastive: g+ and g-) and statistics: lse (SupCon,
    // NT-Xent: over the negatives; Multi-Similarity: lse_P), Multi-Similarity's lse_Q,
    // NT-Xent's W, and SupCon's factor g (-sign / tau) and 1 / |P| (both 0 without a
    // positive: the row's loss is the constant 0)
    const V gi0 = L::set1(g[i * outputs]), gi1 = L::set1(contrastive ? g[i * 2 + 1] : T(0));
    const V lse_i = L::set1(sti[0]), lse_q_i = L::set1(sti[2]), w_i = L::set1(sti[1]);
    const bool has_p = p.kind == kSupCon && sti[3] != T(0);
    const V inv_pi = L::set1(has_p ? T(1) / sti[3] : T(0));
    const V factor_i = has_p ? gi0 * scale : zero;
    int64_t k = 0;
    for (; k + L::kWidth <= ct; k += L::kWidth) {
      if (!lanes.load(k, contrastive)) {
        for (int64_t kk = k; kk < k + L::kWidth; ++kk) pair(kk);
        continue;
      }
      const int64_t j0 = c0 + k;
      const T* stj = stats + j0 * kPairLossStats;  // the lanes' rows' statistics (stride 4)
      // z = -sign m / tau (SupCon, NT-Xent)
      const auto z_lanes = [&] { return (L::set1(-p.sign) * lanes.m) / L::set1(p.a); };
      V coef;
      if (contrastive) {
        const V g0 = gi0 + L::gather(g + j0 * 2, 2);
        const V g1 = gi1 + L::gather(g + j0 * 2 + 1, 2);
        coef =
            L::select(lanes.on_p, g0 * sign, zero) + L::select(lanes.on_n, zero - g1 * sign, zero);
      } else if (p.kind == kNTXent) {
        // c_r = g_r (-sign / tau) (1 / (1 + e^(lse_r - z)) - 1) on a positive pair,
        // g_r (-sign / tau) e^(z - lse_r) W_r on a negative one (lse_r over the negatives)
        const M same = lanes.same;
        const V one = L::set1(T(1)), z = z_lanes();
        const V lse_j = L::gather(stj, kPairLossStats);
        const V e_i = clamped_exp_lanes<L, T>(L::select(same, lse_i - z, z - lse_i));
        const V e_j = clamped_exp_lanes<L, T>(L::select(same, lse_j - z, z - lse_j));
        const V t_i = L::select(same, one / (one + e_i) - one, e_i * w_i);
        const V t_j =
            L::select(same, one / (one + e_j) - one, e_j * L::gather(stj + 1, kPairLossStats));
        coef = (gi0 * scale) * t_i + (L::gather(g + j0, 1) * scale) * t_j;
      } else if (p.kind == kMultiSimilarity) {
        // c_r = +-g_r sign e^(v - lse_r): v = alpha sign (m - base) and lse_P (same), or
        // beta sign (base - m) and lse_Q
        const M same = lanes.same;
        const V v = L::select(same, L::set1(p.a * p.sign) * (lanes.m - L::set1(p.c)),
                              L::set1(p.b * p.sign) * (L::set1(p.c) - lanes.m));
        const V lse_j =
            L::select(same, L::gather(stj, kPairLossStats), L::gather(stj + 2, kPairLossStats));
        const V e_i = clamped_exp_lanes<L, T>(v - L::select(same, lse_i, lse_q_i));
        const V e_j = clamped_exp_lanes<L, T>(v - lse_j);
        const V gj = L::gather(g + j0, 1);
        coef = L::select(same, gi0 * sign * e_i, (zero - gi0) * sign * e_i) +
               L::select(same, gj * sign * e_j, (zero - gj) * sign * e_j);
      } else {  // SupCon: c_r = g_r (-sign / tau) (e^(z - lse_r) - [same] / |P_r|)
        const V z = z_lanes(), pj = L::gather(stj + 3, kPairLossStats);
        const M no_p = L::m_not(L::gt(pj, zero));  // |P_j| = 0 (counts are never negative)
        const V inv_pj = L::select(no_p, zero, L::set1(T(1)) / L::max(pj, L::set1(T(1))));
        const V factor_j = L::select(no_p, zero, L::gather(g + j0 * outputs, outputs) * scale);
        const V e_i = clamped_exp_lanes<L, T>(z - lse_i);
        const V e_j = clamped_exp_lanes<L, T>(z - L::gather(stj, kPairLossStats));
        coef = factor_i * (e_i - L::select(lanes.same, inv_pi, zero)) +
               factor_j * (e_j - L::select(lanes.same, inv_pj, zero));
      }
      if (!t.cosine) coef = L::select(L::gt(lanes.m, zero), coef / lanes.m, zero);
      L::store(srow + k, coef);
    }
    for (; k < ct; ++k) pair(k);
  }
}

// Groups of the one-pass backward: row tiles dealt in contiguous runs to at most 16 groups (a
// split that depends on the sizes only), each group with its own partial dL/dref [M, D], all
// partials within 64 MB; fewer than 2 groups: the two-pass backward.
int64_t one_pass_groups(int64_t n, int64_t m, int64_t d, int64_t element_size) {
  const int64_t tiles = (n + kRowTile - 1) / kRowTile;
  const int64_t cap = (int64_t(64) << 20) / std::max<int64_t>(1, m * (d + 1) * element_size);
  return std::min<int64_t>({16, tiles, cap});
}

// A job's scratch for its row tiles: the coefficient tile and a row's pair values and flags.
template <typename T>
struct RowScratch {
  at::Tensor coef;
  std::vector<T> m_buf;
  std::vector<uint8_t> flags;
  explicit RowScratch(const PairLossTiles<T>& t)
      : coef(at::empty({kRowTile, std::min(kRefTile, t.m)}, t.x.options())),
        m_buf(kRefTile),
        flags(kRefTile) {}
};

// dL/dx of the row tile [r0, r0 + rt) against every reference tile (coefficient tiles C:
// cosine + C r, euclidean + rowsum(C) x - C r). With `part` (this job's [M, D] partial dL/dr)
// and `col_sums` (euclidean), the same C also adds C^T x and its column sums there.
template <typename T>
void row_tile_backward(const PairLossTiles<T>& t, const PairLossParams<T>& p, const T* stats,
                       const T* g, int64_t r0, int64_t rt, RowScratch<T>& s, T* grad_x,
                       at::Tensor* part, T* col_sums) {
  const int64_t outputs = pair_loss_outputs(p.kind), d = t.d;
  const T sign = t.cosine ? T(1) : T(-1);
  const at::Tensor xr = t.x.narrow(0, r0, rt);
  at::Tensor out = at::zeros({rt, d}, t.x.options());
  T* o = out.data_ptr<T>();
  T* pp = part != nullptr ? part->data_ptr<T>() : nullptr;
  std::vector<T> row_coef(rt, T(0));
  t.for_ref_tiles(r0, rt, [&](int64_t c0, int64_t ct, const T* gram) {
    T* cp = s.coef.template data_ptr<T>();
    const int64_t ld = s.coef.size(1);
    for (int64_t ii = 0; ii < rt; ++ii) {
      const int64_t i = r0 + ii;
      row_coef[ii] += row_coefficients(
          t, p, i, c0, ct, gram + ii * ct, 1, stats + i * kPairLossStats, g + i * outputs,
          cp + ii * ld, s.m_buf.data(), s.flags.data(), [&](int64_t j, T c) {
            for (int64_t k = 0; k < d; ++k) {
              const T diff = t.xp[i * d + k] - t.rp[j * d + k];
              o[ii * d + k] += c * diff;
              if (pp != nullptr) pp[j * d + k] -= c * diff;  // dm/dr_j = (r_j - x_i) / m
            }
          });
      if (col_sums != nullptr)
        for (int64_t jj = 0; jj < ct; ++jj) col_sums[c0 + jj] += cp[ii * ld + jj];
    }
    const at::Tensor w = s.coef.narrow(0, 0, rt).narrow(1, 0, ct);
    out.addmm_(w, t.ref.narrow(0, c0, ct), 1, sign);
    if (part != nullptr) part->narrow(0, c0, ct).addmm_(w.t(), xr, 1, sign);
  });
  if (!t.cosine)
    for (int64_t ii = 0; ii < rt; ++ii)
      for (int64_t k = 0; k < d; ++k) o[ii * d + k] += row_coef[ii] * t.xp[(r0 + ii) * d + k];
  std::copy(o, o + rt * d, grad_x + r0 * d);
}

// One pass over the (row tile, reference tile) pairs: each coefficient tile C gives both
// dL/dx (the group's own rows) and the group's partial dL/dr; the partials are added in group
// order after the region (the same bits on any number of threads).
template <typename T>
void backward_one_pass(const PairLossTiles<T>& t, const PairLossParams<T>& p, const T* stats,
                       const T* g, T* grad_x, T* grad_ref, int64_t groups) {
  const int64_t d = t.d, m = t.m;
  const int64_t tiles = (t.n + kRowTile - 1) / kRowTile;
  at::Tensor partial = at::zeros({groups, m, d}, t.x.options());
  std::vector<T> col_sums(t.cosine ? 0 : groups * m, T(0));
  run_jobs(groups, [&](int64_t group, int64_t) {
    at::Tensor part = partial[group];
    RowScratch<T> scratch(t);
    for (int64_t tile = tiles * group / groups; tile < tiles * (group + 1) / groups; ++tile) {
      const int64_t r0 = tile * kRowTile;
      row_tile_backward(t, p, stats, g, r0, std::min(kRowTile, t.n - r0), scratch, grad_x, &part,
                        t.cosine ? nullptr : col_sums.data() + group * m);
    }
  });
  const T* all = partial.data_ptr<T>();
  parallel_rows(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T own = 0;
      if (!t.cosine)
        for (int64_t q = 0; q < groups; ++q) own += col_sums[q * m + j];
      for (int64_t k = 0; k < d; ++k) {
        T sum = 0;
        for (int64_t q = 0; q < groups; ++q) sum += all[(q * m + j) * d + k];
        grad_ref[j * d + k] = sum + own * t.rp[j * d + k];
      }
    }
  });
}

// The two-pass backward (one row tile, or partials too large): dL/dx by row tiles, then
// dL/dr by reference tiles, each output row written by one job.
template <typename T>
void backward_kernel(const PairLossTiles<T>& t, const PairLossParams<T>& p, const T* stats,
                     const T* g, T* grad_x, T* grad_ref) {
  const int64_t outputs = pair_loss_outputs(p.kind), d = t.d;
  run_jobs((t.n + kRowTile - 1) / kRowTile, [&](int64_t job, int64_t) {
    RowScratch<T> scratch(t);
    const int64_t r0 = job * kRowTile;
    row_tile_backward(t, p, stats, g, r0, std::min(kRowTile, t.n - r0), scratch, grad_x,
                      static_cast<at::Tensor*>(nullptr), static_cast<T*>(nullptr));
  });
  // dL/dref: reference tiles against every row tile (coefficients of row i, transposed)
  run_jobs((t.m + kRefTile - 1) / kRefTile, [&](int64_t job, int64_t) {
    const int64_t c0 = job * kRefTile, ct = std::min(kRefTile, t.m - c0);
    const at::Tensor rt_rows = t.ref.narrow(0, c0, ct);
    at::Tensor coef = at::zeros({ct, std::min(kRowTile, t.n)}, t.x.options());
    at::Tensor out = at::zeros({ct, d}, t.x.options());
    std::vector<T> col_coef(ct, T(0)), c_row(ct), m_buf(ct);
    std::vector<uint8_t> flags(ct);
    T* o = out.data_ptr<T>();
    for (int64_t r0 = 0; r0 < t.n; r0 += kRowTile) {
      const int64_t rt = std::min(kRowTile, t.n - r0);
      const at::Tensor gram = at::mm(rt_rows, t.x.narrow(0, r0, rt).t()).contiguous();
      const T* gp = gram.data_ptr<T>();
      T* cp = coef.data_ptr<T>();
      const int64_t ld = coef.size(1);
      // row i's coefficients against this reference tile (column ii of the [ct, rt] Gram
      // tile), written as column ii of the [ct, rt] coefficient tile
      for (int64_t ii = 0; ii < rt; ++ii) {
        const int64_t i = r0 + ii;
        row_coefficients(t, p, i, c0, ct, gp + ii, rt, stats + i * kPairLossStats, g + i * outputs,
                         c_row.data(), m_buf.data(), flags.data(),
                         [&](int64_t j, T c) {  // dm/dr_j = (r_j - x_i) / m
                           const int64_t jj = j - c0;
                           for (int64_t k = 0; k < d; ++k)
                             o[jj * d + k] += c * (t.rp[j * d + k] - t.xp[i * d + k]);
                         });
        for (int64_t jj = 0; jj < ct; ++jj) {
          cp[jj * ld + ii] = c_row[jj];
          col_coef[jj] += c_row[jj];
        }
      }
      out.addmm_(coef.narrow(1, 0, rt), t.x.narrow(0, r0, rt), 1, t.cosine ? 1 : -1);
    }
    if (!t.cosine)
      for (int64_t jj = 0; jj < ct; ++jj)
        for (int64_t k = 0; k < d; ++k) o[jj * d + k] += col_coef[jj] * t.rp[(c0 + jj) * d + k];
    std::copy(o, o + ct * d, grad_ref + c0 * d);
  });
}

// The self case's backward (see stats_self), into grad [N, D] (zeros on entry): for a tile
// pair (P, Q) the coefficients of P's rows against Q (C1, their statistics) and of Q's rows
// against P (C2) combine to S = C1 + C2^T, since a pair's value enters both rows' losses
// (self_coefficients writes S in one pass): dL/dx_P += S x_Q (cosine) or rowsum(S) x_P - S x_Q
// (euclidean, S over m), and the same with S^T for Q; a diagonal tile has S = C1 + C1^T and
// one update. Pairs taken from differences update both rows there.
template <typename T>
void backward_self(const PairLossTiles<T>& t, const PairLossParams<T>& p, const T* stats,
                   const T* g, T* grad) {
  const int64_t d = t.d;
  const int64_t workers = self_pair_workers(t.n);
  const at::Tensor grad_t = at::from_blob(grad, {t.n, d}, t.x.options());
  // per worker: tiles 0 (Gram), 1 (S), 2 (row and column sums of S)
  const std::vector<SelfScratch<T>> scratch =
      self_scratch<T>(workers, 3, self_tile(t.n), t.x.options());
  for_self_tile_pairs(
      t, scratch,
      [&](int64_t r0, int64_t rt, int64_t c0, int64_t ct, const T* gram, int64_t worker) {
        const SelfScratch<T>& sc = scratch[worker];
        const auto pair_direct = [&](int64_t i, int64_t j, T c) {  // d(c m_ij)/dx_i, /dx_j
          for (int64_t k = 0; k < d; ++k) {
            const T diff = t.xp[i * d + k] - t.xp[j * d + k];
            grad[i * d + k] += c * diff;
            grad[j * d + k] -= c * diff;
          }
        };
        at::Tensor s_tile = sc.tile(1, rt, ct);  // S [rt, ct]
        self_coefficients(t, p, r0, rt, c0, ct, gram, stats, g, s_tile.template data_ptr<T>(),
                          pair_direct);
        const at::Tensor xp = t.x.narrow(0, r0, rt), xq = t.x.narrow(0, c0, ct);
        at::Tensor gp = grad_t.narrow(0, r0, rt);
        const T sign = t.cosine ? T(1) : T(-1);
        at::Tensor sums = sc.tile(2, 2, self_tile(t.n));
        if (!t.cosine) {
          at::Tensor row_sums = sums[0].narrow(0, 0, rt).unsqueeze(1);
          at::sum_out(row_sums, s_tile, {1}, true);
          gp.addcmul_(xp, row_sums);
        }
        gp.addmm_(s_tile, xq, 1, sign);
        if (c0 == r0) return;
        at::Tensor gq = grad_t.narrow(0, c0, ct);
        if (!t.cosine) {
          at::Tensor col_sums = sums[1].narrow(0, 0, ct).unsqueeze(1);
          at::sum_out(col_sums, s_tile.t(), {1}, true);
          gq.addcmul_(xq, col_sums);
        }
        gq.addmm_(s_tile.t(), xp, 1, sign);
      });
}

// (rows [N, outputs], stats [N, 4]): the per-row outputs with a gradient (contrastive: the
// sums of l+ and l-; the others the row's loss) and the statistics the backward and the
// reducers read (pair_loss_math.h).
std::tuple<at::Tensor, at::Tensor> pair_loss_stats_cpu(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& ref,
    const at::Tensor& ref_labels, c10::optional<int64_t> self_offset, c10::string_view loss,
    at::ArrayRef<double> params, c10::string_view metric) {
  const NoAutocast no_autocast;
  const SerialAten serial;
  check_pair_loss_inputs(x, labels, ref, ref_labels, self_offset, c10::kCPU);
  const int64_t kind = pair_loss_code(loss);
  const bool cosine = pair_metric_is_cosine(metric);
  at::Tensor rows = at::empty({x.size(0), pair_loss_outputs(kind)}, x.options());
  at::Tensor stats = at::empty({x.size(0), kPairLossStats}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_loss_stats_cpu", [&] {
    const PairLossTiles<scalar_t> t(x, labels.contiguous(), ref, ref_labels.contiguous(),
                                    self_offset, cosine);
    const PairLossParams<scalar_t> p = pair_loss_params<scalar_t>(kind, cosine, params);
    if (is_self(t))
      stats_self(t, p, stats.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>());
    else
      stats_kernel(t, p, stats.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>());
  });
  return {rows, stats};
}

// (dL/dx, dL/dref) from the upstream gradient of the rows [N, outputs] and the forward's
// statistics.
std::tuple<at::Tensor, at::Tensor> pair_loss_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& stats, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    c10::optional<int64_t> self_offset, c10::string_view loss, at::ArrayRef<double> params,
    c10::string_view metric) {
  const NoAutocast no_autocast;
  const SerialAten serial;
  check_pair_loss_inputs(x, labels, ref, ref_labels, self_offset, c10::kCPU);
  const int64_t kind = pair_loss_code(loss);
  const bool cosine = pair_metric_is_cosine(metric);
  check_pair_loss_backward_inputs(grad_rows, stats, x, kind);
  const at::Tensor g = grad_rows.to(x.scalar_type()).contiguous();
  const at::Tensor st = stats.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor grad_ref = at::empty_like(ref, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_loss_backward_cpu", [&] {
    const PairLossTiles<scalar_t> t(x, labels.contiguous(), ref, ref_labels.contiguous(),
                                    self_offset, cosine);
    const PairLossParams<scalar_t> p = pair_loss_params<scalar_t>(kind, cosine, params);
    const int64_t groups = one_pass_groups(t.n, t.m, t.d, int64_t(sizeof(scalar_t)));
    if (is_self(t)) {  // the whole gradient in dL/dx (autograd adds dL/dref to it)
      grad_x.zero_();
      grad_ref.zero_();
      backward_self(t, p, st.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                    grad_x.data_ptr<scalar_t>());
    } else if (groups >= 2)
      backward_one_pass(t, p, st.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                        grad_x.data_ptr<scalar_t>(), grad_ref.data_ptr<scalar_t>(), groups);
    else
      backward_kernel(t, p, st.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
                      grad_x.data_ptr<scalar_t>(), grad_ref.data_ptr<scalar_t>());
  });
  return {grad_x, grad_ref};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("pair_loss_stats", &pair_loss_stats_cpu);
  m.impl("pair_loss_backward", &pair_loss_backward_cpu);
}

}  // namespace confusion_kernels
