// Input checks run by every C++ entry point before any kernel touches memory.
// The Python layer validates first with friendlier messages; these checks
// keep direct torch.ops calls from reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "confusion_kernels/affinity_math.h"
#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// Every op holds one of these while it runs. The kernels call ATen (matrix
// products, reductions) on tensors already in their compute dtype; under
// torch.autocast those calls would be re-cast (an fp32 Gram tile computed in
// bf16, then handed to an fp32 epilogue), so the autocast keys are excluded.
// They also run below autograd: the ops' gradients are their registered backward
// ops, and an ATen call on an input that requires grad would otherwise record a
// graph node for every tile (and `out=` calls would refuse to run).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// float64 accumulates in float64, everything else (fp16, bf16, fp32) in fp32.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The ops take the metric's and the similarity's *name*; these two tables are
// the only place where C++ maps names to its own codes (Metric, Similarity).
// Python never sends a code, so nothing has to be kept in step across languages.
inline int64_t metric_code(c10::string_view name, const char* op) {
  const std::string key(name.data(), name.size());
  for (int64_t code = 0; code < kNumMetrics; ++code)  // kMetricNames: spec.h
    if (key == kMetricNames[code]) return code;
  TORCH_CHECK(false, op, ": unknown metric '", key,
              "'; expected euclidean, sqeuclidean, manhattan, cosine or smooth_l1");
}

// True for the metrics with a Gram form: euclidean, sqeuclidean, cosine.
constexpr bool has_gram_form(int64_t metric) {
  return metric == kEuclidean || metric == kSqEuclidean || metric == kCosine;
}

// The row-sum ops' kernel algorithm (spec.h: Algorithm), chosen by the Python router
// (confusion_kernels/_routing.py) and passed by name: the ops never choose by themselves. The
// Gram forms (pair_pass, gram_tiles) take euclidean, sqeuclidean and cosine only.
inline int64_t algorithm_code(c10::string_view name, int64_t metric, const char* op) {
  const std::string key(name.data(), name.size());
  int64_t code = -1;
  for (int64_t a = 0; a < kNumAlgorithms; ++a)  // kAlgorithmNames: spec.h
    if (key == kAlgorithmNames[a]) code = a;
  TORCH_CHECK(code >= 0, op, ": unknown algorithm '", key,
              "'; expected direct, pair_pass or gram_tiles");
  TORCH_CHECK(code == kDirect || has_gram_form(metric), op, ": algorithm '", key,
              "' is a Gram form (euclidean, sqeuclidean, cosine); ", kMetricNames[metric],
              " runs 'direct'");
  return code;
}

// Refuses an algorithm that this op has no kernel for on this device (`runs`: those it has).
inline void check_algorithm_runs(bool ok, int64_t algorithm, const char* op, c10::DeviceType device,
                                 const char* runs) {
  TORCH_CHECK(ok, op, ": algorithm '", kAlgorithmNames[algorithm], "' has no kernel on ", device,
              "; it runs ", runs);
}

inline int64_t similarity_code(c10::string_view name, const char* op) {
  const std::string key(name.data(), name.size());
  if (key == "gaussian") return kGaussian;
  if (key == "inverse") return kInverse;
  TORCH_CHECK(false, op, ": unknown similarity '", key, "'; expected gaussian or inverse");
}

// Every label (or other index, named `what`) in [0, num_classes): kernels
// index per-class data with them. Reads two values on the host: CPU tensors only
// (guard_label_range is the form for every device).
inline void check_label_range(const at::Tensor& labels, int64_t num_classes, const char* op,
                              const char* what = "labels") {
  TORCH_CHECK(labels.is_cpu(), op, ": check_label_range reads on the host (CPU tensors only)");
  if (labels.numel() == 0) return;
  const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_classes, op, ": ", what, " must lie in [0, ", num_classes,
              "), got [", lo, ", ", hi, "]");
}

// Indices to index a table with, and the rows whose index was out of range.
struct GuardedIndex {
  at::Tensor index;  // every value in [0, num_classes)
  at::Tensor bad;    // [N] bool; undefined when none can be (checked on the host)
};

// On CPU the range check above (an error for bad input). On a GPU no host
// synchronisation: values out of range are clamped, so that no kernel reads out
// of bounds, and their rows are returned for poison_rows / poison_all (bad input
// gives NaN output, as the Python ops do; docs/design.md, "Host synchronisation").
inline GuardedIndex guard_label_range(const at::Tensor& labels, int64_t num_classes, const char* op,
                                      const char* what = "labels") {
  if (labels.is_cpu()) {
    check_label_range(labels, num_classes, op, what);
    return {labels, at::Tensor()};
  }
  at::Tensor bad = labels.lt(0).logical_or_(labels.ge(num_classes));
  return {labels.clamp(0, num_classes - 1), bad};
}

