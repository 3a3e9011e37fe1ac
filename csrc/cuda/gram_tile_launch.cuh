#pragma once
// Host launchers of the Gram-form kernels (gram_tile_kernels.cuh); included by
// gram_<metric>.cu, which instantiate them for one metric each.
#include <stdexcept>
#include <string>

#include "gram_tile_kernels.cuh"
#include "intra_inter_sums_launch.h"

namespace confusion_kernels {
namespace gram {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline unsigned blocks_for(int64_t count, int64_t per_block) {
  return static_cast<unsigned>((count + per_block - 1) / per_block);
}

template <class P, int64_t M>
void forward_with(const void* rows, const float* exact_rows, const int64_t* labels,
                  const float* sq_norms, int64_t n, int64_t d, float* s_in, float* s_out,
                  cudaStream_t stream) {
  const auto kernel = gram_forward_kernel<P, M>;
  const int smem = static_cast<int>(sizeof(ForwardSmem<P>));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "intra_inter_sums Gram forward: shared memory");
  kernel<<<dim3(blocks_for(n, kRows)), kThreads, smem, stream>>>(
      static_cast<const typename P::in_t*>(rows), exact_rows, labels, sq_norms, n, d, s_in, s_out);
  check_cuda(cudaGetLastError(), "intra_inter_sums Gram forward kernel");
}

template <class P, int64_t M>
void backward_with(const void* rows, const float* exact_rows, const int64_t* labels,
                   const float* sq_norms, const float* g_in, const float* g_out, int64_t n,
                   int64_t d, float* grad, cudaStream_t stream) {
  const auto kernel = gram_backward_kernel<P, M>;
  const int smem = static_cast<int>(sizeof(BackwardSmem<P>));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "intra_inter_sums Gram backward: shared memory");
  const dim3 grid(blocks_for(n, kRows), blocks_for(d, kGradDims));
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const typename P::in_t*>(rows), exact_rows,
                                           labels, sq_norms, g_in, g_out, n, d, grad);
  check_cuda(cudaGetLastError(), "intra_inter_sums Gram backward kernel");
}

// Calls f(Policy{}) for the runtime operand kind.
template <class F>
void with_policy(GramOperands ops, F&& f) {
  switch (ops) {
    case GramOperands::kTf32:
      return f(Tf32Gram{});
    case GramOperands::kFp16:
      return f(HalfGram{});
    case GramOperands::kBf16:
      return f(Bf16Gram{});
    default:
      return f(FmaGram{});
  }
}

}  // namespace gram

template <int64_t M>
void launch_gram_forward(GramOperands ops, const void* rows, const float* exact_rows,
                         const int64_t* labels, const float* sq_norms, int64_t n, int64_t d,
                         float* s_in, float* s_out, cudaStream_t stream) {
  gram::with_policy(ops, [&](auto policy) {
    gram::forward_with<decltype(policy), M>(rows, exact_rows, labels, sq_norms, n, d, s_in, s_out,
                                            stream);
  });
}

template <int64_t M>
void launch_gram_backward(GramOperands ops, const void* rows, const float* exact_rows,
                          const int64_t* labels, const float* sq_norms, const float* g_in,
                          const float* g_out, int64_t n, int64_t d, float* grad,
                          cudaStream_t stream) {
  gram::with_policy(ops, [&](auto policy) {
    gram::backward_with<decltype(policy), M>(rows, exact_rows, labels, sq_norms, g_in, g_out, n, d,
                                             grad, stream);
  });
}

#define CK_INSTANTIATE_GRAM(METRIC)                                                         \
  template void launch_gram_forward<METRIC>(GramOperands, const void*, const float*,        \
                                            const int64_t*, const float*, int64_t, int64_t, \
                                            float*, float*, cudaStream_t);                  \
  template void launch_gram_backward<METRIC>(                                               \
      GramOperands, const void*, const float*, const int64_t*, const float*, const float*,  \
      const float*, int64_t, int64_t, float*, cudaStream_t);

}  // namespace confusion_kernels
