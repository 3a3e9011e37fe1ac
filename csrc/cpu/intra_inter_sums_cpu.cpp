// C++ CPU kernels of intra_inter_sums: for every row i
//   S_in[i]  = sum_{j != i, y_j == y_i} D(x_i, x_j)
//   S_out[i] = sum_{j : y_j != y_i}     D(x_i, x_j)
// and its backward, in O(N*D + tile) memory; and of its rectangular form
// intra_inter_sums_rect (columns from a reference set, pair_sides.h).
//
// Two algorithms per op, chosen by the Python router (confusion_kernels/_routing.py:
// euclidean / sqeuclidean with D > 8 and cosine take the Gram form):
//   * 'pair_pass' (square op): the pair pass (Gram form) of pair_pass_cpu.cpp, each
//     unordered pair once, class-aligned tiles shifted by their mean, exact
//     recomputation of the pairs the Gram form cannot resolve;
//   * 'gram_tiles' (rectangular op): Gram tiles of rows against columns, the same
//     exact recomputation;
//   * 'direct' (both): loops over a transposed copy so the inner loop runs over
//     contiguous columns and vectorises; every metric.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/direct_pass.h"
#include "confusion_kernels/gram_tiles.h"
#include "confusion_kernels/pair_math.h"
#include "pair_pass.h"
#include "parallel_jobs.h"
#include "simd.h"

namespace confusion_kernels {
namespace {

constexpr int64_t kDirectColBlock = 256;
// Which algorithm runs is the router's choice (confusion_kernels/_routing.py): on CPU the
// square op runs 'direct' or 'pair_pass', the rectangular op 'direct' or 'gram_tiles'.

// ---------------------------------------------------------------------------
// Direct loops (manhattan, smooth_l1; euclidean, sqeuclidean at small D; the
// rectangular op's metrics without Gram tiles): rows a against the columns of b,
// read from b^T so that the innermost loop walks contiguous columns (pair_sides.h).
// ---------------------------------------------------------------------------
// sums[jj] = sum_k term(a_ik - b_(c0+jj),k) for the ct columns from c0 (bt = b^T, m
// columns); for cosine (unit rows) sums = |a^ - b^|^2 and dots = a^.b^.
template <int64_t M, typename acc_t>
inline void direct_block_sums(const acc_t* ai, const acc_t* bt, int64_t m, int64_t d, int64_t c0,
                              int64_t ct, acc_t* sums, acc_t* dots) {
  std::fill(sums, sums + ct, acc_t(0));
  if (M == kCosine) std::fill(dots, dots + ct, acc_t(0));
  for (int64_t k = 0; k < d; ++k) {
    const acc_t aik = ai[k];
    const acc_t* col = bt + k * m + c0;
    if (M == kCosine) {
#pragma omp simd
      for (int64_t jj = 0; jj < ct; ++jj) {
        const acc_t t = aik - col[jj];
        sums[jj] += t * t;
        dots[jj] += aik * col[jj];
      }
    } else {
#pragma omp simd
      for (int64_t jj = 0; jj < ct; ++jj) sums[jj] += direct_term<acc_t>(M, aik - col[jj]);
    }
  }
}

template <int64_t M, typename acc_t>
inline acc_t block_distance(const PairSide<acc_t>& a, const PairSide<acc_t>& b, int64_t i,
                            int64_t j, acc_t sum, acc_t dot) {
  return M == kCosine ? unit_cosine_distance(sum, dot, a.norms[i], b.norms[j])
                      : direct_finalize<acc_t>(M, sum);
}

template <int64_t M, typename acc_t>
void direct_forward(const PairSide<acc_t>& a, const PairSide<acc_t>& b, const acc_t* bt, int64_t d,
                    int64_t shift, acc_t* s_in, acc_t* s_out) {
  parallel_rows(0, a.n, 4, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(kDirectColBlock), dots(kDirectColBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t li = a.labels[i];
      acc_t in = 0, out = 0;
      for (int64_t c0 = 0; c0 < b.n; c0 += kDirectColBlock) {
        const int64_t ct = std::min(kDirectColBlock, b.n - c0);
        direct_block_sums<M, acc_t>(a.rows + i * d, bt, b.n, d, c0, ct, sums.data(), dots.data());
        for (int64_t jj = 0; jj < ct; ++jj) {
          const int64_t j = c0 + jj;
          if (is_self_pair(i, j, shift)) continue;
          (b.labels[j] == li ? in : out) += block_distance<M>(a, b, i, j, sums[jj], dots[jj]);
        }
      }
      s_in[i] = in;
      s_out[i] = out;
    }
  });
}

// grad[i] += sum_j c_ij dD(a_i, b_j)/da_i (pair_sides.h) for every row of a.
template <int64_t M, typename acc_t>
void direct_backward(const PairSide<acc_t>& a, const PairSide<acc_t>& b, const acc_t* bt, int64_t d,
                     int64_t shift, acc_t* grad) {
  parallel_rows(0, a.n, 4, [&](int64_t begin, int64_t end) {
    // coef: the pair's coefficient (euclidean: over the distance; cosine: alpha);
    // extra: cosine's gamma; sums / dots: the distance sums.
    std::vector<acc_t> coef(kDirectColBlock), extra(kDirectColBlock), sums(kDirectColBlock),
        dots(kDirectColBlock);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* ai = a.rows + i * d;
      for (int64_t c0 = 0; c0 < b.n; c0 += kDirectColBlock) {
        const int64_t ct = std::min(kDirectColBlock, b.n - c0);
        for (int64_t jj = 0; jj < ct; ++jj) coef[jj] = pair_coefficient(a, b, i, c0 + jj, shift);
        if (M == kEuclidean || M == kCosine)
          direct_block_sums<M, acc_t>(ai, bt, b.n, d, c0, ct, sums.data(), dots.data());
        acc_t beta_sum = 0;  // cosine: sum_j beta_j, the coefficient of a^_ik
        for (int64_t jj = 0; jj < ct; ++jj) {
          const acc_t dist = block_distance<M>(a, b, i, c0 + jj, sums[jj], dots[jj]);
          if (M == kEuclidean) {  // fold 1/|a_i - b_j| into the coefficient (0 at distance 0)
            coef[jj] = dist > acc_t(0) ? coef[jj] / dist : acc_t(0);
          } else if (M == kCosine) {
            acc_t alpha, beta, gamma;
            unit_cosine_grad_coefficients(coef[jj], a.norms[i], b.norms[c0 + jj], dist, &alpha,
                                          &beta, &gamma);
            coef[jj] = alpha;
            extra[jj] = gamma;
            beta_sum += beta;
          }
        }
        // euclidean: the folded coefficient times (a_ik - b_jk), i.e. the term at dist 1
        const acc_t dist_arg = M == kEuclidean ? acc_t(1) : acc_t(0);
        for (int64_t k = 0; k < d; ++k) {
          const acc_t aik = ai[k];
          const acc_t* col = bt + k * b.n + c0;
          const acc_t* c = coef.data();
          const acc_t* e = extra.data();
          acc_t acc = 0;
          if (M == kCosine) {
#pragma omp simd reduction(+ : acc)
            for (int64_t jj = 0; jj < ct; ++jj) acc += c[jj] * (col[jj] - aik) + e[jj] * col[jj];
            acc += beta_sum * aik;
          } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t jj = 0; jj < ct; ++jj)
              acc += c[jj] * direct_grad_term<acc_t>(M, aik - col[jj], dist_arg);
          }
          grad[i * d + k] += acc;
        }
      }
    }
  });
}

