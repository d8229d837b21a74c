// y = x · Wᵀ (+ bias) with W a GGUF file's quantized blocks, by integer dot products.
//
// The scheme (docs/algorithms.md, "Integer block kernels"):
//   * each activation row is quantized on its own, per block, to int8 with one float scale
//     (Q8_32: 32 values, d and Σq; Q8_256: 256 values, d and sums per 16 and 32), so row r's quantized
//     values depend on row r alone;
//   * within a weight block the product is an integer sum, exact, so its order is free;
//   * across blocks each output (r, o) accumulates in float32 in one fixed chain, block 0, 1, …,
//     each block adding one or two fused multiply-adds whose operands are the same floats in every
//     build.
// So an output's bits do not depend on the number of rows M, on how rows are tiled, on the thread
// count (threads split outputs, never a sum), nor on which build (AVX-512 VNNI, AVX-VNNI, AVX2 or
// portable) runs it: a k-token pass scores each token exactly as a 1-token pass does.
//
// Weights are repacked once (specdec_repack) into panels of 16 outputs, block by block, so that one
// 64-byte load holds 4 quants of each of the 16 outputs (the operand layout of vpdpbusd) and a
// panel's bytes are contiguous. The sizes are those of the file's blocks (16 rows' worth); N is
// padded to a multiple of 16 with zero rows.
//
// C ABI (loaded with ctypes, see kernels.py); 0 = done, 1 = bad arguments.

#include "pool.h"
#include "qgemm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"


namespace {
using namespace sd;

enum Fmt { Q4_0 = 0, Q4_1 = 1, Q5_0 = 2, Q8_0 = 3, Q4_K = 4, Q6_K = 5, Q5_1 = 6, Q5_K = 7, NFMT = 8 };
constexpr int64_t kTypeSize[NFMT] = {18, 20, 22, 34, 144, 210, 24, 176};
constexpr int64_t kBlockSize[NFMT] = {32, 32, 32, 32, 256, 256, 32, 256};
constexpr int kLanes = 16;

// ---- quantized activations ---------------------------------------------------------------------
// Q8_32 block: float d, int32 Σq, int8 q[32]                 (40 bytes)
// Q8_256 block: float d, int16 Σq per 32 values [8], int8 q[256], int32 −32·Σq per 16 values [16]
// (340 bytes). The sums per 32 serve the mins of Q4_K and Q5_K; the last field is Q6_K's offset,
// the starting value of each 16-value integer sum. (The order of the fields is measured: with the
// offsets before q the Q6_K kernel ran ~10 % slower at 8-16 rows.)
constexpr int64_t kX32 = 40, kX256 = 340;
constexpr int64_t kXq32 = 8, kXq256 = 20;  // offset of q in a block
constexpr int64_t kXBs32 = 4, kXOff = 276;  // Q8_256: offsets of Σq per 32 and of −32·Σq per 16

inline bool kquant(int fmt) { return kBlockSize[fmt] == 256; }
inline int64_t x_block_bytes(int fmt) { return kquant(fmt) ? kX256 : kX32; }

// d = amax / 127 and q = round-to-nearest-even(x · (127 / amax)): the same IEEE operations in every
// build (one multiply and one rounding per value; the maximum and the integer sums are exact).
template <int QK>
void quantize_block(const float* x, uint8_t* out) {
  F32 m = fzero();
  for (int i = 0; i < QK; i += 16) m = fmaxabs(m, fld(x + i));
  const float amax = hmax(m);
  const float d = amax / 127.0f;
  const F32 id = fset(amax > 0.0f ? 127.0f / amax : 0.0f);
  int8_t* q = (int8_t*)(out + (QK == 32 ? kXq32 : kXq256));
  int32_t sums[QK / 16];
  for (int g = 0; g < QK / 16; ++g) sums[g] = st_q8(q + 16 * g, fmul(fld(x + 16 * g), id));
  std::memcpy(out, &d, 4);
  if constexpr (QK == 32) {
    const int32_t s = sums[0] + sums[1];
    std::memcpy(out + 4, &s, 4);
  } else {
    int32_t offsets[16];
    int16_t bs[8];
    for (int g = 0; g < 16; ++g) offsets[g] = -32 * sums[g];
    for (int j = 0; j < 8; ++j) bs[j] = (int16_t)(sums[2 * j] + sums[2 * j + 1]);
    std::memcpy(out + kXOff, offsets, 64);
    std::memcpy(out + kXBs32, bs, 16);
  }
}

void quantize_rows(int fmt, const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* xq) {
  const int64_t qk = kBlockSize[fmt], nb = K / qk, xb = x_block_bytes(fmt);
  sd::parallel_for(0, M * nb, 256, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / nb, b = t % nb;
      if (qk == 32)
        quantize_block<32>(x + r * ldx + b * 32, xq + (r * nb + b) * xb);
      else
        quantize_block<256>(x + r * ldx + b * 256, xq + (r * nb + b) * xb);
    }
  });
}

