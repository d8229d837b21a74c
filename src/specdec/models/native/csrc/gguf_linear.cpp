// y = x · Wᵀ (+ bias) with W kept as a GGUF file's quantized blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K).
//
// specdec_gguf_linear(x [M, K] f32, M, K, w [N, row_bytes] u8, N, fmt, bias [N] f32 or null, y [M, N] f32).
//
// Exactness: every weight is formed as the gguf package forms it in float32 (scale × quant − min; the
// product is exact, one rounding at the add), then multiplied by the float32 activation and accumulated
// in float32.
//
// Batch invariance: output (r, o) is one fixed chain, whatever M, the tiling or the thread count: four
// 8-lane accumulators, acc[i] = fma(w[32m+8i ..), x[32m+8i ..), acc[i]) for m = 0, 1, … in order, then one
// fixed sum of the four and of the lanes, then the bias. M = 1 dequantizes each row on the fly as it
// streams by; M > 1 dequantizes a panel of 3 rows × 256 values into L1 once and runs every activation
// row through it, pausing each chain in memory between panels (bit-exact). Threads split the outputs,
// never the sum.
//
// Built with -mavx2 -mfma -mf16c when the CPU has them (SPECDEC_AVX2), else as portable scalar code with
// the same chains (8 emulated lanes, compiled with -ffp-contract=off).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "vec8.h"

namespace {
using namespace specdec_vec;

enum Fmt { Q4_0 = 0, Q4_1 = 1, Q5_0 = 2, Q8_0 = 3, Q4_K = 4, Q6_K = 5 };

// bytes per block, values per block
constexpr int64_t kTypeSize[] = {18, 20, 22, 34, 144, 210};
constexpr int64_t kBlockSize[] = {32, 32, 32, 32, 256, 256};

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef SPECDEC_AVX2
  return _cvtsh_ss(h);
#else
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
#endif
}

// The 6-bit (scale, min) pair j of a Q4_K block (ggml's get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}


// ---- dequantizing ----------------------------------------------------------------------------------
// prepare<F>(k, row, u) decodes block u of a row's scales into k; group<F>(k, g, w) then writes the
// block's values 32g .. 32g+31 into w[0..3].
struct Blk {
  const uint8_t* b;
  alignas(32) float s[16];  // Q4_K: d·sc[8], dmin·m[8]; Q6_K: d·sc[16]; others: d (and m)
};

template <int F>
SPECDEC_INLINE void prepare(Blk& k, const uint8_t* row, int64_t u);
template <int F>
SPECDEC_INLINE void group(const Blk& k, int g, V w[4]);

#ifdef SPECDEC_AVX2
SPECDEC_INLINE __m256i load8_u32(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
SPECDEC_INLINE __m256i load8_i32(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
SPECDEC_INLINE V to_ps(__m256i v) { return _mm256_cvtepi32_ps(v); }
SPECDEC_INLINE V bcast(const float* p) { return _mm256_broadcast_ss(p); }

// 32 signed bytes -> 4 vectors of 8 dwords, in order
SPECDEC_INLINE void expand_i8(__m256i q, __m256i out[4]) {
  const __m128i a = _mm256_castsi256_si128(q), b = _mm256_extracti128_si256(q, 1);
  out[0] = _mm256_cvtepi8_epi32(a);
  out[1] = _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(a, a));
  out[2] = _mm256_cvtepi8_epi32(b);
  out[3] = _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b));
}

SPECDEC_INLINE __m256i bits_to_bytes(const uint8_t* p) {  // 32 bits -> 32 bytes of 0xFF (set) or 0x00
  uint32_t x;
  std::memcpy(&x, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

template <>
SPECDEC_INLINE void prepare<Q4_0>(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + 18 * u;
  k.s[0] = half_to_float(k.b);
}
template <>
SPECDEC_INLINE void group<Q4_0>(const Blk& k, int, V w[4]) {  // values 0-15: low nibbles; 16-31: high
  const V d = bcast(k.s);
  const __m256i m4 = _mm256_set1_epi32(0x0F), e = _mm256_set1_epi32(8);
  const __m256i a = load8_u32(k.b + 2), b = load8_u32(k.b + 10);
  w[0] = _mm256_mul_ps(d, to_ps(_mm256_sub_epi32(_mm256_and_si256(a, m4), e)));
  w[1] = _mm256_mul_ps(d, to_ps(_mm256_sub_epi32(_mm256_and_si256(b, m4), e)));
  w[2] = _mm256_mul_ps(d, to_ps(_mm256_sub_epi32(_mm256_srli_epi32(a, 4), e)));
  w[3] = _mm256_mul_ps(d, to_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), e)));
}