// The direct loops as the passes of direct_pass.h (they read the columns from b^T).
struct ForwardLoops {
  template <class Metric, class Side, class T>
  void operator()(Metric, const Side& a, const Side& b, const at::Tensor&, const at::Tensor& b_rows,
                  int64_t shift, T* s_in, T* s_out) const {
    const at::Tensor bt = b_rows.t().contiguous();
    direct_forward<Metric::value, T>(a, b, bt.data_ptr<T>(), b_rows.size(1), shift, s_in, s_out);
  }
};

struct BackwardLoops {
  template <class Metric, class Side, class T>
  void operator()(Metric, const Side& a, const Side& b, const at::Tensor&, const at::Tensor& b_rows,
                  int64_t shift, T* grad) const {
    const at::Tensor bt = b_rows.t().contiguous();
    direct_backward<Metric::value, T>(a, b, bt.data_ptr<T>(), b_rows.size(1), shift, grad);
  }
};

// ---------------------------------------------------------------------------
// Gram-form tiles of the rectangular op (euclidean / sqeuclidean with D > 8,
// cosine): one matrix product per (row tile x column tile); the pairs the Gram
// form cannot resolve (gram_distance) are recomputed from differences exactly
// as the direct loops compute them, so duplicated rows get distance 0 and
// gradient 0. One parallel region per call (parallel_jobs.h): a job is a row
// tile against every column tile in order, so each row is written by one
// thread, in a fixed order (deterministic). The per-pair epilogue runs on SIMD
// lanes (simd.h), with the same formulas as gram_distance and
// gram_grad_coefficients.
// ---------------------------------------------------------------------------
constexpr int64_t kRectRowTile = 256;
constexpr int64_t kRectColTile = 512;

// Rows per job: kRectRowTile, or fewer (down to 64) so that every thread gets
// two jobs or more.
inline int64_t rect_row_tile(int64_t n) {
  const int64_t want = (n + 2 * region_threads() - 1) / (2 * region_threads());
  return std::min(kRectRowTile, std::max<int64_t>(64, (want + 7) / 8 * 8));
}

// The Gram operands op(.) of both sides and their squared norms: euclidean /
// sqeuclidean rows centred on b's mean (distances do not change, the Gram form
// keeps its digits on data far from the origin); cosine the unit rows, with the
// squared norms of the rows before normalising (eps test, 1/|a|). Both sides'
// labels as dense int32 ids (the lanes compare them).
struct GramSides {
  at::Tensor a, b, a_sq, b_sq, a_cls, b_cls;
};

