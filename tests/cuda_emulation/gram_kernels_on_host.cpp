// The Gram-form CUDA kernels (csrc/cuda/gram_tile_kernels.cuh), compiled for
// the CPU through cuda_host_shim.h and exposed to tests/test_cuda_emulation.py
// through a C ABI (ctypes). Test-only.
#include "cuda_host_shim.h"
// the shim must come first
#include "gram_tile_kernels.cuh"

namespace ck = confusion_kernels;
namespace g = confusion_kernels::gram;

namespace {

template <class F>
bool with_policy(int policy, F&& f) {
  switch (policy) {
    case 0:
      f(g::FmaGram{});
      return true;
    case 1:
      f(g::Tf32Gram{});
      return true;
    case 2:
      f(g::HalfGram{});
      return true;
    case 3:
      f(g::Bf16Gram{});
      return true;
    default:
      return false;
  }
}

template <class F>
bool with_metric(int metric, F&& f) {
  switch (metric) {
    case ck::kEuclidean:
      f(std::integral_constant<int64_t, ck::kEuclidean>{});
      return true;
    case ck::kSqEuclidean:
      f(std::integral_constant<int64_t, ck::kSqEuclidean>{});
      return true;
    case ck::kCosine:
      f(std::integral_constant<int64_t, ck::kCosine>{});
      return true;
    default:
      return false;
  }
}

unsigned blocks(int64_t count, int64_t per) { return unsigned((count + per - 1) / per); }

}  // namespace

extern "C" {

// policy: 0 fp32 FMA, 1 tf32, 2 fp16, 3 bf16 (rows in that storage type).
int ck_gram_forward(int policy, int metric, const void* rows, const float* exact_rows,
                    const int64_t* labels, const float* sq_norms, int64_t n, int64_t d, float* s_in,
                    float* s_out) {
  bool ok = false;
  with_policy(policy, [&](auto p) {
    using P = decltype(p);
    ok = with_metric(metric, [&](auto m) {
      ck_emulation::launch(dim3{blocks(n, g::kRows), 1, 1}, dim3{g::kThreads, 1, 1},
                           g::gram_forward_kernel<P, decltype(m)::value>,
                           static_cast<const typename P::in_t*>(rows), exact_rows, labels, sq_norms,
                           n, d, s_in, s_out);
    });
  });
  return ok ? 0 : 1;
}

int ck_gram_backward(int policy, int metric, const void* rows, const float* exact_rows,
                     const int64_t* labels, const float* sq_norms, const float* g_in,
                     const float* g_out, int64_t n, int64_t d, float* grad) {
  bool ok = false;
  with_policy(policy, [&](auto p) {
    using P = decltype(p);
    ok = with_metric(metric, [&](auto m) {
      ck_emulation::launch(dim3{blocks(n, g::kRows), blocks(d, g::kGradDims), 1},
                           dim3{g::kThreads, 1, 1}, g::gram_backward_kernel<P, decltype(m)::value>,
                           static_cast<const typename P::in_t*>(rows), exact_rows, labels, sq_norms,
                           g_in, g_out, n, d, grad);
    });
  });
  return ok ? 0 : 1;
}

// Shared memory each kernel asks for (the GPU allows 227 KiB per block on sm_90).
int64_t ck_gram_smem_bytes(int policy, int backward) {
  int64_t bytes = -1;
  with_policy(policy, [&](auto p) {
    using P = decltype(p);
    bytes = backward ? int64_t(sizeof(g::BackwardSmem<P>)) : int64_t(sizeof(g::ForwardSmem<P>));
  });
  return bytes;
}

// grad_a (d values) of coef * D(a, b) both ways: pair_grad_exact_accumulate,
// and pair_grad_exact_coefficients on the operands op(.) (unit rows for cosine).
void ck_pair_grad_both(int metric, const double* a, const double* b, int64_t d, double coef,
                       double* by_accumulate, double* by_coefficients) {
  for (int64_t k = 0; k < d; ++k) by_accumulate[k] = by_coefficients[k] = 0.0;
  ck::pair_grad_exact_accumulate<double, double>(metric, a, b, d, coef, by_accumulate);
  double self = 0, other = 0, diff = 0;
  ck::pair_grad_exact_coefficients<double, double>(metric, a, b, d, coef, &self, &other, &diff);
  double na = 0, nb = 0;
  for (int64_t k = 0; k < d; ++k) {
    na += a[k] * a[k];
    nb += b[k] * b[k];
  }
  na = std::sqrt(na);
  nb = std::sqrt(nb);
  for (int64_t k = 0; k < d; ++k) {
    double oa = a[k], ob = b[k];
    if (metric == ck::kCosine) {
      oa = na > 0 ? a[k] / na : 0.0;
      ob = nb > 0 ? b[k] / nb : 0.0;
    }
    by_coefficients[k] = self * oa + other * ob + diff * (oa - ob);
  }
}

}  // extern "C"
