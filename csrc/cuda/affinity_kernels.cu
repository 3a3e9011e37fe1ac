// Affinity epilogue kernels (affinity_kernels.cuh), fp32 and fp64.
#include "affinity_kernels.cuh"
#include "affinity_launch.h"
#include "launch_checks.h"

namespace confusion_kernels {
namespace affinity {

template <typename T>
void launch_true_class(const T* f, const T* w, const T* f_norms, const T* w_norms,
                       const int64_t* labels, int64_t n, int64_t d, int64_t m, T sigma,
                       int64_t kind, T* d_true, int64_t* arg, cudaStream_t stream) {
  if (n == 0) return;
  true_class_kernel<T><<<blocks_for(n, kEpilogueThreads), kEpilogueThreads, 0, stream>>>(
      f, w, f_norms, w_norms, labels, n, d, m, sigma, kind, d_true, arg);
  check_launch("affinity true-class kernel");
}

template <typename T>
void launch_similarity(const T* g, const T* fn_r, const T* wn_t, int64_t rt, int64_t ct, int64_t m,
                       T sigma, int64_t kind, T* d_tile, int64_t* arg_tile, cudaStream_t stream) {
  if (rt * ct == 0) return;
  similarity_kernel<T><<<blocks_for(rt * ct, kEpilogueThreads), kEpilogueThreads, 0, stream>>>(
      g, fn_r, wn_t, rt, ct, m, sigma, kind, d_tile, arg_tile);
  check_launch("affinity similarity kernel");
}

template <typename T>
void launch_hinge(const T* d_tile, const int64_t* arg_tile, int64_t rt, int64_t ct, int64_t m,
                  int64_t c0, const int64_t* lab_r, const T* d_true_r, T sigma, T margin,
                  int64_t kind, const T* g_r, const T* own_active_r, T* h_tile, T* on_tile, T* a,
                  cudaStream_t stream) {
  if (rt * ct == 0) return;
  hinge_kernel<T><<<blocks_for(rt * ct, kEpilogueThreads), kEpilogueThreads, 0, stream>>>(
      d_tile, arg_tile, rt, ct, m, c0, lab_r, d_true_r, sigma, margin, kind, g_r, own_active_r,
      h_tile, on_tile, a);
  check_launch("affinity hinge kernel");
}

#define CK_INSTANTIATE_AFFINITY(T)                                                               \
  template void launch_true_class<T>(const T*, const T*, const T*, const T*, const int64_t*,     \
                                     int64_t, int64_t, int64_t, T, int64_t, T*, int64_t*,        \
                                     cudaStream_t);                                              \
  template void launch_similarity<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, T, \
                                     int64_t, T*, int64_t*, cudaStream_t);                       \
  template void launch_hinge<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t,    \
                                const int64_t*, const T*, T, T, int64_t, const T*, const T*, T*, \
                                T*, T*, cudaStream_t);
CK_INSTANTIATE_AFFINITY(float)
CK_INSTANTIATE_AFFINITY(double)

}  // namespace affinity
}  // namespace confusion_kernels
