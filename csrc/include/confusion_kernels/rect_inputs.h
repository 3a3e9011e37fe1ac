// Host-side inputs of the direct (difference-form) pair passes (ATen, host
// only), shared by the CPU and CUDA kernels of intra_inter_sums and of its
// rectangular form intra_inter_sums_rect (pair_sides.h says what they compute).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/gram_operands.h"
#include "confusion_kernels/gram_tiles.h"
#include "confusion_kernels/pair_sides.h"

namespace confusion_kernels {

// The rows a direct pass reads: the rows themselves, or for cosine the unit
// rows x/|x| with the norms |x| (eps test, 1/|x|).
struct DirectOperand {
  at::Tensor rows;
  at::Tensor norms;  // undefined unless cosine
};

inline DirectOperand direct_operand(const at::Tensor& xa, int64_t metric) {
  if (metric != kCosine) return {xa, at::Tensor()};
  const at::Tensor norms = at::linalg_vector_norm(xa, 2, {1}).contiguous();
  return {unit_rows(xa, norms), norms};
}

template <typename T>
PairSide<T> pair_side(const DirectOperand& op, const at::Tensor& labels,
                      const at::Tensor& g_in = at::Tensor(),
                      const at::Tensor& g_out = at::Tensor()) {
  PairSide<T> s;
  s.rows = op.rows.data_ptr<T>();
  s.labels = labels.data_ptr<int64_t>();
  s.norms = ptr_or_null<T>(op.norms);
  s.g_in = ptr_or_null<T>(g_in);
  s.g_out = ptr_or_null<T>(g_out);
  s.n = op.rows.size(0);
  return s;
}

// intra_inter_sums_rect(x, labels, ref, ref_labels, self_offset, metric) and its
// backward after the checks: every tensor contiguous, the rows in the
// accumulation dtype; `shift` is self_offset (kNoSelfPair without one).
struct RectInputs {
  at::Tensor x, labels, ref, ref_labels;
  at::Tensor grad_in, grad_out;  // undefined in forward
  int64_t shift = kNoSelfPair;
  int64_t metric = 0;
};

inline RectInputs prepare_rect_inputs(const at::Tensor& x, const at::Tensor& labels,
                                      const at::Tensor& ref, const at::Tensor& ref_labels,
                                      c10::optional<int64_t> self_offset,
                                      c10::string_view metric_name, c10::DeviceType device) {
  const char* op = "intra_inter_sums_rect";
  const int64_t metric = metric_code(metric_name, op);
  check_intra_inter_inputs(x, labels, metric, device);
  TORCH_CHECK(ref.dim() == 2 && ref.size(1) == x.size(1), op, ": ref must be 2-D [M, D] with D = ",
              x.size(1), ", got shape ", ref.sizes());
  TORCH_CHECK(ref.size(0) > 0, op, ": ref has no rows (M = 0)");
  TORCH_CHECK(ref.scalar_type() == x.scalar_type(), op, ": ref must have x's dtype ",
              x.scalar_type(), ", got ", ref.scalar_type());
  TORCH_CHECK(ref.device() == x.device(), op, ": ref is on ", ref.device(), " but x is on ",
              x.device());
  TORCH_CHECK(ref_labels.dim() == 1 && ref_labels.size(0) == ref.size(0) &&
                  ref_labels.scalar_type() == at::kLong && ref_labels.device() == x.device(),
              op, ": ref_labels must be int64 [M] on ", x.device(), " with M = ", ref.size(0),
              ", got ", ref_labels.scalar_type(), " ", ref_labels.sizes(), " on ",
              ref_labels.device());
  RectInputs in;
  if (self_offset.has_value()) {
    const int64_t o = *self_offset;
    TORCH_CHECK(o >= 0 && o + x.size(0) <= ref.size(0), op,
                ": self_offset must satisfy 0 <= self_offset and self_offset + N <= M (N = ",
                x.size(0), ", M = ", ref.size(0), "), got ", o);
    in.shift = o;
  }
  const at::ScalarType acc = accumulation_type(x.scalar_type());
  in.x = x.to(acc).contiguous();
  in.labels = labels.contiguous();
  in.ref = ref.to(acc).contiguous();
  in.ref_labels = ref_labels.contiguous();
  in.metric = metric;
  return in;
}

inline RectInputs prepare_rect_backward_inputs(const at::Tensor& grad_in,
                                               const at::Tensor& grad_out, const at::Tensor& x,
                                               const at::Tensor& labels, const at::Tensor& ref,
                                               const at::Tensor& ref_labels,
                                               c10::optional<int64_t> self_offset,
                                               c10::string_view metric_name,
                                               c10::DeviceType device) {
  RectInputs in = prepare_rect_inputs(x, labels, ref, ref_labels, self_offset, metric_name, device);
  check_row_gradient(grad_in, x, "grad_in");
  check_row_gradient(grad_out, x, "grad_out");
  in.grad_in = grad_in.to(in.x.scalar_type()).contiguous();
  in.grad_out = grad_out.to(in.x.scalar_type()).contiguous();
  return in;
}

// The shift of the backward pass with the roles swapped (rows from ref, columns
// from x): row o + i of ref meets column i of x.
inline int64_t swapped_shift(int64_t shift) { return shift == kNoSelfPair ? shift : -shift; }

// (dL/dx, dL/dref) of the rectangular op from a backend's direct row-gradient
// pass row_grad(rows, row_labels, row_g_in, row_g_out, cols, col_labels,
// col_g_in, col_g_out, shift) -> [rows, D]: once with x as the rows (the
// upstream weights on the row side), once with ref as the rows (the weights on
// the column side, the self pair at the swapped shift). Outputs in the inputs' dtypes.
template <class RowGrad>
std::tuple<at::Tensor, at::Tensor> rect_backward(const RectInputs& in, const at::Tensor& x,
                                                 const at::Tensor& ref, RowGrad&& row_grad) {
  const at::Tensor none;
  if (in.x.size(1) == 0) return {at::zeros_like(x), at::zeros_like(ref)};
  const at::Tensor grad_x = row_grad(in.x, in.labels, in.grad_in, in.grad_out, in.ref,
                                     in.ref_labels, none, none, in.shift);
  const at::Tensor grad_ref = row_grad(in.ref, in.ref_labels, none, none, in.x, in.labels,
                                       in.grad_in, in.grad_out, swapped_shift(in.shift));
  return {grad_x.to(x.scalar_type()), grad_ref.to(ref.scalar_type())};
}

}  // namespace confusion_kernels
