// Host code of the direct (difference-form) pair passes (ATen, host only),
// shared by the CPU and CUDA kernels of intra_inter_sums and of its rectangular
// form intra_inter_sums_rect (pair_sides.h says what they compute): the
// operands, the inputs of the rectangular op, and the dtype / metric dispatch
// around a backend's pass.
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
  TORCH_CHECK(ref.dim() == 2 && ref.size(1) == x.size(1), op,
              ": ref must be 2-D [M, D] with D = ", x.size(1), ", got shape ", ref.sizes());
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

inline RectInputs prepare_rect_backward_inputs(
    const at::Tensor& grad_in, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& labels, const at::Tensor& ref, const at::Tensor& ref_labels,
    c10::optional<int64_t> self_offset, c10::string_view metric_name, c10::DeviceType device) {
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

// (S_in, S_out) of the rows of xa against the columns of ya, the pair (i, i + shift)
// left out, by a backend's direct pass:
//   pass(metric_tag, PairSide<T> a, PairSide<T> b, a's rows, b's rows, shift, T* s_in,
//        T* s_out)
// with metric_tag a std::integral_constant of the metric code.
template <class Pass>
std::tuple<at::Tensor, at::Tensor> direct_pass_row_sums(const at::Tensor& xa,
                                                        const at::Tensor& x_labels,
                                                        const at::Tensor& ya,
                                                        const at::Tensor& y_labels, int64_t shift,
                                                        int64_t metric, Pass&& pass) {
  const DirectOperand a = direct_operand(xa, metric);
  const DirectOperand b = xa.is_same(ya) ? a : direct_operand(ya, metric);
  at::Tensor s_in = at::empty({xa.size(0)}, xa.options());
  at::Tensor s_out = at::empty({xa.size(0)}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "intra_inter_sums", [&] {
    dispatch_metric(metric, "intra_inter_sums", [&](auto m) {
      pass(m, pair_side<scalar_t>(a, x_labels), pair_side<scalar_t>(b, y_labels), a.rows, b.rows,
           shift, s_in.data_ptr<scalar_t>(), s_out.data_ptr<scalar_t>());
    });
  });
  return {s_in, s_out};
}

// sum_j c_ij dD(x_i, y_j)/dx_i [rows of xa, D] (zero-initialised), each side's upstream
// weights in (g_in, g_out) (undefined = 0), by a backend's direct pass:
//   pass(metric_tag, PairSide<T> a, PairSide<T> b, a's rows, b's rows, shift, T* grad)
template <class Pass>
at::Tensor direct_pass_row_grad(const at::Tensor& xa, const at::Tensor& x_labels,
                                const at::Tensor& x_g_in, const at::Tensor& x_g_out,
                                const at::Tensor& ya, const at::Tensor& y_labels,
                                const at::Tensor& y_g_in, const at::Tensor& y_g_out, int64_t shift,
                                int64_t metric, Pass&& pass) {
  const DirectOperand a = direct_operand(xa, metric);
  const DirectOperand b = xa.is_same(ya) ? a : direct_operand(ya, metric);
  at::Tensor grad = at::zeros_like(xa);
  if (xa.size(1) == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "intra_inter_sums_backward", [&] {
    dispatch_metric(metric, "intra_inter_sums_backward", [&](auto m) {
      pass(m, pair_side<scalar_t>(a, x_labels, x_g_in, x_g_out),
           pair_side<scalar_t>(b, y_labels, y_g_in, y_g_out), a.rows, b.rows, shift,
           grad.data_ptr<scalar_t>());
    });
  });
  return grad;
}

// (dL/dx, dL/dref) of the rectangular op by a backend's gradient pass (see
// direct_pass_row_grad): once with x as the rows (the upstream weights on the
// row side), once with ref as the rows (the weights on the column side, the
// self pair at the swapped shift). Outputs in the inputs' dtypes.
template <class Pass>
std::tuple<at::Tensor, at::Tensor> rect_backward(const RectInputs& in, const at::Tensor& x,
                                                 const at::Tensor& ref, Pass&& pass) {
  const at::Tensor none;
  const at::Tensor grad_x =
      direct_pass_row_grad(in.x, in.labels, in.grad_in, in.grad_out, in.ref, in.ref_labels, none,
                           none, in.shift, in.metric, pass);
  const at::Tensor grad_ref =
      direct_pass_row_grad(in.ref, in.ref_labels, none, none, in.x, in.labels, in.grad_in,
                           in.grad_out, swapped_shift(in.shift), in.metric, pass);
  return {grad_x.to(x.scalar_type()), grad_ref.to(ref.scalar_type())};
}

// The entry points of the rectangular op on a device whose passes are the functors
// ForwardPass / BackwardPass (each backend registers these instantiations). A pass is built
// with the router's algorithm and says which ones it runs:
//   static bool runs(int64_t algorithm);  static constexpr const char* kRuns;
template <c10::DeviceType kDevice, class Pass>
int64_t rect_algorithm(c10::string_view algorithm_name, int64_t metric) {
  const char* op = "intra_inter_sums_rect";
  const int64_t algorithm = algorithm_code(algorithm_name, metric, op);
  check_algorithm_runs(Pass::runs(algorithm), algorithm, op, kDevice, Pass::kRuns);
  return algorithm;
}

template <c10::DeviceType kDevice, class ForwardPass>
std::tuple<at::Tensor, at::Tensor> rect_forward_op(const at::Tensor& x, const at::Tensor& labels,
                                                   const at::Tensor& ref,
                                                   const at::Tensor& ref_labels,
                                                   c10::optional<int64_t> self_offset,
                                                   c10::string_view metric_name,
                                                   c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const RectInputs in =
      prepare_rect_inputs(x, labels, ref, ref_labels, self_offset, metric_name, kDevice);
  const int64_t algorithm = rect_algorithm<kDevice, ForwardPass>(algorithm_name, in.metric);
  return direct_pass_row_sums(in.x, in.labels, in.ref, in.ref_labels, in.shift, in.metric,
                              ForwardPass{algorithm});
}

template <c10::DeviceType kDevice, class BackwardPass>
std::tuple<at::Tensor, at::Tensor> rect_backward_op(const at::Tensor& grad_in,
                                                    const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& labels, const at::Tensor& ref,
                                                    const at::Tensor& ref_labels,
                                                    c10::optional<int64_t> self_offset,
                                                    c10::string_view metric_name,
                                                    c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const RectInputs in = prepare_rect_backward_inputs(grad_in, grad_out, x, labels, ref, ref_labels,
                                                     self_offset, metric_name, kDevice);
  const int64_t algorithm = rect_algorithm<kDevice, BackwardPass>(algorithm_name, in.metric);
  return rect_backward(in, x, ref, BackwardPass{algorithm});
}

}  // namespace confusion_kernels
