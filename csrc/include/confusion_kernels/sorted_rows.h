// The rows of a batch sorted by label, and what the pair passes
// (CPU: csrc/cpu/pair_pass_cpu.cpp, CUDA: csrc/cuda/pair_pass_cuda.cu)
// read of them. Host-side ATen code, device-agnostic.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "confusion_kernels/group_by_key.h"
#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// The rows sorted by label and what the pass reads of them.
struct SortedRows {
  at::Tensor perm;  // sorted position -> input row
  at::Tensor xs;    // [N, D] sorted rows (exact pairs)
  at::Tensor zs;    // [N, D] Gram operands: the rows, or the unit rows for cosine
  at::Tensor sq;    // [N] cosine: |x_i|^2 (float64, clamped to the dtype); else zeros
  at::Tensor cls;   // [N] int32 dense class ids 0, 1, ... (nondecreasing)
};

// perm and cls of SortedRows from the labels: the classes in order of first
// appearance (not of label value: relabelling that keeps equality, the only
// thing that matters, gives the same order of rows, tiles and additions, so
// bit-identical results), the rows of a class in input order.
//
// On the device: dense ids in label order from a sort and a cumulative sum (what
// unique(..., return_inverse) gives, but no output size hangs on the data, so
// the host never waits for the device); id tables sized N, not the number of
// classes (unused slots keep N and sort last).
inline void sort_labels_on_device(const at::Tensor& labels, SortedRows& r) {
  const int64_t n = labels.size(0);
  const auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& values = std::get<0>(sorted);
  at::Tensor starts = at::ones_like(values);
  if (n > 1)
    starts.narrow(0, 1, n - 1).copy_(values.narrow(0, 1, n - 1).ne(values.narrow(0, 0, n - 1)));
  const at::Tensor inverse =
      at::empty_like(labels).scatter_(0, std::get<1>(sorted), starts.cumsum(0).sub_(1));
  const at::Tensor first = at::full({n}, n, labels.options())
                               .scatter_reduce(0, inverse, at::arange(n, labels.options()), "amin",
                                               /*include_self=*/true);
  const at::Tensor rank =
      at::empty_like(first).index_copy_(0, at::argsort(first), at::arange(n, labels.options()));
  const at::Tensor key = rank.index_select(0, inverse);
  r.perm = at::argsort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  r.cls = key.index_select(0, r.perm).to(at::kInt).contiguous();
}

// On the host (CPU labels): the same order from one pass over the labels (a
// hash map from label to class id) and a stable counting sort by id
// (group_by_key), without the fixed cost of the dozen tensor ops above (tens of
// microseconds at any N).
inline void sort_labels_on_host(const at::Tensor& labels, SortedRows& r) {
  const int64_t n = labels.size(0);
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  std::unordered_map<int64_t, int64_t> ids;
  std::vector<int64_t> id(n);
  for (int64_t i = 0; i < n; ++i)
    id[i] = ids.try_emplace(lp[i], static_cast<int64_t>(ids.size())).first->second;
  const KeyGroups groups = group_by_key(id.data(), n, static_cast<int64_t>(ids.size()));
  r.perm = at::empty({n}, lab.options());
  r.cls = at::empty({n}, lab.options().dtype(at::kInt));
  int64_t* pp = r.perm.data_ptr<int64_t>();
  int32_t* cp = r.cls.data_ptr<int32_t>();
  for (int64_t k = 0; k < n; ++k) {
    pp[k] = groups.order[k];
    cp[k] = static_cast<int32_t>(id[groups.order[k]]);
  }
}

inline SortedRows sort_rows(const at::Tensor& xa, const at::Tensor& labels, int64_t metric) {
  const int64_t n = xa.size(0);
  SortedRows r;
  if (labels.device().is_cpu())
    sort_labels_on_host(labels, r);
  else
    sort_labels_on_device(labels, r);
  r.xs = xa.index_select(0, r.perm).contiguous();
  // Cosine: the squared norms (its eps test and the projection back from the unit
  // rows) in float64, clamped to the dtype's largest value, and the unit rows.
  // The other metrics read neither: zeros, and the rows themselves.
  r.sq = at::zeros({n}, r.xs.options());
  r.zs = r.xs;
  if (metric == kCosine) {
    const double top = r.xs.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                         : std::numeric_limits<float>::max();
    const at::Tensor x64 = r.xs.to(at::kDouble);
    const at::Tensor sq64 = (x64 * x64).sum(1);
    r.sq = sq64.clamp_max(top).to(r.xs.scalar_type()).contiguous();
    const at::Tensor norms = sq64.sqrt().unsqueeze(1);
    r.zs =
        at::where(norms > 0, x64 / norms, at::zeros_like(x64)).to(r.xs.scalar_type()).contiguous();
  }
  return r;
}

// Cosine: the operand-space gradient g (w.r.t. the unit rows u) becomes the
// gradient w.r.t. x: (g - u (u.g)) / |x|.
inline at::Tensor unit_to_row_gradient(const at::Tensor& g, const at::Tensor& u,
                                       const at::Tensor& sq) {
  const at::Tensor radial = (g * u).sum(1, /*keepdim=*/true);
  const at::Tensor norms = sq.sqrt().unsqueeze(1);
  const at::Tensor inv = at::where(norms > 0, 1 / norms, at::zeros_like(norms));
  return (g - u * radial) * inv;
}

// v [N, ...] given per input row, in sorted order and the rows' dtype (the weights).
inline at::Tensor to_sorted(const SortedRows& r, const at::Tensor& v) {
  return v.to(r.xs.scalar_type()).index_select(0, r.perm).contiguous();
}

// v [N, ...] given per sorted row, back in input order.
inline at::Tensor to_input_order(const SortedRows& r, const at::Tensor& v) {
  return at::empty_like(v).index_copy_(0, r.perm, v);
}

// The gradient w.r.t. the input rows, in input order, from what a pass
// accumulated per sorted row: g in operand space (for cosine w.r.t. the unit
// rows, projected back here) plus g_rows, a part already w.r.t. the rows (the
// exact pairs, the cosine eps branch; undefined: none).
inline at::Tensor row_gradient(const SortedRows& r, int64_t metric, const at::Tensor& g,
                               const at::Tensor& g_rows) {
  at::Tensor grad = metric == kCosine ? unit_to_row_gradient(g, r.zs, r.sq) : g;
  if (g_rows.defined()) grad = grad + g_rows;
  return to_input_order(r, grad);
}

}  // namespace confusion_kernels