template <int64_t M, typename T>
GramSides gram_sides(const PairSide<T>& a, const PairSide<T>& b, const at::Tensor& a_rows,
                     const at::Tensor& b_rows) {
  const auto labels = [](const PairSide<T>& side) {
    return at::from_blob(const_cast<int64_t*>(side.labels), {side.n},
                         at::TensorOptions().dtype(at::kLong));
  };
  const at::Tensor ids = std::get<1>(at::_unique(at::cat({labels(a), labels(b)}), /*sorted=*/true,
                                                 /*return_inverse=*/true))
                             .to(at::kInt);
  const at::Tensor a_cls = ids.narrow(0, 0, a.n).contiguous();
  const at::Tensor b_cls = ids.narrow(0, a.n, b.n).contiguous();
  if (M == kCosine) {
    const auto squared = [](const PairSide<T>& side, const at::Tensor& rows) {
      return at::from_blob(const_cast<T*>(side.norms), {side.n}, rows.options()).square();
    };
    return {a_rows, b_rows, squared(a, a_rows), squared(b, b_rows), a_cls, b_cls};
  }
  const at::Tensor mean = finite_row_mean(b_rows, 0);
  const at::Tensor ac = (a_rows - mean).contiguous(), bc = (b_rows - mean).contiguous();
  return {ac, bc, (ac * ac).sum(1).contiguous(), (bc * bc).sum(1).contiguous(), a_cls, b_cls};
}

// The direct form of one pair, as the loops above compute it: pair_math.h's exact form for
// the metrics on the rows themselves; for cosine, whose sides hold the unit rows and norms,
// |a^ - b^|^2 and a^.b^ of the unit rows (pair_sides.h).
template <int64_t M, typename T>
T exact_pair_distance(const PairSide<T>& a, const PairSide<T>& b, int64_t i, int64_t j, int64_t d) {
  const T* ai = a.rows + i * d;
  const T* bj = b.rows + j * d;
  if (M != kCosine) return pair_distance_exact<T, T>(M, ai, bj, d);
  T sum = 0, dot = 0;
  for (int64_t k = 0; k < d; ++k) {
    const T t = ai[k] - bj[k];
    sum += t * t;
    dot += ai[k] * bj[k];
  }
  return unit_cosine_distance(sum, dot, a.norms[i], b.norms[j]);
}

// gi += coef * dD(a_i, b_j)/da_i by the direct form.
template <int64_t M, typename T>
void exact_pair_grad(const PairSide<T>& a, const PairSide<T>& b, int64_t i, int64_t j, int64_t d,
                     T coef, T* gi) {
  const T* ai = a.rows + i * d;
  const T* bj = b.rows + j * d;
  if (M != kCosine) return pair_grad_exact_accumulate<T, T>(M, ai, bj, d, coef, gi);
  T alpha, beta, gamma;
  unit_cosine_grad_coefficients(coef, a.norms[i], b.norms[j], exact_pair_distance<M>(a, b, i, j, d),
                                &alpha, &beta, &gamma);
  for (int64_t k = 0; k < d; ++k) gi[k] += alpha * (bj[k] - ai[k]) + beta * ai[k] + gamma * bj[k];
}

// Row i of a rectangular Gram tile and what its lanes read (columns from the tile's first).
template <typename T>
struct RectRow {
  int32_t ci;
  T sqi;               // op(a_i)'s squared norm (cosine: |a_i|^2)
  T wii, woi;          // backward: row i's own weights
  T inv_norm_a;        // cosine backward: 1 / |a_i|
  const T* gram;       // row i of the Gram tile
  const int32_t* cls;  // the columns' class ids
  const T* sq;         // the columns' squared norms
  const T *wi, *wo;    // backward: the columns' weights
  T* w;                // backward: out, the columns' coefficients of op(b_j)
};

// Gram-form distances of columns [jj, jj + L::kWidth) and the lanes whose pair
// needs the exact form (gram_distance, lane by lane).
template <int64_t M, typename L, typename T>
inline typename L::V rect_distance(const RectRow<T>& r, int64_t jj, typename L::M* exact) {
  using V = typename L::V;
  const V dot = L::load(r.gram + jj);
  if constexpr (M == kCosine) {
    const V dist = L::set1(T(1)) - dot;
    const V eps2 = L::set1(T(kCosineEps) * T(kCosineEps));
    *exact = L::m_or(L::le(dist, L::set1(T(kGramExactFraction))),
                     L::m_not(L::gt(L::set1(r.sqi) * L::load(r.sq + jj), eps2)));
    return dist;
  } else {
    const V nsum = L::set1(r.sqi) + L::load(r.sq + jj);
    const V d2 = L::max0(nsum - L::set1(T(2)) * dot);
    *exact = L::le(d2, L::set1(T(kGramExactFraction)) * nsum);
    if constexpr (M == kEuclidean) return L::sqrt(d2);
    return d2;
  }
}

