// Arguments of the pair-loss ops (pair_loss_stats, pair_loss_backward) as the CPU and CUDA
// kernels read them: the loss and metric names, the loss's constants, the input checks.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "confusion_kernels/pair_loss_math.h"

namespace confusion_kernels {

inline int64_t pair_loss_code(c10::string_view name) {
  const std::string key(name);
  if (key == "contrastive") return kContrastive;
  if (key == "supcon") return kSupCon;
  if (key == "ntxent") return kNTXent;
  if (key == "multi_similarity") return kMultiSimilarity;
  TORCH_CHECK(false, "pair_loss: unknown loss '", key,
              "'; expected contrastive, supcon, ntxent or multi_similarity");
}

inline bool pair_metric_is_cosine(c10::string_view name) {
  const std::string key(name);
  TORCH_CHECK(key == "euclidean" || key == "cosine", "pair_loss: unknown metric '", key,
              "'; expected euclidean or cosine");
  return key == "cosine";
}

template <typename T>
PairLossParams<T> pair_loss_params(int64_t kind, bool cosine, at::ArrayRef<double> params) {
  const size_t want = kind == kContrastive ? 2 : kind == kMultiSimilarity ? 3 : 1;
  TORCH_CHECK(params.size() == want, "pair_loss: expected ", want, " parameters, got ",
              params.size());
  PairLossParams<T> p{kind, cosine ? T(-1) : T(1), T(params[0]), T(0), T(0)};
  if (want > 1) p.b = T(params[1]);
  if (want > 2) p.c = T(params[2]);
  return p;
}

// The inputs of pair_loss_stats / pair_loss_backward on a kernel of `device` (CPU or CUDA).
inline void check_pair_loss_inputs(const at::Tensor& x, const at::Tensor& labels,
                                   const at::Tensor& ref, const at::Tensor& ref_labels,
                                   c10::optional<int64_t> self_offset, c10::DeviceType device) {
  TORCH_CHECK(x.dim() == 2 && ref.dim() == 2, "pair_loss: x and ref must be 2-D, got ", x.dim(),
              "-D and ", ref.dim(), "-D");
  TORCH_CHECK(x.size(1) == ref.size(1), "pair_loss: x has D = ", x.size(1),
              ", ref D = ", ref.size(1));
  TORCH_CHECK(x.scalar_type() == ref.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "pair_loss: x and ref must both be float32 or both float64, got ", x.scalar_type(),
              " and ", ref.scalar_type());
  TORCH_CHECK(x.device().type() == device && ref.device() == x.device() &&
                  labels.device() == x.device() && ref_labels.device() == x.device(),
              "pair_loss: the ", c10::DeviceTypeName(device), " kernel takes x, labels, ref and ",
              "ref_labels on one ", c10::DeviceTypeName(device), " device, got ", x.device(), ", ",
              labels.device(), ", ", ref.device(), " and ", ref_labels.device());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "pair_loss: labels must be int64 [N] with N = ", x.size(0));
  TORCH_CHECK(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0) &&
                  ref_labels.scalar_type() == at::kLong,
              "pair_loss: ref_labels must be int64 [M] with M = ", ref.size(0));
  if (self_offset.has_value())
    TORCH_CHECK(*self_offset >= 0 && *self_offset + x.size(0) <= ref.size(0),
                "pair_loss: self_offset ", *self_offset, " puts x outside ref (N = ", x.size(0),
                ", M = ", ref.size(0), ")");
}

// grad_rows [N, R] and stats [N, 4] of pair_loss_backward.
inline void check_pair_loss_backward_inputs(const at::Tensor& grad_rows, const at::Tensor& stats,
                                            const at::Tensor& x, int64_t kind) {
  TORCH_CHECK(grad_rows.dim() == 2 && grad_rows.size(0) == x.size(0) &&
                  grad_rows.size(1) == pair_loss_outputs(kind) && grad_rows.device() == x.device(),
              "pair_loss_backward: grad_rows must be [N, ", pair_loss_outputs(kind), "] on ",
              x.device());
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == x.size(0) && stats.size(1) == kPairLossStats &&
                  stats.device() == x.device(),
              "pair_loss_backward: stats must be [N, ", kPairLossStats, "] on ", x.device());
}

}  // namespace confusion_kernels
