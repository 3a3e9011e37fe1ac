// N-Centroids epilogue kernels (n_centroids_kernels.cuh), fp32 and fp64.
#include "launch_checks.h"
#include "n_centroids_kernels.cuh"
#include "n_centroids_launch.h"

namespace confusion_kernels {
namespace n_centroids {

template <typename T>
void launch_direct(const T* x, const T* c, const int64_t* index, const T* weight, int64_t n,
                   int64_t d, int64_t metric, T* dist, T* grad_x, cudaStream_t stream) {
  if (n == 0) return;
  direct_kernel<T><<<blocks_for(n, kSphereThreads), kSphereThreads, 0, stream>>>(
      x, c, index, weight, n, d, metric, dist, grad_x);
  check_launch("n_centroids direct kernel");
}

template <typename T>
void launch_pairs(const T* g, const T* x_r, const T* xn2_r, const T* c_t, const T* cn2_t,
                  const int64_t* lab_r, const T* weight_r, int64_t rt, int64_t ct, int64_t c0,
                  int64_t d, int64_t metric, T* dist, uint8_t* exact, T* coef, T* x_coef,
                  cudaStream_t stream) {
  if (rt * ct == 0) return;
  pairs_kernel<T><<<blocks_for(rt * ct, kSphereThreads), kSphereThreads, 0, stream>>>(
      g, x_r, xn2_r, c_t, cn2_t, lab_r, weight_r, rt, ct, c0, d, metric, dist, exact, coef, x_coef);
  check_launch("n_centroids pairs kernel");
}

template <typename T>
void launch_exact_grad(const T* x_r, const T* c_t, const int64_t* lab_r, const T* weight_r,
                       const uint8_t* exact, int64_t rt, int64_t ct, int64_t c0, int64_t d,
                       int64_t metric, T* grad_x_r, cudaStream_t stream) {
  if (rt * ct == 0) return;
  exact_grad_kernel<T><<<blocks_for(rt, kSphereThreads), kSphereThreads, 0, stream>>>(
      x_r, c_t, lab_r, weight_r, exact, rt, ct, c0, d, metric, grad_x_r);
  check_launch("n_centroids exact-gradient kernel");
}

#define CK_INSTANTIATE_N_CENTROIDS(T)                                                              \
  template void launch_direct<T>(const T*, const T*, const int64_t*, const T*, int64_t, int64_t,   \
                                 int64_t, T*, T*, cudaStream_t);                                   \
  template void launch_pairs<T>(const T*, const T*, const T*, const T*, const T*, const int64_t*,  \
                                const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*,         \
                                uint8_t*, T*, T*, cudaStream_t);                                   \
  template void launch_exact_grad<T>(const T*, const T*, const int64_t*, const T*, const uint8_t*, \
                                     int64_t, int64_t, int64_t, int64_t, int64_t, T*,              \
                                     cudaStream_t);
CK_INSTANTIATE_N_CENTROIDS(float)
CK_INSTANTIATE_N_CENTROIDS(double)

}  // namespace n_centroids
}  // namespace confusion_kernels
