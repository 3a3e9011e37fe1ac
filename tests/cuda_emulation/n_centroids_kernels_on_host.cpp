// The N-Centroids epilogue CUDA kernels (csrc/cuda/n_centroids_kernels.cuh)
// compiled for the CPU through cuda_host_shim.h, behind a C ABI for
// tests/test_cuda_emulation.py. float64 only (the float instantiation is the
// same template). Test-only.
#include "cuda_host_shim.h"
// the shim must come first
#include "n_centroids_kernels.cuh"

namespace nc = confusion_kernels::n_centroids;

namespace {
unsigned blocks(int64_t count) {
  return unsigned((count + nc::kSphereThreads - 1) / nc::kSphereThreads);
}
const dim3 kBlock{nc::kSphereThreads, 1, 1};
}  // namespace

extern "C" {

void ck_ncl_direct(const double* x, const double* c, const int64_t* index, const double* weight,
                   int64_t n, int64_t d, int64_t metric, double* dist, double* grad_x) {
  ck_emulation::launch(dim3{blocks(n), 1, 1}, kBlock, nc::direct_kernel<double>, x, c, index,
                       weight, n, d, metric, dist, grad_x);
}

void ck_ncl_pairs(const double* g, const double* x_r, const double* xn2_r, const double* c_t,
                  const double* cn2_t, const int64_t* lab_r, const double* weight_r, int64_t rt,
                  int64_t ct, int64_t c0, int64_t d, int64_t metric, double* dist, uint8_t* exact,
                  double* coef, double* x_coef) {
  ck_emulation::launch(dim3{blocks(rt * ct), 1, 1}, kBlock, nc::pairs_kernel<double>, g, x_r, xn2_r,
                       c_t, cn2_t, lab_r, weight_r, rt, ct, c0, d, metric, dist, exact, coef,
                       x_coef);
}

void ck_ncl_exact_grad(const double* x_r, const double* c_t, const int64_t* lab_r,
                       const double* weight_r, const uint8_t* exact, int64_t rt, int64_t ct,
                       int64_t c0, int64_t d, int64_t metric, double* grad_x_r) {
  ck_emulation::launch(dim3{blocks(rt), 1, 1}, kBlock, nc::exact_grad_kernel<double>, x_r, c_t,
                       lab_r, weight_r, exact, rt, ct, c0, d, metric, grad_x_r);
}

}  // extern "C"
