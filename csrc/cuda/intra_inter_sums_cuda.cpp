// CUDA dispatch of intra_inter_sums: checks inputs, runs the algorithm that the
// Python router chose (confusion_kernels/_routing.py), on the current stream of
// x's device:
//   * 'gram_tiles': the Gram tile kernels (gram_tile_kernels.cuh) for euclidean /
//     sqeuclidean / cosine with fp32, fp16 or bf16 input, which compute every
//     tile twice (once per row block) on tensor cores (fp16, bf16; tf32 for fp32
//     only when torch.backends.cuda.matmul.allow_tf32 is on) or in exact fp32. On
//     an H100 they ran 2.2-2.5x faster than the pair pass below at D = 128
//     (benchmarks/results/2026-11-24-h100). fp64, and cosine in fp16 / bf16 (whose
//     unit rows a 16-bit operand would round), have no full-tile kernel;
//   * 'pair_pass': the pair pass (pair_pass.h), each unordered pair once, exact
//     FMA arithmetic in the accumulation dtype; the backward is the same pass
//     with the upstream gradients as weights;
//   * 'direct': the difference-form kernels (intra_inter_sums_kernels.cuh) in the
//     accumulation dtype, every metric.
// The rectangular op intra_inter_sums_rect runs 'direct' only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/direct_pass.h"
#include "confusion_kernels/gram_operands.h"
#include "intra_inter_sums_launch.h"
#include "pair_pass.h"

namespace confusion_kernels {
namespace {

// The operand kind of the full-tile Gram kernels for this input (the operands follow the
// dtype, the GPU and torch's TF32 switch, as a matrix product's do), or nullopt where no
// full-tile kernel exists (fp64; cosine with fp16 / bf16 input): the router sends those to
// the pair pass, and a direct call with 'gram_tiles' is refused.
std::optional<GramOperands> full_tile_operands(const at::Tensor& x, int64_t metric) {
  int major = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  TORCH_CHECK(err == cudaSuccess,
              "intra_inter_sums: cannot read the compute capability: ", cudaGetErrorString(err));
  const bool sm80 = major >= 8;
  switch (x.scalar_type()) {
    case at::kFloat:
      return (sm80 && at::globalContext().allowTF32CuBLAS()) ? GramOperands::kTf32
                                                             : GramOperands::kFp32Exact;
    case at::kHalf:
    case at::kBFloat16:
      // cosine's operands are the unit rows x/|x|, which a 16-bit operand would round (an
      // H200 run measured S_in relative errors of 1.4e-4 in bf16 and 1.6e-5 in fp16 against
      // the float64 reference of the same inputs): cosine takes the pair pass, exact in fp32.
      // euclidean / sqeuclidean multiply the input's own 16-bit values, exactly.
      if (metric == kCosine) return std::nullopt;
      if (!sm80) return GramOperands::kFp32Exact;
      return x.scalar_type() == at::kHalf ? GramOperands::kFp16 : GramOperands::kBf16;
    default:
      return std::nullopt;  // fp64: the pair pass, in fp64
  }
}

GramOperands checked_full_tile_operands(const at::Tensor& x, int64_t metric, const char* op) {
  const std::optional<GramOperands> ops = full_tile_operands(x, metric);
  TORCH_CHECK(ops.has_value(), op, ": algorithm 'gram_tiles' has no kernel for ", x.scalar_type(),
              " ", kMetricNames[metric], " (fp64, and cosine in fp16 / bf16, run 'pair_pass')");
  return *ops;
}

// What the Gram kernels read: the operands op(x) in the operand dtype, their
// squared norms in fp32, and the input rows in fp32 for the pairs computed
// exactly (the cosine exact path normalises those itself).
//   * euclidean / sqeuclidean, fp32 / tf32: the rows centred on their mean
//     (gram_operands.h), norms of the centred rows;
//   * euclidean / sqeuclidean, fp16 / bf16: the input's own values (the fp32
//     copy holds them exactly), never centred: centring and casting back would
//     round every entry a second time. Norms come from the same values, so
//     |a|^2 + |b|^2 - 2 a.b is the squared distance of the stored rows up to
//     fp32 accumulation (the tensor cores multiply 16-bit values exactly);
//   * cosine (fp32 / tf32 operands only): the unit rows x/|x| and the squared
//     norms |x|^2 of the input rows (eps test, 1/|x|).
struct GramInputs {
  at::Tensor rows;
  at::Tensor exact_rows;
  at::Tensor sq_norms;
};

GramInputs gram_inputs(const at::Tensor& xa, int64_t metric, GramOperands ops) {
  GramInputs g;
  g.exact_rows = xa;
  const bool half = ops == GramOperands::kFp16 || ops == GramOperands::kBf16;
  const auto to_operand = [&](const at::Tensor& t) {
    if (ops == GramOperands::kFp16) return t.to(at::kHalf).contiguous();
    if (ops == GramOperands::kBf16) return t.to(at::kBFloat16).contiguous();
    return t.contiguous();
  };
  if (metric == kCosine) {
    g.sq_norms = (xa * xa).sum(1).contiguous();
    g.rows = to_operand(gram_operands(xa, g.sq_norms, metric));
  } else {
    g.rows = to_operand(half ? xa : center_for_gram(xa, metric));
    const at::Tensor values = g.rows.to(at::kFloat);
    g.sq_norms = (values * values).sum(1).contiguous();
  }
  return g;
}

// The difference-form kernels as the passes of direct_pass.h, on the current stream
// of the rows' device.
struct ForwardKernels {
  int64_t algorithm = kDirect;
  static constexpr const char* kRuns = "'direct' (rectangular op on CUDA)";
  static bool runs(int64_t a) { return a == kDirect; }