SD_INLINE float x_scale(const uint8_t* xb) {
  float d;
  std::memcpy(&d, xb, 4);
  return d;
}
SD_INLINE int32_t x_sum32(const uint8_t* xb) { return load_i32(xb + 4); }
// −32·Σq over values 16g .. 16g+15 (Q6_K's offset for sub-block g).
SD_INLINE I32 x_offset16(const uint8_t* xb, int g) { return iset(load_i32(xb + kXOff + 4 * g)); }
// Two neighbouring int16 sums as one dword (for dot2_i16): Σq per 32 values j, j+1 (j even).
SD_INLINE int32_t x_bsum32_pair(const uint8_t* xb, int j) { return load_i32(xb + kXBs32 + 2 * j); }
// Bytes k and k+1 of each dword lane as the two int16 halves of the lane (for dot2_i16).
SD_INLINE I32 byte_pair(I32 u, int k) { return ior(iand(isrl(u, 8 * k), 0xFF), isll(iand(isrl(u, 8 * (k + 1)), 0xFF), 16)); }
SD_INLINE I32 byte_of(I32 u, int k) { return iand(isrl(u, 8 * k), 0xFF); }

// ---- prefetching ---------------------------------------------------------------------------------
// Each step asks for the panel block the prefetch distance ahead, a few lines per inner iteration,
// so that requests stay in flight while it computes. Asking for a whole block at once instead makes
// the memory time add to the compute time once several rows share the weights (measured: a 7.7 MB
// Q4_K matrix from DRAM at 8 rows, 436 µs in one burst per block against 320 µs spread out).
// Prefetches never fault: reads past the end of the weights are not made, their lines are unused.
// The distance is in bytes, not blocks: a 32-value format's panel block (288-544 bytes) computes
// in a few nanoseconds at one row, and four of them ahead was less than a memory latency (a Q5_0
// matrix at one row: 23 GB/s four blocks ahead, 27 GB/s at 11 KB). The best distance is the memory
// system's: 12 KB was chosen on an Intel Xeon, and on an AMD EPYC (Zen 4) the 1.5B's one-token
// forward ran 4.8 % faster at 6 KB. So it is set at run time (specdec_set_prefetch_bytes, measured
// per machine by prefetch.py); a prefetch moves bytes into the cache and changes no result.
#ifndef SPECDEC_PF_BYTES
#define SPECDEC_PF_BYTES 12288
#endif
std::atomic<int64_t> g_prefetch_bytes{SPECDEC_PF_BYTES};
inline int64_t blocks_ahead(int64_t pbytes) {
  const int64_t bytes = g_prefetch_bytes.load(std::memory_order_relaxed);
  return std::max<int64_t>(1, (bytes + pbytes - 1) / pbytes);
}

template <int64_t kBytes>
struct Ahead {
  const uint8_t* p;  // the panel block `blocks_ahead` ahead
  // Its share of lines for inner iteration i of n (constants once the loops are unrolled).
  SD_INLINE void part(int i, int n) const {
    constexpr int64_t lines = (kBytes + 63) / 64;
    for (int64_t l = lines * i / n; l < lines * (i + 1) / n; ++l) __builtin_prefetch(p + 64 * l, 0, 2);
  }
  // All of it at once: the formats of 32-value blocks, whose panel blocks are 5-9 lines (spreading
  // those measured slower).
  SD_INLINE void all() const {
    for (int64_t off = 0; off < kBytes; off += 64) __builtin_prefetch(p + off, 0, 3);
  }
};

// ---- the formats: one panel block (16 outputs × one weight block) against R activation rows ------
// step<R>(pb, xb, acc, ahead): pb is the panel block, xb[r] row r's activation block, acc[r] its
// 16 chains, ahead the block to prefetch.