// Forward lanes: the Gram-form distances added to tin / tout (same / other
// class); returns the lanes to recompute exactly (bit k: column jj + k).
template <int64_t M, typename L, typename T>
inline uint32_t rect_sum_lanes(const RectRow<T>& r, int64_t jj, typename L::V& tin,
                               typename L::V& tout) {
  typename L::M exact;
  const typename L::V dist = rect_distance<M, L>(r, jj, &exact);
  const typename L::V wd = L::select(exact, L::zero(), dist);
  const auto same = L::class_eq(r.cls + jj, r.ci);
  tin = tin + L::select(same, wd, L::zero());
  tout = tout + L::select(same, L::zero(), wd);
  return L::bits(exact);
}

// Backward lanes: the pair's coefficient c_ij (pair_coefficient) times
// dD/da_i = self_coef op(a_i) + other_coef op(b_j) (gram_grad_coefficients):
// the self part added to `self`, the other part stored in w; pairs with
// c_ij = 0 contribute nothing. Returns the lanes to recompute exactly.
template <int64_t M, typename L, typename T>
inline uint32_t rect_grad_lanes(const RectRow<T>& r, int64_t jj, typename L::V& self) {
  using V = typename L::V;
  const V zero = L::zero();
  typename L::M exact;
  const V dist = rect_distance<M, L>(r, jj, &exact);
  const auto same = L::class_eq(r.cls + jj, r.ci);
  const V coef =
      L::select(same, L::set1(r.wii) + L::load(r.wi + jj), L::set1(r.woi) + L::load(r.wo + jj));
  const auto nonzero = L::m_or(L::gt(coef, zero), L::gt(zero, coef));
  const auto skip = L::m_or(exact, L::m_not(nonzero));
  V self_coef, other_coef;
  if constexpr (M == kEuclidean) {
    const V inv = L::select(L::gt(dist, zero), L::set1(T(1)) / dist, zero);
    self_coef = coef * inv;
    other_coef = zero - self_coef;
  } else if constexpr (M == kSqEuclidean) {
    self_coef = L::set1(T(2)) * coef;
    other_coef = zero - self_coef;
  } else {
    other_coef = zero - coef * L::set1(r.inv_norm_a);
    self_coef = coef * L::load(r.gram + jj) * L::set1(r.inv_norm_a);
  }
  self = self + L::select(skip, zero, self_coef);
  L::store(r.w + jj, L::select(skip, zero, other_coef));
  return L::bits(exact) & L::bits(nonzero);
}

// Runs lanes(jj) over columns [lo, hi): AVX2 lanes for the body, one lane for
// the tail; fix(jj) for every column whose lane bit came back set.
template <typename T, class Wide, class One, class Fix>
inline void over_columns(int64_t lo, int64_t hi, const Wide& wide, const One& one, const Fix& fix) {
  using L = simd::Widest<T>;
  int64_t jj = lo;
  for (; jj + L::kWidth <= hi; jj += L::kWidth)
    for (uint32_t bits = wide(jj); bits; bits &= bits - 1) fix(jj + __builtin_ctz(bits));
  for (; jj < hi; ++jj)
    if (one(jj)) fix(jj);
}

// The tile-local column of row i's left-out pair in [c0, c0 + ct), or ct.
inline int64_t self_column(int64_t i, int64_t shift, int64_t c0, int64_t ct) {
  if (shift == kNoSelfPair) return ct;
  const int64_t jj = i + shift - c0;
  return jj >= 0 && jj < ct ? jj : ct;
}

// What both passes of the rectangular Gram tiles share: the Gram sides and
// their tables, one job per row tile (rect_row_tile rows) and, inside it, the
// column tiles in order with their Gram tile.
template <int64_t M, typename T>
struct RectTiles {
  GramSides g;
  const T *a_sq, *b_sq;
  const int32_t *a_cls, *b_cls;
  RectTiles(const PairSide<T>& a, const PairSide<T>& b, const at::Tensor& a_rows,
            const at::Tensor& b_rows)
      : g(gram_sides<M>(a, b, a_rows, b_rows)),
        a_sq(g.a_sq.template data_ptr<T>()),
        b_sq(g.b_sq.template data_ptr<T>()),
        a_cls(g.a_cls.template data_ptr<int32_t>()),
        b_cls(g.b_cls.template data_ptr<int32_t>()) {}

  // row_job(r0, rt, ar) per row tile (ar: its rows of op(a)), in one parallel region.
  template <class RowJob>
  void for_row_tiles(const RowJob& row_job) const {
    const int64_t n = g.a.size(0), row_tile = rect_row_tile(n);
    run_jobs((n + row_tile - 1) / row_tile, [&](int64_t t, int64_t) {
      const int64_t r0 = t * row_tile;
      const int64_t rt = std::min(row_tile, n - r0);
      row_job(r0, rt, g.a.narrow(0, r0, rt));
    });
  }

