// C++ CPU kernels of the affinity loss rows (docs/math.md, "Affinity loss"):
//   L_i = sum_{j != y_i} relu(margin + d_ij - d_{i y_i}),  d_ij = sim(min_t |f_i - w_jt|^2)
// and their backward, in O((N + P) D + tile) memory (P = C m prototypes).
//
// Squared distances come from (row tile x prototype tile) matrix products in
// the Gram form; a tile holds whole classes so the min over t stays inside it,
// and its epilogue is one pass over the cache-resident tile with the per-pair
// formulas of affinity_math.h on AVX2 lanes (simd.h, exp included). Forward:
// d_true by direct dot products (affinity_math.h), then every tile adds the
// hinges of its classes. Backward recomputes each tile and turns it into the
// sparse coefficient tile A (one entry per row and class: the arg-min
// prototype), then dL/df = 2 rowsum(A) f - 2 A W and dL/dW = 2 colsum(A) W -
// 2 A^T f, accumulated tile by tile in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "confusion_kernels/affinity_math.h"
#include "confusion_kernels/affinity_tiles.h"
#include "confusion_kernels/checks.h"
#include "confusion_kernels/group_by_key.h"
#include "simd.h"

namespace confusion_kernels {
namespace {

// One row of a (row tile x class tile) block, as its lanes read it.
template <typename T>
struct AffinityRow {
  T f_norm;         // |f_i|^2
  T d_true;         // d_{i y_i}
  T g;              // upstream gradient of L_i (1 in the fused pass)
  T own_weight;     // the own class's weight: -active_i (backward) or 0 (added later)
  int32_t own;      // the own class's column in the tile, -1 when not in it
  const T* gram;    // the row of the Gram tile: f_i . w_jt at [j m + t]
  const T* w_norm;  // |w_jt|^2 at [j m + t]
  T* coef;          // out, when given: the row of the coefficient tile A [j m + t]
};

// Classes [jj, jj + L::kWidth) of one row: affinity_math.h's formulas on lanes
// (affinity_sq_distance, keep_first_min over the m prototypes, affinity_similarity,
// affinity_hinge, affinity_coefficient, in the same operation order), the
// active hinges added to h_sum / count and the coefficients to coef_sum; each
// coefficient goes to its class's arg-min slot of r.coef.
template <class L, typename T>
inline void affinity_lanes(const AffinityRow<T>& r, const int32_t* cols, int64_t jj, int64_t m,
                           T sigma, T margin, int64_t kind, typename L::V& h_sum,
                           typename L::V& count, typename L::V& coef_sum) {
  using V = typename L::V;
  const V zero = L::zero(), one = L::set1(T(1)), sig = L::set1(sigma);
  V s = zero, arg = zero;  // the min over t, and its first arg-min (t as a T)
  for (int64_t t = 0; t < m; ++t) {
    const int64_t k = jj * m + t;
    const V dot = m == 1 ? L::load(r.gram + k) : L::gather(r.gram + k, m);
    const V wn = m == 1 ? L::load(r.w_norm + k) : L::gather(r.w_norm + k, m);
    const V st = L::max0(L::set1(r.f_norm) + wn - L::set1(T(2)) * dot);
    const auto closer = t == 0 ? L::le(zero, zero) : L::gt(s, st);
    s = L::select(closer, st, s);
    arg = L::select(closer, L::set1(T(t)), arg);
  }
  V d, dds;
  if (kind == kInverse) {
    d = one / (one + s / sig);
    dds = zero - d * d / sig;
  } else {  // exp of the exponent, 0 below the normal range (gaussian_exponent)
    const V x = zero - s / sig, floor = L::set1(Subnormal<T>::kExpFloor);
    d = L::select(L::gt(x, floor), L::exp(L::max(x, floor)), zero);
    dds = zero - d / sig;
  }
  const V h = L::set1(margin) + d - L::set1(r.d_true);
  const auto own = L::class_eq(cols + jj, r.own);
  const auto on = L::m_and(L::gt(h, zero), L::m_not(own));
  h_sum = h_sum + L::select(on, h, zero);
  count = count + L::select(on, one, zero);
  if (r.coef == nullptr) return;
  const V weight = L::select(own, L::set1(r.own_weight), L::select(on, one, zero));
  const V c = L::set1(r.g) * weight * dds;
  const V tiny = L::set1(Subnormal<T>::kMin);  // flush_subnormal
  const V flushed = L::select(L::m_and(L::gt(tiny, c), L::gt(c, zero - tiny)), zero, c);
  coef_sum = coef_sum + flushed;
  if (m == 1) return L::store(r.coef + jj, flushed);
  T lanes_c[L::kWidth], lanes_t[L::kWidth];
  L::store(lanes_c, flushed);
  L::store(lanes_t, arg);
  for (int k = 0; k < L::kWidth; ++k)
    r.coef[(jj + k) * m + static_cast<int64_t>(lanes_t[k])] = lanes_c[k];
}

// The classes [0, ct) of one row: AVX2 lanes for the body, one lane for the
// tail; returns (sum of the active hinges, their count, sum of the coefficients).
template <typename T>
inline std::array<T, 3> affinity_row(const AffinityRow<T>& r, const int32_t* cols, int64_t ct,
                                     int64_t m, T sigma, T margin, int64_t kind) {
  using L = simd::Widest<T>;
  using S = simd::Scalar<T>;
  typename L::V h = L::zero(), n = L::zero(), c = L::zero();
  int64_t jj = 0;
  for (; jj + L::kWidth <= ct; jj += L::kWidth)
    affinity_lanes<L>(r, cols, jj, m, sigma, margin, kind, h, n, c);
  T h1 = L::hsum(h), n1 = L::hsum(n), c1 = L::hsum(c);
  for (; jj < ct; ++jj) affinity_lanes<S>(r, cols, jj, m, sigma, margin, kind, h1, n1, c1);
  return {h1, n1, c1};
}

// The epilogue of one (row tile x class tile) block from its Gram tile g
// [rt, ct m], in one pass over it: per row and class the affinity of the
// closest prototype, the hinge against d_true (into rows_r / active_r, when
// given) and the coefficient dL/ds at the class's arg-min prototype into `a`
// [rt, ct m] (when given; other slots stay as they are, the caller zeroes
// them for m > 1), with its row sums into a_row_sums.
template <typename T>
void epilogue_tile(const at::Tensor& g, const T* fn_r, const T* wn_t, int64_t m, int64_t c0,
                   const int64_t* lab_r, const T* d_true_r, T sigma, T margin, int64_t kind,
                   T* rows_r, T* active_r, const T* g_r, const T* own_active_r, T* a,
                   T* a_row_sums) {
  const int64_t rt = g.size(0), ct = g.size(1) / m;
  const T* gp = g.data_ptr<T>();
  std::vector<int32_t> cols(ct);
  for (int64_t jj = 0; jj < ct; ++jj) cols[jj] = static_cast<int32_t>(jj);
  at::parallel_for(0, rt, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ii = begin; ii < end; ++ii) {
      const int64_t own = lab_r[ii] - c0;
      const AffinityRow<T> r{fn_r[ii],
                             d_true_r[ii],
                             g_r != nullptr ? g_r[ii] : T(1),
                             own_active_r != nullptr ? -own_active_r[ii] : T(0),
                             own >= 0 && own < ct ? static_cast<int32_t>(own) : -1,
                             gp + ii * ct * m,
                             wn_t,
                             a == nullptr ? nullptr : a + ii * ct * m};
      const std::array<T, 3> sums = affinity_row(r, cols.data(), ct, m, sigma, margin, kind);
      if (rows_r != nullptr) {
        rows_r[ii] += sums[0];
        active_r[ii] += sums[1];
      }
      if (a_row_sums != nullptr) a_row_sums[ii] += sums[2];
    }
  });
}

