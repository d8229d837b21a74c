// 16-lane vectors for the integer kernels, one definition per instruction set.
//
// A "lane" is one output of a 16-output panel. Every operation here acts on each lane alone, and
// the float operations are the same IEEE operations in every build (an explicit fused multiply-add
// where an FMA is meant, nothing contracted: every build uses -ffp-contract=off), so a lane computes
// the same bits whichever build runs it. Integer dot products are exact, whatever instructions form
// them: AVX-512 VNNI and AVX-VNNI `vpdpbusd`, AVX2 `vpmaddubsw` + `vpmaddwd` (never saturating for
// the operand ranges the kernels use), or scalar loops.
//
// The build is chosen by one macro: SPECDEC_ISA_AVX512VNNI, SPECDEC_ISA_AVXVNNI, SPECDEC_ISA_AVX2 or
// none (portable).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(SPECDEC_ISA_AVX512VNNI) || defined(SPECDEC_ISA_AVXVNNI) || defined(SPECDEC_ISA_AVX2)
#include <immintrin.h>
#endif

#define SD_INLINE inline __attribute__((always_inline))

namespace sd {

// The constants of our exp (every build's fexp and exp_lane read them from here, so the builds
// cannot drift apart): inputs below kExpLow give 0, above kExpHigh are clamped; n = rne(x·log2 e);
// r = x − n·ln 2 with ln 2 split in a high and a low part; then Horner over kExpPoly (x^6/720 … 1).
constexpr float kExpLow = -87.3f, kExpHigh = 88.0f, kLog2e = 1.44269504f;
constexpr float kLn2Hi = -0.693145752f, kLn2Lo = -1.42860677e-06f;
constexpr float kExpPoly[7] = {1.38888889e-03f, 8.33333333e-03f, 4.16666667e-02f, 1.66666667e-01f, 0.5f, 1.0f, 1.0f};

inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float half_to_float_scalar(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 -> float16, round to nearest even (what F16C's vcvtps2ph does with imm 0).
inline uint16_t float_to_half_scalar(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7FFFFFFF;
  if (ax >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000 ? 0x200 | ((ax >> 13) & 0x3FF) : 0));
  if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);  // rounds to infinity
  if (ax < 0x38800000) {                                     // subnormal half (or zero)
    if (ax < 0x33000000) return (uint16_t)sign;              // below half the smallest subnormal
    const int e = (int)(ax >> 23);
    const uint32_t man = (ax & 0x7FFFFF) | 0x800000;
    const int shift = 126 - e;  // 14 + (113 - e) ... aligns to 2^-24 units
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return (uint16_t)(sign | q);
  }
  uint32_t r = ax - 0x38000000;  // rebias the exponent: 127 - 15 = 112 (<< 23)
  const uint32_t rem = r & 0x1FFF;
  r >>= 13;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return (uint16_t)(sign | r);
}

// ================================================================================================
#if defined(SPECDEC_ISA_AVX512VNNI)
constexpr const char* kIsaName = "avx512vnni";
constexpr bool kQ8Offset = true;  // 8-bit weights go through vpdpbusd as q + 128 (see dot4_q8)

struct B64 { __m512i v; };  // 16 lanes × 4 bytes
struct I32 { __m512i v; };  // 16 lanes of int32
struct F32 { __m512 v; };   // 16 lanes of float

SD_INLINE B64 ld64(const uint8_t* p) { return {_mm512_loadu_si512((const void*)p)}; }
SD_INLINE B64 nib_lo(B64 b) { return {_mm512_and_si512(b.v, _mm512_set1_epi8(0x0F))}; }
SD_INLINE B64 nib_hi(B64 b) { return {_mm512_and_si512(_mm512_srli_epi16(b.v, 4), _mm512_set1_epi8(0x0F))}; }
// Each byte's high nibble in its low nibble, the high nibble undefined: for nib_or, which masks it.
SD_INLINE B64 shr4(B64 b) { return {_mm512_srli_epi16(b.v, 4)}; }
// ((b >> s) & mask) per byte (16-bit shifts; the mask drops what crossed from the neighbour byte)
SD_INLINE B64 bits(B64 b, int s, uint8_t mask) {
  return {_mm512_and_si512(_mm512_srli_epi16(b.v, s), _mm512_set1_epi8((char)mask))};
}
SD_INLINE B64 shl(B64 b, int s) { return {_mm512_slli_epi16(b.v, s)}; }  // bytes that stay below 256 only
SD_INLINE B64 bor(B64 a, B64 b) { return {_mm512_or_si512(a.v, b.v)}; }
SD_INLINE void st64(uint8_t* p, B64 b) { _mm512_storeu_si512((void*)p, b.v); }

SD_INLINE I32 izero() { return {_mm512_setzero_si512()}; }
SD_INLINE I32 iset(int32_t x) { return {_mm512_set1_epi32(x)}; }
SD_INLINE I32 iadd(I32 a, I32 b) { return {_mm512_add_epi32(a.v, b.v)}; }
SD_INLINE I32 isub(I32 a, I32 b) { return {_mm512_sub_epi32(a.v, b.v)}; }
SD_INLINE I32 imul(I32 a, I32 b) { return {_mm512_mullo_epi32(a.v, b.v)}; }
SD_INLINE I32 isrl(I32 a, int s) { return {_mm512_srli_epi32(a.v, s)}; }
SD_INLINE I32 isll(I32 a, int s) { return {_mm512_slli_epi32(a.v, s)}; }
SD_INLINE I32 iand(I32 a, int32_t m) { return {_mm512_and_si512(a.v, _mm512_set1_epi32(m))}; }
SD_INLINE I32 ior(I32 a, I32 b) { return {_mm512_or_si512(a.v, b.v)}; }
SD_INLINE I32 ild(const int32_t* p) { return {_mm512_loadu_si512((const void*)p)}; }
SD_INLINE void ist(int32_t* p, I32 a) { _mm512_storeu_si512((void*)p, a.v); }
SD_INLINE I32 ld_u8(const uint8_t* p) { return {_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))}; }
SD_INLINE I32 ld_i8(const int8_t* p) { return {_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))}; }
// acc + Σ_{i<4} w[lane][i] · x[i]: w unsigned bytes, x four signed bytes shared by every lane
// The four bytes go in as an embedded broadcast memory operand, one fused load+op; from set1 the
// compiler emits a separate vpbroadcastd per product, a third more front-end uops in the kernels'
// inner loops (measured 5-15% slower at 4-32 rows).
SD_INLINE I32 dot4(I32 acc, B64 w, const int8_t* x) {
  __m512i a = acc.v;
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(a) : "v"(w.v), "m"(*(const int32_t*)x));
  return {a};
}
// The same for 8-bit weights stored as q + 128 (unsigned): acc + Σ (q + 128)·x; the caller
// subtracts 128·Σx (kQ8Offset).
SD_INLINE I32 dot4_q8(I32 acc, B64 u, const int8_t* x) { return dot4(acc, u, x); }
// acc + w.lo16·x.lo16 + w.hi16·x.hi16 per lane (signed 16-bit halves; x one dword shared by every lane)
SD_INLINE I32 dot2_i16(I32 acc, I32 w, int32_t x) { return {_mm512_dpwssd_epi32(acc.v, w.v, _mm512_set1_epi32(x))}; }
// Bits `mask` of each byte moved from position `from` to position `to` (other bits cleared).
template <int from, int to>
SD_INLINE B64 move_bits(B64 b, uint8_t mask) {
  const __m512i m = _mm512_set1_epi8((char)(mask << to));
  if (to > from) return {_mm512_and_si512(_mm512_slli_epi16(b.v, to - from), m)};
  if (to < from) return {_mm512_and_si512(_mm512_srli_epi16(b.v, from - to), m)};
  return {_mm512_and_si512(b.v, m)};
}
// (lo & 0x0F) | hi, one instruction
SD_INLINE B64 nib_or(B64 lo, B64 hi) { return {_mm512_ternarylogic_epi32(lo.v, hi.v, _mm512_set1_epi8(0x0F), 0xEC)}; }

