// Per-pair math of the pair losses in pytorch-metric-learning's form (docs/math.md, "Pair
// losses"): Contrastive, SupCon, NT-Xent and Multi-Similarity as per-row statistics streamed
// over the references, and the coefficient dLoss/dm_ij of each pair from them. Readable
// definition: confusion_kernels/reference/pair_losses.py. m_ij is a distance (sign = +1) or a
// similarity (sign = -1); z_ij = -sign m_ij / tau.
//
// Row statistics st[4] (kPairLossStats), per loss:
//   contrastive       sum of l+, count of l+ > 0, sum of l-, count of l- > 0
//   supcon            (max, sum) of the online log-sum-exp of z over P u Q; sum_P z; |P|
//                     (after pair_loss_finish_first: st[0] = the log-sum-exp)
//   ntxent            pass 1: (max, sum) over Q -> st[0] = lse_Q (-inf without negatives);
//                     pass 2: st[1] = W = sum_P (1 - s_ij), st[2] = sum_P l_ij, st[3] = |P|
//   multi_similarity  (max, sum) over P of a = alpha sign (m - base) and over Q of
//                     b = beta sign (base - m), both starting from the "+ 1" (max 0, sum 1);
//                     after pair_loss_finish_first: st[0] = lse_P, st[2] = lse_Q
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "confusion_kernels/pair_math.h"

