// The pair pass on CUDA (pair_pass.h, kernels in
// pair_pass_kernels.cuh): label-sorted rows, one launch per round of the block
// schedule, then the diagonal blocks, all on the current stream of x's device.
// Registered as weighted_pair_sums_with_grad (the one-pass ASLoss core) and
// called by intra_inter_sums_cuda.cpp for both directions of the Gram metrics.
// fp16/bf16 inputs run in fp32 (their values exactly: rounded once, at the
// input), fp32 in fp32, fp64 in fp64.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "confusion_kernels/checks.h"
#include "confusion_kernels/gram_operands.h"
#include "confusion_kernels/sorted_rows.h"
#include "pair_pass.h"
#include "pair_pass_kernels.cuh"

namespace confusion_kernels {
namespace {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "weighted_pair_sums_with_grad: ", what, ": ",
              cudaGetErrorString(err));
}

// The mean of the finite rows of every block of pair_pass::kBlock rows: [T, D]
// (the last block padded with NaN rows, which the mean leaves out).
at::Tensor block_shifts(const at::Tensor& z, int64_t blocks) {
  const int64_t n = z.size(0), d = z.size(1), b = pair_pass::kBlock;
  at::Tensor padded =
      at::full({blocks * b, d}, std::numeric_limits<double>::quiet_NaN(), z.options());
  padded.narrow(0, 0, n).copy_(z);
  return finite_row_mean(padded.view({blocks, b, d}), 1).squeeze(1).contiguous();
}

template <typename T, int64_t M, bool Grad>
void launch_rounds(const SortedRows& r, const at::Tensor& shift, const T* w_in, const T* w_out,
                   T* t_in, T* t_out, T* g_in, T* g_out, T* gx_in, T* gx_out, cudaStream_t stream) {
  const int64_t n = r.xs.size(0), d = r.xs.size(1);
  const int64_t t = (n + pair_pass::kBlock - 1) / pair_pass::kBlock;
  const int64_t t_even = t + (t % 2);
  const int smem = static_cast<int>(sizeof(pair_pass::Smem<T>));
  const T* z = r.zs.data_ptr<T>();
  const T* xr = r.xs.data_ptr<T>();
  const T* sh = shift.data_ptr<T>();
  const int32_t* lab = r.cls.data_ptr<int32_t>();
  const T* sq = r.sq.data_ptr<T>();
  for (int64_t round = 0; round + 1 < t_even; ++round) {
    pair_pass::pair_pass_kernel<T, M, Grad, false>
        <<<static_cast<unsigned>(t_even / 2), pair_pass::kThreads, smem, stream>>>(
            z, xr, sh, lab, sq, w_in, w_out, t_in, t_out, g_in, g_out, gx_in, gx_out, n, d, round,
            t, t_even);
    check_launch("round kernel");
  }
  pair_pass::pair_pass_kernel<T, M, Grad, true>
      <<<static_cast<unsigned>(t), pair_pass::kThreads, smem, stream>>>(
          z, xr, sh, lab, sq, w_in, w_out, t_in, t_out, g_in, g_out, gx_in, gx_out, n, d, 0, t,
          t_even);
  check_launch("diagonal kernel");
}

// What a pass reads and writes besides the rows, all per sorted row; the row
// sums (not Grad) use t_in / t_out only. Undefined tensors pass as null.
struct PassBuffers {
  at::Tensor w_in, w_out, t_in, t_out, g_in, g_out, gx_in, gx_out;
};

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Every round and the diagonal of the pass, on the current stream of the rows'
// device; nothing to do for N = 0 or D = 0.
template <bool Grad>
void run_pass(const SortedRows& r, int64_t metric, const PassBuffers& b) {
  const int64_t n = r.xs.size(0);
  if (n == 0 || r.xs.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(r.xs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor shift = block_shifts(r.zs, (n + pair_pass::kBlock - 1) / pair_pass::kBlock);
  AT_DISPATCH_FLOATING_TYPES(r.xs.scalar_type(), "pair_pass_cuda", [&] {
    dispatch_gram_metric(metric, "pair_pass_cuda", [&](auto m) {
      launch_rounds<scalar_t, decltype(m)::value, Grad>(
          r, shift, data_or_null<scalar_t>(b.w_in), data_or_null<scalar_t>(b.w_out),
          data_or_null<scalar_t>(b.t_in), data_or_null<scalar_t>(b.t_out),
          data_or_null<scalar_t>(b.g_in), data_or_null<scalar_t>(b.g_out),
          data_or_null<scalar_t>(b.gx_in), data_or_null<scalar_t>(b.gx_out), stream);
    });
  });
}

}  // namespace

PairSums pair_pass_with_grad_cuda(const at::Tensor& xa, const at::Tensor& labels,
                                  const at::Tensor& w_in, const at::Tensor& w_out, int64_t metric) {
  const int64_t n = xa.size(0);
  const SortedRows r = sort_rows(xa, labels, metric);
  PassBuffers b{to_sorted(r, w_in),
                to_sorted(r, w_out),
                at::zeros({n}, r.xs.options()),
                at::zeros({n}, r.xs.options()),
                at::zeros_like(r.xs),
                at::zeros_like(r.xs),
                at::Tensor(),
                at::Tensor()};
  // the exact pairs' and the eps branch's gradients are w.r.t. the rows: for
  // cosine apart from the unit-row gradient, otherwise the same buffers
  b.gx_in = metric == kCosine ? at::zeros_like(r.xs) : b.g_in;
  b.gx_out = metric == kCosine ? at::zeros_like(r.xs) : b.g_out;
  run_pass<true>(r, metric, b);
  const at::Tensor none;
  return {b.t_in.sum(), b.t_out.sum(),
          row_gradient(r, metric, b.g_in, metric == kCosine ? b.gx_in : none),
          row_gradient(r, metric, b.g_out, metric == kCosine ? b.gx_out : none)};
}

std::tuple<at::Tensor, at::Tensor> pair_row_sums_cuda(const at::Tensor& xa,
                                                      const at::Tensor& labels, int64_t metric) {
  const int64_t n = xa.size(0);
  const SortedRows r = sort_rows(xa, labels, metric);
  PassBuffers b;
  b.t_in = at::zeros({n}, r.xs.options());
  b.t_out = at::zeros({n}, r.xs.options());
  run_pass<false>(r, metric, b);
  return {to_input_order(r, b.t_in), to_input_order(r, b.t_out)};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weighted_pair_sums_with_grad_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_in, const at::Tensor& w_out,
    c10::string_view metric_name) {
  const NoAutocast no_autocast;
  const RowSumsInputs in =
      prepare_pair_pass_inputs(x, labels, w_in, w_out, metric_name, c10::kCUDA);
  const PairSums r = pair_pass_with_grad_cuda(in.x, in.labels, w_in, w_out, in.metric);
  return {r.t_in, r.t_out, r.grad_in.to(x.scalar_type()), r.grad_out.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("weighted_pair_sums_with_grad", &weighted_pair_sums_with_grad_cuda);
}

}  // namespace confusion_kernels
