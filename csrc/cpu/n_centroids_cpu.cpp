// C++ CPU epilogues of the N-Centroids loss (n_centroids_tiles.h; per pair
// sphere_math.h). A Gram tile [rt, ct] is turned into distances in three
// sweeps over the cache-resident tile: (1) a and b per pair from the Gram form,
// recomputed from differences where it cancels; (2) for the angle, atan2 over
// the tile (float lanes; at::atan2 for double); (3) per row the first minimum and the sum
// over the negatives and, for gradients, the coefficient tile. The element
// loops of (1) and (3) are written over simd.h's lane types (AVX2 for the body
// of a row, one lane for its tail) with the formulas of sphere_math.h, which
// the one-lane code, the exact pairs and the CUDA kernels use directly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "confusion_kernels/n_centroids_tiles.h"
#include "confusion_kernels/sphere_math.h"
#include "parallel_jobs.h"
#include "simd.h"

namespace confusion_kernels {
namespace {

namespace nc = n_centroids;

template <typename T>
void direct_rows(const nc::Inputs& in, const int64_t* index, const T* weight, T* dist, T* grad_x) {
  const int64_t n = in.x.size(0), d = in.x.size(1);
  const T* x = in.x.data_ptr<T>();
  const T* c = in.centroids.data_ptr<T>();
  const int64_t metric = in.metric;
  parallel_rows(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (index[i] < 0) {
        dist[i] = T(0);
        continue;
      }
      dist[i] = sphere_pair_direct(metric, x + i * d, c + index[i] * d, d,
                                   weight != nullptr ? weight[i] : T(0),
                                   grad_x != nullptr ? grad_x + i * d : nullptr);
    }
  });
}

// (1) for lanes j.. of a row: a and b from the Gram form (sphere_chords_from_gram)
// and a 0 / 1 flag per pair that must be recomputed exactly; returns the flags' bits.
template <class L, typename T>
uint32_t chord_lanes(int64_t& j, int64_t cols, int64_t metric, T xn2_i, const T* cn2, const T* gi,
                     T* ai, T* bi, T* ei) {
  using V = typename L::V;
  using M = typename L::M;
  const V two = L::set1(T(2)), xn = L::set1(xn2_i), frac = L::set1(T(kGramExactFraction));
  const V one = L::set1(T(1)), zero = L::zero();
  uint32_t any = 0;
  for (; j + L::kWidth <= cols; j += L::kWidth) {
    const V s = xn + L::load(cn2 + j), g = L::load(gi + j);
    const V a2 = L::max0(s - two * g), b2 = L::max0(s + two * g);
    const V floor = frac * s;
    M redo = L::le(a2, floor);
    if (metric == kGreatCircle) redo = L::m_or(redo, L::le(b2, floor));
    if (metric == kSphereCosine) redo = L::gt(zero, one);  // no cancellation: never
    L::store(ai + j, L::sqrt(a2));
    L::store(bi + j, L::sqrt(b2));
    L::store(ei + j, L::select(redo, one, zero));
    any |= L::bits(redo);
  }
  return any;
}

// (3) for lanes j.. of a row: coef = w beta and the sum of alpha over the Gram pairs
// (flag 0), with dd/dx = alpha x + beta c as in sphere_gram_coefficients: p and q of
// sphere_distance_grad, alpha = p + q, beta = q - p.
template <class L, typename T>
T coefficient_lanes(int64_t& j, int64_t cols, int64_t metric, T w, const T* ai, const T* bi,
                    const T* ei, T* coef_i) {
  using V = typename L::V;
  const V zero = L::zero(), one = L::set1(T(1)), two = L::set1(T(2)), wv = L::set1(w);
  V alpha_sum = zero;
  for (; j + L::kWidth <= cols; j += L::kWidth) {
    const V a = L::load(ai + j), b = L::load(bi + j);
    const auto keep = L::m_not(L::gt(L::load(ei + j), zero));
    V alpha, beta;
    if (metric == kSphereCosine) {
      alpha = zero;
      beta = zero - one;
    } else if (metric == kChord) {
      const V p = L::select(L::gt(a, zero), one / a, zero);
      alpha = p;
      beta = zero - p;
    } else {
      const V s = a * a + b * b;
      const V p = L::select(L::gt(a, zero), two * b / (a * s), zero);
      const V q = L::select(L::gt(b, zero), (zero - two) * a / (b * s), zero);
      alpha = p + q;
      beta = q - p;
    }
    L::store(coef_i + j, L::select(keep, wv * beta, zero));
    alpha_sum = alpha_sum + L::select(keep, alpha, zero);
  }
  return L::hsum(alpha_sum);
}

