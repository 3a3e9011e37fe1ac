// Explicit SIMD lanes for the CPU kernels' element loops.
//
// GCC 12 leaves some `omp simd` loops scalar (the gradient rows of the pair
// pass: if-conversion of their selects fails), so those loops are written once
// over a lane type L and instantiated twice: with the widest vector the build
// targets (AVX2: 8 floats / 4 doubles) for the body and with one lane (plain
// scalar code, the same formulas) for the tail and for builds without AVX2.
//
// A lane type provides
//   L::kWidth                                lanes per value
//   L::V, L::M                               value and mask (one bit per lane)
//   load(p), store(p, v), set1(s), zero()
//   gather(p, stride)                         lane k: p[k stride]
//   +, -, *, / (V), sqrt(v), max0(v)          max0: v < 0 -> 0, NaN stays NaN
//   max(a, b)                                 a or b, whichever is larger (b if NaN)
//   exp(v)                                    for the normal range only: float
//                                             [-87, 88], double [-708, 709]; the
//                                             caller clamps (AVX2 float: a
//                                             degree-7 polynomial, about 1 ulp)
//   le(a, b), gt(a, b)                        ordered: false if either is NaN
//   class_eq(p, c)                            p[k] == c for int32 class ids
//   m_or, m_and, m_not, select(m, a, b)       select: m ? a : b per lane
//   bits(m)                                   lane k's mask as bit k
//   hsum(v)                                   sum of the lanes, lane 0 first
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CK_SIMD_AVX2 1
#endif

namespace confusion_kernels {
namespace simd {

// One lane: plain scalar code.
template <typename T>
struct Scalar {
  static constexpr int kWidth = 1;
  using V = T;
  using M = bool;
  static V load(const T* p) { return *p; }
  static V gather(const T* p, int64_t) { return *p; }
  static void store(T* p, V v) { *p = v; }
  static V set1(T s) { return s; }
  static V zero() { return T(0); }
  static V sqrt(V v) { return std::sqrt(v); }
  static V max0(V v) { return v < T(0) ? T(0) : v; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V exp(V v) { return std::exp(v); }
  static M le(V a, V b) { return a <= b; }
  static M gt(V a, V b) { return a > b; }
  static M class_eq(const int32_t* p, int32_t c) { return *p == c; }
  static M m_or(M a, M b) { return a || b; }
  static M m_and(M a, M b) { return a && b; }
  static M m_not(M a) { return !a; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static uint32_t bits(M m) { return m ? 1u : 0u; }
  static T hsum(V v) { return v; }
};

#ifdef CK_SIMD_AVX2

template <typename T>
struct Avx2;

template <>
struct Avx2<float> {
  static constexpr int kWidth = 8;
  using V = __m256;
  using M = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V gather(const float* p, int64_t stride) {
    const __m256i k = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    // (the masked form with a zero source: the plain one leaves GCC 12 warning that its
    // undefined source may be used)
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), p,
                                    _mm256_mullo_epi32(k, _mm256_set1_epi32(int32_t(stride))),
                                    _mm256_castsi256_ps(_mm256_set1_epi32(-1)), 4);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float s) { return _mm256_set1_ps(s); }
  static V zero() { return _mm256_setzero_ps(); }
  static V sqrt(V v) { return _mm256_sqrt_ps(v); }
  // max(0, v) returns v when either is NaN: NaN passes through, as in Scalar
  static V max0(V v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  // exp(v) = 2^n e^r with n = round(v / ln 2) and r = v - n ln 2 (ln 2 in two
  // parts, so n ln2_hi is exact), |r| <= ln(2) / 2; e^r by its Taylor series
  // to degree 7 (remainder < 6e-9 relative); 2^n written into the exponent
  // field (n in [-126, 127] on the normal range).
  static V exp(V v) {
    const V n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.4286068202862268e-06f), r);
    V p = _mm256_set1_ps(1.0f / 5040.0f);
    for (const float c :
         {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
      p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  static M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M class_eq(const int32_t* p, int32_t c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, _mm256_set1_epi32(c)));
  }
  static M m_or(M a, M b) { return _mm256_or_ps(a, b); }
  static M m_and(M a, M b) { return _mm256_and_ps(a, b); }
  static M m_not(M a) { return _mm256_xor_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(-1))); }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static uint32_t bits(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static float hsum(V v) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    float s = lanes[0];
    for (int k = 1; k < 8; ++k) s += lanes[k];
    return s;
  }
};

template <>
struct Avx2<double> {
  static constexpr int kWidth = 4;
  using V = __m256d;
  using M = __m256d;
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V gather(const double* p, int64_t stride) {
    const __m128i k = _mm_setr_epi32(0, 1, 2, 3);
    return _mm256_mask_i32gather_pd(_mm256_setzero_pd(), p,
                                    _mm_mullo_epi32(k, _mm_set1_epi32(int32_t(stride))),
                                    _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), 8);
  }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V set1(double s) { return _mm256_set1_pd(s); }
  static V zero() { return _mm256_setzero_pd(); }
  static V sqrt(V v) { return _mm256_sqrt_pd(v); }
  static V max0(V v) { return _mm256_max_pd(_mm256_setzero_pd(), v); }
  static V max(V a, V b) { return _mm256_max_pd(a, b); }
  static V exp(V v) {  // lane by lane: double is the accuracy path, not the fast one
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, v);
    for (double& x : lanes) x = std::exp(x);
    return _mm256_load_pd(lanes);
  }
  static M le(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static M class_eq(const int32_t* p, int32_t c) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    // four 32-bit lane masks sign-extended to 64 bits
    return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(_mm_cmpeq_epi32(v, _mm_set1_epi32(c))));
  }
  static M m_or(M a, M b) { return _mm256_or_pd(a, b); }
  static M m_and(M a, M b) { return _mm256_and_pd(a, b); }
  static M m_not(M a) { return _mm256_xor_pd(a, _mm256_castsi256_pd(_mm256_set1_epi64x(-1))); }
  static V select(M m, V a, V b) { return _mm256_blendv_pd(b, a, m); }
  static uint32_t bits(M m) { return static_cast<uint32_t>(_mm256_movemask_pd(m)); }
  static double hsum(V v) {
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, v);
    return ((lanes[0] + lanes[1]) + lanes[2]) + lanes[3];
  }
};

template <typename T>
using Widest = Avx2<T>;
#else
template <typename T>
using Widest = Scalar<T>;
#endif

}  // namespace simd
}  // namespace confusion_kernels
