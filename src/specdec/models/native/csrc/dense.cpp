// y = x · Wᵀ (+ bias) for bfloat16 or float16 weights and activations, with one fixed float32
// reduction order per output: the dense path's row-invariant linear layer (models/dense/exact_linear.py).
//
// Every 16-bit value is widened to float32 exactly. Output (r, o) keeps four float32 chains,
// value k going to chain k mod 4 in increasing k, each step one fused multiply-add; then
// (c0 + c1) + (c2 + c3), + bias, rounded once to the 16-bit type (nearest even). Lanes are
// outputs (16 per panel), so the order is the same whatever the vector width, the number of rows,
// the row tiling or the thread count (threads split panels): a row's result never depends on the
// other rows of the call, unlike a BLAS GEMM that blocks the reduction by the matrix shape.
//
// Weights are repacked once into panels [N/16][K][16]. C ABI; 0 = done, 1 = bad arguments.

#include "pool.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {
using namespace sd;
constexpr int kLanes = 16;
enum Kind { BF16 = 0, F16 = 1 };

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((x >> 16) | 0x40);
  x += 0x7FFF + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

inline float widen(int kind, uint16_t h) { return kind == BF16 ? bf16_to_float(h) : half_to_float_scalar(h); }
inline uint16_t narrow(int kind, float f) { return kind == BF16 ? float_to_bf16(f) : float_to_half_scalar(f); }

// 16 weights of one k (a panel row) widened to float32 lanes.
SD_INLINE F32 widen16(int kind, const uint16_t* p) {
  if (kind == F16) return ld_f16(p);
#if defined(SPECDEC_ISA_AVX512VNNI)
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
#elif defined(SPECDEC_ISA_AVXVNNI) || defined(SPECDEC_ISA_AVX2)
  const __m256i a = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  const __m256i b = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(p + 8)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
#else
  alignas(64) float t[kLanes];
  for (int i = 0; i < kLanes; ++i) t[i] = bf16_to_float(p[i]);
  return fld(t);
#endif
}

// Rows r0 .. r0+R-1 of one panel: R × 4 chains of 16 lanes.
template <int R>
void panel_rows(int kind, const float* xf, int64_t K, const uint16_t* panel, const uint16_t* bias, int64_t o0, int nv,
                int64_t r0, uint16_t* y, int64_t ldy) {
  F32 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = fzero();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    F32 w[4];
    for (int c = 0; c < 4; ++c) w[c] = widen16(kind, panel + (k + c) * kLanes);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = ffma(fset(xf[(r0 + r) * K + k + c]), w[c], acc[r][c]);
  }
  for (; k < K; ++k) {  // chain k mod 4, as above
    const F32 w = widen16(kind, panel + k * kLanes);
    for (int r = 0; r < R; ++r) acc[r][k & 3] = ffma(fset(xf[(r0 + r) * K + k]), w, acc[r][k & 3]);
  }
  alignas(64) float b[kLanes] = {};
  if (bias)
    for (int i = 0; i < nv; ++i) b[i] = widen(kind, bias[o0 + i]);
  for (int r = 0; r < R; ++r) {
    alignas(64) float out[kLanes];
    fst(out, fadd(fadd(fadd(acc[r][0], acc[r][1]), fadd(acc[r][2], acc[r][3])), fld(b)));
    for (int i = 0; i < nv; ++i) y[(r0 + r) * ldy + o0 + i] = narrow(kind, out[i]);
  }
}

}  // namespace

extern "C" {

// w [N, K] 16-bit rows -> panels [ceil(N/16)][K][16] (padding outputs zero).
int specdec_dense_repack(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) {
  if (N < 0 || K <= 0) return 1;
  const int64_t panels = (N + kLanes - 1) / kLanes;
  sd::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < K; ++k)
        for (int l = 0; l < kLanes; ++l) {
          const int64_t o = p * kLanes + l;
          out[(p * K + k) * kLanes + l] = o < N ? w[o * K + k] : 0;
        }
  });
  return 0;
}

// y [M, ldy ≥ N] = x [M, K] · Wᵀ (+ bias [N]); kind 0 = bfloat16, 1 = float16 (x, w, bias, y alike).
int specdec_dense_gemm(int64_t kind, const uint16_t* x, int64_t M, int64_t K, const uint16_t* wp, int64_t N,
                       const uint16_t* bias, uint16_t* y, int64_t ldy) {
  if ((kind != BF16 && kind != F16) || M < 0 || N < 0 || K <= 0 || ldy < N) return 1;
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = widen((int)kind, x[i]);
  const int64_t panels = (N + kLanes - 1) / kLanes;
  sd::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* panel = wp + p * K * kLanes;
      const int64_t o0 = p * kLanes;
      const int nv = (int)std::min<int64_t>(kLanes, N - o0);
      int64_t r = 0;
      for (; r + 4 <= M; r += 4) panel_rows<4>((int)kind, xf.data(), K, panel, bias, o0, nv, r, y, ldy);
      for (; r < M; ++r) panel_rows<1>((int)kind, xf.data(), K, panel, bias, o0, nv, r, y, ldy);
    }
  });
  return 0;
}

}  // extern "C"
