// C++ CPU kernels of the affinity loss rows (SPEC section 3):
//   L_i = sum_{j != y_i} relu(margin + d_ij - d_{i y_i}),  d_ij = sim(min_t |f_i - w_jt|^2)
// and their backward, in O((N + P) D + tile) memory (P = C m prototypes).
//
// Squared distances come from (row tile x prototype tile) matrix products in
// the Gram form; a tile holds whole classes so the min over t stays inside it.
// Forward: d_true by direct dot products, then every tile adds the hinges of
// its classes. Backward recomputes each tile and turns it into the sparse
// coefficient tile A (one entry per row and class: the arg-min prototype),
// then dL/df = 2 rowsum(A) f - 2 A W and dL/dW = 2 colsum(A) W - 2 A^T f,
// accumulated tile by tile in a fixed order (deterministic).
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

constexpr int64_t kRowTile = 256;
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

template <typename acc_t>
void forward_impl(const AffinityInputs& in, acc_t sigma, acc_t margin, int64_t kind,
                  acc_t* rows, acc_t* d_true, acc_t* active) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const int64_t n = f.size(0), d = f.size(1), c = in.num_classes, m = in.num_centers;
  const at::Tensor f_norms = (f * f).sum(1), w_norms = (w * w).sum(1);
  const acc_t* fp = f.data_ptr<acc_t>();
  const acc_t* wp = w.data_ptr<acc_t>();
  const acc_t* fnp = f_norms.data_ptr<acc_t>();
  const acc_t* wnp = w_norms.data_ptr<acc_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dots(m);
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* fi = fp + i * d;
      for (int64_t t = 0; t < m; ++t) {
        const acc_t* wt = wp + (lab[i] * m + t) * d;
        acc_t dot = 0;
        for (int64_t k = 0; k < d; ++k) dot += fi[k] * wt[k];
        dots[t] = dot;
      }
      int64_t arg;
      const acc_t smin = class_min(dots.data(), wnp + lab[i] * m, fnp[i], m, &arg);
      d_true[i] = affinity_similarity(kind, smin, sigma);
      rows[i] = 0;
      active[i] = 0;
    }
  });
  const int64_t ct_max = classes_per_tile(m);
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t rt = std::min(kRowTile, n - r0);
    const at::Tensor fr = f.narrow(0, r0, rt);
    for (int64_t c0 = 0; c0 < c; c0 += ct_max) {
      const int64_t ct = std::min(ct_max, c - c0);
      const at::Tensor g = at::mm(fr, w.narrow(0, c0 * m, ct * m).t()).contiguous();
      const acc_t* gp = g.data_ptr<acc_t>();
      at::parallel_for(0, rt, 8, [&](int64_t begin, int64_t end) {
        for (int64_t ii = begin; ii < end; ++ii) {
          const int64_t i = r0 + ii;
          acc_t h_sum = 0, count = 0;
          for (int64_t jj = 0; jj < ct; ++jj) {
            const int64_t j = c0 + jj;
            if (j == lab[i]) continue;
            int64_t arg;
            const acc_t smin = class_min(gp + ii * ct * m + jj * m, wnp + j * m, fnp[i], m, &arg);
            bool on;
            h_sum += affinity_hinge(margin, affinity_similarity(kind, smin, sigma), d_true[i], &on);
            count += on ? acc_t(1) : acc_t(0);
          }
          rows[i] += h_sum;
          active[i] += count;
        }
      });
    }
  }
}

template <typename acc_t>
void backward_impl(const AffinityInputs& in, const acc_t* g_rows, const acc_t* d_true,
                   const acc_t* active, acc_t sigma, acc_t margin, int64_t kind,
                   at::Tensor& grad_f, at::Tensor& grad_w) {
  const at::Tensor& f = in.f;
  const at::Tensor& w = in.prototypes;
  const int64_t n = f.size(0), c = in.num_classes, m = in.num_centers;
  const at::Tensor f_norms = (f * f).sum(1), w_norms = (w * w).sum(1);
  const acc_t* fnp = f_norms.data_ptr<acc_t>();
  const acc_t* wnp = w_norms.data_ptr<acc_t>();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  at::Tensor row_coef = at::zeros({n}, f.options());
  at::Tensor col_coef = at::zeros({w.size(0)}, f.options());
  const int64_t ct_max = classes_per_tile(m);
  at::Tensor a_buf = at::empty({std::min(kRowTile, n) * std::min(ct_max, c) * m}, f.options());
  for (int64_t r0 = 0; r0 < n; r0 += kRowTile) {
    const int64_t rt = std::min(kRowTile, n - r0);
    const at::Tensor fr = f.narrow(0, r0, rt);
    for (int64_t c0 = 0; c0 < c; c0 += ct_max) {
      const int64_t ct = std::min(ct_max, c - c0);
      const at::Tensor wt = w.narrow(0, c0 * m, ct * m);
      const at::Tensor g = at::mm(fr, wt.t()).contiguous();
      const acc_t* gp = g.data_ptr<acc_t>();
      // A: one coefficient per (row, class), at the class's arg-min prototype.
      at::Tensor a = a_buf.narrow(0, 0, rt * ct * m).view({rt, ct * m});
      a.zero_();
      acc_t* ap = a.data_ptr<acc_t>();
      at::parallel_for(0, rt, 8, [&](int64_t begin, int64_t end) {
        for (int64_t ii = begin; ii < end; ++ii) {
          const int64_t i = r0 + ii;
          if (g_rows[i] == acc_t(0)) continue;
          for (int64_t jj = 0; jj < ct; ++jj) {
            const int64_t j = c0 + jj;
            int64_t arg;
            const acc_t smin = class_min(gp + (ii * ct + jj) * m, wnp + j * m, fnp[i], m, &arg);
            const acc_t dj = affinity_similarity(kind, smin, sigma);
            acc_t weight;  // dL_i / dd_ij
            if (j == lab[i]) {
              weight = -active[i];
            } else {
              bool on;
              affinity_hinge(margin, dj, d_true[i], &on);
              weight = on ? acc_t(1) : acc_t(0);
            }
            ap[(ii * ct + jj) * m + arg] = g_rows[i] * weight * affinity_similarity_grad(kind, dj, sigma);
          }
        }
      });
      // ds/df = 2 (f - w), ds/dw = -2 (f - w)
      grad_f.narrow(0, r0, rt).addmm_(a, wt, 1, -2);
      grad_w.narrow(0, c0 * m, ct * m).addmm_(a.t(), fr, 1, -2);
      row_coef.narrow(0, r0, rt).add_(a.sum(1));
      col_coef.narrow(0, c0 * m, ct * m).add_(a.sum(0));
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
    forward_impl<scalar_t>(in, scalar_t(sigma), scalar_t(margin), similarity,
                           rows.data_ptr<scalar_t>(), d_true.data_ptr<scalar_t>(),
                           active.data_ptr<scalar_t>());
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
    backward_impl<scalar_t>(in, g.data_ptr<scalar_t>(), dt.data_ptr<scalar_t>(),
                            ac.data_ptr<scalar_t>(), scalar_t(sigma), scalar_t(margin),
                            similarity, grad_f, grad_w);
  });
  return {grad_f.to(f.scalar_type()),
          grad_w.view(prototypes.sizes()).to(prototypes.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("affinity_hinge", &affinity_hinge_cpu);
  m.impl("affinity_hinge_backward", &affinity_hinge_backward_cpu);
}

}  // namespace confusion_kernels