// Legacy 32-value blocks. Panel: f16 d[16] | (f16 m[16]) | (high bits[64]) | nibbles 4 × 64.
// Nibble vector v holds chunk v (values 4v..4v+3) in its low nibbles and chunk v + 4 in its high
// ones, as the file's own bytes do; high-bit byte (l, i) has bit t = bit 4 of chunk t's value i.
template <int F>
struct Legacy {
  static constexpr bool kMin = F == Q4_1 || F == Q5_1;
  static constexpr bool kHigh = F == Q5_0 || F == Q5_1;
  static constexpr int64_t kHighAt = kMin ? 64 : 32, kQAt = kHighAt + (kHigh ? 64 : 0);
  static constexpr int kOffset = F == Q4_0 ? 8 : F == Q5_0 ? 16 : 0;  // w = d·(q − offset) (+ m)
  using Pf = Ahead<kTypeSize[F] * kLanes>;

  template <int R>
  static SD_INLINE void step(const uint8_t* pb, const uint8_t* const* xb, F32* acc, Pf ahead) {
    I32 a[R];
    for (int r = 0; r < R; ++r) a[r] = izero();
    ahead.all();
    B64 hb;
    if (kHigh) hb = ld64(pb + kHighAt);
    for (int v = 0; v < 4; ++v) {
      const B64 raw = ld64(pb + kQAt + 64 * v);
      B64 lo = nib_lo(raw), hi = nib_hi(raw);
      if (kHigh) {
        lo = bor(lo, shl(bits(hb, v, 1), 4));
        hi = bor(hi, shl(bits(hb, v + 4, 1), 4));
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = (const int8_t*)(xb[r] + kXq32);
        a[r] = dot4(dot4(a[r], lo, x + 4 * v), hi, x + 16 + 4 * v);
      }
    }
    for (int r = 0; r < R; ++r) finish(pb, xb[r], a[r], acc[r]);
  }

  // The block's float step for one activation row, from a = Σ q·x (q the unsigned quants).
  static SD_INLINE void finish(const uint8_t* pb, const uint8_t* xb, I32 a, F32& acc) {
    const F32 dx = fset(x_scale(xb));
    if (kOffset) a = isub(a, iset(kOffset * x_sum32(xb)));
    acc = ffma(fmul(ld_f16((const uint16_t*)pb), dx), fcvt(a), acc);
    if (kMin) acc = ffma(fmul(ld_f16((const uint16_t*)pb + 16), dx), fcvt(iset(x_sum32(xb))), acc);
  }


};

// Q8_0. Panel: f16 d[16] | 8 vectors of q + 128 (chunk c in vector c).
struct Q80 {
  using Pf = Ahead<kTypeSize[Q8_0] * kLanes>;

  template <int R>
  static SD_INLINE void step(const uint8_t* pb, const uint8_t* const* xb, F32* acc, Pf ahead) {
    ahead.all();
    I32 a[R];
    for (int r = 0; r < R; ++r) a[r] = izero();
    for (int c = 0; c < 8; ++c) {
      const B64 u = ld64(pb + 32 + 64 * c);
      for (int r = 0; r < R; ++r) a[r] = dot4_q8(a[r], u, (const int8_t*)(xb[r] + kXq32) + 4 * c);
    }
    for (int r = 0; r < R; ++r) finish(pb, xb[r], a[r], acc[r], kQ8Offset);
  }

  // a = Σ (q + 128)·x when `offset`, else Σ q·x.
  static SD_INLINE void finish(const uint8_t* pb, const uint8_t* xb, I32 a, F32& acc, bool offset) {
    if (offset) a = isub(a, iset(128 * x_sum32(xb)));
    acc = ffma(fmul(ld_f16((const uint16_t*)pb), fset(x_scale(xb))), fcvt(a), acc);
  }

};

// Q4_K and Q5_K. Panel: f16 d[16], dmin[16] | the 12 scale bytes of each lane as 3 dword planes |
// nibbles 32 × 64 | (Q5_K: high bits 8 × 64). Nibble vector 8p + c holds chunk 16p + c (sub-block
// 2p) low and chunk 16p + 8 + c (sub-block 2p + 1) high; high-bit plane g has bit t of byte (l, i)
// = bit 4 of chunk 8g + t's value i.
// w = (d·sc_j)·q − dmin·m_j per 32 values j: Σ w·x = d·dx·Σ_j sc_j·dot_j − dmin·dx·Σ_j m_j·Σx_j.
template <int F>
struct K45 {
  static constexpr bool kHigh = F == Q5_K;
  using Pf = Ahead<kTypeSize[F] * kLanes>;