template <>
SPECDEC_INLINE void prepare<Q4_1>(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + 20 * u;
  k.s[0] = half_to_float(k.b);
  k.s[1] = half_to_float(k.b + 2);
}
template <>
SPECDEC_INLINE void group<Q4_1>(const Blk& k, int, V w[4]) {  // d·q exact: one rounding, as gguf's d·q + m
  const V d = bcast(k.s), m = bcast(k.s + 1);
  const __m256i m4 = _mm256_set1_epi32(0x0F);
  const __m256i a = load8_u32(k.b + 4), b = load8_u32(k.b + 12);
  w[0] = _mm256_fmadd_ps(d, to_ps(_mm256_and_si256(a, m4)), m);
  w[1] = _mm256_fmadd_ps(d, to_ps(_mm256_and_si256(b, m4)), m);
  w[2] = _mm256_fmadd_ps(d, to_ps(_mm256_srli_epi32(a, 4)), m);
  w[3] = _mm256_fmadd_ps(d, to_ps(_mm256_srli_epi32(b, 4)), m);
}

template <>
SPECDEC_INLINE void prepare<Q5_0>(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + 22 * u;
  k.s[0] = half_to_float(k.b);
}
template <>
SPECDEC_INLINE void group<Q5_0>(const Blk& k, int, V w[4]) {
  const V d = bcast(k.s);
  const __m128i v = _mm_loadu_si128((const __m128i*)(k.b + 6)), m = _mm_set1_epi8(0x0F);
  const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
  const __m256i high = _mm256_and_si256(bits_to_bytes(k.b + 2), _mm256_set1_epi8(0x10));
  __m256i q[4];
  expand_i8(_mm256_sub_epi8(_mm256_or_si256(nib, high), _mm256_set1_epi8(16)), q);
  for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(d, to_ps(q[i]));
}

template <>
SPECDEC_INLINE void prepare<Q8_0>(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + 34 * u;
  k.s[0] = half_to_float(k.b);
}
template <>
SPECDEC_INLINE void group<Q8_0>(const Blk& k, int, V w[4]) {
  const V d = bcast(k.s);
  for (int i = 0; i < 4; ++i) w[i] = _mm256_mul_ps(to_ps(load8_i32(k.b + 2 + 8 * i)), d);
}

// The eight d·scale and dmin·min of a Q4_K block (ggml's 6-bit packing, unpacked with 32-bit masks as
// llama.cpp does); the products are exact.
template <>
SPECDEC_INLINE void prepare<Q4_K>(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + 144 * u;
  uint32_t m[4];
  std::memcpy(m, k.b + 4, 12);
  const uint32_t m1 = 0x3f3f3f3f, m2 = 0x0f0f0f0f, m3 = 0x03030303;
  m[3] = ((m[2] >> 4) & m2) | (((m[1] >> 6) & m3) << 4);
  const uint32_t mins_lo = m[1] & m1;
  m[1] = (m[2] & m2) | (((m[0] >> 6) & m3) << 4);
  m[2] = mins_lo;
  m[0] &= m1;  // bytes 0-7 of m: the scales; bytes 8-15: the mins
  _mm256_store_ps(k.s, _mm256_mul_ps(_mm256_set1_ps(half_to_float(k.b)), to_ps(load8_u32((const uint8_t*)m))));
  _mm256_store_ps(k.s + 8, _mm256_mul_ps(_mm256_set1_ps(half_to_float(k.b + 2)), to_ps(load8_u32((const uint8_t*)m + 8))));
}
template <>
SPECDEC_INLINE void group<Q4_K>(const Blk& k, int g, V w[4]) {  // 32 bytes per pair: low nibbles = sub-block 2j
  const uint8_t* q = k.b + 16 + 32 * (g >> 1);
  const V ds = bcast(k.s + g), dm = bcast(k.s + 8 + g);
  for (int i = 0; i < 4; ++i) {
    const __m256i v = load8_u32(q + 8 * i);
    w[i] = _mm256_fmsub_ps(ds, to_ps((g & 1) ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(0x0F))), dm);
  }
}