SD_INLINE F32 fzero() { return {_mm512_setzero_ps()}; }
SD_INLINE F32 fset(float x) { return {_mm512_set1_ps(x)}; }
SD_INLINE F32 fcvt(I32 a) { return {_mm512_cvtepi32_ps(a.v)}; }
SD_INLINE F32 fmul(F32 a, F32 b) { return {_mm512_mul_ps(a.v, b.v)}; }
SD_INLINE F32 fadd(F32 a, F32 b) { return {_mm512_add_ps(a.v, b.v)}; }
SD_INLINE F32 ffma(F32 a, F32 b, F32 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
SD_INLINE F32 fnfma(F32 a, F32 b, F32 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c − a·b, one rounding
SD_INLINE F32 fld(const float* p) { return {_mm512_loadu_ps(p)}; }
SD_INLINE void fst(float* p, F32 a) { _mm512_storeu_ps(p, a.v); }
SD_INLINE F32 ld_f16(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
// 16 floats to float16, round to nearest even
SD_INLINE void st_f16(uint16_t* p, F32 a) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
SD_INLINE F32 fmaxabs(F32 m, F32 v) { return {_mm512_max_ps(m.v, _mm512_abs_ps(v.v))}; }
// exp(x) exactly as exp_scalar (below): n = rne(x·log2 e), r = x − n·ln 2 in two fused steps, a
// degree-6 Horner polynomial of fused multiply-adds, times 2^n through the exponent bits; 0 below −87.3
SD_INLINE F32 fexp(F32 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(kExpLow), _CMP_LT_OQ);
  const __m512 xc = _mm512_min_ps(x.v, _mm512_set1_ps(kExpHigh));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
  return {_mm512_maskz_mov_ps(~tiny, _mm512_castsi512_ps(bits))};
}
SD_INLINE float hmax(F32 v) { return _mm512_reduce_max_ps(v.v); }  // exact, any order
// q[i] = round-to-nearest-even(v[i]) as int8 (|v| ≤ 127 here); returns the 16 values' sum
SD_INLINE int32_t st_q8(int8_t* q, F32 v) {
  const __m512i i = _mm512_cvtps_epi32(v.v);
  _mm_storeu_si128((__m128i*)q, _mm512_cvtepi32_epi8(i));
  return _mm512_reduce_add_epi32(i);
}

// ================================================================================================
#elif defined(SPECDEC_ISA_AVXVNNI) || defined(SPECDEC_ISA_AVX2)
#if defined(SPECDEC_ISA_AVXVNNI)
constexpr const char* kIsaName = "avxvnni";
constexpr bool kQ8Offset = true;
#else
constexpr const char* kIsaName = "avx2";
constexpr bool kQ8Offset = false;  // 8-bit weights: sign trick, the signed sum directly
#endif

struct B64 { __m256i a, b; };  // lanes 0-7, 8-15
struct I32 { __m256i a, b; };
struct F32 { __m256 a, b; };

SD_INLINE B64 ld64(const uint8_t* p) {
  return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 32))};
}
SD_INLINE B64 nib_lo(B64 x) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(x.a, m), _mm256_and_si256(x.b, m)};
}
SD_INLINE B64 nib_hi(B64 x) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(_mm256_srli_epi16(x.a, 4), m), _mm256_and_si256(_mm256_srli_epi16(x.b, 4), m)};
}
SD_INLINE B64 shr4(B64 x) { return {_mm256_srli_epi16(x.a, 4), _mm256_srli_epi16(x.b, 4)}; }
SD_INLINE B64 bits(B64 x, int s, uint8_t mask) {
  const __m256i m = _mm256_set1_epi8((char)mask);
  const __m128i c = _mm_cvtsi32_si128(s);
  return {_mm256_and_si256(_mm256_srl_epi16(x.a, c), m), _mm256_and_si256(_mm256_srl_epi16(x.b, c), m)};
}
SD_INLINE B64 shl(B64 x, int s) {
  const __m128i c = _mm_cvtsi32_si128(s);
  return {_mm256_sll_epi16(x.a, c), _mm256_sll_epi16(x.b, c)};
}
SD_INLINE B64 bor(B64 x, B64 y) { return {_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b)}; }
SD_INLINE void st64(uint8_t* p, B64 x) {
  _mm256_storeu_si256((__m256i*)p, x.a);
  _mm256_storeu_si256((__m256i*)(p + 32), x.b);
}

