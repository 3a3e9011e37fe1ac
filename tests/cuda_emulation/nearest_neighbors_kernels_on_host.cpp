// The nearest_neighbors CUDA kernels (csrc/cuda/nearest_neighbors_kernels.cuh) compiled for the
// CPU through cuda_host_shim.h, behind a C ABI for tests/test_cuda_emulation.py. float64 only
// (the float instantiation is the same template). Test-only.
#include "cuda_host_shim.h"
// the shim must come first
#include "nearest_neighbors_kernels.cuh"

namespace nb = confusion_kernels::neighbors;

extern "C" {

// The shared-memory bytes of a list for k neighbours and blocks of `threads` (the GPU launches
// kNeighborThreads).
int64_t ck_nn_list_bytes(int64_t k, unsigned threads) {
  return int64_t(nb::list_bytes(nb::list_capacity(k, threads), sizeof(double)));
}

void ck_nn_offer(const double* gram, const double* ref_sq, int64_t rt, int64_t ct, int64_t c0,
                 int64_t self_delta, int has_self, int64_t metric, int64_t k, double* keys,
                 int64_t* index, int64_t* count, unsigned threads) {
  const nb::NeighborTile<double> tile{gram, ref_sq, rt, ct, c0, self_delta, has_self != 0, metric};
  ck_emulation::launch(dim3{unsigned(rt), 1, 1}, dim3{threads, 1, 1}, nb::offer_kernel<double>,
                       tile, k, nb::list_capacity(k, threads), keys, index, count);
}

void ck_nn_finish(const double* q, const double* q_sq, const double* r, const double* r_sq,
                  int64_t n, int64_t d, int64_t k, int64_t metric, const int64_t* index,
                  double* dist, int64_t* out_index, unsigned threads) {
  ck_emulation::launch(dim3{unsigned(n), 1, 1}, dim3{threads, 1, 1}, nb::finish_kernel<double>, q,
                       q_sq, r, r_sq, d, k, metric, index, dist, out_index);
}

}  // extern "C"