  // tile(c0, ct, bt, gram) per column tile of one row tile's rows ar (bt: the
  // tile's rows of op(b); gram: the [rt, ct] product ar bt^T).
  template <class Tile>
  void for_column_tiles(const at::Tensor& ar, const Tile& tile) const {
    for_each_column_tile(ar, g.b, kRectColTile,
                         [&](int64_t c0, int64_t ct, const at::Tensor& bt, const at::Tensor& gram) {
                           tile(c0, ct, bt, gram.template data_ptr<T>());
                         });
  }
};

template <int64_t M, typename T>
void gram_rect_forward(const PairSide<T>& a, const PairSide<T>& b, const at::Tensor& a_rows,
                       const at::Tensor& b_rows, int64_t shift, T* s_in, T* s_out) {
  using L = simd::Widest<T>;
  using S = simd::Scalar<T>;
  const int64_t d = a_rows.size(1);
  const RectTiles<M, T> tiles(a, b, a_rows, b_rows);
  const T *a_sq = tiles.a_sq, *b_sq = tiles.b_sq;
  const int32_t *a_cls = tiles.a_cls, *b_cls = tiles.b_cls;
  std::fill(s_in, s_in + a.n, T(0));
  std::fill(s_out, s_out + a.n, T(0));
  tiles.for_row_tiles([&](int64_t r0, int64_t rt, const at::Tensor& ar) {
    tiles.for_column_tiles(ar, [&](int64_t c0, int64_t ct, const at::Tensor&, const T* gp) {
      parallel_rows(0, rt, 16, [&](int64_t begin, int64_t end) {
        for (int64_t ii = begin; ii < end; ++ii) {
          const int64_t i = r0 + ii;
          const RectRow<T> r{a_cls[i],   a_sq[i],   0,       0,       0,      gp + ii * ct,
                             b_cls + c0, b_sq + c0, nullptr, nullptr, nullptr};
          typename L::V tin = L::zero(), tout = L::zero();
          T in_tail = 0, out_tail = 0, in_exact = 0, out_exact = 0;
          const auto wide = [&](int64_t jj) { return rect_sum_lanes<M, L>(r, jj, tin, tout); };
          const auto one = [&](int64_t jj) {
            return rect_sum_lanes<M, S>(r, jj, in_tail, out_tail);
          };
          const auto fix = [&](int64_t jj) {
            const int64_t j = c0 + jj;
            (b_cls[j] == a_cls[i] ? in_exact : out_exact) += exact_pair_distance<M>(a, b, i, j, d);
          };
          const int64_t self = self_column(i, shift, c0, ct);
          over_columns<T>(0, self, wide, one, fix);
          over_columns<T>(std::min(self + 1, ct), ct, wide, one, fix);
          s_in[i] += L::hsum(tin) + in_tail + in_exact;
          s_out[i] += L::hsum(tout) + out_tail + out_exact;
        }
      });
    });
  });
}

// What the gradient passes of the rectangular Gram tiles share: the tiles and
// their tables, the columns' weights (a side without them weighs 0), the rows'
// gradient and their self-coefficient sums, and the lanes of one row.
template <int64_t M, typename T>
struct RectGrad {
  const PairSide<T>&a, &b;
  RectTiles<M, T> tiles;
  at::Tensor zeros, grad_rows, self_sum;
  const T *b_wi, *b_wo;
  T* self_p;
  RectGrad(const PairSide<T>& a_, const PairSide<T>& b_, const at::Tensor& a_rows,
           const at::Tensor& b_rows, T* grad)
      : a(a_),
        b(b_),
        tiles(a_, b_, a_rows, b_rows),
        zeros(at::zeros({b_.n}, a_rows.options())),
        grad_rows(at::from_blob(grad, {a_.n, a_rows.size(1)}, a_rows.options())),
        self_sum(at::zeros({a_.n}, a_rows.options())),
        b_wi(b_.g_in ? b_.g_in : zeros.template data_ptr<T>()),
        b_wo(b_.g_out ? b_.g_out : zeros.template data_ptr<T>()),
        self_p(self_sum.template data_ptr<T>()) {}

  // Row i against columns [c0, c0 + ct) of a tile (gp: its Gram row tile, w: row i of the
  // coefficient tile): rect_grad_lanes over the columns but the left-out one, fix(j) for
  // every pair that needs the exact form, the self coefficients into self_sum.
  template <class Fix>
  void row(int64_t i, int64_t c0, int64_t ct, const T* gram_row, T* w, int64_t shift,
           const Fix& fix) const {
    using L = simd::Widest<T>;
    using S = simd::Scalar<T>;
    const T inv_norm_a = M == kCosine && a.norms[i] > T(0) ? T(1) / a.norms[i] : T(0);
    const RectRow<T> r{tiles.a_cls[i],
                       tiles.a_sq[i],
                       side_weight(a.g_in, i),
                       side_weight(a.g_out, i),
                       inv_norm_a,
                       gram_row,
                       tiles.b_cls + c0,
                       tiles.b_sq + c0,
                       b_wi + c0,
                       b_wo + c0,
                       w};
    typename L::V self = L::zero();
    T self_tail = 0;
    const auto wide = [&](int64_t jj) { return rect_grad_lanes<M, L>(r, jj, self); };
    const auto one = [&](int64_t jj) { return rect_grad_lanes<M, S>(r, jj, self_tail); };
    const auto fix_column = [&](int64_t jj) { fix(c0 + jj); };
    const int64_t skip = self_column(i, shift, c0, ct);
    over_columns<T>(0, skip, wide, one, fix_column);
    if (skip < ct) r.w[skip] = T(0);
    over_columns<T>(std::min(skip + 1, ct), ct, wide, one, fix_column);
    self_p[i] += L::hsum(self) + self_tail;
  }
};

