// C++ CPU epilogues of the N-Centroids loss (n_centroids_tiles.h; per pair
// sphere_math.h). A Gram tile [rt, ct] is turned into distances in three
// sweeps over the cache-resident tile: (1) a and b per pair from the Gram form,
// recomputed from differences where it cancels; (2) for the angle, one
// vectorised at::atan2 over the tile; (3) per row the first minimum and the sum
// over the negatives and, for gradients, the coefficient tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "confusion_kernels/n_centroids_tiles.h"
#include "confusion_kernels/sphere_math.h"

namespace confusion_kernels {
namespace {

namespace nc = n_centroids;

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
void direct_rows(const nc::Inputs& in, const int64_t* index, const T* weight, T* dist, T* grad_x) {
  const int64_t n = in.x.size(0), d = in.x.size(1);
  const T* x = in.x.data_ptr<T>();
  const T* c = in.centroids.data_ptr<T>();
  const int64_t metric = in.metric;
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (index[i] < 0) {
        dist[i] = T(0);
        continue;
      }
      const T* xi = x + i * d;
      const T* ck = c + index[i] * d;
      T a2, b2, dot;
      sphere_pair_exact(xi, ck, d, &a2, &b2, &dot);
      const T a = std::sqrt(a2), b = std::sqrt(b2);
      dist[i] = sphere_distance(metric, a, b, dot);
      if (grad_x != nullptr) sphere_grad_exact_accumulate(metric, xi, ck, d, a, b, weight[i],
                                                          grad_x + i * d);
    }
  });
}

// Tile buffers of one epilogue call: a and b per pair (euclidean, great circle),
// the distances, and one byte per pair marking pairs recomputed exactly.
struct TileScratch {
  at::Tensor a, b, dist, exact;
};

template <typename T>
void negatives_tile(const at::Tensor& g_tile, const nc::Inputs& in, int64_t r0, int64_t c0,
                    const T* weight, T* best, int64_t* best_k, T* sum, T* coef, T* x_coef,
                    T* grad_x) {
  const int64_t rt = g_tile.size(0), ct = g_tile.size(1), d = in.x.size(1);
  const int64_t metric = in.metric;
  const at::Tensor g_c = g_tile.contiguous();
  const T* g = g_c.data_ptr<T>();
  const T* x = in.x.data_ptr<T>() + r0 * d;
  const T* xn2 = in.x_norm2.data_ptr<T>() + r0;
  const T* c = in.centroids.data_ptr<T>() + c0 * d;
  const T* cn2 = in.c_norm2.data_ptr<T>() + c0;
  const int64_t* lab = in.labels.data_ptr<int64_t>() + r0;

  TileScratch s;
  s.a = at::empty({rt, ct}, g_c.options());
  s.b = at::empty({rt, ct}, g_c.options());
  s.exact = at::empty({rt, ct}, g_c.options().dtype(at::kByte));
  T* a = s.a.data_ptr<T>();
  T* b = s.b.data_ptr<T>();
  uint8_t* exact = s.exact.data_ptr<uint8_t>();
  // (1) a and b per pair from the Gram form (a loop the compiler vectorises), then
  // the pairs where it cancels again from differences (rare: a row close to a
  // centroid or to its antipode)
  std::vector<uint8_t> row_has_exact(rt, 0);
  at::parallel_for(0, rt, 16, [&](int64_t begin, int64_t end) {
    const int64_t cols = ct;  // locals: the stores below cannot alias them
    const int64_t m = metric;
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = g + i * cols;
      T* ai = a + i * cols;
      T* bi = b + i * cols;
      uint8_t* ei = exact + i * cols;
      const T xn2_i = xn2[i];
      uint8_t any = 0;
      for (int64_t j = 0; j < cols; ++j) {
        T a2, b2;
        const bool redo = sphere_chords_from_gram(m, xn2_i, cn2[j], gi[j], &a2, &b2);
        ai[j] = std::sqrt(a2);
        bi[j] = std::sqrt(b2);
        ei[j] = redo;
        any |= uint8_t(redo);
      }
      row_has_exact[i] = any;
      if (!any) continue;
      for (int64_t j = 0; j < cols; ++j) {
        if (!ei[j]) continue;
        T a2, b2, dot;
        sphere_pair_exact(x + i * d, c + j * d, d, &a2, &b2, &dot);
        ai[j] = std::sqrt(a2);
        bi[j] = std::sqrt(b2);
      }
    }
  });
  // (2) the distances of the tile (the angle: one vectorised atan2; x 2 below)
  at::Tensor dist_t;
  T scale = 1;
  if (metric == kGreatCircle) {
    dist_t = at::atan2(s.a, s.b);
    scale = 2;
  } else if (metric == kChord) {
    dist_t = s.a;
  } else {
    dist_t = at::rsub(g_c, 1);
  }
  const T* dist = dist_t.data_ptr<T>();
  // (3) per row: first min and sum over negatives; the coefficient tile
  at::parallel_for(0, rt, 16, [&](int64_t begin, int64_t end) {
    const int64_t cols = ct;  // locals: the stores below cannot alias them
    const int64_t m = metric;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t own = lab[i] - c0;  // may lie outside [0, ct)
      const bool own_here = own >= 0 && own < ct;
      const T* di = dist + i * ct;
      if (best != nullptr) {
        T row_sum = 0;
        for (int64_t j = 0; j < ct; ++j) row_sum += di[j];
        if (own_here) row_sum -= di[own];
        T row_best = best_k[i] < 0 ? std::numeric_limits<T>::infinity() : best[i] / scale;
        int64_t row_k = best_k[i];
        for (int64_t j = 0; j < ct; ++j) {
          if (j == own) continue;
          keep_first_smaller(di[j], c0 + j, &row_best, &row_k);
        }
        best[i] = scale * row_best;
        best_k[i] = row_k;
        sum[i] += scale * row_sum;
      }
      if (coef != nullptr) {
        const T w = weight[i];
        const T* ai = a + i * ct;
        const T* bi = b + i * ct;
        const uint8_t* ei = exact + i * ct;
        T* coef_i = coef + i * ct;
        T row_alpha = 0;
        for (int64_t j = 0; j < cols; ++j) {
          T alpha, beta;
          sphere_gram_coefficients(m, ai[j], bi[j], &alpha, &beta);
          const bool keep = !ei[j];
          coef_i[j] = keep ? w * beta : T(0);
          row_alpha += keep ? alpha : T(0);
        }
        if (own_here) {
          if (!ei[own]) {
            T alpha, beta;
            sphere_gram_coefficients(metric, ai[own], bi[own], &alpha, &beta);
            row_alpha -= alpha;
          }
          coef_i[own] = 0;
        }
        x_coef[i] += w * row_alpha;
        if (!row_has_exact[i]) continue;
        for (int64_t j = 0; j < ct; ++j)
          if (ei[j] && j != own)
            sphere_grad_exact_accumulate(metric, x + i * d, c + j * d, d, ai[j], bi[j], w,
                                         grad_x + i * d);
      }
    }
  });
}