  template <int R>
  static SD_INLINE void step(const uint8_t* pb, const uint8_t* const* xb, F32* acc, Pf ahead) {
    const Consts k(pb);
    const uint8_t* q = pb + 256;
    const uint8_t* hb = pb + 256 + 2048;
    F32 t[R];
    for (int r = 0; r < R; ++r) t[r] = fzero();
    for (int p = 0; p < 4; ++p) {
      I32 alo[R], ahi[R];
      for (int r = 0; r < R; ++r) alo[r] = ahi[r] = izero();
      B64 h0, h1;
      if (kHigh) {
        h0 = ld64(hb + 64 * (2 * p));
        h1 = ld64(hb + 64 * (2 * p + 1));
      }
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        ahead.part(8 * p + c, 32);
        const B64 raw = ld64(q + 64 * (8 * p + c));
        B64 lo = nib_lo(raw), hi = nib_hi(raw);
        if (kHigh) {
          lo = bor(lo, shl(bits(h0, c, 1), 4));
          hi = bor(hi, shl(bits(h1, c, 1), 4));
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* x = (const int8_t*)(xb[r] + kXq256) + 64 * p + 4 * c;
          alo[r] = dot4(alo[r], lo, x);
          ahi[r] = dot4(ahi[r], hi, x + 32);
        }
      }
      for (int r = 0; r < R; ++r) t[r] = ffma(fcvt(ahi[r]), k.sc[2 * p + 1], ffma(fcvt(alo[r]), k.sc[2 * p], t[r]));
    }
    for (int r = 0; r < R; ++r) finish(k, xb[r], t[r], acc[r]);
  }

  // What the float steps need of a panel block: d, dmin, the scales (as floats) and the mins as
  // 16-bit pairs.
  struct Consts {
    F32 d, dmin, sc[8];
    I32 mp[4];
    SD_INLINE explicit Consts(const uint8_t* pb) {
      const I32 m0 = ild((const int32_t*)(pb + 64)), m1 = ild((const int32_t*)(pb + 128)),
                m2 = ild((const int32_t*)(pb + 192));
      const I32 sc_w[2] = {iand(m0, 0x3f3f3f3f), ior(iand(m2, 0x0f0f0f0f), isll(iand(isrl(m0, 6), 0x03030303), 4))};
      const I32 mn_w[2] = {iand(m1, 0x3f3f3f3f), ior(iand(isrl(m2, 4), 0x0f0f0f0f), isll(iand(isrl(m1, 6), 0x03030303), 4))};
      for (int j = 0; j < 8; ++j) sc[j] = fcvt(byte_of(sc_w[j >> 2], j & 3));
      for (int k = 0; k < 4; ++k) mp[k] = byte_pair(mn_w[k >> 1], 2 * (k & 1));
      d = ld_f16((const uint16_t*)pb);
      dmin = ld_f16((const uint16_t*)pb + 16);
    }
  };

  // t = Σ_j sc_j·(Σ q·x over sub-block j), one fused multiply-add per sub-block in order j = 0..7
  // (each product exact); adds d·dx·t − dmin·dx·Σ_j m_j·Σx_j.
  static SD_INLINE void finish(const Consts& k, const uint8_t* xb, F32 t, F32& acc) {
    I32 imin = izero();
    for (int j = 0; j < 4; ++j) imin = dot2_i16(imin, k.mp[j], x_bsum32_pair(xb, 2 * j));
    const F32 dx = fset(x_scale(xb));
    acc = ffma(fmul(k.d, dx), t, acc);
    acc = fnfma(fmul(k.dmin, dx), fcvt(imin), acc);
  }


};

// Q6_K. Panel: f16 d[16] | int8 scales [16 sub-blocks][16 lanes] | nibbles 32 × 64 | high pairs 16 × 64.
// Nibble vector v holds chunk v low and chunk v + 32 high; high vector h holds chunks 4h .. 4h+3 at
// bit pairs 0, 2, 4, 6. w = d·sc_j·(q − 32) per 16 values j: each sub-block's integer sum starts at
// −32·Σx_j (stored with the activations), so it is Σ (q − 32)·x and needs no correction after.
struct Q6K {
  template <int t>
  static SD_INLINE void chunk_pair(B64 raw, B64 h1, B64 h2, B64& w1, B64& w2) {
    w1 = nib_or(raw, move_bits<2 * t, 4>(h1, 3));
    w2 = nib_or(shr4(raw), move_bits<2 * t, 4>(h2, 3));  // nib_or masks the low nibble
  }

  using Pf = Ahead<kTypeSize[Q6_K] * kLanes>;