// grad (zeroed, [a.n, D]) += sum_j c_ij dD(a_i, b_j)/da_i: per tile, the Gram pairs'
// coefficients dD/da = self op(a_i) + other op(b_j) go to a row sum (self) and a
// coefficient tile W (other) that one product multiplies into op(b); the exact pairs
// add their direct-form gradient to their row.
template <int64_t M, typename T>
void gram_rect_backward(const PairSide<T>& a, const PairSide<T>& b, const at::Tensor& a_rows,
                        const at::Tensor& b_rows, int64_t shift, T* grad) {
  const int64_t d = a_rows.size(1);
  const RectGrad<M, T> rg(a, b, a_rows, b_rows, grad);
  rg.tiles.for_row_tiles([&](int64_t r0, int64_t rt, const at::Tensor& ar) {
    at::Tensor w_all = at::empty({rt, std::min(kRectColTile, b.n)}, a_rows.options());
    rg.tiles.for_column_tiles(ar, [&](int64_t c0, int64_t ct, const at::Tensor& bt, const T* gp) {
      T* wp = w_all.template data_ptr<T>();
      const int64_t ld = w_all.size(1);
      parallel_rows(0, rt, 16, [&](int64_t begin, int64_t end) {
        for (int64_t ii = begin; ii < end; ++ii) {
          const int64_t i = r0 + ii;
          rg.row(i, c0, ct, gp + ii * ct, wp + ii * ld, shift, [&](int64_t j) {
            exact_pair_grad<M>(a, b, i, j, d, pair_coefficient(a, b, i, j, shift), grad + i * d);
          });
        }
      });
      rg.grad_rows.narrow(0, r0, rt).addmm_(w_all.narrow(1, 0, ct), bt);
    });
    rg.grad_rows.narrow(0, r0, rt).add_(ar * rg.self_sum.narrow(0, r0, rt).unsqueeze(1));
  });
}

// Both gradients of the rectangular op in one pass over its Gram tiles, for the
// metrics that depend on a_i - b_j only (euclidean, sqeuclidean): a pair's
// coefficient W_ij gives dD/da_i = W_ij (a_i - b_j) = -dD/db_j, so one tile of
// coefficients serves both sides (3 products per tile pair instead of the two
// passes' 4, and one epilogue instead of 2):
//   grad_a_i = rowsum(W)_i op(a_i) - (W op(B))_i     (rows owned by their job)
//   grad_b_j = colsum(W)_j op(b_j) - (W^T op(A))_j   (every job adds to it)
// The row tiles (kRectRowTile rows, a split that depends on N only) are dealt
// to `groups` jobs in turn; each job adds its b side into its own partial,
// and the partials are summed in group order at the end, so the result is the
// same on any number of threads. Exact pairs add their direct-form gradient to
// a_i at once and to b_j after the region, in job order.
constexpr int64_t kRectGroups = 16;
constexpr int64_t kRectPartialBytes = int64_t(64) << 20;

// How many groups the one-pass backward uses for these sizes (< 2: use the two passes).
inline int64_t rect_groups(int64_t n, int64_t m, int64_t d, int64_t element_size) {
  const int64_t tiles = (n + kRectRowTile - 1) / kRectRowTile;
  const int64_t per_group = std::max<int64_t>(1, m * (d + 1) * element_size);
  return std::min({kRectGroups, tiles, kRectPartialBytes / per_group});
}

