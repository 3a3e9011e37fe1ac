// C++ CPU kernels of the affinity loss rows (SPEC section 3):
//   L_i = sum_{j != y_i} relu(margin + d_ij - d_{i y_i}),  d_ij = sim(min_t |f_i - w_jt|^2)
// and their backward, in O((N + P) D + tile) memory (P = C m prototypes).
//
// Squared distances come from (row tile x prototype tile) matrix products in
// the Gram form; a tile holds whole classes so the min over t stays inside it,
// and its epilogue is one loop over the cache-resident tile with the per-pair
// formulas of affinity_math.h (plus one vectorised exp pass). Forward:
// d_true by direct dot products (affinity_math.h), then every tile adds the
// hinges of its classes. Backward recomputes each tile and turns it into the
// sparse coefficient tile A (one entry per row and class: the arg-min
// prototype), then dL/df = 2 rowsum(A) f - 2 A W and dL/dW = 2 colsum(A) W -
// 2 A^T f, accumulated tile by tile in a fixed order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "confusion_kernels/affinity_math.h"
#include "confusion_kernels/checks.h"

namespace confusion_kernels {
namespace {

constexpr int64_t kRowTile = 1024;
constexpr int64_t kProtoTile = 1024;  // prototypes per tile, rounded down to whole classes

int64_t classes_per_tile(int64_t m) { return std::max<int64_t>(1, kProtoTile / m); }

// Smallest squared distance of row i to the m prototypes of one class, and the
// first prototype reaching it; `dots` holds f_i . w for those m prototypes.
template <typename acc_t>
inline acc_t class_min(const acc_t* dots, const acc_t* w_norms, acc_t f_norm, int64_t m,
                       int64_t* arg) {
  acc_t best = std::numeric_limits<acc_t>::infinity();
  *arg = 0;
  for (int64_t t = 0; t < m; ++t) {
    const acc_t s = affinity_sq_distance(f_norm, w_norms[t], dots[t]);
    if (s < best) {
      best = s;
      *arg = t;
    }
  }
  return best;
}

// Affinities of one (row tile x class tile) block: G = f_r W_t^T by a matrix
// product, then per row and class the min over the m prototypes
// (affinity_sq_distance, class_min), the first arg-min, and the similarity
// (affinity_similarity; the exp as one vectorised pass over the tile).
template <typename acc_t>
void similarity_tile(const at::Tensor& fr, const acc_t* fn_r, const at::Tensor& wt,
                     const acc_t* wn_t, int64_t m, acc_t sigma, int64_t kind, at::Tensor& d_tile,
                     int64_t* arg_tile) {
  const int64_t rt = fr.size(0), ct = wt.size(0) / m;
  const at::Tensor g = at::mm(fr, wt.t());
  const acc_t* gp = g.data_ptr<acc_t>();
  acc_t* dp = d_tile.data_ptr<acc_t>();
  at::parallel_for(0, rt, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ii = begin; ii < end; ++ii) {
      for (int64_t jj = 0; jj < ct; ++jj) {
        int64_t arg = 0;
        const acc_t s =
            m == 1 ? affinity_sq_distance(fn_r[ii], wn_t[jj], gp[ii * ct + jj])
                   : class_min(gp + (ii * ct + jj) * m, wn_t + jj * m, fn_r[ii], m, &arg);
        arg_tile[ii * ct + jj] = arg;
        dp[ii * ct + jj] = kind == kInverse ? affinity_similarity(kind, s, sigma) : -s / sigma;
      }
    }
  });
  if (kind != kInverse) d_tile.exp_();
}

