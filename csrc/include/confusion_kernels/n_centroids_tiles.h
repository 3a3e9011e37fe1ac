// The N-Centroids loss rows and their gradient, shared by the CPU and CUDA
// kernels (host code, ATen):
//   x_i = z_i / max(|z_i|, 1e-12)
//   L_i = d(x_i, c_{y_i}) - g [ d(x_i, c_{h_i}) + mean_{k != y_i} d(x_i, c_k) ],
//   h_i = argmin_{k != y_i} d(x_i, c_k)            (g = 1 with negatives, else 0)
// The own and the hardest centroid are one pair per row, computed exactly from
// differences (Tiles::direct). The hardest index and the mean over negatives
// need every centroid: each row tile (Tiles::row_tiles) against every centroid
// tile in order, one product per tile pair, with an epilogue
// (Tiles::negatives, per pair sphere_math.h) that keeps per row the running
// first minimum, the running sum and, for gradients, the coefficient tile B of
// the centroids (grad_x += B C_t, one more product per tile) plus a per-row
// coefficient of x. Backward maps grad_x through the normalisation:
// grad_z = (grad_x - x (x . grad_x)) / |z| (grad_x / 1e-12 below the clamp).
// Memory O((N + K) D + tile); nothing of size N x K.
//
// The device's epilogues (`Tiles`):
//   Tiles::kDevice, Tiles::kRowTile, Tiles::kCentroidTile, Tiles::Guard
//   Tiles::normalise(in): in.norms, in.x, in.x_norm2 from in.z
//   Tiles::through_normalisation(in, grad_x): dL/dz from dL/dx
//   Tiles::direct(in, index, weight, dist, grad_x): per row with index_i >= 0
//       dist_i = d(x_i, c_{index_i}) (exact) and, when grad_x is defined,
//       grad_x_i += weight_i dd/dx; rows with index_i < 0 get dist_i = 0
//   Tiles::negatives(g, in, r0, c0, weight_r, best_r, best_k_r, sum_r, coef, x_coef_r, grad_x_r)
//       one Gram tile g [rt, ct]: running first min (best_r, best_k_r) and sum
//       (sum_r) over the row's negatives when best_r is defined; with weight_r
//       defined, coef [rt, ct] = weight_i * beta_ik for the Gram pairs (0 for
//       the own class and for pairs recomputed exactly, whose whole gradient
//       goes straight into grad_x_r), x_coef_r += weight_i * alpha_ik.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/gram_tiles.h"
#include "confusion_kernels/sphere_math.h"