template <int64_t M, typename T>
void gram_rect_backward_both(const PairSide<T>& a, const PairSide<T>& b, const at::Tensor& a_rows,
                             const at::Tensor& b_rows, int64_t shift, int64_t groups, T* grad_a,
                             T* grad_b) {
  static_assert(M == kEuclidean || M == kSqEuclidean, "antisymmetric metrics only");
  const int64_t d = a_rows.size(1);
  const RectGrad<M, T> rg(a, b, a_rows, b_rows, grad_a);
  const RectTiles<M, T>& tiles = rg.tiles;
  // the b side of every group: [groups, M, D] products and [groups, M] column sums of W
  // (a group's first row tile writes them, the later ones add: no fill)
  at::Tensor parts = at::empty({groups, b.n, d}, a_rows.options());
  at::Tensor col_parts = at::empty({groups, b.n}, a_rows.options());
  std::vector<std::vector<std::pair<int64_t, int64_t>>> exact_pairs(groups);
  const int64_t n_tiles = (a.n + kRectRowTile - 1) / kRectRowTile;
  run_jobs(groups, [&](int64_t group, int64_t) {
    // (plain tensors over the group's partials, not autograd views: written on this thread)
    T* part_p = parts.template data_ptr<T>() + group * b.n * d;
    T* col_p = col_parts.template data_ptr<T>() + group * b.n;
    at::Tensor part = at::from_blob(part_p, {b.n, d}, a_rows.options());
    at::Tensor w_all = at::empty({kRectRowTile, std::min(kRectColTile, b.n)}, a_rows.options());
    for (int64_t t = group; t < n_tiles; t += groups) {
      const int64_t r0 = t * kRectRowTile, rt = std::min(kRectRowTile, a.n - r0);
      const at::Tensor ar = tiles.g.a.narrow(0, r0, rt);
      tiles.for_column_tiles(ar, [&](int64_t c0, int64_t ct, const at::Tensor& bt, const T* gp) {
        at::Tensor w = w_all.narrow(0, 0, rt).narrow(1, 0, ct);
        T* wp = w_all.template data_ptr<T>();
        const int64_t ld = w_all.size(1);
        for (int64_t ii = 0; ii < rt; ++ii) {
          const int64_t i = r0 + ii;
          rg.row(i, c0, ct, gp + ii * ct, wp + ii * ld, shift, [&](int64_t j) {
            exact_pair_grad<M>(a, b, i, j, d, pair_coefficient(a, b, i, j, shift), grad_a + i * d);
            exact_pairs[group].emplace_back(i, j);
          });
        }
        // w holds -W (rect_grad_lanes' other coefficient): grad_a += w op(B),
        // the b side += w^T op(A) and colsum(W) = -colsum(w)
        const bool first = t == group;
        rg.grad_rows.narrow(0, r0, rt).addmm_(w, bt);
        part.narrow(0, c0, ct).addmm_(w.t(), ar, first ? 0 : 1, 1);  // beta 0: not read
        T* __restrict__ cols = col_p + c0;
        if (first) std::fill(cols, cols + ct, T(0));
        for (int64_t ii = 0; ii < rt; ++ii) {
          const T* __restrict__ wr = wp + ii * ld;
#pragma omp simd
          for (int64_t jj = 0; jj < ct; ++jj) cols[jj] -= wr[jj];
        }
      });
      rg.grad_rows.narrow(0, r0, rt).add_(ar * rg.self_sum.narrow(0, r0, rt).unsqueeze(1));
    }
  });
  at::Tensor grad_cols = at::from_blob(grad_b, {b.n, d}, a_rows.options());
  grad_cols.copy_(parts.sum(0) + tiles.g.b * col_parts.sum(0).unsqueeze(1));
  for (const auto& pairs : exact_pairs)
    for (const auto& [i, j] : pairs)
      exact_pair_grad<M>(b, a, j, i, d, pair_coefficient(a, b, i, j, shift), grad_b + j * d);
}

// The rectangular op's passes: the Gram tiles ('gram_tiles') or the loops ('direct').
struct RectForward {
  int64_t algorithm = kDirect;
  static constexpr const char* kRuns = "'direct' or 'gram_tiles' (rectangular op on CPU)";
  static bool runs(int64_t a) { return a == kDirect || a == kGramTiles; }

  template <class Metric, class Side, class T>
  void operator()(Metric m, const Side& a, const Side& b, const at::Tensor& a_rows,
                  const at::Tensor& b_rows, int64_t shift, T* s_in, T* s_out) const {
    if constexpr (has_gram_form(Metric::value)) {
      if (algorithm == kGramTiles)
        return gram_rect_forward<Metric::value>(a, b, a_rows, b_rows, shift, s_in, s_out);
    }
    ForwardLoops{}(m, a, b, a_rows, b_rows, shift, s_in, s_out);
  }
};

struct RectBackward {
  int64_t algorithm = kDirect;
  static constexpr const char* kRuns = RectForward::kRuns;
  static bool runs(int64_t a) { return RectForward::runs(a); }

  template <class Metric, class Side, class T>
  void operator()(Metric m, const Side& a, const Side& b, const at::Tensor& a_rows,
                  const at::Tensor& b_rows, int64_t shift, T* grad) const {
    if constexpr (has_gram_form(Metric::value)) {
      if (algorithm == kGramTiles)
        return gram_rect_backward<Metric::value>(a, b, a_rows, b_rows, shift, grad);
    }
    BackwardLoops{}(m, a, b, a_rows, b_rows, shift, grad);
  }
};

// The square op's algorithm: 'direct' or 'pair_pass' on CPU.
int64_t square_algorithm(c10::string_view name, int64_t metric, const char* op) {
  const int64_t algorithm = algorithm_code(name, metric, op);
  check_algorithm_runs(algorithm == kDirect || algorithm == kPairPass, algorithm, op, c10::kCPU,
                       "'direct' or 'pair_pass' (square op on CPU)");
  return algorithm;
}