// The CPU epilogues of n_centroids_tiles.h.
struct CpuTiles {
  static constexpr c10::DeviceType kDevice = c10::kCPU;
  static constexpr int64_t kRowTile = 256;
  static constexpr int64_t kCentroidTile = 512;
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static void direct(const nc::Inputs& in, const at::Tensor& index, const at::Tensor& weight,
                     at::Tensor& dist, const at::Tensor& grad_x) {
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "n_centroids_direct_cpu", [&] {
      const at::Tensor w = weight.defined() ? weight.contiguous() : weight;
      direct_rows<scalar_t>(in, index.data_ptr<int64_t>(), ptr_or_null<scalar_t>(w),
                            dist.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(grad_x));
    });
  }
  static void negatives(const at::Tensor& g, const nc::Inputs& in, int64_t r0, int64_t c0,
                        const at::Tensor& weight_r, const at::Tensor& best_r,
                        const at::Tensor& best_k_r, const at::Tensor& sum_r,
                        const at::Tensor& coef, const at::Tensor& x_coef_r,
                        const at::Tensor& grad_x_r) {
    AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "n_centroids_negatives_cpu", [&] {
      const at::Tensor w = weight_r.defined() ? weight_r.contiguous() : weight_r;
      negatives_tile<scalar_t>(g, in, r0, c0, ptr_or_null<scalar_t>(w),
                               ptr_or_null<scalar_t>(best_r), ptr_or_null<int64_t>(best_k_r),
                               ptr_or_null<scalar_t>(sum_r), ptr_or_null<scalar_t>(coef),
                               ptr_or_null<scalar_t>(x_coef_r), ptr_or_null<scalar_t>(grad_x_r));
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(confusion_kernels, CPU, m) {
  m.impl("n_centroids_rows", &n_centroids::rows_op<CpuTiles>);
  m.impl("n_centroids_rows_backward", &n_centroids::rows_backward_op<CpuTiles>);
  m.impl("n_centroids_sum_with_grad", &n_centroids::sum_with_grad_op<CpuTiles>);
}

}  // namespace confusion_kernels