// Per row and class of a tile: the hinge against d_true (forward sums, when
// rows_r is given) and the coefficient dL/ds at the class's arg-min prototype
// into `a` [rt, ct m] (when given): g_i * w_ij * dd/ds with w_ij = 1 for an
// active hinge, 0 otherwise, and for the own class -active_i when own_active_r
// is given (else 0: the caller adds that term).
template <typename acc_t>
void hinge_tile(const acc_t* dp, const int64_t* arg_tile, int64_t rt, int64_t ct, int64_t m,
                int64_t c0, const int64_t* lab_r, const acc_t* d_true_r, acc_t sigma,
                acc_t margin, int64_t kind, acc_t* rows_r, acc_t* active_r, const acc_t* g_r,
                const acc_t* own_active_r, acc_t* a, acc_t* a_row_sums) {
  at::parallel_for(0, rt, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ii = begin; ii < end; ++ii) {
      acc_t h_sum = 0, count = 0, coef_sum = 0;
      const acc_t g = g_r != nullptr ? g_r[ii] : acc_t(1);
      for (int64_t jj = 0; jj < ct; ++jj) {
        const acc_t d = dp[ii * ct + jj];
        const bool own = c0 + jj == lab_r[ii];
        bool on;
        const acc_t h = affinity_hinge(margin, d, d_true_r[ii], &on);
        on = on && !own;
        h_sum += on ? h : acc_t(0);
        count += on ? acc_t(1) : acc_t(0);
        if (a != nullptr) {
          const acc_t weight = own ? (own_active_r != nullptr ? -own_active_r[ii] : acc_t(0))
                                   : (on ? acc_t(1) : acc_t(0));
          const acc_t coef = g * weight * affinity_similarity_grad(kind, d, sigma);
          a[(ii * ct + jj) * m + arg_tile[ii * ct + jj]] = coef;
          coef_sum += coef;
        }
      }
      if (rows_r != nullptr) {
        rows_r[ii] += h_sum;
        active_r[ii] += count;
      }
      if (a_row_sums != nullptr) a_row_sums[ii] += coef_sum;
    }
  });
}

// grad_f -= 2 A W_t and grad_w -= 2 A^T f_r for a coefficient tile A
// [rt, ct m] (ds/df = 2 (f - w), ds/dw = -2 (f - w)); the column sums of A
// for the 2 colsum(A) W term added at the end.
void add_tile_gradient(const at::Tensor& a, const at::Tensor& fr, const at::Tensor& wt,
                       int64_t r0, int64_t p0, at::Tensor& grad_f, at::Tensor& grad_w,
                       at::Tensor& col_coef) {
  const int64_t rt = a.size(0), pt = a.size(1);
  grad_f.narrow(0, r0, rt).addmm_(a, wt, 1, -2);
  grad_w.narrow(0, p0, pt).addmm_(a.t(), fr, 1, -2);
  col_coef.narrow(0, p0, pt).add_(a.sum(0));
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

// With grad_f / grad_w defined, also accumulates the gradient of sum_i L_i
// (upstream gradient 1 for every row) in the same pass: no recomputation.
// The own-class coefficient -active_i d'(s_iy) is known only after the last
// tile, so that term is added after the loop from the direct arg-min.
template <typename acc_t>
void forward_impl(const AffinityInputs& in, acc_t sigma, acc_t margin, int64_t kind,
                  at::Tensor& rows, at::Tensor& d_true, at::Tensor& active,
                  at::Tensor* grad_f = nullptr, at::Tensor* grad_w = nullptr) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const int64_t n = f.size(0), c = in.num_classes, m = in.num_centers;
  const at::Tensor f_norms = (f * f).sum(1), w_norms = (w * w).sum(1);
  at::Tensor true_arg = at::empty({n}, in.labels.options());
  true_class_affinity<acc_t>(in, f_norms, w_norms, sigma, kind, d_true.data_ptr<acc_t>(),
                             true_arg.data_ptr<int64_t>());
  rows.zero_();
  active.zero_();
  const bool with_grad = grad_f != nullptr;
  at::Tensor row_coef = at::zeros({n}, f.options());
  at::Tensor col_coef = at::zeros({w.size(0)}, f.options());
  const int64_t ct_max = classes_per_tile(m);
  const int64_t rt_max = std::min(kRowTile, n), ctile = std::min(ct_max, c);
  at::Tensor d_buf = at::empty({rt_max * ctile}, f.options());
  at::Tensor arg_buf = at::empty({rt_max * ctile}, in.labels.options());
  at::Tensor a_buf = with_grad ? at::empty({rt_max * ctile * m}, f.options()) : at::Tensor();
  const acc_t* fnp = f_norms.data_ptr<acc_t>();
  const acc_t* wnp = w_norms.data_ptr<acc_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t rt = std::min(kRowTile, n - r0);
    const at::Tensor fr = f.narrow(0, r0, rt);
    for (int64_t c0 = 0; c0 < c; c0 += ct_max) {
      const int64_t ct = std::min(ct_max, c - c0);
      const at::Tensor wt = w.narrow(0, c0 * m, ct * m);
      at::Tensor d_tile = d_buf.narrow(0, 0, rt * ct).view({rt, ct});
      similarity_tile<acc_t>(fr, fnp + r0, wt, wnp + c0 * m, m, sigma, kind, d_tile,
                             arg_buf.data_ptr<int64_t>());
      at::Tensor a;
      if (with_grad) {
        a = a_buf.narrow(0, 0, rt * ct * m).view({rt, ct * m});
        if (m > 1) a.zero_();
      }
      hinge_tile<acc_t>(d_tile.data_ptr<acc_t>(), arg_buf.data_ptr<int64_t>(), rt, ct, m, c0,
                        lab + r0, d_true.data_ptr<acc_t>() + r0, sigma, margin, kind,
                        rows.data_ptr<acc_t>() + r0, active.data_ptr<acc_t>() + r0, nullptr,
                        nullptr, with_grad ? a.data_ptr<acc_t>() : nullptr,
                        with_grad ? row_coef.data_ptr<acc_t>() + r0 : nullptr);
      if (with_grad) add_tile_gradient(a, fr, wt, r0, c0 * m, *grad_f, *grad_w, col_coef);
    }
  }
  if (!with_grad) return;
  // the own class: coefficient -active_i d'(s_iy) at the direct arg-min prototype
  const at::Tensor dds = kind == kInverse ? d_true.square().div(-sigma) : d_true.div(-sigma);
  const at::Tensor own_coef = active.neg().mul(dds);
  const at::Tensor own_proto = in.labels * m + true_arg;
  grad_f->addcmul_(own_coef.unsqueeze(1), w.index_select(0, own_proto), -2);
  row_coef.add_(own_coef);
  grad_w->index_add_(0, own_proto, f * own_coef.unsqueeze(1), -2);
  col_coef.index_add_(0, own_proto, own_coef);
  grad_f->addcmul_(row_coef.unsqueeze(1), f, 2);
  grad_w->addcmul_(col_coef.unsqueeze(1), w, 2);
}

