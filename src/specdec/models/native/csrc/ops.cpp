// The rest of a native decoder layer: RMSNorm, rotary embedding, the float16 KV cache, attention,
// SiLU-gated product, embedding rows. Every output element is computed from its own row (token)
// alone, in one fixed order of IEEE operations that every build (AVX-512, AVX2, portable) performs
// identically: reductions run over 16 lanes in index order and end with one fixed horizontal sum,
// the exponential is our own polynomial of fused multiply-adds. So a token gets the same bits
// whether it is scored alone or inside a k-token chain or tree pass, on any build.
//
// C ABI (loaded with ctypes, see kernels.py); 0 = done, 1 = bad arguments.

#include "pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace {
using namespace sd;
constexpr int L = 16;
#ifdef SPECDEC_PLANT_ORDER
bool plant_reverse = false;  // tests only: set for passes of more than one query
#endif

// ---- scalar and 16-lane building blocks ----------------------------------------------------------
// Sum of 16 lanes in one fixed order: pairs (i, i+8), then (i, i+4), (i, i+2), (i, i+1).
inline float hsum(F32 v) {
  alignas(64) float t[L];
  fst(t, v);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
  return t[0];
}

// exp over 16 lanes: simd.h's fexp, the same polynomial in every build (the softmax numerators, SiLU).

// ---- RMSNorm -------------------------------------------------------------------------------------
// y = (x · 1/sqrt(mean(x²) + eps)) · w per row; the sum of squares over 16 lanes by index.
void rmsnorm_row(const float* x, const float* w, float eps, int64_t D, float* y) {
  F32 acc = fzero();
  int64_t i = 0;
  for (; i + L <= D; i += L) {
    const F32 v = fld(x + i);
    acc = ffma(v, v, acc);
  }
  float ss = hsum(acc);
  for (; i < D; ++i) ss = std::fma(x[i], x[i], ss);
  const float r = 1.0f / std::sqrt(ss / (float)D + eps);
  const F32 rv = fset(r);
  for (i = 0; i + L <= D; i += L) fst(y + i, fmul(fmul(fld(x + i), rv), fld(w + i)));
  for (; i < D; ++i) y[i] = (x[i] * r) * w[i];
}

template <int GN>
SD_INLINE void score_heads(const float* qt, int64_t d, const uint16_t* base, int64_t ld, float scale, float* out,
                           int64_t stride) {
  F32 acc[GN];
  for (int g = 0; g < GN; ++g) acc[g] = fzero();
  for (int64_t c = 0; c < d; ++c) {
    const F32 kv = ld_f16(base + c * ld);
    for (int g = 0; g < GN; ++g) acc[g] = ffma(fset(qt[g * d + c]), kv, acc[g]);
  }
  for (int g = 0; g < GN; ++g) fst(out + g * stride, fmul(acc[g], fset(scale)));
}

// Scores of up to 16 keys (slots sl[0..15]) for the G query heads at qt [G, d]: lane = key, one
// chain over the dimensions per lane. Contiguous prefix slots are read in place; other chunks are
// first copied (as float16 bits) into kbuf [d, 16].
void score_chunk(const float* qt, int64_t G, int64_t d, const uint16_t* kh, int64_t cap, const int64_t* sl, bool direct,
                 uint16_t* kbuf, float scale, float* out, int64_t stride) {
  const uint16_t* base = kh + sl[0];
  int64_t ld = cap;
  if (!direct) {
    for (int64_t c = 0; c < d; ++c)
      for (int i = 0; i < L; ++i) kbuf[c * L + i] = kh[c * cap + sl[i]];
    base = kbuf;
    ld = L;
  }
  int64_t g0 = 0;
  for (; g0 + 4 <= G; g0 += 4) score_heads<4>(qt + g0 * d, d, base, ld, scale, out + g0 * stride, stride);
  switch (G - g0) {
    case 3: score_heads<3>(qt + g0 * d, d, base, ld, scale, out + g0 * stride, stride); break;
    case 2: score_heads<2>(qt + g0 * d, d, base, ld, scale, out + g0 * stride, stride); break;
    case 1: score_heads<1>(qt + g0 * d, d, base, ld, scale, out + g0 * stride, stride); break;
    default: break;
  }
}

