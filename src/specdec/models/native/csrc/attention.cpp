// Batch-invariant attention: out[i, h] = Σ_j softmax_j(scale · q[h, i]·k[h', j] + mask[i, j]) v[h', j].
//
// specdec_exact_attention(q, H, n, d, q strides, k, v, Hkv, L, dv, k/v strides, mask or null, mask strides,
//                         scale, out [n, H, dv] contiguous); h' = h / (H / Hkv) (grouped-query heads).
//
// Each (query row, head) is computed on its own, in one fixed order: the scores j = 0, 1, … (an 8-lane
// dot product with one fixed sum), their maximum, exp, a sequential sum, then the value rows accumulated
// in order of j. A key whose mask is ≤ -1e30 (masked) is skipped: it would add an exact zero. So a token
// gets the same bits whether it is scored alone (1-token decoding step, no mask) or inside a k-token
// chain or tree pass, where the extra keys are masked: the property the compiled linear kernel has, for
// the attention between them (torch's sdpa picks different blockings for different row counts).

#include "pool.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec8.h"

namespace {
using namespace specdec_vec;

constexpr float kMasked = -1e30f;

// q·k over d values (d a multiple of 8): one 8-lane accumulator in order, then the fixed lane sum.
SPECDEC_INLINE float dot(const float* a, const float* b, int64_t d) {
  V acc = vzero();
  for (int64_t c = 0; c < d; c += 8) acc = vfma(vload(a + c), vload(b + c), acc);
  return vsum(acc);
}

}  // namespace

extern "C" int specdec_exact_attention(const float* q, int64_t H, int64_t n, int64_t d, int64_t q_sh, int64_t q_sn,
                                       const float* k, const float* v, int64_t Hkv, int64_t L, int64_t dv,
                                       int64_t k_sh, int64_t k_sl, int64_t v_sh, int64_t v_sl, const float* mask,
                                       int64_t m_sh, int64_t m_sn, float scale, float* out) {
  if (H <= 0 || Hkv <= 0 || H % Hkv || d % 8 || dv % 8 || n < 0 || L <= 0) return 1;
  const int64_t group = H / Hkv;
  sd::parallel_for(0, H * n, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(L);
    std::vector<float> acc(dv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / n, i = t % n;
      const float* qi = q + h * q_sh + i * q_sn;
      const float* kh = k + (h / group) * k_sh;
      const float* vh = v + (h / group) * v_sh;
      const float* mi = mask ? mask + h * m_sh + i * m_sn : nullptr;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < L; ++j) {
        if (mi && mi[j] <= kMasked) {
          s[j] = -std::numeric_limits<float>::infinity();
          continue;
        }
        s[j] = dot(qi, kh + j * k_sl, d) * scale + (mi ? mi[j] : 0.0f);
        if (s[j] > m) m = s[j];
      }
      float* o = out + (i * H + h) * dv;
      if (m == -std::numeric_limits<float>::infinity()) {  // every key masked: no attention, zeros
        for (int64_t c = 0; c < dv; ++c) o[c] = 0.0f;
        continue;
      }
      float sum = 0.0f;
      for (int64_t c = 0; c < dv; ++c) acc[c] = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        if (s[j] == -std::numeric_limits<float>::infinity()) continue;
        const float p = std::exp(s[j] - m);
        sum += p;
        const V pv = vset1(p);
        const float* vj = vh + j * v_sl;
        for (int64_t c = 0; c < dv; c += 8) vstore(acc.data() + c, vfma(pv, vload(vj + c), vload(acc.data() + c)));
      }
      const V inv = vset1(1.0f / sum);
      for (int64_t c = 0; c < dv; c += 8) vstore(o + c, vmul(vload(acc.data() + c), inv));
    }
  });
  return 0;
}
