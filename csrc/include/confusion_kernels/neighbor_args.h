// Arguments of the nearest_neighbors op as the CPU and CUDA kernels read them: the metric's
// name and the input checks.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "confusion_kernels/neighbor_math.h"

namespace confusion_kernels {

inline int64_t neighbor_metric_code(c10::string_view name) {
  const std::string key(name);
  if (key == "euclidean") return kNeighborEuclidean;
  if (key == "sqeuclidean") return kNeighborSqEuclidean;
  if (key == "cosine") return kNeighborCosine;
  TORCH_CHECK(false, "nearest_neighbors: unknown metric '", key,
              "'; expected euclidean, sqeuclidean or cosine");
}

// The inputs of nearest_neighbors on a kernel of `device` (CPU or CUDA).
inline void check_neighbor_inputs(const at::Tensor& q, const at::Tensor& r, int64_t k,
                                  c10::optional<int64_t> self_offset, c10::DeviceType device) {
  TORCH_CHECK(q.dim() == 2 && r.dim() == 2,
              "nearest_neighbors: query and reference must be 2-D, "
              "got ",
              q.sizes(), " and ", r.sizes());
  TORCH_CHECK(q.size(1) == r.size(1), "nearest_neighbors: query has D = ", q.size(1),
              ", reference D = ", r.size(1));
  TORCH_CHECK(q.scalar_type() == r.scalar_type(), "nearest_neighbors: query is ", q.scalar_type(),
              ", reference ", r.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "nearest_neighbors: ", "the ", c10::DeviceTypeName(device),
              " kernel takes float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(q.device().type() == device && r.device() == q.device(), "nearest_neighbors: the ",
              c10::DeviceTypeName(device), " kernel takes query and reference on one ",
              c10::DeviceTypeName(device), " device, got ", q.device(), " and ", r.device());
  TORCH_CHECK(k >= 1, "nearest_neighbors: k must be at least 1, got ", k);
  if (self_offset.has_value())
    TORCH_CHECK(*self_offset >= 0 && *self_offset + q.size(0) <= r.size(0),
                "nearest_neighbors: self_offset ", *self_offset, " puts the ", q.size(0),
                " queries outside the ", r.size(0), " references");
}

// K = min(k, M - [self_offset given]) (0 when there is no reference): the neighbours each
// query gets.
inline int64_t neighbor_count(int64_t k, int64_t m, c10::optional<int64_t> self_offset) {
  return std::max<int64_t>(0, std::min<int64_t>(k, m - (self_offset.has_value() ? 1 : 0)));
}

}  // namespace confusion_kernels