// s[0..n) -> exp(s − max s), zeros up to `stride`; returns 1 / Σ (16 lanes by index, fixed final sum).
float softmax_numerators(float* s, int64_t n, int64_t stride) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  const F32 mv = fset(m);
  F32 sum = fzero();
  for (int64_t j0 = 0; j0 < stride; j0 += L) {
    F32 e = fexp(fadd(fld(s + j0), fmul(mv, fset(-1.0f))));
    if (j0 + L > n) {  // lanes past n hold nothing
      alignas(64) float tmp[L];
      fst(tmp, e);
      for (int64_t i = n - j0; i < L; ++i) tmp[i] = 0.0f;
      e = fld(tmp);
    }
    fst(s + j0, e);
    sum = fadd(sum, e);
  }
  return 1.0f / hsum(sum);
}

// out[g] = (Σ_j p[g][j]·v_{slot j}) · inv[g] for GN heads and CN·16 dimensions; lane = dimension,
// keys in order.
template <int GN, int CN>
SD_INLINE void values_tile(const float* p, int64_t stride, int64_t n, const uint16_t* vh, const int64_t* sl, int64_t d,
                           const float* inv, float* out) {
  F32 acc[GN][CN];
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < CN; ++c) acc[g][c] = fzero();
  for (int64_t i = 0; i < n; ++i) {
#ifdef SPECDEC_PLANT_ORDER
    const int64_t j = plant_reverse ? n - 1 - i : i;  // tests only: values summed backwards in block passes
#else
    const int64_t j = i;
#endif
    const uint16_t* vr = vh + sl[j] * d;
    F32 v[CN];
    for (int c = 0; c < CN; ++c) v[c] = ld_f16(vr + c * L);
    for (int g = 0; g < GN; ++g) {
      const F32 pj = fset(p[g * stride + j]);
      for (int c = 0; c < CN; ++c) acc[g][c] = ffma(pj, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int c = 0; c < CN; ++c) fst(out + g * d + c * L, fmul(acc[g][c], fset(inv[g])));
}

template <int GN>
void weighted_values(const float* p, int64_t stride, int64_t n, const uint16_t* vh, const int64_t* sl, int64_t d,
                     const float* inv, float* out) {
  int64_t c0 = 0;  // 8 vectors (128 dimensions) at a time, then 4, 2, 1
  for (; c0 + 8 * L <= d; c0 += 8 * L) values_tile<GN, 8>(p, stride, n, vh + c0, sl, d, inv, out + c0);
  for (; c0 + 4 * L <= d; c0 += 4 * L) values_tile<GN, 4>(p, stride, n, vh + c0, sl, d, inv, out + c0);
  for (; c0 + 2 * L <= d; c0 += 2 * L) values_tile<GN, 2>(p, stride, n, vh + c0, sl, d, inv, out + c0);
  for (; c0 < d; c0 += L) values_tile<GN, 1>(p, stride, n, vh + c0, sl, d, inv, out + c0);
}

}  // namespace

extern "C" {

// y[r] = rmsnorm(x[r]) for M rows; with `res` non-null, x[r] += res[r] first (in place).
int specdec_rmsnorm(float* x, const float* res, const float* w, float eps, int64_t M, int64_t D, float* y) {
  if (M < 0 || D <= 0) return 1;
  sd::parallel_for(0, M, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = x + r * D;
      if (res) {
        const float* rr = res + r * D;
        int64_t i = 0;
        for (; i + L <= D; i += L) fst(xr + i, fadd(fld(xr + i), fld(rr + i)));
        for (; i < D; ++i) xr[i] = xr[i] + rr[i];
      }
      rmsnorm_row(xr, w, eps, D, y + r * D);
    }
  });
  return 0;
}