// atan2(a, b) for a, b >= 0 (the norms |x - c|, |x + c|) on lanes of floats:
// t = min / max in [0, 1], folded by atan(t) = pi/4 + atan((t - 1) / (t + 1))
// to |u| <= tan(pi/8) (one division either way), Cephes' atanf polynomial there,
// then pi/2 - atan(t) where a > b: within 3 ulp of the float64 angle (2.0e-7
// relative over 10^6 random pairs). atan2(0, 0) = 0 as std::atan2 gives; NaN stays NaN. The
// N-Centroids step (N = 16384, K = 1000, D = 128) took 0.93x the time of
// at::atan2's (three alternating runs, 2-core VM, 2026-12-07).
template <class L>
inline typename L::V angle_lanes(typename L::V a, typename L::V b) {
  using V = typename L::V;
  const V zero = L::zero();
  const auto swap = L::gt(a, b);
  const V hi = L::select(swap, a, b), lo = L::select(swap, b, a);
  const auto fold = L::gt(lo, L::set1(0.4142135623730950f) * hi);           // t > tan(pi/8)
  const V u = L::select(fold, lo - hi, lo) / L::select(fold, lo + hi, hi);  // one division
  const V z = u * u;
  V p = L::set1(8.05374449538e-2f);
  p = p * z - L::set1(1.38776856032e-1f);
  p = p * z + L::set1(1.99777106478e-1f);
  p = p * z - L::set1(3.33329491539e-1f);
  V r = p * z * u + u;
  r = L::select(fold, r + L::set1(0.7853981633974483f), r);
  r = L::select(swap, L::set1(1.5707963267948966f) - r, r);
  return L::select(L::m_and(L::le(hi, zero), L::le(lo, zero)), zero, r);
}

// dist[k] = atan2(a[k], b[k]) for k < count: float lanes (angle_lanes), at::atan2
// for double (the polynomial is a float one).
template <typename T>
at::Tensor tile_angles(const at::Tensor& a_t, const at::Tensor& b_t) {
  if constexpr (!std::is_same_v<T, float>) {
    return at::atan2(a_t, b_t);
  } else {
    at::Tensor out = at::empty_like(a_t);
    const float* a = a_t.data_ptr<float>();
    const float* b = b_t.data_ptr<float>();
    float* d = out.data_ptr<float>();
    const int64_t count = a_t.numel();
    using L = simd::Widest<float>;
    using S = simd::Scalar<float>;
    int64_t k = 0;
    for (; k + L::kWidth <= count; k += L::kWidth)
      L::store(d + k, angle_lanes<L>(L::load(a + k), L::load(b + k)));
    for (; k < count; ++k) d[k] = angle_lanes<S>(a[k], b[k]);
    return out;
  }
}

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

  // a and b per pair, and a flag per pair (1: recomputed exactly) in the tile's
  // dtype, so that lane code loads it as a value
  const at::Tensor a_t = at::empty({rt, ct}, g_c.options());
  const at::Tensor b_t = at::empty({rt, ct}, g_c.options());
  const at::Tensor exact_t = at::empty({rt, ct}, g_c.options());
  T* a = a_t.data_ptr<T>();
  T* b = b_t.data_ptr<T>();
  T* exact = exact_t.data_ptr<T>();
  // (1) a and b per pair from the Gram form (simd lanes), then
  // the pairs where it cancels again from differences (rare: a row close to a
  // centroid or to its antipode)
  std::vector<uint8_t> row_has_exact(rt, 0);
  parallel_rows(0, rt, 16, [&](int64_t begin, int64_t end) {
    const int64_t cols = ct;  // locals: the stores below cannot alias them
    const int64_t m = metric;
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = g + i * cols;
      T* ai = a + i * cols;
      T* bi = b + i * cols;
      T* ei = exact + i * cols;
      const T xn2_i = xn2[i];
      int64_t j = 0;
      uint32_t any = chord_lanes<simd::Widest<T>>(j, cols, m, xn2_i, cn2, gi, ai, bi, ei);
      any |= chord_lanes<simd::Scalar<T>>(j, cols, m, xn2_i, cn2, gi, ai, bi, ei);
      row_has_exact[i] = any != 0;
      if (!any) continue;
      for (int64_t k = 0; k < cols; ++k) {
        if (ei[k] == T(0)) continue;
        T a2, b2, dot;
        sphere_pair_exact(x + i * d, c + k * d, d, &a2, &b2, &dot);
        ai[k] = std::sqrt(a2);
        bi[k] = std::sqrt(b2);
      }
    }
  });
  // (2) the distances of the tile (the angle: tile_angles; x 2 below)
  at::Tensor dist_t;
  T scale = 1;
  if (metric == kGreatCircle) {
    dist_t = tile_angles<T>(a_t, b_t);
    scale = 2;
  } else if (metric == kChord) {
    dist_t = a_t;
  } else {
    dist_t = at::rsub(g_c, 1);
  }
  const T* dist = dist_t.data_ptr<T>();
  // (3) per row: first min and sum over negatives; the coefficient tile
  parallel_rows(0, rt, 16, [&](int64_t begin, int64_t end) {
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
        const T* ei = exact + i * ct;
        T* coef_i = coef + i * ct;
        int64_t j = 0;
        T row_alpha = coefficient_lanes<simd::Widest<T>>(j, cols, m, w, ai, bi, ei, coef_i);
        row_alpha += coefficient_lanes<simd::Scalar<T>>(j, cols, m, w, ai, bi, ei, coef_i);
        if (own_here) {
          if (ei[own] == T(0)) {
            T alpha, beta;
            sphere_gram_coefficients(metric, ai[own], bi[own], &alpha, &beta);
            row_alpha -= alpha;
          }
          coef_i[own] = 0;
        }
        x_coef[i] += w * row_alpha;
        if (!row_has_exact[i]) continue;
        for (int64_t j = 0; j < ct; ++j)
          if (ei[j] != T(0) && j != own)
            sphere_grad_exact_accumulate(metric, x + i * d, c + j * d, d, ai[j], bi[j], w,
                                         grad_x + i * d);
      }
    }
  });
}