template <>
SPECDEC_INLINE void prepare<Q6_K>(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + 210 * u;
  const V d = _mm256_set1_ps(half_to_float(k.b + 208));
  _mm256_store_ps(k.s, _mm256_mul_ps(d, to_ps(load8_i32(k.b + 192))));  // exact products
  _mm256_store_ps(k.s + 8, _mm256_mul_ps(d, to_ps(load8_i32(k.b + 200))));
}
template <>
SPECDEC_INLINE void group<Q6_K>(const Blk& k, int g, V w[4]) {  // run g = half h (128 values), run t; scale per 16
  const int h = g >> 2, t = g & 3;
  __m256i lo = _mm256_loadu_si256((const __m256i*)(k.b + 64 * h + 32 * (t & 1)));
  if (t >> 1) lo = _mm256_srli_epi16(lo, 4);
  lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
  const __m256i qh = _mm256_loadu_si256((const __m256i*)(k.b + 128 + 32 * h));
  const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * t), _mm256_set1_epi8(0x03)), 4);
  __m256i q[4];
  expand_i8(_mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32)), q);
  const V d0 = bcast(k.s + 2 * g), d1 = bcast(k.s + 2 * g + 1);
  w[0] = _mm256_mul_ps(d0, to_ps(q[0]));
  w[1] = _mm256_mul_ps(d0, to_ps(q[1]));
  w[2] = _mm256_mul_ps(d1, to_ps(q[2]));
  w[3] = _mm256_mul_ps(d1, to_ps(q[3]));
}
#else
// Portable: the same values with scalar code.
template <int F>
inline void prepare(Blk& k, const uint8_t* row, int64_t u) {
  k.b = row + kTypeSize[F] * u;
}
template <int F>
inline void group(const Blk& k, int g, V w[4]) {
  const uint8_t* b = k.b;
  float out[32];
  if constexpr (F == Q4_0) {
    const float d = half_to_float(b);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * (float)((b[2 + j] & 15) - 8);
      out[j + 16] = d * (float)((b[2 + j] >> 4) - 8);
    }
  } else if constexpr (F == Q4_1) {
    const float d = half_to_float(b), m = half_to_float(b + 2);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * (float)(b[4 + j] & 15) + m;
      out[j + 16] = d * (float)(b[4 + j] >> 4) + m;
    }
  } else if constexpr (F == Q5_0) {
    const float d = half_to_float(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    for (int j = 0; j < 16; ++j) {  // (int): the high bit comes out of an unsigned word
      out[j] = d * (float)((int)((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
      out[j + 16] = d * (float)((int)((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
  } else if constexpr (F == Q8_0) {
    const float d = half_to_float(b);
    for (int j = 0; j < 32; ++j) out[j] = (float)(int8_t)b[2 + j] * d;
  } else if constexpr (F == Q4_K) {
    int sc, mn;
    scale_min_k4(g, b + 4, &sc, &mn);
    const float ds = half_to_float(b) * (float)sc, dm = half_to_float(b + 2) * (float)mn;
    const uint8_t* qs = b + 16 + 32 * (g >> 1);
    const int shift = 4 * (g & 1);
    for (int j = 0; j < 32; ++j) out[j] = ds * (float)((qs[j] >> shift) & 15) - dm;
  } else {  // Q6_K
    const int h = g >> 2, t = g & 3;
    const uint8_t* ql = b + 64 * h + 32 * (t & 1);
    const uint8_t* qh = b + 128 + 32 * h;
    const float d = half_to_float(b + 208);
    const int8_t* sc = (const int8_t*)(b + 192);
    for (int j = 0; j < 32; ++j) {
      const int q = ((ql[j] >> (4 * (t >> 1))) & 15) | (((qh[j] >> (2 * t)) & 3) << 4);
      out[j] = (d * (float)sc[2 * g + j / 16]) * (float)(q - 32);
    }
  }
  for (int i = 0; i < 4; ++i) w[i] = vload(out + 8 * i);
}
#endif

// ---- the two loops ---------------------------------------------------------------------------------
// The chain of output (r, o): four 8-lane accumulators; values 32m + 8i .. 32m + 8i + 7 go to acc[i] in
// order of m; at the end y = vsum((acc[0] + acc[1]) + (acc[2] + acc[3])). Four chains per row let one
// row run at full speed on its own (the FMA latency is hidden), so M = 1 walks rows one at a time.
constexpr int kPanelRows = 3;  // outputs per panel for M > 1: 3 × 4 accumulators stay in registers
constexpr int64_t kSeg = 256;  // values per panel row

SPECDEC_INLINE float finish(const V acc[4]) { return vsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3]))); }

// M == 1: one output, dequantized 32 values at a time as the row streams by.
template <int F>
SPECDEC_INLINE float row_dot(const float* x, int64_t K, const uint8_t* row) {
  constexpr int64_t BS = kBlockSize[F];
  V acc[4] = {vzero(), vzero(), vzero(), vzero()};
  Blk k;
  for (int64_t u = 0; u < K / BS; ++u) {
    prepare<F>(k, row, u);
#pragma GCC unroll 8
    for (int g = 0; g < (int)(BS / 32); ++g) {
      V wv[4];
      group<F>(k, g, wv);
      const float* xg = x + u * BS + 32 * g;
      for (int i = 0; i < 4; ++i) acc[i] = vfma(wv[i], vload(xg + 8 * i), acc[i]);
    }
  }
  return finish(acc);
}

// M > 1: outputs o0 .. o0+T-1 for every activation row. Each kSeg-value segment of the T weight rows is
// dequantized once into `panel` (T × kSeg floats, in L1), then every activation row runs through it;
// `accs` (M × T × 32 floats) holds the chains between segments.
template <int F, int T>
SPECDEC_INLINE void tile_gemm(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t rb, float* panel,
                              float* accs, float* out, int64_t ld_out) {
  constexpr int64_t BS = kBlockSize[F];
  std::fill(accs, accs + M * T * 32, 0.0f);
  for (int64_t ks = 0; ks < K; ks += kSeg) {
    const int64_t len = std::min(kSeg, K - ks);
    for (int o = 0; o < T; ++o)
      for (int64_t j = 0; j < len / BS; ++j) {
        Blk k;
        prepare<F>(k, w + o * rb, ks / BS + j);
#pragma GCC unroll 8
        for (int g = 0; g < (int)(BS / 32); ++g) {
          V wv[4];
          group<F>(k, g, wv);
          for (int i = 0; i < 4; ++i) vstore(panel + o * kSeg + j * BS + 32 * g + 8 * i, wv[i]);
        }
      }
    for (int64_t r = 0; r < M; ++r) {
      float* ar = accs + r * T * 32;
      V acc[T][4];
      for (int o = 0; o < T; ++o)
        for (int i = 0; i < 4; ++i) acc[o][i] = vload(ar + 32 * o + 8 * i);
      const float* xr = x + r * K + ks;
      for (int64_t m = 0; m < len; m += 32) {
        for (int i = 0; i < 4; ++i) {
          const V xv = vload(xr + m + 8 * i);
          for (int o = 0; o < T; ++o) acc[o][i] = vfma(vload(panel + o * kSeg + m + 8 * i), xv, acc[o][i]);
        }
      }
      for (int o = 0; o < T; ++o)
        for (int i = 0; i < 4; ++i) vstore(ar + 32 * o + 8 * i, acc[o][i]);
    }
  }
  for (int64_t r = 0; r < M; ++r)
    for (int o = 0; o < T; ++o) {
      V acc[4];
      for (int i = 0; i < 4; ++i) acc[i] = vload(accs + (r * T + o) * 32 + 8 * i);
      out[r * ld_out + o] = finish(acc);
    }
}

template <int F>
void run(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t rb, const float* bias, float* y) {
  if (M == 1) {
    at::parallel_for(0, N, 16, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const float v = row_dot<F>(x, K, w + o * rb);
        y[o] = bias ? v + bias[o] : v;
      }
    });
    return;
  }
  const int64_t tiles = (N + kPanelRows - 1) / kPanelRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> panel(kPanelRows * kSeg), accs(M * kPanelRows * 32);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kPanelRows, nt = std::min<int64_t>(kPanelRows, N - o0);
      const uint8_t* wt = w + o0 * rb;
      if (nt == kPanelRows)
        tile_gemm<F, kPanelRows>(x, M, K, wt, rb, panel.data(), accs.data(), y + o0, N);
      else
        for (int64_t o = 0; o < nt; ++o)
          tile_gemm<F, 1>(x, M, K, wt + o * rb, rb, panel.data(), accs.data(), y + o0 + o, N);
      if (bias)
        for (int64_t r = 0; r < M; ++r)
          for (int64_t o = 0; o < nt; ++o) y[r * N + o0 + o] += bias[o0 + o];
    }
  });
}

}  // namespace

