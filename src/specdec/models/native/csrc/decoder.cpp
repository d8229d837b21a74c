// The decoder layers of a llama-family model in one call: for each layer, RMSNorm, the q/k/v
// projections (+ biases), rotary embedding, the float16 KV cache write, attention, the output
// projection and residual, RMSNorm, the SiLU-gated MLP and residual. The same kernels the Python
// runner would call one by one (qgemm.cpp, ops.cpp), in the same order, so the results are theirs;
// one call per pass instead of a dozen per layer keeps Python out of a ~30 ms decoding step.
//
// C ABI (loaded with ctypes; the structs mirror runner.py's ctypes declarations).

#include <cstdint>
#include <vector>

#include "qgemm.h"

extern "C" {
int64_t specdec_quantized_bytes(int64_t fmt, int64_t M, int64_t K);
int specdec_quantize(int64_t fmt, const float* x, int64_t M, int64_t K, int64_t ldx, uint8_t* xq);
int specdec_qgemm(int64_t fmt, const uint8_t* xq, int64_t M, int64_t K, const uint8_t* w, int64_t N,
                  const float* bias, float* y, int64_t ldy);
int specdec_qgemm_many(int64_t n, const void* jobs, int64_t M);
int specdec_rmsnorm(float* x, const float* res, const float* w, float eps, int64_t M, int64_t D, float* y);
int specdec_rope(float* x, int64_t T, int64_t heads, int64_t d, const float* cs, const int64_t* pos);
int specdec_kv_store(const float* k, const float* v, int64_t T, int64_t Hkv, int64_t d, const int64_t* rows,
                     const int64_t* slots, uint16_t* kt, uint16_t* vc, int64_t nrows, int64_t cap);
int specdec_attention(const float* q, int64_t T, int64_t H, int64_t Hkv, int64_t d, const uint16_t* kt,
                      const uint16_t* vc, int64_t nrows, int64_t cap, const int64_t* rows, const int64_t* prefix,
                      const int64_t* vis, const int64_t* vis_off, float scale, float* out);
int specdec_silu_mul(const float* g, const float* u, int64_t n, float* y);
}

namespace {

struct Linear {
  int64_t fmt, in, out;
  const uint8_t* packed;
  const float* bias;  // padded to whole panels, or null
};

struct Layer {
  const float* ln1;
  const float* ln2;
  Linear q, k, v, o, gate, up, down;
  uint16_t* kt;  // [rows, Hkv, d, cap] float16
  uint16_t* vc;  // [rows, Hkv, cap, d] float16
};

struct Model {
  int64_t layers, hidden, heads, kv_heads, head_dim, inter, rows, cap;
  float eps, scale;
  const float* rope;  // [positions, d]
  const Layer* layer;
};

struct Pass {  // the tokens of one pass
  int64_t T;
  const int64_t* pos;
  const int64_t* rows;  // null: row 0
  const int64_t* slots;
  const int64_t* prefix;
  const int64_t* vis;
  const int64_t* vis_off;
};

// Activations quantized once per block size their consumers need (32 or 256 values per scale).
class Quantized {
 public:
  Quantized(const float* x, int64_t M, int64_t K) : x_(x), M_(M), K_(K) {}
  const uint8_t* for_format(int64_t fmt) {
    const bool k = fmt == 4 || fmt == 5 || fmt == 7;  // Q4_K, Q6_K, Q5_K: 256-value blocks
    std::vector<uint8_t>& buf = k ? k256_ : k32_;
    if (buf.empty()) {
      buf.resize(specdec_quantized_bytes(fmt, M_, K_));
      specdec_quantize(fmt, x_, M_, K_, K_, buf.data());
    }
    return buf.data();
  }

 private:
  const float* x_;
  int64_t M_, K_;
  std::vector<uint8_t> k32_, k256_;
};

int linear(const Linear& w, Quantized& xq, int64_t M, float* y) {
  return specdec_qgemm(w.fmt, xq.for_format(w.fmt), M, w.in, w.packed, w.out, w.bias, y, w.out);
}

// Several projections of the same input in one parallel call (the same bits as one call each):
// q, k and v are 0.2-1.3 MB each, and alone each ended before the weights streamed at full speed.
template <int N>
int linears(const Linear* const (&ws)[N], Quantized& xq, int64_t M, float* const (&ys)[N]) {
  QJob jobs[N];
  for (int i = 0; i < N; ++i)
    jobs[i] = {ws[i]->fmt, xq.for_format(ws[i]->fmt), ws[i]->in, ws[i]->packed, ws[i]->out, ws[i]->bias, ys[i],
               ws[i]->out};
  return specdec_qgemm_many(N, jobs, M);
}

}  // namespace

extern "C" {

// x [T, hidden]: the embeddings in, the residual stream after the last layer out (its final
// residual add done; the final norm is the caller's). 0 = done, else the failing step + 1.
int specdec_decoder_layers(const Model* m, const Pass* p, float* x) {
  const int64_t T = p->T, D = m->hidden, hd = m->head_dim, H = m->heads, Hkv = m->kv_heads;
  std::vector<float> h(T * D), q(T * H * hd), k(T * Hkv * hd), v(T * Hkv * hd), att(T * H * hd);
  std::vector<float> gate(T * m->inter), up(T * m->inter), res(T * D);
  const float* pending = nullptr;  // the previous layer's MLP output, added before the next norm
  for (int64_t i = 0; i < m->layers; ++i) {
    const Layer& L = m->layer[i];
    if (specdec_rmsnorm(x, pending, L.ln1, m->eps, T, D, h.data())) return 1;
    Quantized hq(h.data(), T, D);
    if (linears<3>({&L.q, &L.k, &L.v}, hq, T, {q.data(), k.data(), v.data()})) return 2;
    if (specdec_rope(q.data(), T, H, hd, m->rope, p->pos) || specdec_rope(k.data(), T, Hkv, hd, m->rope, p->pos)) return 3;
    if (specdec_kv_store(k.data(), v.data(), T, Hkv, hd, p->rows, p->slots, L.kt, L.vc, m->rows, m->cap)) return 4;
    if (specdec_attention(q.data(), T, H, Hkv, hd, L.kt, L.vc, m->rows, m->cap, p->rows, p->prefix, p->vis, p->vis_off,
                          m->scale, att.data()))
      return 5;
    Quantized aq(att.data(), T, H * hd);
    if (linear(L.o, aq, T, res.data())) return 6;
    if (specdec_rmsnorm(x, res.data(), L.ln2, m->eps, T, D, h.data())) return 7;
    Quantized mq(h.data(), T, D);
    if (linears<2>({&L.gate, &L.up}, mq, T, {gate.data(), up.data()})) return 8;
    if (specdec_silu_mul(gate.data(), up.data(), T * m->inter, gate.data())) return 9;
    Quantized gq(gate.data(), T, m->inter);
    if (linear(L.down, gq, T, res.data())) return 10;
    pending = res.data();
  }
  // the last residual add (the final norm reads x)
  if (pending)
    for (int64_t j = 0; j < T * D; ++j) x[j] = x[j] + res[j];
  return 0;
}

}  // extern "C"
