// C++ CPU kernels of the affinity loss rows (docs/math.md, "Affinity loss"):
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
#include "confusion_kernels/affinity_tiles.h"
#include "confusion_kernels/checks.h"

namespace confusion_kernels {
namespace {

// Affinities of one (row tile x class tile) block from its Gram tile g
// [rt, ct m]: per row and class the min over the m prototypes
// (affinity_sq_distance, class_min), the first arg-min, and the similarity
// (affinity_similarity; the exp as one vectorised pass over the tile).
template <typename acc_t>
void similarity_tile(const at::Tensor& g, const acc_t* fn_r, const acc_t* wn_t, int64_t m,
                     acc_t sigma, int64_t kind, at::Tensor& d_tile, int64_t* arg_tile) {
  const int64_t rt = g.size(0), ct = g.size(1) / m;
  const acc_t* gp = g.data_ptr<acc_t>();
  acc_t* dp = d_tile.data_ptr<acc_t>();
  at::parallel_for(0, rt, 16, [&](int64_t begin, int64_t end) {
    for (int64_t ii = begin; ii < end; ++ii) {
      for (int64_t jj = 0; jj < ct; ++jj) {
        int64_t arg = 0;
        const acc_t s = m == 1
                            ? affinity_sq_distance(fn_r[ii], wn_t[jj], gp[ii * ct + jj])
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
                int64_t c0, const int64_t* lab_r, const acc_t* d_true_r, acc_t sigma, acc_t margin,
                int64_t kind, acc_t* rows_r, acc_t* active_r, const acc_t* g_r,
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
  static void similarity(const at::Tensor& g, const at::Tensor& fn_r, const at::Tensor& wn_t,
                         int64_t m, double sigma, int64_t kind, at::Tensor& d_tile,
                         at::Tensor& arg_tile) {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "affinity_similarity_cpu", [&] {
      similarity_tile<scalar_t>(g.contiguous(), fn_r.data_ptr<scalar_t>(),
                                wn_t.data_ptr<scalar_t>(), m, scalar_t(sigma), kind, d_tile,
                                arg_tile.data_ptr<int64_t>());
    });
  }
  static void hinge(const at::Tensor& d_tile, const at::Tensor& arg_tile, int64_t m, int64_t c0,
                    const at::Tensor& lab_r, const at::Tensor& d_true_r, double sigma,
                    double margin, int64_t kind, const at::Tensor& rows_r,
                    const at::Tensor& active_r, const at::Tensor& g_r,
                    const at::Tensor& own_active_r, const at::Tensor& a,
                    const at::Tensor& a_row_sums) {
    AT_DISPATCH_FLOATING_TYPES(d_tile.scalar_type(), "affinity_hinge_tile_cpu", [&] {
      hinge_tile<scalar_t>(d_tile.data_ptr<scalar_t>(), arg_tile.data_ptr<int64_t>(),
                           d_tile.size(0), d_tile.size(1), m, c0, lab_r.data_ptr<int64_t>(),
                           d_true_r.data_ptr<scalar_t>(), scalar_t(sigma), scalar_t(margin), kind,
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