  template <int R>
  static SD_INLINE void step(const uint8_t* pb, const uint8_t* const* xb, F32* acc, Pf ahead) {
    const Consts k(pb);
    const uint8_t* q = pb + 32 + 256;
    const uint8_t* hq = q + 2048;
    F32 t[R];
    for (int r = 0; r < R; ++r) t[r] = fzero();
    for (int g = 0; g < 8; ++g) {  // sub-blocks g (chunks 4g..4g+3) and g + 8 (chunks 32+4g..)
      ahead.part(g, 8);
      I32 a1[R], a2[R];
      for (int r = 0; r < R; ++r) {
        a1[r] = x_offset16(xb[r], g);
        a2[r] = x_offset16(xb[r], g + 8);
      }
      const B64 h1 = ld64(hq + 64 * g), h2 = ld64(hq + 64 * (g + 8));
      B64 w[8];
      chunk_pair<0>(ld64(q + 64 * (4 * g)), h1, h2, w[0], w[1]);
      chunk_pair<1>(ld64(q + 64 * (4 * g + 1)), h1, h2, w[2], w[3]);
      chunk_pair<2>(ld64(q + 64 * (4 * g + 2)), h1, h2, w[4], w[5]);
      chunk_pair<3>(ld64(q + 64 * (4 * g + 3)), h1, h2, w[6], w[7]);
      for (int r = 0; r < R; ++r) {
        const int8_t* x = (const int8_t*)(xb[r] + kXq256) + 16 * g;
        for (int t = 0; t < 4; ++t) {
          a1[r] = dot4(a1[r], w[2 * t], x + 4 * t);
          a2[r] = dot4(a2[r], w[2 * t + 1], x + 128 + 4 * t);
        }
      }
      for (int r = 0; r < R; ++r) t[r] = ffma(fcvt(a2[r]), k.sc[g + 8], ffma(fcvt(a1[r]), k.sc[g], t[r]));
    }
    for (int r = 0; r < R; ++r) finish(k, xb[r], t[r], acc[r]);
  }

  struct Consts {
    F32 d, sc[16];  // the scales as floats
    SD_INLINE explicit Consts(const uint8_t* pb) {
      for (int j = 0; j < 16; ++j) sc[j] = fcvt(ld_i8((const int8_t*)(pb + 32 + 16 * j)));
      d = ld_f16((const uint16_t*)pb);
    }
  };

  // t = Σ_j sc_j·(Σ (q − 32)·x over sub-block j), one fused multiply-add per sub-block in order
  // j = 0, 8, 1, 9, …, 7, 15; adds d·dx·t.
  static SD_INLINE void finish(const Consts& k, const uint8_t* xb, F32 t, F32& acc) {
    acc = ffma(fmul(k.d, fset(x_scale(xb))), t, acc);
  }


};

template <int F>
struct FormatOf;
template <> struct FormatOf<Q4_0> { using T = Legacy<Q4_0>; };
template <> struct FormatOf<Q4_1> { using T = Legacy<Q4_1>; };
template <> struct FormatOf<Q5_0> { using T = Legacy<Q5_0>; };
template <> struct FormatOf<Q5_1> { using T = Legacy<Q5_1>; };
template <> struct FormatOf<Q8_0> { using T = Q80; };
template <> struct FormatOf<Q4_K> { using T = K45<Q4_K>; };
template <> struct FormatOf<Q5_K> { using T = K45<Q5_K>; };
template <> struct FormatOf<Q6_K> { using T = Q6K; };

// ---- the driver --------------------------------------------------------------------------------
#ifdef SPECDEC_ISA_AVX512VNNI
constexpr int kRowTile = 8;  // rows sharing each unpacked weight vector (registers permitting)
#else
constexpr int kRowTile = 2;
#endif


// One panel (16 outputs starting at o0, `nv` of them real) for rows r0 .. r0+R-1.
template <int F, int R>
void panel_rows(const uint8_t* panel, int64_t nb, const uint8_t* xq, int64_t x_row, int64_t r0, const float* bias,
                int64_t o0, int nv, float* y, int64_t ldy, int64_t ahead) {
  using T = typename FormatOf<F>::T;
  const int64_t pbytes = kTypeSize[F] * kLanes, xbytes = x_block_bytes(F);
  F32 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fzero();
  for (int64_t i = 0; i < nb; ++i) {
#ifdef SPECDEC_PLANT_ORDER
    const int64_t b = R > 1 ? nb - 1 - i : i;  // tests only: blocks of row tiles summed backwards
#else
    const int64_t b = i;
#endif
    const uint8_t* xb[R];
    for (int r = 0; r < R; ++r) xb[r] = xq + (r0 + r) * x_row + b * xbytes;
    T::template step<R>(panel + b * pbytes, xb, acc, typename T::Pf{panel + (b + ahead) * pbytes});
  }
  for (int r = 0; r < R; ++r) {
    F32 out = acc[r];
    if (bias) out = fadd(out, fld(bias + o0));  // bias is padded to whole panels by the caller
    float* yr = y + (r0 + r) * ldy + o0;
    if (nv == kLanes) {
      fst(yr, out);
    } else {
      alignas(64) float tmp[kLanes];
      fst(tmp, out);
      std::memcpy(yr, tmp, sizeof(float) * nv);
    }
  }
}



