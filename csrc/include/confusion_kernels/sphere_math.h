// Per-pair math of the N-Centroids loss on the unit sphere, shared by the C++
// CPU kernel and the CUDA kernel (host + device). Readable definition:
// confusion_kernels/reference/n_centroids.py.
//
// A pair (x, c) is described by a = |x - c|, b = |x + c| and t = x.c:
//   euclidean     d = a                       (the chord)
//   cosine        d = 1 - t
//   great_circle  d = 2 atan2(a, b)           (the angle; exact near 0 and pi)
// The gradient of every metric in x has the form
//   dd/dx = p (x - c) + q (x + c)
// with p = 0 where a = 0 and q = 0 where b = 0 (a norm has gradient 0 at 0, as
// in torch), so duplicates and antipodes get a finite gradient. In the Gram
// form a^2 = |x|^2 + |c|^2 - 2t and b^2 = |x|^2 + |c|^2 + 2t come from one
// matrix product; where a^2 (or, for the angle, b^2) is a small fraction of
// |x|^2 + |c|^2 the subtraction has lost its digits, and such pairs are
// recomputed from per-dimension differences instead.
#pragma once

#include <cmath>
#include <cstdint>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// The sphere metrics' codes (SphereMetric) come from spec.h (generated from
// confusion_kernels/_spec.py); n_centroids_tiles.h: sphere_metric_code.

template <typename T>
CK_HOST_DEVICE T ck_atan2(T y, T x) {
  return std::atan2(y, x);
}

// a^2 and b^2 of a pair from its squared norms and dot product, clamped at 0;
// true when the pair must be recomputed exactly (sphere_pair_exact).
template <typename T>
CK_HOST_DEVICE bool sphere_chords_from_gram(int64_t metric, T x_norm2, T c_norm2, T dot, T* a2,
                                            T* b2) {
  const T s = x_norm2 + c_norm2;
  const T am = s - T(2) * dot, bp = s + T(2) * dot;
  *a2 = am > T(0) ? am : T(0);
  *b2 = bp > T(0) ? bp : T(0);
  if (metric == kSphereCosine) return false;  // d = 1 - t and dd/dx = -c: no cancellation
  const T floor = T(kGramExactFraction) * s;
  return *a2 <= floor || (metric == kGreatCircle && *b2 <= floor);
}

// a^2, b^2 and t of a pair from per-dimension differences.
template <typename T>
CK_HOST_DEVICE void sphere_pair_exact(const T* x, const T* c, int64_t d, T* a2, T* b2, T* dot) {
  T am = 0, bp = 0, t = 0;
  for (int64_t k = 0; k < d; ++k) {
    const T u = x[k] - c[k], v = x[k] + c[k];
    am += u * u;
    bp += v * v;
    t += x[k] * c[k];
  }
  *a2 = am;
  *b2 = bp;
  *dot = t;
}

// The distance from a = |x - c|, b = |x + c| and t = x.c.
template <typename T>
CK_HOST_DEVICE T sphere_distance(int64_t metric, T a, T b, T dot) {
  if (metric == kSphereCosine) return T(1) - dot;
  if (metric == kChord) return a;
  return T(2) * ck_atan2(a, b);
}

// p and q of dd/dx = p (x - c) + q (x + c).
template <typename T>
CK_HOST_DEVICE void sphere_distance_grad(int64_t metric, T a, T b, T* p, T* q) {
  if (metric == kSphereCosine) {  // -c = ((x - c) - (x + c)) / 2
    *p = T(0.5);
    *q = T(-0.5);
  } else if (metric == kChord) {
    *p = a > T(0) ? T(1) / a : T(0);
    *q = T(0);
  } else {  // d(2 atan2(a, b)) = 2 (b da - a db) / (a^2 + b^2)
    const T s = a * a + b * b;
    *p = a > T(0) ? T(2) * b / (a * s) : T(0);
    *q = b > T(0) ? T(-2) * a / (b * s) : T(0);
  }
}

// dd/dx of the pair written on x and c: alpha x + beta c (the Gram form of the
// gradient; only for pairs sphere_chords_from_gram did not send to the exact form).
template <typename T>
CK_HOST_DEVICE void sphere_gram_coefficients(int64_t metric, T a, T b, T* alpha, T* beta) {
  T p, q;
  sphere_distance_grad(metric, a, b, &p, &q);
  *alpha = p + q;
  *beta = q - p;
}

// grad += weight dd/dx of one pair from per-dimension differences (exact).
template <typename T>
CK_HOST_DEVICE void sphere_grad_exact_accumulate(int64_t metric, const T* x, const T* c, int64_t d,
                                                 T a, T b, T weight, T* grad) {
  T p, q;
  sphere_distance_grad(metric, a, b, &p, &q);
  p *= weight;
  q *= weight;
  for (int64_t k = 0; k < d; ++k) grad[k] += p * (x[k] - c[k]) + q * (x[k] + c[k]);
}

// d(x, c) of one pair from differences and, with grad given, grad += weight dd/dx
// (the own centroid and the hardest negative of a row).
template <typename T>
CK_HOST_DEVICE T sphere_pair_direct(int64_t metric, const T* x, const T* c, int64_t d, T weight,
                                    T* grad) {
  T a2, b2, dot;
  sphere_pair_exact(x, c, d, &a2, &b2, &dot);
  const T a = ck_sqrt(a2), b = ck_sqrt(b2);
  if (grad != nullptr) sphere_grad_exact_accumulate(metric, x, c, d, a, b, weight, grad);
  return sphere_distance(metric, a, b, dot);
}

// Running hardest negative over columns visited in increasing order: keeps the
// first minimum (as torch.min does on the CPU).
template <typename T>
CK_HOST_DEVICE void keep_first_smaller(T d, int64_t k, T* best, int64_t* best_k) {
  if (*best_k < 0 || d < *best) {
    *best = d;
    *best_k = k;
  }
}

}  // namespace confusion_kernels