// x_i = z_i / max(|z_i|, eps) and |x_i|^2 from the norms |z_i|, one pass per
// row, the rows in one parallel region: the tensor ops this replaces ran
// serially here (SerialAten), each over all of z. (The norms stay torch's: a row
// that is a multiple of a centroid must normalise to that centroid's exact bits,
// as the reference's does, or its zero distance turns into rounding noise.)
template <typename T>
void normalise_rows(const T* z, const T* norms, int64_t n, int64_t d, T* x, T* x_norm2) {
  parallel_rows(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* zi = z + i * d;
      const T divisor = std::max(norms[i], T(kNormEps));
      T* xi = x + i * d;
      T xsq = 0;
      for (int64_t k = 0; k < d; ++k) {
        xi[k] = zi[k] / divisor;
        xsq += xi[k] * xi[k];
      }
      x_norm2[i] = xsq;
    }
  });
}

// dL/dz_i = (g_i - x_i (x_i . g_i)) / |z_i|, or g_i / eps below the clamp, per row
// in one parallel region (n_centroids_tiles.h, through_normalisation_with_aten).
template <typename T>
void rows_through_normalisation(const T* g, const T* x, const T* norms, int64_t n, int64_t d,
                                T* out) {
  parallel_rows(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = g + i * d;
      const T* xi = x + i * d;
      T* oi = out + i * d;
      if (!(norms[i] >= T(kNormEps))) {
        for (int64_t k = 0; k < d; ++k) oi[k] = gi[k] / T(kNormEps);
        continue;
      }
      T radial = 0;
      for (int64_t k = 0; k < d; ++k) radial += gi[k] * xi[k];
      for (int64_t k = 0; k < d; ++k) oi[k] = (gi[k] - xi[k] * radial) / norms[i];
    }
  });
}

// The CPU epilogues of n_centroids_tiles.h.
struct CpuTiles {
  static constexpr c10::DeviceType kDevice = c10::kCPU;
  static constexpr int64_t kRowTile = 256;
  static constexpr int64_t kCentroidTile = 512;
  struct Guard {
    NoAutocast no_autocast;
    SerialAten serial;  // the row tiles' region is the op's only parallel one
    explicit Guard(c10::Device) {}
  };
  static void normalise(nc::Inputs& in) {
    const int64_t n = in.z.size(0), d = in.z.size(1);
    in.norms = at::linalg_vector_norm(in.z, 2, {1}, false, c10::nullopt).contiguous();
    in.x = at::empty_like(in.z);
    in.x_norm2 = at::empty({n}, in.z.options());
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "n_centroids_normalise_cpu", [&] {
      normalise_rows<scalar_t>(in.z.data_ptr<scalar_t>(), in.norms.data_ptr<scalar_t>(), n, d,
                               in.x.data_ptr<scalar_t>(), in.x_norm2.data_ptr<scalar_t>());
    });
  }
  static at::Tensor through_normalisation(const nc::Inputs& in, const at::Tensor& grad_x) {
    const at::Tensor g = grad_x.contiguous();
    at::Tensor out = at::empty_like(g);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "n_centroids_through_normalisation_cpu", [&] {
      rows_through_normalisation<scalar_t>(g.data_ptr<scalar_t>(), in.x.data_ptr<scalar_t>(),
                                           in.norms.data_ptr<scalar_t>(), g.size(0), g.size(1),
                                           out.data_ptr<scalar_t>());
    });
    return out;
  }
  // job(r0, rt) for every row tile, in one parallel region (parallel_jobs.h): each
  // tile on one thread, its products single-threaded, its rows written by it alone
  template <class Job>
  static void row_tiles(int64_t n, const Job& job) {
    run_jobs((n + kRowTile - 1) / kRowTile,
             [&](int64_t t, int64_t) { job(t * kRowTile, std::min(kRowTile, n - t * kRowTile)); });
  }
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
                        const at::Tensor& best_k_r, const at::Tensor& sum_r, const at::Tensor& coef,
                        const at::Tensor& x_coef_r, const at::Tensor& grad_x_r) {
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