// Panels [p0, p1) of y = x · Wᵀ (+ bias).
template <int F>
void gemm_panels(const uint8_t* xq, int64_t M, int64_t K, const uint8_t* w, int64_t N, const float* bias, float* y,
                 int64_t ldy, int64_t p0, int64_t p1) {
  const int64_t nb = K / kBlockSize[F], x_row = nb * x_block_bytes(F);
  const int64_t pstride = nb * kTypeSize[F] * kLanes;
  const int64_t ahead = blocks_ahead(kTypeSize[F] * kLanes);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t o0 = p * kLanes;
    const int nv = (int)std::min<int64_t>(kLanes, N - o0);
    const uint8_t* panel = w + p * pstride;
    int64_t r = 0;
    for (; r + kRowTile <= M; r += kRowTile)
      panel_rows<F, kRowTile>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead);
    switch (M - r) {
      case 7: panel_rows<F, 7>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      case 6: panel_rows<F, 6>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      case 5: panel_rows<F, 5>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      case 4: panel_rows<F, 4>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      case 3: panel_rows<F, 3>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      case 2: panel_rows<F, 2>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      case 1: panel_rows<F, 1>(panel, nb, xq, x_row, r, bias, o0, nv, y, ldy, ahead); break;
      default: break;
    }
  }
}

void job_panels(const QJob& j, int64_t M, int64_t p0, int64_t p1) {
  switch (j.fmt) {
    case Q4_0: gemm_panels<Q4_0>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    case Q4_1: gemm_panels<Q4_1>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    case Q5_0: gemm_panels<Q5_0>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    case Q5_1: gemm_panels<Q5_1>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    case Q8_0: gemm_panels<Q8_0>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    case Q4_K: gemm_panels<Q4_K>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    case Q5_K: gemm_panels<Q5_K>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
    default: gemm_panels<Q6_K>(j.xq, M, j.K, j.w, j.N, j.bias, j.y, j.ldy, p0, p1); break;
  }
}

inline int64_t panels_of(int64_t N) { return (N + kLanes - 1) / kLanes; }

// The panels of several weights as one range, split among the threads in one parallel call: each
// output is still computed by the same panel_rows on the same inputs, so the same bits; only the
// calls' start-up (threads woken, the memory stream begun) is paid once for small projections.
void gemm_many(const QJob* jobs, int64_t n, int64_t M) {
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) first[i + 1] = first[i] + panels_of(jobs[i].N);
  sd::parallel_for(0, first[n], 1, [&](int64_t p0, int64_t p1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = std::max(p0, first[i]), b = std::min(p1, first[i + 1]);
      if (a < b) job_panels(jobs[i], M, a - first[i], b - first[i]);
    }
  });
}

// ---- repacking ---------------------------------------------------------------------------------
inline uint16_t rd16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The unsigned quants of one source block, in value order: what the kernels multiply.
void unpack_quants(int fmt, const uint8_t* b, uint8_t* q) {
  switch (fmt) {
    case Q4_0:
    case Q4_1: {
      const uint8_t* qs = b + (fmt == Q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) {
        q[j] = qs[j] & 15;
        q[j + 16] = qs[j] >> 4;
      }
      break;
    }
    case Q5_0:
    case Q5_1: {
      const uint8_t* qh = b + (fmt == Q5_0 ? 2 : 4);
      const uint8_t* qs = qh + 4;
      uint32_t h;
      std::memcpy(&h, qh, 4);
      for (int j = 0; j < 16; ++j) {
        q[j] = (uint8_t)((qs[j] & 15) | (((h >> j) & 1) << 4));
        q[j + 16] = (uint8_t)((qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4));
      }
      break;
    }
    case Q8_0:
      for (int j = 0; j < 32; ++j) q[j] = (uint8_t)((int)(int8_t)b[2 + j] + 128);
      break;
    case Q4_K:
    case Q5_K: {
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (fmt == Q4_K ? 16 : 48);
      for (int p = 0; p < 4; ++p)
        for (int i = 0; i < 32; ++i) {
          const uint8_t byte = qs[32 * p + i];
          q[64 * p + i] = byte & 15;
          q[64 * p + 32 + i] = byte >> 4;
          if (fmt == Q5_K) {
            q[64 * p + i] |= (uint8_t)(((qh[i] >> (2 * p)) & 1) << 4);
            q[64 * p + 32 + i] |= (uint8_t)(((qh[i] >> (2 * p + 1)) & 1) << 4);
          }
        }
      break;
    }
    default: {  // Q6_K
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l)
          for (int k = 0; k < 4; ++k) {
            const uint8_t lb = ql[64 * h + l + 32 * (k & 1)];
            const int lo = (k >> 1) ? lb >> 4 : lb & 15;
            const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
            q[128 * h + 32 * k + l] = (uint8_t)(lo | (hi << 4));
          }
    }
  }
}

