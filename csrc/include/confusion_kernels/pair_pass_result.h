// What the pair passes (CPU: csrc/cpu/pair_pass_cpu.cpp,
// CUDA: csrc/cuda/pair_pass_cuda.cu) return for weights w_in, w_out [N]:
//   t_in  = sum_i w_in[i]  S_in[i],   t_out = sum_i w_out[i] S_out[i]
// and their gradients, each unordered pair computed once. The ASLoss op passes
// the loss's dL/dS as weights; the backward of intra_inter_sums passes the
// upstream gradients dL/dS_in, dL/dS_out, and dL/dx = grad_in + grad_out.
#pragma once

#include <ATen/ATen.h>

namespace confusion_kernels {

struct PairSums {
  at::Tensor t_in;      // 0-d
  at::Tensor t_out;     // 0-d
  at::Tensor grad_in;   // [N, D] dt_in/dx, in the rows' (accumulation) dtype
  at::Tensor grad_out;  // [N, D] dt_out/dx
};

}  // namespace confusion_kernels
