// The two sides of a direct (difference-form) pair pass: rows a [n, d] against
// columns b [m, d]. intra_inter_sums is the square case (a = b, no shift);
// its rectangular form takes the columns from a reference set `ref`.
//
//   S_in[i]  = sum_{j : y^b_j == y^a_i, not self(i, j)} D(a_i, b_j)
//   S_out[i] = sum_{j : y^b_j != y^a_i}                 D(a_i, b_j)
//   grad_a[i] = sum_j c_ij dD(a_i, b_j)/da_i,
//   c_ij = g^a_in[i] + g^b_in[j] (same label) or g^a_out[i] + g^b_out[j] (other label)
//
// The pair (i, j) is left out ("self") when j - i == shift: shift 0 is the
// diagonal of the square op, shift o says that row i of a is row o + i of b.
// The square backward has the upstream gradients on both sides; the
// rectangular one has them on the side of x only, once with x as the rows
// (grad_x) and once with x as the columns (grad_ref, shift -o).
#pragma once

#include <cstdint>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

// A shift that no (row, column) pair has: no pair is left out.
constexpr int64_t kNoSelfPair = INT64_MIN;

template <typename T>
struct PairSide {
  const T* rows = nullptr;          // [n, d] contiguous (the unit rows for cosine)
  const int64_t* labels = nullptr;  // [n]
  const T* norms = nullptr;         // |row| before normalising (cosine), else null
  const T* g_in = nullptr;          // [n] upstream weights (backward), null = 0
  const T* g_out = nullptr;         // [n]
  int64_t n = 0;
};

CK_HOST_DEVICE bool is_self_pair(int64_t row, int64_t col, int64_t shift) {
  return shift != kNoSelfPair && col - row == shift;
}

template <typename T>
CK_HOST_DEVICE T side_weight(const T* w, int64_t i) {
  return w == nullptr ? T(0) : w[i];
}

// c_ij of the backward (0 for the left-out pair).
template <typename T>
CK_HOST_DEVICE T pair_coefficient(const PairSide<T>& a, const PairSide<T>& b, int64_t i, int64_t j,
                                  int64_t shift) {
  if (is_self_pair(i, j, shift)) return T(0);
  return a.labels[i] == b.labels[j] ? side_weight(a.g_in, i) + side_weight(b.g_in, j)
                                    : side_weight(a.g_out, i) + side_weight(b.g_out, j);
}

// Cosine distance from the unit rows' sums acc = |a^ - b^|^2, dot = a^.b^ = cos(a, b)
// (pair_math.h: exact form); on the eps branch a.b = |a||b| cos(a, b).
template <typename T>
CK_HOST_DEVICE T unit_cosine_distance(T acc, T dot, T norm_a, T norm_b) {
  return cosine_norms_regular(norm_a, norm_b) ? T(0.5) * acc
                                              : T(1) - norm_a * norm_b * dot / T(kCosineEps);
}

// coef * dD(a, b)/da_k for the cosine metric from the unit-row entries ua = a_k/|a|,
// ub = b_k/|b| and the pair's distance, written as
//   alpha (ub - ua) + beta ua + gamma ub
// so that a kernel can sum beta over the columns and form ub - ua per dimension
// (identical rows give exactly 0): alpha = -coef/|a|, beta = alpha D when
// |a||b| > eps, else only gamma = -coef |b| / eps (the gradient -coef b / eps).
template <typename T>
CK_HOST_DEVICE void unit_cosine_grad_coefficients(T coef, T norm_a, T norm_b, T dist, T* alpha,
                                                  T* beta, T* gamma) {
  if (!cosine_norms_regular(norm_a, norm_b)) {
    *alpha = *beta = T(0);
    *gamma = -coef * norm_b / T(kCosineEps);
    return;
  }
  *alpha = -coef / norm_a;
  *beta = *alpha * dist;
  *gamma = T(0);
}

}  // namespace confusion_kernels
