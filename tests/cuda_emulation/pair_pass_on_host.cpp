// The pair-pass CUDA kernel (csrc/cuda/pair_pass_kernels.cuh), compiled
// for the CPU through cuda_host_shim.h and exposed to tests/test_cuda_emulation.py
// through a C ABI (ctypes): one call runs every round and the diagonal launch,
// as csrc/cuda/pair_pass_cuda.cu does. Test-only.
#include "cuda_host_shim.h"
// the shim must come first
#include "pair_pass_kernels.cuh"

namespace ck = confusion_kernels;
namespace pp = confusion_kernels::pair_pass;

namespace {

template <typename T, int64_t M, bool Grad>
void run_rounds(const T* z, const T* xr, const T* shift, const int32_t* labels, const T* sq,
                const T* w_in, const T* w_out, T* t_in, T* t_out, T* g_in, T* g_out, T* gx_in,
                T* gx_out, int64_t n, int64_t d) {
  const int64_t t = (n + pp::kBlock - 1) / pp::kBlock;
  const int64_t t_even = t + (t % 2);
  for (int64_t round = 0; round + 1 < t_even; ++round)
    ck_emulation::launch(dim3{unsigned(t_even / 2), 1, 1}, dim3{pp::kThreads, 1, 1},
                         pp::pair_pass_kernel<T, M, Grad, false>, z, xr, shift, labels, sq, w_in,
                         w_out, t_in, t_out, g_in, g_out, gx_in, gx_out, n, d, round, t, t_even);
  ck_emulation::launch(dim3{unsigned(t), 1, 1}, dim3{pp::kThreads, 1, 1},
                       pp::pair_pass_kernel<T, M, Grad, true>, z, xr, shift, labels, sq, w_in,
                       w_out, t_in, t_out, g_in, g_out, gx_in, gx_out, n, d, int64_t(0), t, t_even);
}

template <typename T>
int run(int metric, int grad, const void* z, const void* xr, const void* shift,
        const int32_t* labels, const void* sq, const void* w_in, const void* w_out, void* t_in,
        void* t_out, void* g_in, void* g_out, void* gx_in, void* gx_out, int64_t n, int64_t d) {
  const auto go = [&](auto m, auto g) {
    run_rounds<T, decltype(m)::value, decltype(g)::value>(
        static_cast<const T*>(z), static_cast<const T*>(xr), static_cast<const T*>(shift), labels,
        static_cast<const T*>(sq), static_cast<const T*>(w_in), static_cast<const T*>(w_out),
        static_cast<T*>(t_in), static_cast<T*>(t_out), static_cast<T*>(g_in),
        static_cast<T*>(g_out), static_cast<T*>(gx_in), static_cast<T*>(gx_out), n, d);
  };
  const auto with_grad = [&](auto m) {
    if (grad)
      go(m, std::true_type{});
    else
      go(m, std::false_type{});
  };
  switch (metric) {
    case ck::kEuclidean:
      with_grad(std::integral_constant<int64_t, ck::kEuclidean>{});
      return 0;
    case ck::kSqEuclidean:
      with_grad(std::integral_constant<int64_t, ck::kSqEuclidean>{});
      return 0;
    case ck::kCosine:
      with_grad(std::integral_constant<int64_t, ck::kCosine>{});
      return 0;
    default:
      return 1;
  }
}

}  // namespace

extern "C" {

// double_precision: 1 for fp64 buffers, 0 for fp32. grad: 1 for the weighted
// totals and gradients, 0 for the row sums (t_in / t_out = S_in / S_out).
int ck_pair_pass(int double_precision, int metric, int grad, const void* z, const void* xr,
                 const void* shift, const int32_t* labels, const void* sq, const void* w_in,
                 const void* w_out, void* t_in, void* t_out, void* g_in, void* g_out, void* gx_in,
                 void* gx_out, int64_t n, int64_t d) {
  return double_precision ? run<double>(metric, grad, z, xr, shift, labels, sq, w_in, w_out, t_in,
                                        t_out, g_in, g_out, gx_in, gx_out, n, d)
                          : run<float>(metric, grad, z, xr, shift, labels, sq, w_in, w_out, t_in,
                                       t_out, g_in, g_out, gx_in, gx_out, n, d);
}

int64_t ck_pair_pass_smem_bytes(int double_precision) {
  return double_precision ? int64_t(sizeof(pp::Smem<double>)) : int64_t(sizeof(pp::Smem<float>));
}

}  // extern "C"