// Rotary embedding in place, rotate-half form: for i < d/2, (a, b) = (x[i], x[i + d/2]) becomes
// (a·cos − b·sin, b·cos + a·sin), each product rounded, then the sum (as transformers computes
// q·cos + rotate_half(q)·sin). x [T, heads, d]; cs [positions, d] = cos then sin halves per position
// (cos[i] for i < d/2, sin[i] for i ≥ d/2 … see kernels.py: the table holds cos[d/2] | sin[d/2]).
int specdec_rope(float* x, int64_t T, int64_t heads, int64_t d, const float* cs, const int64_t* pos) {
  if (d % 2 || T < 0) return 1;
  const int64_t h2 = d / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cs + pos[t] * d;
    const float* s = c + h2;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * d;
      for (int64_t i = 0; i < h2; ++i) {
        const float a = v[i], b = v[i + h2];
        const float ac = a * c[i], bs = b * s[i], bc = b * c[i], as = a * s[i];
        v[i] = ac - bs;
        v[i + h2] = bc + as;
      }
    }
  }
  return 0;
}

// Store T tokens' keys and values (float32 [T, Hkv, d]) into a float16 cache: token t goes to row
// rows[t] (null: row 0), slot slots[t]. Per row: kt [Hkv, d, cap] (keys transposed: a slot's key
// is a column), vc [Hkv, cap, d]; `nrows` rows one after the other.
int specdec_kv_store(const float* k, const float* v, int64_t T, int64_t Hkv, int64_t d, const int64_t* rows,
                     const int64_t* slots, uint16_t* kt, uint16_t* vc, int64_t nrows, int64_t cap) {
  if (d % L) return 1;
  const int64_t row = Hkv * d * cap;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = slots[t], r = rows ? rows[t] : 0;
    if (s < 0 || s >= cap || r < 0 || r >= nrows) return 1;
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* kr = k + (t * Hkv + h) * d;
      const float* vr = v + (t * Hkv + h) * d;
      uint16_t* kd = kt + r * row + h * d * cap + s;
      uint16_t* vd = vc + r * row + (h * cap + s) * d;
      alignas(64) uint16_t tmp[L];
      for (int64_t c = 0; c < d; c += L) {
        st_f16(tmp, fld(kr + c));
        for (int i = 0; i < L; ++i) kd[(c + i) * cap] = tmp[i];
        st_f16(vd + c, fld(vr + c));
      }
    }
  }
  return 0;
}

// Gather one row's cache entries (kt, vc point at the row): slot dst + i takes slot src[i] (i < n),
// in every head. src may overlap the destination: the sources are read before any is written.
int specdec_kv_gather(uint16_t* kt, uint16_t* vc, int64_t Hkv, int64_t d, int64_t cap, int64_t dst, const int64_t* src,
                      int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (src[i] < 0 || src[i] >= cap || dst + i >= cap) return 1;
  std::vector<uint16_t> tmp(n * d);
  for (int64_t h = 0; h < Hkv; ++h) {
    uint16_t* kh = kt + h * d * cap;
    for (int64_t c = 0; c < d; ++c) {
      for (int64_t i = 0; i < n; ++i) tmp[i] = kh[c * cap + src[i]];
      for (int64_t i = 0; i < n; ++i) kh[c * cap + dst + i] = tmp[i];
    }
    uint16_t* vh = vc + h * cap * d;
    for (int64_t i = 0; i < n; ++i) std::memcpy(tmp.data() + i * d, vh + src[i] * d, 2 * d);
    for (int64_t i = 0; i < n; ++i) std::memcpy(vh + (dst + i) * d, tmp.data() + i * d, 2 * d);
  }
  return 0;
}

