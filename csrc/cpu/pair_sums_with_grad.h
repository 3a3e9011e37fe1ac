// The one-pass pair sums of the CPU backend (pair_sums_with_grad_cpu.cpp):
//   t_in  = sum_i w_in[i]  S_in[i],   t_out = sum_i w_out[i] S_out[i]
// and their gradients, each unordered pair computed once. Serves the ASLoss op
// (weights = the loss's dL/dS) and the backward of intra_inter_sums (weights =
// the upstream gradients dL/dS_in, dL/dS_out: the sum of the two gradients is
// dL/dx).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace confusion_kernels {

struct PairSums {
  at::Tensor t_in;      // 0-d
  at::Tensor t_out;     // 0-d
  at::Tensor grad_in;   // [N, D] dt_in/dx, in xa's dtype
  at::Tensor grad_out;  // [N, D] dt_out/dx
};

// xa: [N, D] rows in the accumulation dtype (contiguous); labels: int64 [N];
// w_in, w_out: floating [N]; metric: kEuclidean, kSqEuclidean or kCosine.
PairSums pair_sums_with_grad(const at::Tensor& xa, const at::Tensor& labels,
                             const at::Tensor& w_in, const at::Tensor& w_out, int64_t metric);

// The forward of intra_inter_sums by the same pass: (S_in, S_out) [N] in xa's
// dtype, each unordered pair's distance computed once and added to both rows.
std::tuple<at::Tensor, at::Tensor> pair_row_sums(const at::Tensor& xa, const at::Tensor& labels,
                                                 int64_t metric);

}  // namespace confusion_kernels