// Write one panel block from the 16 lanes' source blocks (src[l] null: a padding lane, all zero).
void repack_block(int fmt, const uint8_t* const* src, uint8_t* out) {
  const int64_t bytes = kTypeSize[fmt] * kLanes;
  std::memset(out, 0, bytes);
  uint8_t q[kLanes][256];
  for (int l = 0; l < kLanes; ++l)
    if (src[l]) unpack_quants(fmt, src[l], q[l]);
    else std::memset(q[l], fmt == Q8_0 ? 128 : 0, 256);
  auto lane_half = [&](int field, int l) -> uint16_t {  // the f16 field at byte `field` of lane l's block
    return src[l] ? rd16(src[l] + field) : 0;
  };
  auto put16 = [&](int64_t at, int field) {
    for (int l = 0; l < kLanes; ++l) {
      const uint16_t h = lane_half(field, l);
      std::memcpy(out + at + 2 * l, &h, 2);
    }
  };
  // The byte (lane l, position i) of a 64-byte vector whose lane l holds 4 values of chunk c.
  auto chunk = [&](int l, int c, int i) -> uint8_t { return q[l][4 * c + i]; };
  if (!kquant(fmt)) {
    const bool has_min = fmt == Q4_1 || fmt == Q5_1, high = fmt == Q5_0 || fmt == Q5_1;
    put16(0, 0);
    if (has_min) put16(32, 2);
    if (fmt == Q8_0) {
      for (int c = 0; c < 8; ++c)
        for (int l = 0; l < kLanes; ++l)
          for (int i = 0; i < 4; ++i) out[32 + 64 * c + 4 * l + i] = chunk(l, c, i);
      return;
    }
    const int64_t hb_at = has_min ? 64 : 32, q_at = hb_at + (high ? 64 : 0);
    for (int l = 0; l < kLanes; ++l)
      for (int i = 0; i < 4; ++i) {
        if (high) {
          uint8_t hb = 0;
          for (int t = 0; t < 8; ++t) hb |= (uint8_t)(((chunk(l, t, i) >> 4) & 1) << t);
          out[hb_at + 4 * l + i] = hb;
        }
        for (int v = 0; v < 4; ++v)
          out[q_at + 64 * v + 4 * l + i] = (uint8_t)((chunk(l, v, i) & 15) | ((chunk(l, v + 4, i) & 15) << 4));
      }
    return;
  }
  if (fmt == Q6_K) {
    put16(0, 208);
    for (int l = 0; l < kLanes; ++l)
      for (int j = 0; j < 16; ++j) out[32 + 16 * j + l] = src[l] ? src[l][192 + j] : 0;
    uint8_t* nib = out + 32 + 256;
    uint8_t* hi = nib + 2048;
    for (int l = 0; l < kLanes; ++l)
      for (int i = 0; i < 4; ++i) {
        for (int v = 0; v < 32; ++v)
          nib[64 * v + 4 * l + i] = (uint8_t)((chunk(l, v, i) & 15) | ((chunk(l, v + 32, i) & 15) << 4));
        for (int h = 0; h < 16; ++h) {
          uint8_t b = 0;
          for (int t = 0; t < 4; ++t) b |= (uint8_t)(((chunk(l, 4 * h + t, i) >> 4) & 3) << (2 * t));
          hi[64 * h + 4 * l + i] = b;
        }
      }
    return;
  }
  // Q4_K, Q5_K
  put16(0, 0);
  put16(32, 2);
  for (int l = 0; l < kLanes; ++l)
    for (int t = 0; t < 3; ++t)
      for (int i = 0; i < 4; ++i) out[64 + 64 * t + 4 * l + i] = src[l] ? src[l][4 + 4 * t + i] : 0;
  uint8_t* nib = out + 256;
  uint8_t* hb = nib + 2048;
  for (int l = 0; l < kLanes; ++l)
    for (int i = 0; i < 4; ++i) {
      for (int p = 0; p < 4; ++p)
        for (int c = 0; c < 8; ++c)
          nib[64 * (8 * p + c) + 4 * l + i] =
              (uint8_t)((chunk(l, 16 * p + c, i) & 15) | ((chunk(l, 16 * p + 8 + c, i) & 15) << 4));
      if (fmt == Q5_K)
        for (int g = 0; g < 8; ++g) {
          uint8_t b = 0;
          for (int t = 0; t < 8; ++t) b |= (uint8_t)(((chunk(l, 8 * g + t, i) >> 4) & 1) << t);
          hb[64 * g + 4 * l + i] = b;
        }
    }
}