SD_INLINE I32 izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
SD_INLINE I32 iset(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
SD_INLINE I32 iadd(I32 x, I32 y) { return {_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)}; }
SD_INLINE I32 isub(I32 x, I32 y) { return {_mm256_sub_epi32(x.a, y.a), _mm256_sub_epi32(x.b, y.b)}; }
SD_INLINE I32 imul(I32 x, I32 y) { return {_mm256_mullo_epi32(x.a, y.a), _mm256_mullo_epi32(x.b, y.b)}; }
SD_INLINE I32 isrl(I32 x, int s) { return {_mm256_srli_epi32(x.a, s), _mm256_srli_epi32(x.b, s)}; }
SD_INLINE I32 isll(I32 x, int s) { return {_mm256_slli_epi32(x.a, s), _mm256_slli_epi32(x.b, s)}; }
SD_INLINE I32 iand(I32 x, int32_t m) {
  const __m256i v = _mm256_set1_epi32(m);
  return {_mm256_and_si256(x.a, v), _mm256_and_si256(x.b, v)};
}
SD_INLINE I32 ior(I32 x, I32 y) { return {_mm256_or_si256(x.a, y.a), _mm256_or_si256(x.b, y.b)}; }
SD_INLINE I32 ild(const int32_t* p) {
  return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 8))};
}
SD_INLINE void ist(int32_t* p, I32 x) {
  _mm256_storeu_si256((__m256i*)p, x.a);
  _mm256_storeu_si256((__m256i*)(p + 8), x.b);
}
SD_INLINE I32 ld_u8(const uint8_t* p) {
  return {_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)),
          _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)))};
}
SD_INLINE I32 ld_i8(const int8_t* p) {
  return {_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)),
          _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)))};
}
#if defined(SPECDEC_ISA_AVXVNNI)
SD_INLINE I32 dot4(I32 acc, B64 w, const int8_t* x) {
  const __m256i xb = _mm256_set1_epi32(load_i32(x));
  return {_mm256_dpbusd_avx_epi32(acc.a, w.a, xb), _mm256_dpbusd_avx_epi32(acc.b, w.b, xb)};
}
SD_INLINE I32 dot4_q8(I32 acc, B64 u, const int8_t* x) { return dot4(acc, u, x); }
#else
// u8·s8 pairs into int16 (at most 2·63·127 for the weights used here: no saturation), then pairs
// of int16 into int32.
SD_INLINE I32 dot4(I32 acc, B64 w, const int8_t* x) {
  const __m256i xb = _mm256_set1_epi32(load_i32(x)), one = _mm256_set1_epi16(1);
  const __m256i ta = _mm256_madd_epi16(_mm256_maddubs_epi16(w.a, xb), one);
  const __m256i tb = _mm256_madd_epi16(_mm256_maddubs_epi16(w.b, xb), one);
  return {_mm256_add_epi32(acc.a, ta), _mm256_add_epi32(acc.b, tb)};
}
// 8-bit weights stored as q + 128: the signed q (flip the top bit), |q|·(x with q's sign): pairs of
// at most 2·128·127, no saturation. The result is acc + Σ q·x (no offset term: kQ8Offset false).
SD_INLINE I32 dot4_q8(I32 acc, B64 u, const int8_t* x) {
  const __m256i xb = _mm256_set1_epi32(load_i32(x)), one = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
  const __m256i qa = _mm256_xor_si256(u.a, flip), qb = _mm256_xor_si256(u.b, flip);
  const __m256i ta = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(qa), _mm256_sign_epi8(xb, qa)), one);
  const __m256i tb = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(qb), _mm256_sign_epi8(xb, qb)), one);
  return {_mm256_add_epi32(acc.a, ta), _mm256_add_epi32(acc.b, tb)};
}
#endif
#if defined(SPECDEC_ISA_AVXVNNI)
SD_INLINE I32 dot2_i16(I32 acc, I32 w, int32_t x) {
  const __m256i xb = _mm256_set1_epi32(x);
  return {_mm256_dpwssd_avx_epi32(acc.a, w.a, xb), _mm256_dpwssd_avx_epi32(acc.b, w.b, xb)};
}
#else
SD_INLINE I32 dot2_i16(I32 acc, I32 w, int32_t x) {
  const __m256i xb = _mm256_set1_epi32(x);
  return {_mm256_add_epi32(acc.a, _mm256_madd_epi16(w.a, xb)), _mm256_add_epi32(acc.b, _mm256_madd_epi16(w.b, xb))};
}
#endif
template <int from, int to>
SD_INLINE B64 move_bits(B64 x, uint8_t mask) {
  const __m256i m = _mm256_set1_epi8((char)(mask << to));
  if (to > from) return {_mm256_and_si256(_mm256_slli_epi16(x.a, to - from), m), _mm256_and_si256(_mm256_slli_epi16(x.b, to - from), m)};
  if (to < from) return {_mm256_and_si256(_mm256_srli_epi16(x.a, from - to), m), _mm256_and_si256(_mm256_srli_epi16(x.b, from - to), m)};
  return {_mm256_and_si256(x.a, m), _mm256_and_si256(x.b, m)};
}
SD_INLINE B64 nib_or(B64 lo, B64 hi) {
  const __m256i m = _mm256_set1_epi8(0x0F);
  return {_mm256_or_si256(_mm256_and_si256(lo.a, m), hi.a), _mm256_or_si256(_mm256_and_si256(lo.b, m), hi.b)};
}