// C ABI (loaded with ctypes): only ATen/Parallel.h is included, which keeps the first-use build short.
// The caller (kernels.py) checks shapes, dtypes and contiguity; 0 = done, 1 = bad arguments.
extern "C" int specdec_gguf_linear(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N, int64_t fmt,
                                   const float* bias, float* y) {
  if (fmt < Q4_0 || fmt > Q6_K || K % kBlockSize[fmt] != 0 || M < 0 || N < 0) return 1;
  const int64_t rb = K / kBlockSize[fmt] * kTypeSize[fmt];
  if (M == 0 || N == 0) return 0;
  switch (fmt) {
    case Q4_0: run<Q4_0>(x, M, K, w, N, rb, bias, y); break;
    case Q4_1: run<Q4_1>(x, M, K, w, N, rb, bias, y); break;
    case Q5_0: run<Q5_0>(x, M, K, w, N, rb, bias, y); break;
    case Q8_0: run<Q8_0>(x, M, K, w, N, rb, bias, y); break;
    case Q4_K: run<Q4_K>(x, M, K, w, N, rb, bias, y); break;
    default: run<Q6_K>(x, M, K, w, N, rb, bias, y); break;
  }
  return 0;
}

// 1 when built with the AVX2/FMA/F16C path, 0 for the portable one.
extern "C" int specdec_gguf_isa() {
#ifdef SPECDEC_AVX2
  return 1;
#else
  return 0;
#endif
}