bool valid(int64_t fmt, int64_t K) { return fmt >= 0 && fmt < NFMT && K > 0 && K % kBlockSize[fmt] == 0; }

}  // namespace

extern "C" {

const char* specdec_isa() { return kIsaName; }

// How far ahead (bytes) the kernels prefetch weights from now on; returns the previous distance.
int64_t specdec_set_prefetch_bytes(int64_t bytes) {
  return g_prefetch_bytes.exchange(bytes < 0 ? 0 : bytes, std::memory_order_relaxed);
}


// Bytes of the repacked form of N rows of K values (N padded to 16), or -1.
int64_t specdec_repacked_bytes(int64_t fmt, int64_t N, int64_t K) {
  if (!valid(fmt, K) || N < 0) return -1;
  return (N + kLanes - 1) / kLanes * kLanes * (K / kBlockSize[fmt]) * kTypeSize[fmt];
}

// src [N, K/QK blocks] in the file's layout -> dst (specdec_repacked_bytes).
int specdec_repack(int64_t fmt, const uint8_t* src, int64_t N, int64_t K, uint8_t* dst) {
  if (!valid(fmt, K) || N < 0) return 1;
  const int64_t nb = K / kBlockSize[fmt], row = nb * kTypeSize[fmt], pblock = kTypeSize[fmt] * kLanes;
  const int64_t panels = (N + kLanes - 1) / kLanes;
  sd::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* srcs[kLanes];
        for (int l = 0; l < kLanes; ++l) {
          const int64_t o = p * kLanes + l;
          srcs[l] = o < N ? src + o * row + b * kTypeSize[fmt] : nullptr;
        }
        repack_block((int)fmt, srcs, dst + (p * nb + b) * pblock);
      }
  });
  return 0;
}

// Bytes of M activation rows of K values quantized for weights of format fmt, or -1.
int64_t specdec_quantized_bytes(int64_t fmt, int64_t M, int64_t K) {
  if (!valid(fmt, K) || M < 0) return -1;
  return M * (K / kBlockSize[fmt]) * x_block_bytes((int)fmt);
}

int specdec_quantize(int64_t fmt, const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* xq) {
  if (!valid(fmt, K) || M < 0 || ldx < K) return 1;
  quantize_rows((int)fmt, x, M, K, ldx, xq);
  return 0;
}

// y [M, ldy ≥ N] = xq · Wᵀ (+ bias padded to whole panels, or null); w repacked.
int specdec_qgemm(int64_t fmt, const uint8_t* xq, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                  const float* bias, float* y, int64_t ldy) {
  if (!valid(fmt, K) || M < 0 || N < 0 || ldy < N) return 1;
  if (M == 0 || N == 0) return 0;
  const QJob job{fmt, xq, K, w, N, bias, y, ldy};
  gemm_many(&job, 1, M);
  return 0;
}

// The products of n weights with the same M rows in one parallel call (jobs: fmt, xq, K, w, N,
// bias, y, ldy each, as specdec_qgemm takes them); 0 = done, 1 = bad arguments.
int specdec_qgemm_many(int64_t n, const void* jobs, int64_t M) {
  const QJob* js = (const QJob*)jobs;
  if (n < 0 || M < 0) return 1;
  for (int64_t i = 0; i < n; ++i)
    if (!valid(js[i].fmt, js[i].K) || js[i].N < 0 || js[i].ldy < js[i].N) return 1;
  if (M > 0 && n > 0) gemm_many(js, n, M);
  return 0;
}

}  // extern "C"
