// Per-pair math of the affinity loss (docs/math.md, "Affinity loss"), shared by the C++ CPU
// kernel and the CUDA kernel (host + device). Readable definition:
// confusion_kernels/reference/affinity.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// C++'s own similarity codes, mapped from the op's similarity name once
// (checks.h: similarity_code).
enum Similarity : int64_t { kGaussian = 0, kInverse = 1 };

template <typename T>
CK_HOST_DEVICE T ck_exp(T v) {
  return std::exp(v);
}

// s = |f|^2 + |w|^2 - 2 f.w, clamped at 0 (the Gram form of |f - w|^2).
template <typename T>
CK_HOST_DEVICE T affinity_sq_distance(T f_norm2, T w_norm2, T dot) {
  const T s = f_norm2 + w_norm2 - T(2) * dot;
  return s > T(0) ? s : T(0);
}

// Running minimum over a class's prototypes t = 0, 1, ...: keeps the first
// arg-min (as torch.min does), so ties send the gradient to the first prototype.
template <typename T>
CK_HOST_DEVICE void keep_first_min(T s, int64_t t, T* best, int64_t* best_t) {
  if (t == 0 || s < *best) {
    *best = s;
    *best_t = t;
  }
}

// Smallest squared distance of a row to the m prototypes of one class, and
// the first prototype reaching it; dots[t] = f . w_t, w_norms[t] = |w_t|^2.
template <typename T>
CK_HOST_DEVICE T class_min(const T* dots, const T* w_norms, T f_norm, int64_t m, int64_t* arg) {
  T best = T(0);
  *arg = 0;
  for (int64_t t = 0; t < m; ++t)
    keep_first_min(affinity_sq_distance(f_norm, w_norms[t], dots[t]), t, &best, arg);
  return best;
}

// Subnormal numbers: the smallest normal number of T, and the exponent below
// which exp(x) is no longer normal (ceil(log(kMin))). Far points have
// affinities down there; x86 computes exp into that range and products with
// subnormal operands 10-40x slower than with normal ones (microcode assists),
// so the C++ kernels flush such affinities and gradient coefficients to 0: a
// change below kMin per term (the reference keeps them).
template <typename T>
struct Subnormal;
template <>
struct Subnormal<float> {
  static constexpr float kMin = 1.17549435e-38f;
  static constexpr float kExpFloor = -87.0f;
};
template <>
struct Subnormal<double> {
  static constexpr double kMin = 2.2250738585072014e-308;
  static constexpr double kExpFloor = -708.0;
};

// v, or 0 when |v| is below the smallest normal number.
template <typename T>
CK_HOST_DEVICE T flush_subnormal(T v) {
  return (v < Subnormal<T>::kMin && v > -Subnormal<T>::kMin) ? T(0) : v;
}

// The gaussian's exponent -s / sigma, or -inf where exp of it would not be a
// normal number (exp(-inf) = 0 exactly, and fast).
template <typename T>
CK_HOST_DEVICE T gaussian_exponent(T s, T sigma) {
  const T x = -s / sigma;
  return x > Subnormal<T>::kExpFloor ? x : -T(INFINITY);
}

// d = exp(-s / sigma) (gaussian) or 1 / (1 + s / sigma) (inverse). The
// gaussian is 0 for far points (exp below the normal range, see Subnormal),
// and so is its derivative.
template <typename T>
CK_HOST_DEVICE T affinity_similarity(int64_t kind, T s, T sigma) {
  return kind == kInverse ? T(1) / (T(1) + s / sigma) : ck_exp(gaussian_exponent(s, sigma));
}

// dd/ds given d: -d / sigma (gaussian), -d^2 / sigma (inverse).
template <typename T>
CK_HOST_DEVICE T affinity_similarity_grad(int64_t kind, T d, T sigma) {
  return kind == kInverse ? -d * d / sigma : -d / sigma;
}

// The gradient coefficient dL/ds of one (row, class) pair: upstream gradient
// g times the hinge weight times dd/ds, flushed to 0 below the normal range (it
// feeds the gradient products; see Subnormal).
template <typename T>
CK_HOST_DEVICE T affinity_coefficient(int64_t kind, T g, T weight, T d, T sigma) {
  return flush_subnormal(g * weight * affinity_similarity_grad(kind, d, sigma));
}

// The hinge of one other class: relu(margin + d - d_true), active when > 0
// (the relu convention: no gradient at the kink).
template <typename T>
CK_HOST_DEVICE T affinity_hinge(T margin, T d, T d_true, bool* active) {
  const T h = margin + d - d_true;
  *active = h > T(0);
  return *active ? h : T(0);
}

}  // namespace confusion_kernels