inline at::Tensor merge_bad(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return a.logical_or(b);
}

// t [N, ...] with NaN in the rows where bad holds (t itself when bad is undefined).
inline at::Tensor poison_rows(const at::Tensor& t, const at::Tensor& bad) {
  if (!bad.defined()) return t;
  std::vector<int64_t> shape(t.dim(), 1);
  shape[0] = bad.size(0);
  return t.masked_fill(bad.view(shape), std::numeric_limits<double>::quiet_NaN());
}

// t all NaN when any row is bad: what every row contributes to (a sum, a table's gradient).
inline at::Tensor poison_all(const at::Tensor& t, const at::Tensor& bad) {
  if (!bad.defined()) return t;
  return t.masked_fill(bad.any(), std::numeric_limits<double>::quiet_NaN());
}

inline void check_intra_inter_inputs(const at::Tensor& x, const at::Tensor& labels, int64_t metric,
                                     c10::DeviceType device) {
  TORCH_CHECK(x.dim() == 2, "intra_inter_sums: x must be 2-D [N, D], got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "intra_inter_sums: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) > 0, "intra_inter_sums: x has no rows (N = 0)");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              "intra_inter_sums: labels must be 1-D of length N = ", x.size(0), ", got shape ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "intra_inter_sums: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(x.device().type() == device, "intra_inter_sums: x must be on ", device, ", got ",
              x.device());
  TORCH_CHECK(labels.device() == x.device(), "intra_inter_sums: labels are on ", labels.device(),
              " but x is on ", x.device());
  TORCH_CHECK(metric >= 0 && metric < kNumMetrics, "intra_inter_sums: unknown metric code ",
              metric);
}

inline void check_row_gradient(const at::Tensor& g, const at::Tensor& x, const char* name) {
  TORCH_CHECK(g.dim() == 1 && g.size(0) == x.size(0), "intra_inter_sums_backward: ", name,
              " must be 1-D of length ", x.size(0), ", got shape ", g.sizes());
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "intra_inter_sums_backward: ", name,
              " must be floating");
  TORCH_CHECK(g.device() == x.device(), "intra_inter_sums_backward: ", name, " is on ", g.device(),
              " but x is on ", x.device());
}

// Inputs of a kernel after the checks: the rows in the accumulation dtype and
// the labels, both contiguous, plus (backward) the per-row upstream gradients.
struct RowSumsInputs {
  at::Tensor x;
  at::Tensor labels;
  at::Tensor grad_in;   // undefined in forward
  at::Tensor grad_out;  // undefined in forward
  int64_t metric = 0;   // the Metric code of the op's metric name
};

inline RowSumsInputs prepare_row_sums_inputs(const at::Tensor& x, const at::Tensor& labels,
                                             c10::string_view metric_name, c10::DeviceType device) {
  const int64_t metric = metric_code(metric_name, "intra_inter_sums");
  check_intra_inter_inputs(x, labels, metric, device);
  return {
      x.to(accumulation_type(x.scalar_type())).contiguous(), labels.contiguous(), {}, {}, metric};
}

// weighted_pair_sums_with_grad(x, labels, w_in, w_out, metric): the row-sum
// checks, a metric with a Gram form, and floating [N] weights on x's device.
inline RowSumsInputs prepare_pair_pass_inputs(const at::Tensor& x, const at::Tensor& labels,
                                              const at::Tensor& w_in, const at::Tensor& w_out,
                                              c10::string_view metric_name,
                                              c10::DeviceType device) {
  RowSumsInputs in = prepare_row_sums_inputs(x, labels, metric_name, device);
  TORCH_CHECK(has_gram_form(in.metric),
              "weighted_pair_sums_with_grad: metrics with a Gram form only (euclidean, "
              "sqeuclidean, cosine)");
  const int64_t n = in.x.size(0);
  for (const at::Tensor* w : {&w_in, &w_out})
    TORCH_CHECK(w->dim() == 1 && w->size(0) == n && at::isFloatingType(w->scalar_type()) &&
                    w->device() == x.device(),
                "weighted_pair_sums_with_grad: the weights must be floating [N] tensors on ",
                x.device(), " with N = ", n);
  return in;
}