std::tuple<at::Tensor, at::Tensor> intra_inter_sums_cpu(const at::Tensor& x,
                                                        const at::Tensor& labels,
                                                        c10::string_view metric_name,
                                                        c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in = prepare_row_sums_inputs(x, labels, metric_name, c10::kCPU);
  if (square_algorithm(algorithm_name, in.metric, "intra_inter_sums") == kPairPass)
    return pair_row_sums(in.x, in.labels, in.metric);
  return direct_pass_row_sums(in.x, in.labels, in.x, in.labels, /*shift=*/0, in.metric,
                              ForwardLoops{});
}

at::Tensor intra_inter_sums_backward_cpu(const at::Tensor& grad_in, const at::Tensor& grad_out,
                                         const at::Tensor& x, const at::Tensor& labels,
                                         c10::string_view metric_name,
                                         c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in =
      prepare_row_sums_backward_inputs(grad_in, grad_out, x, labels, metric_name, c10::kCPU);
  if (square_algorithm(algorithm_name, in.metric, "intra_inter_sums_backward") == kPairPass) {
    // dL/dx is the gradient of sum_i g_in[i] S_in[i] + g_out[i] S_out[i]: the one-pass
    // kernel with the upstream gradients as weights, each unordered pair once.
    const PairSums r = pair_pass_with_grad(in.x, in.labels, in.grad_in, in.grad_out, in.metric);
    return (r.grad_in + r.grad_out).to(x.scalar_type());
  }
  return direct_pass_row_grad(in.x, in.labels, in.grad_in, in.grad_out, in.x, in.labels, in.grad_in,
                              in.grad_out, /*shift=*/0, in.metric, BackwardLoops{})
      .to(x.scalar_type());
}

// The rectangular op's backward on CPU: the one-pass Gram form for euclidean /
// sqeuclidean when its partials fit (gram_rect_backward_both), else the two
// passes of rect_backward (x as the rows, then ref as the rows).
std::tuple<at::Tensor, at::Tensor> rect_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    c10::optional<int64_t> self_offset, c10::string_view metric_name,
    c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const SerialAten serial;  // the row tiles' region is the op's only parallel one
  const RectInputs in = prepare_rect_backward_inputs(grad_in, grad_out, x, labels, ref, ref_labels,
                                                     self_offset, metric_name, c10::kCPU);
  const int64_t algorithm = rect_algorithm<c10::kCPU, RectBackward>(algorithm_name, in.metric);
  const int64_t n = in.x.size(0), m = in.ref.size(0), d = in.x.size(1);
  const int64_t groups = rect_groups(n, m, d, in.x.element_size());
  if (algorithm != kGramTiles || (in.metric != kEuclidean && in.metric != kSqEuclidean) || d == 0 ||
      groups < 2)
    return rect_backward(in, x, ref, RectBackward{algorithm});
  // (grad_ref is written whole, then the exact pairs add to it)
  at::Tensor grad_x = at::zeros_like(in.x), grad_ref = at::empty_like(in.ref);
  const DirectOperand a = direct_operand(in.x, in.metric), b = direct_operand(in.ref, in.metric);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "intra_inter_sums_rect_backward", [&] {
    const PairSide<scalar_t> sa = pair_side<scalar_t>(a, in.labels, in.grad_in, in.grad_out);
    const PairSide<scalar_t> sb = pair_side<scalar_t>(b, in.ref_labels);
    if (in.metric == kEuclidean)
      gram_rect_backward_both<kEuclidean>(sa, sb, a.rows, b.rows, in.shift, groups,
                                          grad_x.data_ptr<scalar_t>(),
                                          grad_ref.data_ptr<scalar_t>());
    else
      gram_rect_backward_both<kSqEuclidean>(sa, sb, a.rows, b.rows, in.shift, groups,
                                            grad_x.data_ptr<scalar_t>(),
                                            grad_ref.data_ptr<scalar_t>());
  });
  return {grad_x.to(x.scalar_type()), grad_ref.to(ref.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> rect_forward_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                    const at::Tensor& ref,
                                                    const at::Tensor& ref_labels,
                                                    c10::optional<int64_t> self_offset,
                                                    c10::string_view metric_name,
                                                    c10::string_view algorithm_name) {
  const SerialAten serial;  // the row tiles' region is the op's only parallel one
  return rect_forward_op<c10::kCPU, RectForward>(x, labels, ref, ref_labels, self_offset,
                                                 metric_name, algorithm_name);
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("intra_inter_sums", &intra_inter_sums_cpu);
  m.impl("intra_inter_sums_backward", &intra_inter_sums_backward_cpu);
  // the rectangular op: Gram tiles ('gram_tiles') or the direct loops ('direct')
  m.impl("intra_inter_sums_rect", &rect_forward_cpu);
  m.impl("intra_inter_sums_rect_backward", &rect_backward_cpu);
}

}  // namespace confusion_kernels
