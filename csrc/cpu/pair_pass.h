// The one-pass pair sums of the CPU backend (pair_pass_cpu.cpp);
// what they compute: confusion_kernels/pair_pass_result.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "confusion_kernels/pair_pass_result.h"

namespace confusion_kernels {

// xa: [N, D] rows in the accumulation dtype (contiguous); labels: int64 [N];
// w_in, w_out: floating [N]; metric: kEuclidean, kSqEuclidean or kCosine.
PairSums pair_pass_with_grad(const at::Tensor& xa, const at::Tensor& labels, const at::Tensor& w_in,
                             const at::Tensor& w_out, int64_t metric);

// The forward of intra_inter_sums by the same pass: (S_in, S_out) [N] in xa's
// dtype, each unordered pair's distance computed once and added to both rows.
std::tuple<at::Tensor, at::Tensor> pair_row_sums(const at::Tensor& xa, const at::Tensor& labels,
                                                 int64_t metric);

}  // namespace confusion_kernels