// Calls f(std::integral_constant<int64_t, M>{}) for the metric code M; an unknown
// code is an error of `op`.
template <typename F>
void dispatch_metric(int64_t metric, const char* op, F&& f) {
  switch (metric) {
    case kEuclidean:
      return f(std::integral_constant<int64_t, kEuclidean>{});
    case kSqEuclidean:
      return f(std::integral_constant<int64_t, kSqEuclidean>{});
    case kManhattan:
      return f(std::integral_constant<int64_t, kManhattan>{});
    case kCosine:
      return f(std::integral_constant<int64_t, kCosine>{});
    case kSmoothL1:
      return f(std::integral_constant<int64_t, kSmoothL1>{});
    default:
      TORCH_CHECK(false, op, ": unknown metric code ", metric);
  }
}

// dispatch_metric for a metric code with a Gram form; f is instantiated for those
// metrics only, and any other code is an error of `op`.
template <typename F>
void dispatch_gram_metric(int64_t metric, const char* op, F&& f) {
  TORCH_CHECK(has_gram_form(metric), op, ": no Gram form for metric code ", metric);
  dispatch_metric(metric, op, [&](auto m) {
    if constexpr (has_gram_form(decltype(m)::value)) f(m);
  });
}

inline RowSumsInputs prepare_row_sums_backward_inputs(const at::Tensor& grad_in,
                                                      const at::Tensor& grad_out,
                                                      const at::Tensor& x, const at::Tensor& labels,
                                                      c10::string_view metric,
                                                      c10::DeviceType device) {
  RowSumsInputs in = prepare_row_sums_inputs(x, labels, metric, device);
  check_row_gradient(grad_in, x, "grad_in");
  check_row_gradient(grad_out, x, "grad_out");
  in.grad_in = grad_in.to(in.x.scalar_type()).contiguous();
  in.grad_out = grad_out.to(in.x.scalar_type()).contiguous();
  return in;
}

// ---------------------------------------------------------------------------
// Affinity loss inputs.
// ---------------------------------------------------------------------------
struct AffinityInputs {
  at::Tensor f;           // [N, D] in the accumulation dtype, contiguous
  at::Tensor prototypes;  // [C * m, D] in the accumulation dtype, contiguous
  at::Tensor labels;      // [N] int64, contiguous, every value in [0, C)
  at::Tensor bad;         // [N] bool: labels out of range (GPU; undefined on CPU)
  int64_t num_classes = 0;
  int64_t num_centers = 0;
  int64_t similarity = 0;  // the Similarity code of the op's similarity name
};

inline AffinityInputs prepare_affinity_inputs(const at::Tensor& f, const at::Tensor& prototypes,
                                              const at::Tensor& labels, double sigma,
                                              c10::string_view similarity_name,
                                              c10::DeviceType device) {
  const int64_t similarity = similarity_code(similarity_name, "affinity_hinge");
  TORCH_CHECK(f.dim() == 2, "affinity_hinge: f must be 2-D [N, D], got ", f.dim(), "-D");
  TORCH_CHECK(f.size(0) > 0, "affinity_hinge: f has no rows (N = 0)");
  TORCH_CHECK(at::isFloatingType(f.scalar_type()) && at::isFloatingType(prototypes.scalar_type()),
              "affinity_hinge: f and prototypes must be floating");
  TORCH_CHECK(prototypes.dim() == 3 && prototypes.size(2) == f.size(1) && prototypes.size(0) > 0 &&
                  prototypes.size(1) > 0,
              "affinity_hinge: prototypes must be [C, m, D] with C, m > 0 and D = ", f.size(1),
              ", got shape ", prototypes.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == f.size(0) && labels.scalar_type() == at::kLong,
              "affinity_hinge: labels must be int64 [N] with N = ", f.size(0));
  TORCH_CHECK(f.device().type() == device && prototypes.device() == f.device() &&
                  labels.device() == f.device(),
              "affinity_hinge: f, prototypes and labels must all be on one ", device, " device");
  TORCH_CHECK(sigma > 0, "affinity_hinge: sigma must be > 0, got ", sigma);
  const int64_t c = prototypes.size(0);
  GuardedIndex guarded = guard_label_range(labels, c, "affinity_hinge");
  const at::ScalarType acc = accumulation_type(f.scalar_type());
  AffinityInputs in;
  in.f = f.to(acc).contiguous();
  in.prototypes = prototypes.to(acc).reshape({c * prototypes.size(1), f.size(1)}).contiguous();
  in.labels = guarded.index.contiguous();
  in.bad = guarded.bad;
  in.num_classes = c;
  in.num_centers = prototypes.size(1);
  in.similarity = similarity;
  return in;
}

}  // namespace confusion_kernels
