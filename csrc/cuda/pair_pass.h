// The pair pass on CUDA (pair_pass_cuda.cu), callable from host C++:
// the one-pass ASLoss core and both directions of intra_inter_sums for the
// Gram metrics (euclidean, sqeuclidean, cosine), each unordered pair of rows
// computed once.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "confusion_kernels/pair_pass_result.h"

namespace confusion_kernels {

// xa: [N, D] CUDA rows in the accumulation dtype (contiguous); labels: int64 [N];
// w_in, w_out: floating [N]; metric: kEuclidean, kSqEuclidean or kCosine.
PairSums pair_pass_with_grad_cuda(const at::Tensor& xa, const at::Tensor& labels,
                                  const at::Tensor& w_in, const at::Tensor& w_out, int64_t metric);

// (S_in, S_out) [N] in xa's dtype: each pair's distance computed once and added
// to both rows' sums.
std::tuple<at::Tensor, at::Tensor> pair_row_sums_cuda(const at::Tensor& xa,
                                                      const at::Tensor& labels, int64_t metric);

}  // namespace confusion_kernels
