// The triangular pair pass on CUDA (pair_pass.h, kernels in
// pair_pass_kernels.cuh): label-sorted rows, one launch per round of the block
// schedule, then the diagonal blocks, all on the current stream of x's device.
// Registered as weighted_pair_sums_with_grad (the one-pass ASLoss core) and
// called by intra_inter_sums_cuda.cpp for both directions of the Gram metrics. fp16/bf16 inputs run in fp32 (their values exactly: rounded once, at
// the input), fp32 in fp32, fp64 in fp64.
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
  at::Tensor padded = at::full({blocks * b, d}, std::numeric_limits<double>::quiet_NaN(),
                               z.options());
  padded.narrow(0, 0, n).copy_(z);
  return finite_row_mean(padded.view({blocks, b, d}), 1).squeeze(1).contiguous();
}

template <typename T, int64_t M, bool Grad>
void launch_rounds(const SortedRows& r, const at::Tensor& shift, const T* w_in, const T* w_out,
                   T* t_in, T* t_out, T* g_in, T* g_out, T* gx_in, T* gx_out,
                   cudaStream_t stream) {
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
            z, xr, sh, lab, sq, w_in, w_out, t_in, t_out, g_in, g_out, gx_in, gx_out, n, d,
            round, t, t_even);
    check_launch("round kernel");
  }
  pair_pass::pair_pass_kernel<T, M, Grad, true>
      <<<static_cast<unsigned>(t), pair_pass::kThreads, smem, stream>>>(
          z, xr, sh, lab, sq, w_in, w_out, t_in, t_out, g_in, g_out, gx_in, gx_out, n, d, 0, t,
          t_even);
  check_launch("diagonal kernel");
}

}  // namespace

PairSums pair_sums_with_grad_cuda(const at::Tensor& xa, const at::Tensor& labels,
                                  const at::Tensor& w_in, const at::Tensor& w_out,
                                  int64_t metric) {
  const int64_t n = xa.size(0);
  const c10::cuda::CUDAGuard guard(xa.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SortedRows r = sort_rows(xa, labels, metric);
  const at::Tensor wis = w_in.to(r.xs.scalar_type()).index_select(0, r.perm).contiguous();
  const at::Tensor wos = w_out.to(r.xs.scalar_type()).index_select(0, r.perm).contiguous();
  at::Tensor t_in = at::zeros({n}, r.xs.options()), t_out = at::zeros({n}, r.xs.options());
  at::Tensor g_in = at::zeros_like(r.xs), g_out = at::zeros_like(r.xs);
  at::Tensor gx_in = metric == kCosine ? at::zeros_like(r.xs) : g_in;
  at::Tensor gx_out = metric == kCosine ? at::zeros_like(r.xs) : g_out;
  const int64_t blocks = (n + pair_pass::kBlock - 1) / pair_pass::kBlock;
  if (n > 0 && xa.size(1) > 0) {
    const at::Tensor shift = block_shifts(r.zs, blocks);
    AT_DISPATCH_FLOATING_TYPES(r.xs.scalar_type(), "pair_sums_with_grad_cuda", [&] {
      dispatch_gram_metric(metric, "pair_sums_with_grad_cuda", [&](auto m) {
        launch_rounds<scalar_t, decltype(m)::value, true>(
            r, shift, wis.data_ptr<scalar_t>(), wos.data_ptr<scalar_t>(),
            t_in.data_ptr<scalar_t>(), t_out.data_ptr<scalar_t>(), g_in.data_ptr<scalar_t>(),
            g_out.data_ptr<scalar_t>(), gx_in.data_ptr<scalar_t>(), gx_out.data_ptr<scalar_t>(),
            stream);
      });
    });
  }
  if (metric == kCosine) {
    g_in = unit_to_row_gradient(g_in, r.zs, r.sq) + gx_in;
    g_out = unit_to_row_gradient(g_out, r.zs, r.sq) + gx_out;
  }
  PairSums out{t_in.sum(), t_out.sum(), at::empty_like(r.xs), at::empty_like(r.xs)};
  out.grad_in.index_copy_(0, r.perm, g_in);
  out.grad_out.index_copy_(0, r.perm, g_out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> pair_row_sums_cuda(const at::Tensor& xa,
                                                      const at::Tensor& labels, int64_t metric) {
  const int64_t n = xa.size(0);
  const c10::cuda::CUDAGuard guard(xa.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const SortedRows r = sort_rows(xa, labels, metric);
  at::Tensor s_in = at::zeros({n}, r.xs.options()), s_out = at::zeros({n}, r.xs.options());
  const int64_t blocks = (n + pair_pass::kBlock - 1) / pair_pass::kBlock;
  if (n > 0 && xa.size(1) > 0) {
    const at::Tensor shift = block_shifts(r.zs, blocks);
    AT_DISPATCH_FLOATING_TYPES(r.xs.scalar_type(), "pair_row_sums_cuda", [&] {
      dispatch_gram_metric(metric, "pair_row_sums_cuda", [&](auto m) {
        launch_rounds<scalar_t, decltype(m)::value, false>(
            r, shift, nullptr, nullptr, s_in.data_ptr<scalar_t>(), s_out.data_ptr<scalar_t>(),
            nullptr, nullptr, nullptr, nullptr, stream);
      });
    });
  }
  at::Tensor in_rows = at::empty_like(s_in), out_rows = at::empty_like(s_out);
  in_rows.index_copy_(0, r.perm, s_in);
  out_rows.index_copy_(0, r.perm, s_out);
  return {in_rows, out_rows};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> weighted_pair_sums_with_grad_cuda(
    const at::Tensor& x, const at::Tensor& labels, const at::Tensor& w_in,
    const at::Tensor& w_out, c10::string_view metric_name) {
  const RowSumsInputs in =
      prepare_pair_sums_inputs(x, labels, w_in, w_out, metric_name, c10::kCUDA);
  const PairSums r = pair_sums_with_grad_cuda(in.x, in.labels, w_in, w_out, in.metric);
  return {r.t_in, r.t_out, r.grad_in.to(x.scalar_type()), r.grad_out.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CUDA, m) {
  m.impl("weighted_pair_sums_with_grad", &weighted_pair_sums_with_grad_cuda);
}

}  // namespace confusion_kernels
