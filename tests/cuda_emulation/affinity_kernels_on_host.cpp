// The affinity epilogue CUDA kernels (csrc/cuda/affinity_kernels.cuh) compiled
// for the CPU through cuda_host_shim.h, behind a C ABI for
// tests/test_cuda_emulation.py. float64 only (the kernels are templates; the
// float instantiation is the same code). Test-only.
#include "cuda_host_shim.h"
// the shim must come first
#include "affinity_kernels.cuh"

namespace af = confusion_kernels::affinity;

namespace {
unsigned blocks(int64_t count) {
  return unsigned((count + af::kEpilogueThreads - 1) / af::kEpilogueThreads);
}
const dim3 kBlock{af::kEpilogueThreads, 1, 1};
}  // namespace

extern "C" {

void ck_affinity_true_class(const double* f, const double* w, const double* f_norms,
                            const double* w_norms, const int64_t* labels, int64_t n, int64_t d,
                            int64_t m, double sigma, int64_t kind, double* d_true, int64_t* arg) {
  ck_emulation::launch(dim3{blocks(n), 1, 1}, kBlock, af::true_class_kernel<double>, f, w, f_norms,
                       w_norms, labels, n, d, m, sigma, kind, d_true, arg);
}

void ck_affinity_similarity(const double* g, const double* fn_r, const double* wn_t, int64_t rt,
                            int64_t ct, int64_t m, double sigma, int64_t kind, double* d_tile,
                            int64_t* arg_tile) {
  ck_emulation::launch(dim3{blocks(rt * ct), 1, 1}, kBlock, af::similarity_kernel<double>, g, fn_r,
                       wn_t, rt, ct, m, sigma, kind, d_tile, arg_tile);
}

void ck_affinity_hinge(const double* d_tile, const int64_t* arg_tile, int64_t rt, int64_t ct,
                       int64_t m, int64_t c0, const int64_t* lab_r, const double* d_true_r,
                       double sigma, double margin, int64_t kind, const double* g_r,
                       const double* own_active_r, double* h_tile, double* on_tile, double* a) {
  ck_emulation::launch(dim3{blocks(rt * ct), 1, 1}, kBlock, af::hinge_kernel<double>, d_tile,
                       arg_tile, rt, ct, m, c0, lab_r, d_true_r, sigma, margin, kind, g_r,
                       own_active_r, h_tile, on_tile, a);
}

}  // extern "C"
