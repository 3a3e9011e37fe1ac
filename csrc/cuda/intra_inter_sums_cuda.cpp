// CUDA dispatch of intra_inter_sums: checks inputs, converts to the
// accumulation dtype (fp32, or fp64 for fp64 input), launches on the current
// stream of x's device. Kernels: intra_inter_sums_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "confusion_kernels/checks.h"
#include "intra_inter_sums_launch.h"

namespace confusion_kernels {
namespace {

at::Tensor row_norms_if_cosine(const at::Tensor& xa, int64_t metric) {
  return metric == kCosine ? at::linalg_vector_norm(xa, 2, {1}).contiguous() : at::Tensor();
}

// The rows the kernels read: x itself, or for cosine the unit rows x/|x|
// (a division: exactly +-1 in one dimension; zero rows stay zero).
at::Tensor kernel_rows(const at::Tensor& xa, const at::Tensor& norms, int64_t metric) {
  if (metric != kCosine) return xa;
  const at::Tensor col = norms.unsqueeze(1);
  return at::where(col > 0, xa / col, at::zeros_like(xa)).contiguous();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Calls F<kMetric>() for the runtime metric code.
template <typename F>
void dispatch_metric(int64_t metric, F&& f) {
  switch (metric) {
    case kEuclidean: return f(std::integral_constant<int64_t, kEuclidean>{});
    case kSqEuclidean: return f(std::integral_constant<int64_t, kSqEuclidean>{});
    case kManhattan: return f(std::integral_constant<int64_t, kManhattan>{});
    case kCosine: return f(std::integral_constant<int64_t, kCosine>{});
    default: return f(std::integral_constant<int64_t, kSmoothL1>{});
  }
}

std::tuple<at::Tensor, at::Tensor> intra_inter_sums_cuda(const at::Tensor& x,
                                                         const at::Tensor& labels,
                                                         int64_t metric) {
  const RowSumsInputs in = prepare_row_sums_inputs(x, labels, metric, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor norms = row_norms_if_cosine(in.x, metric);
  const at::Tensor rows = kernel_rows(in.x, norms, metric);
  at::Tensor s_in = at::empty({x.size(0)}, in.x.options());
  at::Tensor s_out = at::empty({x.size(0)}, in.x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "intra_inter_sums_cuda", [&] {
    dispatch_metric(metric, [&](auto m) {
      launch_forward_for_metric<scalar_t, decltype(m)::value>(
          rows.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(),
          data_or_null<scalar_t>(norms), in.x.size(0), in.x.size(1), s_in.data_ptr<scalar_t>(),
          s_out.data_ptr<scalar_t>(), stream);
    });
  });
  return {s_in, s_out};
}

at::Tensor intra_inter_sums_backward_cuda(const at::Tensor& grad_in, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& labels,
                                          int64_t metric) {
  const RowSumsInputs in =
      prepare_row_sums_backward_inputs(grad_in, grad_out, x, labels, metric, c10::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor norms = row_norms_if_cosine(in.x, metric);
  const at::Tensor rows = kernel_rows(in.x, norms, metric);
  at::Tensor grad = at::empty_like(in.x);
  if (in.x.size(1) == 0) return grad.to(x.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "intra_inter_sums_backward_cuda", [&] {
    dispatch_metric(metric, [&](auto m) {
      launch_backward_for_metric<scalar_t, decltype(m)::value>(
          rows.data_ptr<scalar_t>(), in.labels.data_ptr<int64_t>(),
          data_or_null<scalar_t>(norms), in.grad_in.data_ptr<scalar_t>(),
          in.grad_out.data_ptr<scalar_t>(), in.x.size(0), in.x.size(1),
          grad.data_ptr<scalar_t>(), stream);
    });
  });
  return grad.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("intra_inter_sums", &intra_inter_sums_cuda);
  m.impl("intra_inter_sums_backward", &intra_inter_sums_backward_cuda);
}

}  // namespace confusion_kernels