template <typename acc_t>
void backward_impl(const AffinityInputs& in, const at::Tensor& g_rows, const at::Tensor& d_true,
                   const at::Tensor& active, acc_t sigma, acc_t margin, int64_t kind,
                   at::Tensor& grad_f, at::Tensor& grad_w) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const int64_t n = f.size(0), c = in.num_classes, m = in.num_centers;
  const at::Tensor f_norms = (f * f).sum(1), w_norms = (w * w).sum(1);
  at::Tensor row_coef = at::zeros({n}, f.options());
  at::Tensor col_coef = at::zeros({w.size(0)}, f.options());
  const int64_t ct_max = classes_per_tile(m);
  const int64_t rt_max = std::min(kRowTile, n), ctile = std::min(ct_max, c);
  at::Tensor d_buf = at::empty({rt_max * ctile}, f.options());
  at::Tensor arg_buf = at::empty({rt_max * ctile}, in.labels.options());
  at::Tensor a_buf = at::empty({rt_max * ctile * m}, f.options());
  const acc_t* fnp = f_norms.data_ptr<acc_t>();
  const acc_t* wnp = w_norms.data_ptr<acc_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t rt = std::min(kRowTile, n - r0);
    const at::Tensor fr = f.narrow(0, r0, rt);
    for (int64_t c0 = 0; c0 < c; c0 += ct_max) {
      const int64_t ct = std::min(ct_max, c - c0);
      const at::Tensor wt = w.narrow(0, c0 * m, ct * m);
      at::Tensor d_tile = d_buf.narrow(0, 0, rt * ct).view({rt, ct});
      similarity_tile<acc_t>(fr, fnp + r0, wt, wnp + c0 * m, m, sigma, kind, d_tile,
                             arg_buf.data_ptr<int64_t>());
      at::Tensor a = a_buf.narrow(0, 0, rt * ct * m).view({rt, ct * m});
      if (m > 1) a.zero_();
      hinge_tile<acc_t>(d_tile.data_ptr<acc_t>(), arg_buf.data_ptr<int64_t>(), rt, ct, m, c0,
                        lab + r0, d_true.data_ptr<acc_t>() + r0, sigma, margin, kind, nullptr,
                        nullptr, g_rows.data_ptr<acc_t>() + r0, active.data_ptr<acc_t>() + r0,
                        a.data_ptr<acc_t>(), row_coef.data_ptr<acc_t>() + r0);
      add_tile_gradient(a, fr, wt, r0, c0 * m, grad_f, grad_w, col_coef);
    }
  }
  grad_f.addcmul_(row_coef.unsqueeze(1), f, 2);
  grad_w.addcmul_(col_coef.unsqueeze(1), w, 2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_hinge_cpu(const at::Tensor& f,
                                                                  const at::Tensor& prototypes,
                                                                  const at::Tensor& labels,
                                                                  double sigma, double margin,
                                                                  int64_t similarity) {
  const AffinityInputs in =
      prepare_affinity_inputs(f, prototypes, labels, sigma, similarity, c10::kCPU);
  at::Tensor rows = at::empty({f.size(0)}, in.f.options());
  at::Tensor d_true = at::empty_like(rows), active = at::empty_like(rows);
  AT_DISPATCH_FLOATING_TYPES(in.f.scalar_type(), "affinity_hinge_cpu", [&] {
    forward_impl<scalar_t>(in, scalar_t(sigma), scalar_t(margin), similarity, rows, d_true,
                           active);
  });
  return {rows, d_true, active};
}

std::tuple<at::Tensor, at::Tensor> affinity_hinge_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& f, const at::Tensor& prototypes,
    const at::Tensor& labels, const at::Tensor& d_true, const at::Tensor& active, double sigma,
    double margin, int64_t similarity) {
  const AffinityInputs in =
      prepare_affinity_inputs(f, prototypes, labels, sigma, similarity, c10::kCPU);
  const int64_t n = f.size(0);
  for (const at::Tensor* t : {&grad_rows, &d_true, &active})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == f.device(),
                "affinity_hinge_backward: per-row tensors must be [N] on f's device");
  const at::Tensor g = grad_rows.to(in.f.scalar_type()).contiguous();
  const at::Tensor dt = d_true.to(in.f.scalar_type()).contiguous();
  const at::Tensor ac = active.to(in.f.scalar_type()).contiguous();
  at::Tensor grad_f = at::zeros_like(in.f), grad_w = at::zeros_like(in.prototypes);
  AT_DISPATCH_FLOATING_TYPES(in.f.scalar_type(), "affinity_hinge_backward_cpu", [&] {
    backward_impl<scalar_t>(in, g, dt, ac, scalar_t(sigma), scalar_t(margin), similarity,
                            grad_f, grad_w);
  });
  return {grad_f.to(f.scalar_type()),
          grad_w.view(prototypes.sizes()).to(prototypes.scalar_type())};
}