  template <class Metric, class Side, class T>
  void operator()(Metric, const Side& a, const Side& b, const at::Tensor&, const at::Tensor& b_rows,
                  int64_t shift, T* s_in, T* s_out) const {
    const c10::cuda::CUDAGuard guard(b_rows.device());
    launch_forward_for_metric<T, Metric::value>(a, b, b_rows.size(1), shift, s_in, s_out,
                                                c10::cuda::getCurrentCUDAStream().stream());
  }
};

struct BackwardKernels {
  int64_t algorithm = kDirect;
  static constexpr const char* kRuns = ForwardKernels::kRuns;
  static bool runs(int64_t a) { return ForwardKernels::runs(a); }

  template <class Metric, class Side, class T>
  void operator()(Metric, const Side& a, const Side& b, const at::Tensor&, const at::Tensor& b_rows,
                  int64_t shift, T* grad) const {
    const c10::cuda::CUDAGuard guard(b_rows.device());
    launch_backward_for_metric<T, Metric::value>(a, b, b_rows.size(1), shift, grad,
                                                 c10::cuda::getCurrentCUDAStream().stream());
  }
};

std::tuple<at::Tensor, at::Tensor> intra_inter_sums_cuda(const at::Tensor& x,
                                                         const at::Tensor& labels,
                                                         c10::string_view metric_name,
                                                         c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in = prepare_row_sums_inputs(x, labels, metric_name, c10::kCUDA);
  const int64_t metric = in.metric;
  // direct, pair_pass and gram_tiles all run on CUDA
  const int64_t algorithm = algorithm_code(algorithm_name, metric, "intra_inter_sums");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor s_in = at::empty({x.size(0)}, in.x.options());
  at::Tensor s_out = at::empty({x.size(0)}, in.x.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (algorithm == kGramTiles) {
    const GramOperands ops = checked_full_tile_operands(x, metric, "intra_inter_sums");
    const GramInputs g = gram_inputs(in.x, metric, ops);
    dispatch_gram_metric(metric, "intra_inter_sums", [&](auto m) {
      launch_gram_forward<decltype(m)::value>(
          ops, g.rows.data_ptr(), g.exact_rows.data_ptr<float>(), in.labels.data_ptr<int64_t>(),
          g.sq_norms.data_ptr<float>(), in.x.size(0), in.x.size(1), s_in.data_ptr<float>(),
          s_out.data_ptr<float>(), stream);
    });
    return {s_in, s_out};
  }
  if (algorithm == kPairPass) return pair_row_sums_cuda(in.x, in.labels, metric);
  return direct_pass_row_sums(in.x, in.labels, in.x, in.labels, /*shift=*/0, metric,
                              ForwardKernels{});
}

at::Tensor intra_inter_sums_backward_cuda(const at::Tensor& grad_in, const at::Tensor& grad_out,
                                          const at::Tensor& x, const at::Tensor& labels,
                                          c10::string_view metric_name,
                                          c10::string_view algorithm_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in =
      prepare_row_sums_backward_inputs(grad_in, grad_out, x, labels, metric_name, c10::kCUDA);
  const int64_t metric = in.metric;
  const int64_t algorithm = algorithm_code(algorithm_name, metric, "intra_inter_sums_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad = at::empty_like(in.x);
  if (in.x.size(1) == 0) return grad.to(x.scalar_type());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (algorithm == kGramTiles) {
    const GramOperands ops = checked_full_tile_operands(x, metric, "intra_inter_sums_backward");
    const GramInputs g = gram_inputs(in.x, metric, ops);
    dispatch_gram_metric(metric, "intra_inter_sums", [&](auto m) {
      launch_gram_backward<decltype(m)::value>(
          ops, g.rows.data_ptr(), g.exact_rows.data_ptr<float>(), in.labels.data_ptr<int64_t>(),
          g.sq_norms.data_ptr<float>(), in.grad_in.data_ptr<float>(), in.grad_out.data_ptr<float>(),
          in.x.size(0), in.x.size(1), grad.data_ptr<float>(), stream);
    });
    return grad.to(x.scalar_type());
  }
  if (algorithm == kPairPass) {
    // dL/dx is the gradient of sum_i g_in[i] S_in[i] + g_out[i] S_out[i]: the pair
    // pass with the upstream gradients as weights, each unordered pair once.
    const PairSums r = pair_pass_with_grad_cuda(in.x, in.labels, in.grad_in, in.grad_out, metric);
    return (r.grad_in + r.grad_out).to(x.scalar_type());
  }
  return direct_pass_row_grad(in.x, in.labels, in.grad_in, in.grad_out, in.x, in.labels, in.grad_in,
                              in.grad_out, /*shift=*/0, metric, BackwardKernels{})
      .to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("intra_inter_sums", &intra_inter_sums_cuda);
  m.impl("intra_inter_sums_backward", &intra_inter_sums_backward_cuda);
  // the rectangular op: 'direct' for every metric (exact per pair)
  m.impl("intra_inter_sums_rect", &rect_forward_op<c10::kCUDA, ForwardKernels>);
  m.impl("intra_inter_sums_rect_backward", &rect_backward_op<c10::kCUDA, BackwardKernels>);
}

}  // namespace confusion_kernels