template <typename acc_t>
void true_class_affinity(const AffinityInputs& in, const at::Tensor& f_norms,
                         const at::Tensor& w_norms, acc_t sigma, int64_t kind, acc_t* d_true,
                         int64_t* true_arg) {
  const at::Tensor& f = in.f;
  const int64_t n = f.size(0), d = f.size(1), m = in.num_centers;
  const acc_t* fp = f.data_ptr<acc_t>();
  const acc_t* wp = in.prototypes.data_ptr<acc_t>();
  const acc_t* fnp = f_norms.data_ptr<acc_t>();
  const acc_t* wnp = w_norms.data_ptr<acc_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dots(m);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t t = 0; t < m; ++t) {
        const acc_t* wt = wp + (lab[i] * m + t) * d;
        const acc_t* fi = fp + i * d;
        acc_t dot = 0;
        for (int64_t k = 0; k < d; ++k) dot += fi[k] * wt[k];
        dots[t] = dot;
      }
      int64_t arg;
      const acc_t smin = class_min(dots.data(), wnp + lab[i] * m, fnp[i], m, &arg);
      d_true[i] = affinity_similarity(kind, smin, sigma);
      true_arg[i] = arg;
    }
  });
}

// The own-class terms (own_class_terms_aten's arithmetic) in two loops: the
// rows in parallel, then the prototypes in parallel, each over its rows in
// increasing order (a counting sort by prototype; deterministic).
template <typename T>
void own_class_terms(const T* f, const T* w, const int64_t* proto, const T* coef, int64_t n,
                     int64_t p, int64_t d, T* grad_f, T* grad_w, T* row_coef, T* col_coef) {
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T c = coef[i];
      const T* wp = w + proto[i] * d;
      T* gi = grad_f + i * d;
      for (int64_t k = 0; k < d; ++k) gi[k] += T(-2) * c * wp[k];
      row_coef[i] += c;
    }
  });
  const KeyGroups groups = group_by_key(proto, n, p);
  const std::vector<int64_t>&start = groups.start, &order = groups.order;
  at::parallel_for(0, p, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(d);
    for (int64_t q = begin; q < end; ++q) {
      if (start[q] == start[q + 1]) continue;
      std::fill(sum.begin(), sum.end(), T(0));
      T csum = 0;
      for (int64_t r = start[q]; r < start[q + 1]; ++r) {
        const int64_t i = order[r];
        const T* fi = f + i * d;
        for (int64_t k = 0; k < d; ++k) sum[k] += fi[k] * coef[i];
        csum += coef[i];
      }
      T* gq = grad_w + q * d;
      for (int64_t k = 0; k < d; ++k) gq[k] += T(-2) * sum[k];
      col_coef[q] += csum;
    }
  });
}