// sum_i L_i and its gradients (for f and the prototypes) in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_hinge_sum_with_grad_cpu(
    const at::Tensor& f, const at::Tensor& prototypes, const at::Tensor& labels, double sigma,
    double margin, int64_t similarity) {
  const AffinityInputs in =
      prepare_affinity_inputs(f, prototypes, labels, sigma, similarity, c10::kCPU);
  at::Tensor rows = at::empty({f.size(0)}, in.f.options());
  at::Tensor d_true = at::empty_like(rows), active = at::empty_like(rows);
  at::Tensor grad_f = at::zeros_like(in.f), grad_w = at::zeros_like(in.prototypes);
  AT_DISPATCH_FLOATING_TYPES(in.f.scalar_type(), "affinity_hinge_sum_with_grad_cpu", [&] {
    forward_impl<scalar_t>(in, scalar_t(sigma), scalar_t(margin), similarity, rows, d_true,
                           active, &grad_f, &grad_w);
  });
  return {rows.sum(), grad_f.to(f.scalar_type()),
          grad_w.view(prototypes.sizes()).to(prototypes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("affinity_hinge_sum_with_grad", &affinity_hinge_sum_with_grad_cpu);
  m.impl("affinity_hinge", &affinity_hinge_cpu);
  m.impl("affinity_hinge_backward", &affinity_hinge_backward_cpu);
}

}  // namespace confusion_kernels
