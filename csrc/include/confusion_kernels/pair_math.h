// Per-pair distance math shared by the C++ CPU kernels and the CUDA kernels.
//
// Every function is `inline` and, under nvcc, `__host__ __device__`, so the
// lines the CPU tests exercise are the lines the GPU runs. The readable
// definition of every formula is confusion_kernels/reference/pairwise.py.
//
// Two ways to get a distance:
//   * the Gram form from squared norms and a dot product (fast: the dot
//     products come from a matrix product), and
//   * the exact form from per-dimension differences (used for the metrics
//     with no Gram form and for pairs where the Gram form cancels badly,
//     which includes duplicated rows: they get distance 0 and gradient 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "confusion_kernels/spec.h"  // metric codes and constants (generated)

#if defined(__CUDACC__)
#define CK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CK_HOST_DEVICE inline
#endif

namespace confusion_kernels {

// Metric codes (Metric), kCosineEps and kGramExactFraction: spec.h, generated from
// confusion_kernels/_spec.py.

template <typename T>
CK_HOST_DEVICE T ck_sqrt(T v) {
  return std::sqrt(v);
}

template <typename T>
CK_HOST_DEVICE T ck_abs(T v) {
  return v < T(0) ? -v : v;
}

// sign(t) with sign(0) = 0.
template <typename T>
CK_HOST_DEVICE T ck_sign(T t) {
  return T(t > T(0)) - T(t < T(0));
}

// ---------------------------------------------------------------------------
// Exact form, metrics that sum a term over dimensions (all but cosine).
// D(a, b) = finalize(sum_k term(a_k - b_k)).
// ---------------------------------------------------------------------------
template <typename T>
CK_HOST_DEVICE T direct_term(int64_t metric, T t) {
  switch (metric) {
    case kManhattan:
      return ck_abs(t);
    case kSmoothL1: {
      const T at = ck_abs(t);
      return at < T(1) ? T(0.5) * t * t : at - T(0.5);
    }
    default:  // kEuclidean, kSqEuclidean
      return t * t;
  }
}

template <typename T>
CK_HOST_DEVICE T direct_finalize(int64_t metric, T acc) {
  return metric == kEuclidean ? ck_sqrt(acc) : acc;
}

// dD/da_k for t = a_k - b_k, given the pair's distance `dist`.
template <typename T>
CK_HOST_DEVICE T direct_grad_term(int64_t metric, T t, T dist) {
  switch (metric) {
    case kEuclidean:
      return dist > T(0) ? t / dist : T(0);
    case kSqEuclidean:
      return T(2) * t;
    case kManhattan:
      return ck_sign(t);
    case kSmoothL1:
      return t > T(1) ? T(1) : (t < T(-1) ? T(-1) : t);
    default:
      return T(0);
  }
}

// ---------------------------------------------------------------------------
// Exact form of the cosine distance, from normalised differences:
//   1 - cos(a, b) = |a/|a| - b/|b||^2 / 2                  if |a||b| > eps
//   dD/da = -(1/|a|) * ((b/|b| - a/|a|) + D * a/|a|)
// which is the quotient rule -b/(|a||b|) + (a.b) a/(|a|^3 |b|) rearranged so
// that identical rows give exactly 0 and near-parallel rows keep their digits.
// When |a||b| <= eps the denominator is the constant eps: D = 1 - a.b/eps,
// dD/da = -b/eps.
// ---------------------------------------------------------------------------
template <typename T>
CK_HOST_DEVICE bool cosine_norms_regular(T norm_a, T norm_b) {
  return norm_a * norm_b > T(kCosineEps);
}

// ---------------------------------------------------------------------------
// Exact distance and gradient of one pair of rows of length d.
// `scalar_t` is the storage type, `acc_t` the accumulation type.
// ---------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
CK_HOST_DEVICE acc_t pair_distance_exact(int64_t metric, const scalar_t* a, const scalar_t* b,
                                         int64_t d) {
  acc_t acc = acc_t(0);
  if (metric == kCosine) {
    acc_t na2 = acc_t(0), nb2 = acc_t(0), dot = acc_t(0);
    for (int64_t k = 0; k < d; ++k) {
      const acc_t ak = acc_t(a[k]), bk = acc_t(b[k]);
      na2 += ak * ak;
      nb2 += bk * bk;
      dot += ak * bk;
    }
    const acc_t na = ck_sqrt(na2), nb = ck_sqrt(nb2);
    if (!cosine_norms_regular(na, nb)) return acc_t(1) - dot / acc_t(kCosineEps);
    // a_k / |a| (a division, not a product with 1/|a|): exact +-1 in one dimension.
    for (int64_t k = 0; k < d; ++k) {
      const acc_t t = acc_t(a[k]) / na - acc_t(b[k]) / nb;
      acc += t * t;
    }
    return acc_t(0.5) * acc;
  }
  for (int64_t k = 0; k < d; ++k) acc += direct_term<acc_t>(metric, acc_t(a[k]) - acc_t(b[k]));
  return direct_finalize(metric, acc);
}

// grad[k] += coef * dD(a, b)/da_k for every k.
template <typename scalar_t, typename acc_t>
CK_HOST_DEVICE void pair_grad_exact_accumulate(int64_t metric, const scalar_t* a, const scalar_t* b,
                                               int64_t d, acc_t coef, acc_t* grad) {
  if (coef == acc_t(0)) return;
  if (metric == kCosine) {
    acc_t na2 = acc_t(0), nb2 = acc_t(0);
    for (int64_t k = 0; k < d; ++k) {
      na2 += acc_t(a[k]) * acc_t(a[k]);
      nb2 += acc_t(b[k]) * acc_t(b[k]);
    }
    const acc_t na = ck_sqrt(na2), nb = ck_sqrt(nb2);
    if (!cosine_norms_regular(na, nb)) {
      const acc_t s = -coef / acc_t(kCosineEps);
      for (int64_t k = 0; k < d; ++k) grad[k] += s * acc_t(b[k]);
      return;
    }
    acc_t dist = acc_t(0);
    for (int64_t k = 0; k < d; ++k) {
      const acc_t t = acc_t(a[k]) / na - acc_t(b[k]) / nb;
      dist += t * t;
    }
    dist *= acc_t(0.5);
    const acc_t s = -coef / na;
    for (int64_t k = 0; k < d; ++k) {
      const acc_t ua = acc_t(a[k]) / na;
      grad[k] += s * ((acc_t(b[k]) / nb - ua) + dist * ua);
    }
    return;
  }
  acc_t dist = acc_t(0);
  if (metric == kEuclidean) dist = pair_distance_exact<scalar_t, acc_t>(metric, a, b, d);
  for (int64_t k = 0; k < d; ++k)
    grad[k] += coef * direct_grad_term<acc_t>(metric, acc_t(a[k]) - acc_t(b[k]), dist);
}

// ---------------------------------------------------------------------------
// Gram form. For euclidean / sqeuclidean the operands are the rows themselves:
// `dot` = a.b and na2, nb2 their squared norms. For cosine the operands are
// the unit rows a/|a|, b/|b|: `dot` = cos(a, b), and na2, nb2 are still the
// squared norms of the original rows (for the eps test and 1/|a|). Working on
// unit rows keeps the cosine gradient free of the 1/|b| cancellation of the
// quotient-rule form.
// ---------------------------------------------------------------------------
template <typename T>
CK_HOST_DEVICE T gram_sq_distance(T na2, T nb2, T dot) {
  const T d2 = na2 + nb2 - T(2) * dot;
  return d2 < T(0) ? T(0) : d2;  // NaN passes through (NaN policy: never a plausible number)
}

// |a||b| > eps without square roots.
template <typename T>
CK_HOST_DEVICE bool cosine_norms_regular_sq(T na2, T nb2) {
  return na2 * nb2 > T(kCosineEps) * T(kCosineEps);
}

// Distance of the pair from the Gram form; sets `needs_exact` when the value
// has lost too many digits (or, for cosine, |a||b| <= eps) and the pair must
// go through pair_distance_exact / pair_grad_exact_accumulate instead.
template <typename T>
CK_HOST_DEVICE T gram_distance(int64_t metric, T na2, T nb2, T dot, bool* needs_exact) {
  if (metric == kCosine) {
    const T dist = T(1) - dot;
    *needs_exact = dist <= T(kGramExactFraction) || !cosine_norms_regular_sq(na2, nb2);
    return dist;
  }
  const T d2 = gram_sq_distance(na2, nb2, dot);
  *needs_exact = d2 <= T(kGramExactFraction) * (na2 + nb2);
  return metric == kEuclidean ? ck_sqrt(d2) : d2;
}

// Gradient of a Gram-form pair as a combination of the Gram operands:
//   dD(a, b)/da = self_coef * op(a) + other_coef * op(b)
// with op the rows (euclidean, sqeuclidean) or unit rows (cosine:
// dD/da = (cos * a/|a| - b/|b|) / |a|; `inv_norm_a` = 1/|a|, unused otherwise).
// Only valid for pairs where gram_distance did not ask for the exact form.
template <typename T>
CK_HOST_DEVICE void gram_grad_coefficients(int64_t metric, T dot, T dist, T inv_norm_a,
                                           T* self_coef, T* other_coef) {
  switch (metric) {
    case kEuclidean: {
      const T w = dist > T(0) ? T(1) / dist : T(0);
      *self_coef = w;
      *other_coef = -w;
      return;
    }
    case kSqEuclidean:
      *self_coef = T(2);
      *other_coef = T(-2);
      return;
    default:  // kCosine
      *self_coef = dot * inv_norm_a;
      *other_coef = -inv_norm_a;
      return;
  }
}

// The exact-form gradient of one pair written on the Gram operands op(.)
// (the rows for euclidean / sqeuclidean, the unit rows for cosine):
//   coef * dD(a, b)/da = self * op(a) + other * op(b) + diff * (op(a) - op(b))
// A tiled kernel adds self and other to the same accumulators as the Gram
// pairs and forms op(a) - op(b) per dimension, so near-identical rows keep
// their digits. Equals pair_grad_exact_accumulate (see the CPU tests).
template <typename scalar_t, typename acc_t>
CK_HOST_DEVICE void pair_grad_exact_coefficients(int64_t metric, const scalar_t* a,
                                                 const scalar_t* b, int64_t d, acc_t coef,
                                                 acc_t* self, acc_t* other, acc_t* diff) {
  *self = *other = *diff = acc_t(0);
  if (coef == acc_t(0)) return;
  switch (metric) {
    case kSqEuclidean:
      *diff = acc_t(2) * coef;
      return;
    case kEuclidean: {
      const acc_t dist = pair_distance_exact<scalar_t, acc_t>(metric, a, b, d);
      *diff = dist > acc_t(0) ? coef / dist : acc_t(0);
      return;
    }
    case kCosine: {
      acc_t na2 = acc_t(0), nb2 = acc_t(0);
      for (int64_t k = 0; k < d; ++k) {
        na2 += acc_t(a[k]) * acc_t(a[k]);
        nb2 += acc_t(b[k]) * acc_t(b[k]);
      }
      const acc_t na = ck_sqrt(na2), nb = ck_sqrt(nb2);
      if (!cosine_norms_regular(na, nb)) {  // -coef * b / eps = -coef * |b| / eps * op(b)
        *other = -coef * nb / acc_t(kCosineEps);
        return;
      }
      const acc_t dist = pair_distance_exact<scalar_t, acc_t>(metric, a, b, d);
      *diff = coef / na;
      *self = -coef * dist / na;
      return;
    }
    default:
      return;  // manhattan / smooth_l1 have no Gram form
  }
}

}  // namespace confusion_kernels