namespace confusion_kernels {
namespace n_centroids {

// kNormEps: spec.h (generated from confusion_kernels/_spec.py).
using confusion_kernels::kNormEps;

inline int64_t sphere_metric_code(c10::string_view name, const char* op) {
  const std::string key(name.data(), name.size());
  for (int64_t code = 0; code < int64_t(sizeof(kSphereMetricNames) / sizeof(kSphereMetricNames[0]));
       ++code)
    if (key == kSphereMetricNames[code]) return code;
  TORCH_CHECK(false, op, ": unknown metric '", key,
              "'; expected euclidean, cosine or great_circle");
}

struct Inputs {
  at::Tensor z;          // [N, D] accumulation dtype, contiguous
  at::Tensor norms;      // [N] |z_i|
  at::Tensor x;          // [N, D] z_i / max(|z_i|, eps)
  at::Tensor x_norm2;    // [N] |x_i|^2
  at::Tensor centroids;  // [K, D] accumulation dtype, contiguous
  at::Tensor c_norm2;    // [K]
  at::Tensor labels;     // [N] int64 in [0, K)
  at::Tensor bad;        // [N] bool: labels out of range (GPU; undefined on CPU)
  int64_t metric = 0;    // SphereMetric
  bool negatives = true;
};

// norms, x and x_norm2 of `in` from in.z with tensor ops (a device's
// Tiles::normalise may run them so).
inline void normalise_with_aten(Inputs& in) {
  in.norms = at::linalg_vector_norm(in.z, 2, {1}, false, c10::nullopt);
  in.x = (in.z / in.norms.clamp_min(kNormEps).unsqueeze(1)).contiguous();
  in.x_norm2 = (in.x * in.x).sum(1);
}

template <class Tiles>
Inputs prepare_inputs(const at::Tensor& z, const at::Tensor& centroids, const at::Tensor& labels,
                      c10::string_view metric, bool use_negatives, c10::DeviceType device,
                      const char* op) {
  Inputs in;
  in.metric = sphere_metric_code(metric, op);
  TORCH_CHECK(z.dim() == 2 && z.size(0) > 0 && z.size(1) > 0, op,
              ": z must be 2-D [N, D] with N, D > 0, got shape ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && at::isFloatingType(centroids.scalar_type()),
              op, ": z and centroids must be floating");
  TORCH_CHECK(centroids.dim() == 2 && centroids.size(0) > 0 && centroids.size(1) == z.size(1), op,
              ": centroids must be [K, D] with K > 0 and D = ", z.size(1), ", got shape ",
              centroids.sizes());
  TORCH_CHECK(!use_negatives || centroids.size(0) >= 2, op,
              ": negatives need at least 2 centroids (K >= 2)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == z.size(0) && labels.scalar_type() == at::kLong,
              op, ": labels must be int64 [N] with N = ", z.size(0));
  TORCH_CHECK(z.device().type() == device && centroids.device() == z.device() &&
                  labels.device() == z.device(),
              op, ": z, centroids and labels must all be on one ", device, " device");
  const GuardedIndex guarded = guard_label_range(labels, centroids.size(0), op);
  const at::ScalarType acc = accumulation_type(z.scalar_type());
  in.z = z.to(acc).contiguous();
  Tiles::normalise(in);
  in.centroids = centroids.to(acc).contiguous();
  in.c_norm2 = (in.centroids * in.centroids).sum(1);
  in.labels = guarded.index.contiguous();
  in.bad = guarded.bad;
  in.negatives = use_negatives;
  return in;
}

// The pass over every centroid tile: hardest negative (best, best_k) and the
// sum over negatives when best is defined; with weight defined, grad_x +=
// weight_i * sum_{k != y_i} dd(x_i, c_k)/dx.
template <class Tiles>
void negatives_pass(const Inputs& in, const at::Tensor& best, const at::Tensor& best_k,
                    const at::Tensor& sum, const at::Tensor& weight, const at::Tensor& grad_x) {
  const bool with_grad = weight.defined();
  const int64_t n = in.x.size(0), k = in.centroids.size(0);
  const int64_t ct_max = std::min<int64_t>(Tiles::kCentroidTile, k);
  at::Tensor x_coef;
  if (with_grad) x_coef = at::zeros({n}, in.x.options());
  // a row tile against every centroid tile in order (the first hardest negative and
  // the sums keep that order); Tiles::row_tiles runs the row tiles (CPU: in parallel,
  // each on one thread; CUDA: one after another on the stream)
  Tiles::row_tiles(n, [&](int64_t r0, int64_t rt) {
    at::Tensor coef_buf;
    if (with_grad) coef_buf = at::empty({rt * ct_max}, in.x.options());
    for_each_column_tile(in.x.narrow(0, r0, rt), in.centroids, Tiles::kCentroidTile,
                         [&](int64_t c0, int64_t ct, const at::Tensor& cents, const at::Tensor& g) {
                           at::Tensor coef;
                           if (with_grad) coef = coef_buf.narrow(0, 0, rt * ct).view({rt, ct});
                           Tiles::negatives(g, in, r0, c0, rows_of(weight, r0, rt),
                                            rows_of(best, r0, rt), rows_of(best_k, r0, rt),
                                            rows_of(sum, r0, rt), coef, rows_of(x_coef, r0, rt),
                                            rows_of(grad_x, r0, rt));
                           if (with_grad) grad_x.narrow(0, r0, rt).addmm_(coef, cents);
                         });
  });
  if (with_grad) grad_x.addcmul_(x_coef.unsqueeze(1), in.x);
}

// dL/dz from dL/dx through x = z / max(|z|, eps), with tensor ops (a device's
// Tiles::through_normalisation may run them so).
inline at::Tensor through_normalisation_with_aten(const Inputs& in, const at::Tensor& grad_x) {
  const at::Tensor radial = (grad_x * in.x).sum(1, true);
  const at::Tensor n = in.norms.unsqueeze(1);
  return at::where(n >= kNormEps, (grad_x - in.x * radial) / n, grad_x / kNormEps);
}

// Rows L, the hardest index (-1 without negatives) and, when grad_weight is
// defined, dL/dx for upstream gradients grad_weight [N] (one pass).
template <class Tiles>
std::tuple<at::Tensor, at::Tensor> rows_and_grad(const Inputs& in, const at::Tensor& grad_weight,
                                                 const at::Tensor& grad_x) {
  const int64_t n = in.x.size(0), k = in.centroids.size(0);
  at::Tensor own = at::empty({n}, in.x.options());
  Tiles::direct(in, in.labels, grad_weight, own, grad_x);
  at::Tensor best_k = at::full({n}, -1, in.labels.options());
  if (!in.negatives) return {own, best_k};
  at::Tensor best = at::empty({n}, in.x.options()), sum = at::zeros({n}, in.x.options());
  const at::Tensor mean_weight =
      grad_weight.defined() ? grad_weight / -double(k - 1) : at::Tensor();
  negatives_pass<Tiles>(in, best, best_k, sum, mean_weight, grad_x);
  at::Tensor hard = at::empty({n}, in.x.options());
  Tiles::direct(in, best_k, grad_weight.defined() ? -grad_weight : at::Tensor(), hard, grad_x);
  return {own - hard - sum / double(k - 1), best_k};
}

// ---- the three ops --------------------------------------------------------

template <class Tiles>
std::tuple<at::Tensor, at::Tensor> rows_op(const at::Tensor& z, const at::Tensor& centroids,
                                           const at::Tensor& labels, c10::string_view metric,
                                           bool use_negatives) {
  const typename Tiles::Guard guard(z.device());
  const Inputs in = prepare_inputs<Tiles>(z, centroids, labels, metric, use_negatives,
                                          Tiles::kDevice, "n_centroids_rows");
  auto [rows, hardest] = rows_and_grad<Tiles>(in, at::Tensor(), at::Tensor());
  return {poison_rows(rows, in.bad), hardest};
}

template <class Tiles>
at::Tensor rows_backward_op(const at::Tensor& grad_rows, const at::Tensor& z,
                            const at::Tensor& centroids, const at::Tensor& labels,
                            const at::Tensor& hardest, c10::string_view metric,
                            bool use_negatives) {
  const typename Tiles::Guard guard(z.device());
  const Inputs in = prepare_inputs<Tiles>(z, centroids, labels, metric, use_negatives,
                                          Tiles::kDevice, "n_centroids_rows_backward");
  const int64_t n = in.x.size(0), k = in.centroids.size(0);
  for (const at::Tensor* t : {&grad_rows, &hardest})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == z.device(),
                "n_centroids_rows_backward: grad_rows and hardest must be [N] on z's device");
  TORCH_CHECK(hardest.scalar_type() == at::kLong,
              "n_centroids_rows_backward: hardest must be int64");
  const at::Tensor g = grad_rows.to(in.x.scalar_type()).contiguous();
  at::Tensor grad_x = at::zeros_like(in.x);
  at::Tensor scratch = at::empty({n}, in.x.options());
  Tiles::direct(in, in.labels, g, scratch, grad_x);
  at::Tensor bad = in.bad;
  if (in.negatives) {
    const GuardedIndex h = guard_label_range(hardest, k, "n_centroids_rows_backward", "hardest");
    bad = merge_bad(bad, h.bad);
    Tiles::direct(in, h.index.contiguous(), -g, scratch, grad_x);
    negatives_pass<Tiles>(in, at::Tensor(), at::Tensor(), at::Tensor(), g / -double(k - 1), grad_x);
  }
  return poison_rows(Tiles::through_normalisation(in, grad_x), bad).to(z.scalar_type());
}

// sum_i L_i and its gradient in z from one pass (the training path, whose
// upstream gradient is a scalar).
template <class Tiles>
std::tuple<at::Tensor, at::Tensor> sum_with_grad_op(const at::Tensor& z,
                                                    const at::Tensor& centroids,
                                                    const at::Tensor& labels,
                                                    c10::string_view metric, bool use_negatives) {
  const typename Tiles::Guard guard(z.device());
  const Inputs in = prepare_inputs<Tiles>(z, centroids, labels, metric, use_negatives,
                                          Tiles::kDevice, "n_centroids_sum_with_grad");
  at::Tensor grad_x = at::zeros_like(in.x);
  const at::Tensor ones = at::ones({in.x.size(0)}, in.x.options());
  const at::Tensor rows = std::get<0>(rows_and_grad<Tiles>(in, ones, grad_x));
  return {poison_all(rows.sum(), in.bad),
          poison_rows(Tiles::through_normalisation(in, grad_x), in.bad).to(z.scalar_type())};
}

}  // namespace n_centroids
}  // namespace confusion_kernels