SD_INLINE F32 fzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
SD_INLINE F32 fset(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
SD_INLINE F32 fcvt(I32 x) { return {_mm256_cvtepi32_ps(x.a), _mm256_cvtepi32_ps(x.b)}; }
SD_INLINE F32 fmul(F32 x, F32 y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
SD_INLINE F32 fadd(F32 x, F32 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
SD_INLINE F32 ffma(F32 x, F32 y, F32 z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
SD_INLINE F32 fnfma(F32 x, F32 y, F32 z) { return {_mm256_fnmadd_ps(x.a, y.a, z.a), _mm256_fnmadd_ps(x.b, y.b, z.b)}; }
SD_INLINE F32 fld(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
SD_INLINE void fst(float* p, F32 x) {
  _mm256_storeu_ps(p, x.a);
  _mm256_storeu_ps(p + 8, x.b);
}
SD_INLINE F32 ld_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
SD_INLINE void st_f16(uint16_t* p, F32 x) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(x.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128((__m128i*)(p + 8), _mm256_cvtps_ph(x.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
SD_INLINE F32 fmaxabs(F32 m, F32 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_max_ps(m.a, _mm256_andnot_ps(sign, x.a)), _mm256_max_ps(m.b, _mm256_andnot_ps(sign, x.b))};
}
SD_INLINE __m256 fexp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(kExpLow), _CMP_LT_OQ);
  const __m256 xc = _mm256_min_ps(x, _mm256_set1_ps(kExpHigh));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return _mm256_andnot_ps(tiny, _mm256_castsi256_ps(bits));
}
SD_INLINE F32 fexp(F32 x) { return {fexp8(x.a), fexp8(x.b)}; }
SD_INLINE float hmax(F32 x) {
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(x.a, x.b));
  float m = t[0];
  for (int i = 1; i < 8; ++i) m = m > t[i] ? m : t[i];
  return m;
}
SD_INLINE int32_t st_q8(int8_t* q, F32 x) {
  const __m256i a = _mm256_cvtps_epi32(x.a), b = _mm256_cvtps_epi32(x.b);
  alignas(32) int32_t t[16];
  _mm256_store_si256((__m256i*)t, a);
  _mm256_store_si256((__m256i*)(t + 8), b);
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) {
    q[i] = (int8_t)t[i];
    s += t[i];
  }
  return s;
}

// ================================================================================================
#else
constexpr const char* kIsaName = "generic";
constexpr bool kQ8Offset = true;

struct B64 { uint8_t v[64]; };
struct I32 { int32_t v[16]; };
struct F32 { float v[16]; };

inline B64 ld64(const uint8_t* p) {
  B64 b;
  std::memcpy(b.v, p, 64);
  return b;
}
inline B64 nib_lo(B64 b) {
  for (int i = 0; i < 64; ++i) b.v[i] &= 0x0F;
  return b;
}
inline B64 nib_hi(B64 b) {
  for (int i = 0; i < 64; ++i) b.v[i] = (uint8_t)(b.v[i] >> 4);
  return b;
}
inline B64 shr4(B64 b) {
  for (int i = 0; i < 64; ++i) b.v[i] = (uint8_t)(b.v[i] >> 4);
  return b;
}
inline B64 bits(B64 b, int s, uint8_t mask) {
  for (int i = 0; i < 64; ++i) b.v[i] = (uint8_t)((b.v[i] >> s) & mask);
  return b;
}
inline B64 shl(B64 b, int s) {
  for (int i = 0; i < 64; ++i) b.v[i] = (uint8_t)(b.v[i] << s);
  return b;
}
inline B64 bor(B64 a, B64 b) {
  for (int i = 0; i < 64; ++i) a.v[i] |= b.v[i];
  return a;
}
inline void st64(uint8_t* p, B64 b) { std::memcpy(p, b.v, 64); }

#define SD_I32_OP(name, expr)            \
  inline I32 name(I32 a, I32 b) {        \
    for (int i = 0; i < 16; ++i) expr;   \
    return a;                            \
  }
SD_I32_OP(iadd, a.v[i] = (int32_t)((uint32_t)a.v[i] + (uint32_t)b.v[i]))
SD_I32_OP(isub, a.v[i] = (int32_t)((uint32_t)a.v[i] - (uint32_t)b.v[i]))
SD_I32_OP(imul, a.v[i] = (int32_t)((uint32_t)a.v[i] * (uint32_t)b.v[i]))
SD_I32_OP(ior, a.v[i] |= b.v[i])
#undef SD_I32_OP
inline I32 izero() { return I32{}; }
inline I32 iset(int32_t x) {
  I32 a;
  for (int i = 0; i < 16; ++i) a.v[i] = x;
  return a;
}
inline I32 isrl(I32 a, int s) {
  for (int i = 0; i < 16; ++i) a.v[i] = (int32_t)((uint32_t)a.v[i] >> s);
  return a;
}
inline I32 isll(I32 a, int s) {
  for (int i = 0; i < 16; ++i) a.v[i] = (int32_t)((uint32_t)a.v[i] << s);
  return a;
}
inline I32 iand(I32 a, int32_t m) {
  for (int i = 0; i < 16; ++i) a.v[i] &= m;
  return a;
}
inline I32 ild(const int32_t* p) {
  I32 a;
  std::memcpy(a.v, p, sizeof a.v);
  return a;
}
inline void ist(int32_t* p, I32 a) { std::memcpy(p, a.v, sizeof a.v); }
inline I32 ld_u8(const uint8_t* p) {
  I32 a;
  for (int i = 0; i < 16; ++i) a.v[i] = p[i];
  return a;
}
inline I32 ld_i8(const int8_t* p) {
  I32 a;
  for (int i = 0; i < 16; ++i) a.v[i] = p[i];
  return a;
}
inline I32 dot4(I32 acc, B64 w, const int8_t* x) {
  for (int l = 0; l < 16; ++l)
    for (int i = 0; i < 4; ++i) acc.v[l] += (int32_t)w.v[4 * l + i] * (int32_t)x[i];
  return acc;
}
inline I32 dot4_q8(I32 acc, B64 u, const int8_t* x) { return dot4(acc, u, x); }
inline I32 dot2_i16(I32 acc, I32 w, int32_t x) {
  const int32_t x0 = (int16_t)(x & 0xFFFF), x1 = (int16_t)((uint32_t)x >> 16);
  for (int l = 0; l < 16; ++l)
    acc.v[l] += (int32_t)(int16_t)(w.v[l] & 0xFFFF) * x0 + (int32_t)(int16_t)((uint32_t)w.v[l] >> 16) * x1;
  return acc;
}
template <int from, int to>
inline B64 move_bits(B64 b, uint8_t mask) {
  for (int i = 0; i < 64; ++i) b.v[i] = (uint8_t)(((b.v[i] >> from) & mask) << to);
  return b;
}
inline B64 nib_or(B64 lo, B64 hi) {
  for (int i = 0; i < 64; ++i) lo.v[i] = (uint8_t)((lo.v[i] & 0x0F) | hi.v[i]);
  return lo;
}

inline F32 fzero() { return F32{}; }
inline F32 fset(float x) {
  F32 a;
  for (int i = 0; i < 16; ++i) a.v[i] = x;
  return a;
}
inline F32 fcvt(I32 a) {
  F32 f;
  for (int i = 0; i < 16; ++i) f.v[i] = (float)a.v[i];
  return f;
}
inline F32 fmul(F32 a, F32 b) {
  for (int i = 0; i < 16; ++i) a.v[i] = a.v[i] * b.v[i];
  return a;
}
inline F32 fadd(F32 a, F32 b) {
  for (int i = 0; i < 16; ++i) a.v[i] = a.v[i] + b.v[i];
  return a;
}
inline F32 ffma(F32 a, F32 b, F32 c) {
  for (int i = 0; i < 16; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline F32 fnfma(F32 a, F32 b, F32 c) {
  for (int i = 0; i < 16; ++i) c.v[i] = std::fma(-a.v[i], b.v[i], c.v[i]);
  return c;
}
inline F32 fld(const float* p) {
  F32 a;
  std::memcpy(a.v, p, sizeof a.v);
  return a;
}
inline void fst(float* p, F32 a) { std::memcpy(p, a.v, sizeof a.v); }
inline F32 ld_f16(const uint16_t* p) {
  F32 a;
  for (int i = 0; i < 16; ++i) a.v[i] = half_to_float_scalar(p[i]);
  return a;
}
inline void st_f16(uint16_t* p, F32 a) {
  for (int i = 0; i < 16; ++i) p[i] = float_to_half_scalar(a.v[i]);
}
inline F32 fmaxabs(F32 m, F32 v) {
  for (int i = 0; i < 16; ++i) m.v[i] = std::max(m.v[i], std::fabs(v.v[i]));
  return m;
}
inline float exp_lane(float x) {
  if (x < kExpLow) return 0.0f;
  x = std::min(x, kExpHigh);
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, kLn2Hi, x);
  r = std::fma(n, kLn2Lo, r);
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = std::fma(p, r, kExpPoly[i]);
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += (int32_t)n << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}
inline F32 fexp(F32 x) {
  for (int i = 0; i < 16; ++i) x.v[i] = exp_lane(x.v[i]);
  return x;
}
inline float hmax(F32 v) {
  float m = v.v[0];
  for (int i = 1; i < 16; ++i) m = std::max(m, v.v[i]);
  return m;
}
inline int32_t st_q8(int8_t* q, F32 v) {
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) {
    q[i] = (int8_t)(int)std::nearbyint(v.v[i]);
    s += q[i];
  }
  return s;
}
#endif

}  // namespace sd
