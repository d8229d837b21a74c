// 8-lane float vectors for the kernels: AVX2 registers, or plain arrays with the same lane arithmetic.
// A kernel built from these gives the same bits for the same inputs whatever else it is batched with;
// the portable build is compiled with -ffp-contract=off so that a*b + c stays two roundings.
#pragma once

#include <cstdint>
#include <cstring>

#define SPECDEC_INLINE inline __attribute__((always_inline))

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPECDEC_AVX2 1
#endif

namespace specdec_vec {

// ---- 8-lane vectors ------------------------------------------------------------------------------
#ifdef SPECDEC_AVX2
typedef __m256 V;
SPECDEC_INLINE V vzero() { return _mm256_setzero_ps(); }
SPECDEC_INLINE V vload(const float* p) { return _mm256_loadu_ps(p); }
SPECDEC_INLINE void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
SPECDEC_INLINE V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
SPECDEC_INLINE V vadd(V a, V b) { return _mm256_add_ps(a, b); }
SPECDEC_INLINE V vmul(V a, V b) { return _mm256_mul_ps(a, b); }
SPECDEC_INLINE V vset1(float x) { return _mm256_set1_ps(x); }
SPECDEC_INLINE float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // lanes i + (i+4)
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                            // + lanes 2, 3
  s = _mm_add_ss(s, _mm_movehdup_ps(s));                                             // + lane 1
  return _mm_cvtss_f32(s);
}
#else
struct V {
  float l[8];
};
inline V vzero() { return V{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline V vload(const float* p) {
  V v;
  std::memcpy(v.l, p, sizeof v.l);
  return v;
}
inline void vstore(float* p, V v) { std::memcpy(p, v.l, sizeof v.l); }
inline V vfma(V a, V b, V c) {
  for (int i = 0; i < 8; ++i) c.l[i] = c.l[i] + a.l[i] * b.l[i];
  return c;
}
inline V vadd(V a, V b) {
  for (int i = 0; i < 8; ++i) a.l[i] = a.l[i] + b.l[i];
  return a;
}
inline V vmul(V a, V b) {
  for (int i = 0; i < 8; ++i) a.l[i] = a.l[i] * b.l[i];
  return a;
}
inline V vset1(float x) { return V{{x, x, x, x, x, x, x, x}}; }
inline float vsum(V v) {  // the AVX2 order: (i + (i+4)), then pairs, then the last two
  float s[4];
  for (int i = 0; i < 4; ++i) s[i] = v.l[i] + v.l[i + 4];
  return (s[0] + s[2]) + (s[1] + s[3]);
}
#endif

}  // namespace specdec_vec