// Attention of T query tokens over a float16 cache, grouped-query heads (H = Hkv · G).
//
// q [T, H, d] float32; kt [nrows, Hkv, d, cap], vc [nrows, Hkv, cap, d] float16; query t reads row
// rows[t] (null: row 0) and sees its slots [0, prefix[t]) and then the extra slots
// vis[vis_off[t] .. vis_off[t+1]) in increasing order (its pending ancestors and itself);
// out [T, H, d].
//
// Per (query, head): scores s_j = (q·k_j)·scale, each an independent chain over the d dimensions;
// m = max s; p_j = exp(s_j − m); Σ p over 16 lanes by the position of j in the query's sequence of
// visible keys; o = Σ_j p_j·v_j in that order, then o·(1/Σ p). The sequence of visible keys of a
// token is the same in a 1-token pass and in any chain or tree pass that holds it, so its output is
// too.
int specdec_attention(const float* q, int64_t T, int64_t H, int64_t Hkv, int64_t d, const uint16_t* kt,
                      const uint16_t* vc, int64_t nrows, int64_t cap, const int64_t* rows, const int64_t* prefix,
                      const int64_t* vis, const int64_t* vis_off, float scale, float* out) {
  if (H % Hkv || d % L || d > 256 || T < 0) return 1;
  const int64_t G = H / Hkv, row = Hkv * d * cap;
#ifdef SPECDEC_PLANT_ORDER
  plant_reverse = T > 1;
#endif
  for (int64_t t = 0; t < T; ++t) {
    if (prefix[t] < 0 || prefix[t] > cap || vis_off[t + 1] < vis_off[t] || (rows && (rows[t] < 0 || rows[t] >= nrows)))
      return 1;
    for (int64_t e = vis_off[t]; e < vis_off[t + 1]; ++e)
      if (vis[e] < 0 || vis[e] >= cap) return 1;
  }
  sd::parallel_for(0, T * Hkv, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> score;
    std::vector<int64_t> slot;
    std::vector<uint16_t> kbuf(d * L);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / Hkv, hk = w % Hkv;
      const int64_t r = rows ? rows[t] : 0;
      const int64_t np = prefix[t], ne = vis_off[t + 1] - vis_off[t], n = np + ne;
      const int64_t stride = (n + L - 1) / L * L;
      const uint16_t* kh = kt + r * row + hk * d * cap;
      const uint16_t* vh = vc + r * row + hk * cap * d;
      const float* qt = q + (t * H + hk * G) * d;
      if (n == 0) {  // nothing visible: no attention
        std::memset(out + (t * H + hk * G) * d, 0, sizeof(float) * G * d);
        continue;
      }
      score.assign(G * stride, 0.0f);
      slot.resize(stride);
      for (int64_t j = 0; j < np; ++j) slot[j] = j;
      for (int64_t e = 0; e < ne; ++e) slot[np + e] = vis[vis_off[t] + e];
      for (int64_t j = n; j < stride; ++j) slot[j] = 0;  // padding lanes: any valid slot, result unused
      for (int64_t j0 = 0; j0 < n; j0 += L) score_chunk(qt, G, d, kh, cap, slot.data() + j0, j0 + L <= np,
                                                          kbuf.data(), scale, score.data() + j0, stride);
      for (int64_t g0 = 0; g0 < G; g0 += 2) {
        const int64_t gn = std::min<int64_t>(2, G - g0);
        float inv[2];
        for (int64_t g = 0; g < gn; ++g) inv[g] = softmax_numerators(score.data() + (g0 + g) * stride, n, stride);
        float* o = out + (t * H + hk * G + g0) * d;
        if (gn == 2)
          weighted_values<2>(score.data() + g0 * stride, stride, n, vh, slot.data(), d, inv, o);
        else
          weighted_values<1>(score.data() + g0 * stride, stride, n, vh, slot.data(), d, inv, o);
      }
    }
  });
  return 0;
}

// y = silu(g)·u = (g / (1 + exp(−g)))·u, element by element ([n] each; y may alias g).
int specdec_silu_mul(const float* g, const float* u, int64_t n, float* y) {
  if (n % L) return 1;
  sd::parallel_for(0, n / L, 256, [&](int64_t i0, int64_t i1) {
    const F32 one = fset(1.0f), minus = fset(-1.0f);
    for (int64_t i = i0 * L; i < i1 * L; i += L) {
      const F32 gv = fld(g + i);
      const F32 e = fexp(fmul(gv, minus));
      alignas(64) float den[L], num[L];
      fst(den, fadd(one, e));
      fst(num, gv);
      for (int k = 0; k < L; ++k) num[k] = num[k] / den[k];
      fst(y + i, fmul(fld(num), fld(u + i)));
    }
  });
  return 0;
}

}  // extern "C"
