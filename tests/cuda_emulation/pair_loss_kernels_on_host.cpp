// The pair-loss CUDA kernels (csrc/cuda/pair_loss_kernels.cuh) compiled for the CPU through
// cuda_host_shim.h, behind a C ABI for tests/test_cuda_emulation.py. float64 only (the float
// instantiation is the same template). Test-only.
#include "cuda_host_shim.h"
// the shim must come first
#include "pair_loss_kernels.cuh"

namespace pl = confusion_kernels::pair_losses;
using confusion_kernels::PairLossParams;

namespace {
unsigned blocks(int64_t count, unsigned threads) {
  return unsigned((count + threads - 1) / threads);
}

PairLossParams<double> params(int64_t kind, int cosine, double a, double b, double c) {
  return PairLossParams<double>{kind, cosine ? -1.0 : 1.0, a, b, c};
}

pl::PairTile<double> tile(const double* g, const double* x, const double* xn, const int64_t* lab,
                          const double* r, const double* rn, const int64_t* rlab, int64_t rt,
                          int64_t ct, int64_t d, int64_t self_delta, int has_self, int cosine) {
  return pl::PairTile<double>{g,  x, xn,         lab,           r,          rn, rlab, rt,
                              ct, d, self_delta, has_self != 0, cosine != 0};
}
}  // namespace

extern "C" {

// threads: the block size to emulate (a power of two; the GPU launches kRowThreads)
void ck_pl_row_step(int64_t kind, int cosine, double a, double b, double c, int64_t n, int step,
                    double* stats, double* rows, unsigned threads) {
  ck_emulation::launch(dim3{blocks(n, threads), 1, 1}, dim3{threads, 1, 1},
                       pl::row_step_kernel<double>, params(kind, cosine, a, b, c), n, step, stats,
                       rows);
}

void ck_pl_stats(const double* g, const double* x, const double* xn, const int64_t* lab,
                 const double* r, const double* rn, const int64_t* rlab, int64_t rt, int64_t ct,
                 int64_t d, int64_t self_delta, int has_self, int cosine, int64_t kind, double a,
                 double b, double c, int second, double* stats, unsigned threads) {
  ck_emulation::launch(dim3{unsigned(rt), 1, 1}, dim3{threads, 1, 1}, pl::stats_kernel<double>,
                       tile(g, x, xn, lab, r, rn, rlab, rt, ct, d, self_delta, has_self, cosine),
                       params(kind, cosine, a, b, c), second != 0, stats);
}

void ck_pl_coefficients(const double* g, const double* x, const double* xn, const int64_t* lab,
                        const double* r, const double* rn, const int64_t* rlab, int64_t rt,
                        int64_t ct, int64_t d, int64_t self_delta, int has_self, int cosine,
                        int64_t kind, double a, double b, double c, const double* stats,
                        const double* grad_rows, double* coef, double* near, unsigned threads) {
  ck_emulation::launch(dim3{blocks(rt * ct, threads), 1, 1}, dim3{threads, 1, 1},
                       pl::coefficient_kernel<double>,
                       tile(g, x, xn, lab, r, rn, rlab, rt, ct, d, self_delta, has_self, cosine),
                       params(kind, cosine, a, b, c), stats, grad_rows, coef, near);
}

void ck_pl_near_grads(const double* x, const double* r, int64_t rt, int64_t ct, int64_t d,
                      const double* near, double* grad_x, double* grad_r, unsigned threads) {
  const pl::PairTile<double> t =
      tile(nullptr, x, nullptr, nullptr, r, nullptr, nullptr, rt, ct, d, 0, 0, 0);
  ck_emulation::launch(dim3{blocks(rt, threads), 1, 1}, dim3{threads, 1, 1},
                       pl::near_rows_kernel<double>, t, near, grad_x);
  ck_emulation::launch(dim3{blocks(ct, threads), 1, 1}, dim3{threads, 1, 1},
                       pl::near_refs_kernel<double>, t, near, grad_r);
}

}  // extern "C"