namespace confusion_kernels {

enum PairLoss : int64_t { kContrastive = 0, kSupCon = 1, kNTXent = 2, kMultiSimilarity = 3 };
constexpr int64_t kPairLossStats = 4;

// Per-row outputs with a gradient: contrastive (sum l+, sum l-), the others one.
CK_HOST_DEVICE int64_t pair_loss_outputs(int64_t kind) { return kind == kContrastive ? 2 : 1; }

// The loss's constants: contrastive (a, b) = (pos_margin, neg_margin); supcon / ntxent
// a = temperature; multi_similarity (a, b, c) = (alpha, beta, base).
template <typename T>
struct PairLossParams {
  int64_t kind;
  T sign;  // +1: m is a distance, -1: a similarity
  T a, b, c;
};

// m_ij of rows x_i and references r_j from their Gram entry `dot`: the cosine of the rows as
// given (the caller normalises), or the euclidean distance by pair_math.h's Gram rule, taken
// from differences where that cancels (*exact). xn, rn: the squared norms of the rows and of
// the references, read for euclidean only.
template <typename T>
CK_HOST_DEVICE T pair_loss_value(bool cosine, const T* xn, const T* rn, const T* x, const T* r,
                                 int64_t i, int64_t j, int64_t d, T dot, bool* exact) {
  *exact = false;
  if (cosine) return dot;
  const T dist = gram_distance(kEuclidean, xn[i], rn[j], dot, exact);
  return *exact ? pair_distance_exact<T, T>(kEuclidean, x + i * d, r + j * d, d) : dist;
}

template <typename T>
CK_HOST_DEVICE T lse_value(T mx, T sum) {
  return sum > T(0) ? mx + std::log(sum) : -std::numeric_limits<T>::infinity();
}

template <typename T>
CK_HOST_DEVICE void pair_loss_init(const PairLossParams<T>& p, T* st) {
  const T ninf = -std::numeric_limits<T>::infinity();
  st[0] = st[1] = st[2] = st[3] = T(0);
  if (p.kind == kSupCon || p.kind == kNTXent) st[0] = ninf;
  if (p.kind == kMultiSimilarity) st[1] = st[3] = T(1);  // the "+ 1": e^0 at max 0
}

// The first streaming pass (for ntxent the one before its positives' pass), pair (i, j) of
// value m, positive (same label) or negative; a left-out pair is never passed. The parts
// without an exp go into st here; the return value is the exponent v whose e^v joins the
// online log-sum-exp (st[*slot], st[*slot + 1]), *slot = -1 when there is none; a kernel adds
// the e^v of a row's tile in a batch and merges them with lse_merge.
template <typename T>
CK_HOST_DEVICE T pair_loss_stream(const PairLossParams<T>& p, T m, bool same, T* st, int* slot) {
  *slot = -1;
  switch (p.kind) {
    case kContrastive: {
      // constant indices: a CUDA thread keeps st in registers
      const T h = same ? p.sign * (m - p.a) : p.sign * (p.b - m);
      if (h > T(0) && same) {
        st[0] += h;
        st[1] += T(1);
      } else if (h > T(0)) {
        st[2] += h;
        st[3] += T(1);
      }
      return T(0);
    }
    case kSupCon: {
      const T z = -p.sign * m / p.a;
      if (same) {
        st[2] += z;
        st[3] += T(1);
      }
      *slot = 0;
      return z;
    }
    case kNTXent:
      if (same) return T(0);
      *slot = 0;
      return -p.sign * m / p.a;
    default:  // kMultiSimilarity
      *slot = same ? 0 : 2;
      return same ? p.a * p.sign * (m - p.c) : p.b * p.sign * (p.c - m);
  }
}

// Merges a tile's (max, sum of e^(v - max)) into the online log-sum-exp (mx, sum).
template <typename T>
CK_HOST_DEVICE void lse_merge(T tile_max, T tile_sum, T* mx, T* sum) {
  if (tile_sum == T(0)) return;
  if (tile_max <= *mx) {
    *sum += tile_sum * std::exp(tile_max - *mx);
  } else {
    *sum = *sum * std::exp(*mx - tile_max) + tile_sum;
    *mx = tile_max;
  }
}

// A partial of the first pass (a share of a row's pairs, the CUDA kernels' threads): empty
// sums and empty log-sum-exps (max -inf, sum 0); the "+ 1" of multi_similarity stays in the
// row's own statistics (pair_loss_init).
template <typename T>
CK_HOST_DEVICE void pair_loss_init_partial(const PairLossParams<T>& p, T* st) {
  const T ninf = -std::numeric_limits<T>::infinity();
  st[0] = st[1] = st[2] = st[3] = T(0);
  if (p.kind != kContrastive) st[0] = ninf;
  if (p.kind == kMultiSimilarity) st[2] = ninf;
}

// One pair of the first pass into a partial: pair_loss_stream, its e^v merged at once.
template <typename T>
CK_HOST_DEVICE void pair_loss_add(const PairLossParams<T>& p, T m, bool same, T* st) {
  int slot;
  const T v = pair_loss_stream(p, m, same, st, &slot);
  if (slot == 0) lse_merge(v, T(1), &st[0], &st[1]);  // constant indices (registers on CUDA)
  if (slot == 2) lse_merge(v, T(1), &st[2], &st[3]);
}

// Merges the first-pass partial `part` into `st` (sums added, log-sum-exps merged); with
// `second`, NT-Xent's second-pass sums (slots 1-3; slot 0 holds lse_Q in both).
template <typename T>
CK_HOST_DEVICE void pair_loss_merge(const PairLossParams<T>& p, const T* part, bool second, T* st) {
  if (second || p.kind == kContrastive) {
    if (!second) st[0] += part[0];
    st[1] += part[1];
    st[2] += part[2];
    st[3] += part[3];
    return;
  }
  lse_merge(part[0], part[1], &st[0], &st[1]);
  if (p.kind == kMultiSimilarity) {
    lse_merge(part[2], part[3], &st[2], &st[3]);
  } else if (p.kind == kSupCon) {
    st[2] += part[2];
    st[3] += part[3];
  }
}

// After the first pass: the log-sum-exps (ntxent: lse_Q in st[0], the rest cleared for pass 2).
template <typename T>
CK_HOST_DEVICE void pair_loss_finish_first(const PairLossParams<T>& p, T* st) {
  if (p.kind == kSupCon) {
    st[0] = lse_value(st[0], st[1]);
  } else if (p.kind == kNTXent) {
    st[0] = lse_value(st[0], st[1]);
    st[1] = st[2] = st[3] = T(0);
  } else if (p.kind == kMultiSimilarity) {
    st[0] = lse_value(st[0], st[1]);
    st[2] = lse_value(st[2], st[3]);
  }
}

// s_ij = e^z / (e^z + e^lse_Q): the positive's share of its NT-Xent denominator.
template <typename T>
CK_HOST_DEVICE T ntxent_share(T z, T lse_q) {
  return T(1) / (T(1) + std::exp(lse_q - z));
}

// NT-Xent's second pass, positive pairs only: l_ij = log(e^z + e^lse_Q) - z.
template <typename T>
CK_HOST_DEVICE void ntxent_accumulate_positive(const PairLossParams<T>& p, T m, T* st) {
  const T z = -p.sign * m / p.a;
  const T d = st[0] - z;  // lse_Q - z; -inf without negatives: l = 0
  st[2] += d > T(0) ? d + std::log1p(std::exp(-d)) : std::log1p(std::exp(d));
  st[1] += T(1) - ntxent_share(z, st[0]);
  st[3] += T(1);
}

// The row's differentiable outputs from its finished statistics.
template <typename T>
CK_HOST_DEVICE void pair_loss_rows(const PairLossParams<T>& p, const T* st, T* rows) {
  switch (p.kind) {
    case kContrastive:
      rows[0] = st[0];
      rows[1] = st[2];
      break;
    case kSupCon:
      rows[0] = st[3] > T(0) ? st[0] - st[2] / st[3] : T(0);
      break;
    case kNTXent:
      rows[0] = st[2];
      break;
    default:
      rows[0] = st[0] / p.a + st[2] / p.b;
  }
}

// The exponent whose exp a pair's coefficient needs (0 for contrastive, which needs none):
// supcon z - lse, ntxent positives lse_Q - z (its share is 1 / (1 + e)), ntxent negatives
// z - lse_Q, multi_similarity a - lse_P / b - lse_Q (a kernel computes the exps in batches).
template <typename T>
CK_HOST_DEVICE T pair_loss_exponent(const PairLossParams<T>& p, T m, bool same, const T* st) {
  switch (p.kind) {
    case kContrastive:
      return T(0);
    case kSupCon:
      return -p.sign * m / p.a - st[0];
    case kNTXent: {
      const T z = -p.sign * m / p.a;
      return same ? st[0] - z : z - st[0];
    }
    default:
      return same ? p.a * p.sign * (m - p.c) - st[0] : p.b * p.sign * (p.c - m) - st[2];
  }
}

// d(sum_r g[r] rows[r]) / dm_ij for a pair of row i (statistics st, upstream g) from
// e = exp(pair_loss_exponent(...)).
template <typename T>
CK_HOST_DEVICE T pair_loss_coefficient_from_exp(const PairLossParams<T>& p, T m, bool same,
                                                const T* st, const T* g, T e) {
  switch (p.kind) {
    case kContrastive:
      if (same) return p.sign * (m - p.a) > T(0) ? g[0] * p.sign : T(0);
      return p.sign * (p.b - m) > T(0) ? -g[1] * p.sign : T(0);
    case kSupCon:
      if (st[3] == T(0)) return T(0);  // no positive: the row's loss is the constant 0
      return g[0] * (-p.sign / p.a) * (e - (same ? T(1) / st[3] : T(0)));
    case kNTXent:
      if (same) return g[0] * (-p.sign / p.a) * (T(1) / (T(1) + e) - T(1));
      return g[0] * (-p.sign / p.a) * e * st[1];
    default:
      return same ? g[0] * p.sign * e : -g[0] * p.sign * e;
  }
}

}  // namespace confusion_kernels