// The CPU epilogues of affinity_tiles.h.
struct CpuTiles {
  static constexpr c10::DeviceType kDevice = c10::kCPU;
  struct Guard {
    NoAutocast no_autocast;
    explicit Guard(c10::Device) {}
  };
  static void true_class(const AffinityInputs& in, const at::Tensor& f_norms,
                         const at::Tensor& w_norms, double sigma, int64_t kind, at::Tensor& d_true,
                         at::Tensor& true_arg) {
    AT_DISPATCH_FLOATING_TYPES(in.f.scalar_type(), "affinity_true_class_cpu", [&] {
      true_class_affinity<scalar_t>(in, f_norms, w_norms, scalar_t(sigma), kind,
                                    d_true.data_ptr<scalar_t>(), true_arg.data_ptr<int64_t>());
    });
  }
  static void own_class(const at::Tensor& f, const at::Tensor& w, const at::Tensor& own_proto,
                        const at::Tensor& own_coef, at::Tensor& grad_f, at::Tensor& grad_w,
                        at::Tensor& row_coef, at::Tensor& col_coef) {
    AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "affinity_own_class_cpu", [&] {
      own_class_terms<scalar_t>(f.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                own_proto.data_ptr<int64_t>(), own_coef.data_ptr<scalar_t>(),
                                f.size(0), w.size(0), f.size(1), grad_f.data_ptr<scalar_t>(),
                                grad_w.data_ptr<scalar_t>(), row_coef.data_ptr<scalar_t>(),
                                col_coef.data_ptr<scalar_t>());
    });
  }
  static constexpr bool kTileScratch = false;  // the epilogue needs no d / arg tiles
  static void epilogue(const at::Tensor& g, const at::Tensor& fn_r, const at::Tensor& wn_t,
                       int64_t m, int64_t c0, const at::Tensor& lab_r, const at::Tensor& d_true_r,
                       double sigma, double margin, int64_t kind, const at::Tensor& rows_r,
                       const at::Tensor& active_r, const at::Tensor& g_r,
                       const at::Tensor& own_active_r, const at::Tensor& a,
                       const at::Tensor& a_row_sums, affinity::TileBuffers&) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "affinity_epilogue_cpu", [&] {
      epilogue_tile<scalar_t>(g.contiguous(), fn_r.data_ptr<scalar_t>(), wn_t.data_ptr<scalar_t>(),
                              m, c0, lab_r.data_ptr<int64_t>(), d_true_r.data_ptr<scalar_t>(),
                              scalar_t(sigma), scalar_t(margin), kind,
                              ptr_or_null<scalar_t>(rows_r), ptr_or_null<scalar_t>(active_r),
                              ptr_or_null<scalar_t>(g_r), ptr_or_null<scalar_t>(own_active_r),
                              ptr_or_null<scalar_t>(a), ptr_or_null<scalar_t>(a_row_sums));
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("affinity_hinge", &affinity::hinge_op<CpuTiles>);
  m.impl("affinity_hinge_backward", &affinity::hinge_backward_op<CpuTiles>);
  m.impl("affinity_hinge_sum_with_grad", &affinity::hinge_sum_with_grad_op<CpuTiles>);
}

}  // namespace confusion_kernels
