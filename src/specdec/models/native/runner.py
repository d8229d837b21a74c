"""A lean forward pass for llama-family GGUF models on the native kernels (`NativeModel`).

The transformers model that `load.py` builds around a GGUF file's blocks (GGUFLinear layers) is
correct for any architecture, but each of its modules costs Python and dispatch time that a
~30 ms decoding step cannot afford. For the architectures whose decoder layer is the llama layer
(llama, mistral, qwen2: RMSNorm, rotary embedding, grouped-query attention with optional q/k/v
biases, SiLU-gated MLP) `NativeModel` runs the same computation as a short sequence of compiled
calls per layer (kernels.py): every linear layer on the integer block kernel, attention over a
float16 KV cache, norms, rotary embedding and SiLU in one fixed order per token. Each token's
result depends on that token's row and on the cache entries it attends to, never on what else is in
the pass, so a chain or tree pass of k tokens scores each exactly as k one-token steps
(docs/algorithms.md §15).

`forward` takes a flat list of tokens, each with its position, the cache row and slot its K/V go to,
and the cache slots it attends to; a single sequence (`lm.NativeLM`) and many sequences in one pass
(`lm.BatchedNativeModel`) are both this call.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from specdec.models.native import kernels
from specdec.models.native.formats import BlockFormat, UnsupportedFormat
from specdec.models.native.linear import GGUFEmbedding, GGUFLinear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["SUPPORTED_ARCHITECTURES", "KVCache", "NativeModel", "QLinear"]

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
_BUFFER_VERSIONS = itertools.count(1)


class QLinear:
    """A weight in the compiled kernel's layout: y [M, out] = x [M, in] · Wᵀ (+ bias)."""

    def __init__(self, blocks: Tensor, fmt: BlockFormat, in_features: int, bias: Tensor | None = None) -> None:
        self.fmt, self.in_features, self.out_features = fmt, int(in_features), int(blocks.shape[0])
        self.packed = kernels.repack(blocks, fmt, in_features)  # [bytes] uint8
        self.bias: Tensor | None = None  # [out rounded up to 16] float32
        if bias is not None:
            self.bias = torch.zeros(-(-self.out_features // 16) * 16)
            self.bias[: self.out_features] = bias.float()

    @classmethod
    def of(cls, layer: nn.Module) -> "QLinear":
        if not isinstance(layer, GGUFLinear):
            raise UnsupportedFormat(f"{type(layer).__name__} is not a GGUF block layer")
        return cls(layer.blocks, layer.fmt, layer.in_features, layer.bias)

    def nbytes(self) -> int:
        return self.packed.numel() + (self.bias.numel() * 4 if self.bias is not None else 0)


@dataclass
class NativeLayer:
    ln1: Tensor  # [D] float32
    ln2: Tensor
    q: QLinear
    k: QLinear
    v: QLinear
    o: QLinear
    gate: QLinear
    up: QLinear
    down: QLinear


class KVCache:
    """Float16 keys and values per layer for `rows` sequences of `capacity` slots each.

    kt[l] [rows, Hkv, d, capacity] (keys transposed: attention reads 16 slots of one dimension at a
    time), vc[l] [rows, Hkv, capacity, d]. Slots hold whatever was written last: the attention call
    says which ones a token sees.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, rows: int = 1, capacity: int = 0) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.rows, self.capacity = 0, 0
        self.version = 0  # unique per set of buffers (process-wide), so pointers are never reused stale
        self.kt: list[Tensor] = []
        self.vc: list[Tensor] = []
        self.resize(rows, capacity)

    def resize(self, rows: int, capacity: int) -> None:
        """New buffers of `rows` × `capacity`; the slots both sizes have keep their contents."""
        if (rows, capacity) == (self.rows, self.capacity):
            return
        r, c = min(rows, self.rows), min(capacity, self.capacity)
        kts, vcs = [], []
        for layer in range(self.num_layers):
            kt = torch.empty(rows, self.kv_heads, self.head_dim, capacity, dtype=torch.float16)
            vc = torch.empty(rows, self.kv_heads, capacity, self.head_dim, dtype=torch.float16)
            if r and c:
                kt[:r, :, :, :c] = self.kt[layer][:r, :, :, :c]
                vc[:r, :, :c] = self.vc[layer][:r, :, :c]
            kts.append(kt)
            vcs.append(vc)
        self.kt, self.vc, self.rows, self.capacity = kts, vcs, rows, capacity
        self.version = next(_BUFFER_VERSIONS)

    def gather(self, row: int, dst: int, src: Tensor) -> None:
        """Row `row`: slots dst + i take the K/V of slot src[i] (src [n] int64), every layer."""
        src = src.to(torch.int64).contiguous()
        for kt, vc in zip(self.kt, self.vc):
            kernels.kv_gather(kt[row], vc[row], dst, src)

    def nbytes(self) -> int:
        return sum(t.numel() * 2 for t in (*self.kt, *self.vc))

    def read(self, row: int, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Copies of row `row`'s slots [start, end), every layer: keys [L, Hkv, d, n], values [L, Hkv, n, d]."""
        return (torch.stack([kt[row, :, :, start:end] for kt in self.kt]),
                torch.stack([vc[row, :, start:end] for vc in self.vc]))

    def write(self, row: int, start: int, keys: Tensor, values: Tensor) -> None:
        """Row `row`'s slots [start, start + n) take `keys` [L, Hkv, d, n] and `values` [L, Hkv, n, d]."""
        n = keys.shape[-1]
        for layer, (kt, vc) in enumerate(zip(self.kt, self.vc)):
            kt[row, :, :, start : start + n].copy_(keys[layer])
            vc[row, :, start : start + n].copy_(values[layer])


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


# Mirrors of csrc/decoder.cpp's structs.
class _CLinear(ctypes.Structure):
    _fields_ = [("fmt", ctypes.c_int64), ("inp", ctypes.c_int64), ("out", ctypes.c_int64),
                ("packed", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _CLayer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p),
                *[(n, _CLinear) for n in ("q", "k", "v", "o", "gate", "up", "down")],
                ("kt", ctypes.c_void_p), ("vc", ctypes.c_void_p)]


class _CModel(ctypes.Structure):
    _fields_ = [*[(n, ctypes.c_int64) for n in ("layers", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                                "rows", "cap")],
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("rope", ctypes.c_void_p),
                ("layer", ctypes.POINTER(_CLayer))]


class _CPass(ctypes.Structure):
    _fields_ = [("T", ctypes.c_int64), *[(n, ctypes.c_void_p) for n in ("pos", "rows", "slots", "prefix", "vis",
                                                                          "vis_off")]]


def _c_linear(w: QLinear) -> _CLinear:
    return _CLinear(w.fmt.code, w.in_features, w.out_features, w.packed.data_ptr(), _ptr(w.bias))


class NativeModel:
    """The weights of a llama-family decoder in the kernels' layouts, and one forward pass over tokens."""

    def __init__(self, config, embed: GGUFEmbedding, layers: list[NativeLayer], norm: Tensor, head: QLinear,
                 rotary: nn.Module, eps: float, lib: ctypes.CDLL | None = None) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.config = config
        self.hidden = int(text.hidden_size)
        self.heads = int(text.num_attention_heads)
        self.kv_heads = int(getattr(text, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(text, "head_dim", None) or self.hidden // self.heads)
        self.intermediate = layers[0].gate.out_features
        self.vocab_size = head.out_features
        self.context_length = int(getattr(text, "max_position_embeddings", 1 << 20))
        self.embed, self.layers, self.norm, self.head = embed, layers, norm, head
        self.kept: Tensor | None = None
        """The token ids the head computes (`with_pruned_head`); None: all of them."""
        self.head_source: Callable[[Tensor], tuple[Tensor, BlockFormat, int]] | None = None
        """Gives rows `kept` [K] of the head, (blocks [K, row bytes], format, in_features), in the format
        the head was packed in: read from the file again, or a tied head's from the embedding (set by
        the loader: the packed head alone cannot give its rows back)."""
        self.requantized_to: BlockFormat | None = None
        """The format the loader requantized some of the layers to (`load.build_native_runner`; None:
        every layer computes on the file's blocks)."""
        self.rotary, self.eps = rotary, float(eps)
        self.scale = self.head_dim**-0.5
        self.num_layers = len(layers)
        self._table = torch.empty(0, self.head_dim)
        self._c_layers = (_CLayer * len(layers))(*[
            _CLayer(l.ln1.data_ptr(), l.ln2.data_ptr(), *(_c_linear(getattr(l, n)) for n in
                                                          ("q", "k", "v", "o", "gate", "up", "down")), None, None)
            for l in layers])
        self._c_cache: int | None = None  # the version of the cache buffers the layers point at
        self.lib = lib if lib is not None else kernels.native_library()
        """The compiled kernels this model calls (any build: the packed weights are the same bytes)."""
        if self.lib is None:
            raise UnsupportedFormat(kernels.unavailable_reason() or "the native kernels are not available")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: "PreTrainedModel", lib: ctypes.CDLL | None = None) -> "NativeModel":
        """The lean form of a transformers model built around GGUF blocks (`load.build_native_model`);
        UnsupportedFormat says why a model has none (the caller keeps the transformers model)."""
        config = model.config
        why = unsupported_reason(model)
        if why:
            raise UnsupportedFormat(why)
        inner = model.model
        layers = []
        for block in inner.layers:
            att, mlp = block.self_attn, block.mlp
            layers.append(NativeLayer(
                block.input_layernorm.weight.detach().float().contiguous(),
                block.post_attention_layernorm.weight.detach().float().contiguous(),
                *(QLinear.of(m) for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj,
                                          mlp.gate_proj, mlp.up_proj, mlp.down_proj)),
            ))
        return cls(config, inner.embed_tokens, layers, inner.norm.weight.detach().float().contiguous(),
                   QLinear.of(model.get_output_embeddings()), inner.rotary_emb, inner.norm.variance_epsilon, lib)

    def first_layers(self, n: int) -> "NativeModel":
        """The model cut after its first `n` decoder layers, sharing the weights (a weaker draft for
        tests and experiments)."""
        twin = self.with_library(self.lib)
        twin.layers, twin.num_layers = self.layers[:n], n
        twin._c_layers = (_CLayer * n)(*self._c_layers[:n])
        return twin

    def with_library(self, lib: ctypes.CDLL) -> "NativeModel":
        """The same weights computed by another build of the kernels (tests compare builds)."""
        twin = object.__new__(NativeModel)
        twin.__dict__.update(self.__dict__)
        twin.lib = lib
        twin._c_layers = (_CLayer * len(self.layers))(*self._c_layers)  # its own cache pointers
        twin._c_cache = None
        return twin

    def with_pruned_head(self, kept: Tensor) -> "NativeModel":  # kept: [K] int64 token ids
        """The same model whose output head computes only the `kept` tokens' rows; the other logits
        are -inf, so a distribution taken from them is exactly the softmax over the kept tokens (a
        cheaper draft: the 0.5B Qwen's 150k-row Q8_0 head is 145 of its 485 MB; docs/algorithms.md
        §14.4). The rows come from `head_source` (the file's blocks read again, requantized as the head
        was), or from the token embedding when the head is tied to it."""
        kept = torch.unique(kept.long())
        if self.head_source is not None:
            blocks, fmt, cols = self.head_source(kept)
        elif getattr(self.config, "tie_word_embeddings", False) and self.head.out_features == self.embed.num_embeddings:
            blocks, fmt, cols = self.embed.blocks.index_select(0, kept), self.embed.fmt, self.hidden
        else:
            raise ValueError("a pruned native head needs the head's blocks: a model loaded from its file, or a head "
                             "tied to the token embedding")
        twin = self.with_library(self.lib)
        twin.head = QLinear(blocks, fmt, cols)
        twin.kept = kept
        return twin

    def nbytes(self) -> int:
        """Bytes of weights held (packed layers, norms, the embedding's blocks)."""
        layers = sum(getattr(l, n).nbytes() for l in self.layers for n in ("q", "k", "v", "o", "gate", "up", "down"))
        return layers + self.head.nbytes() + self.embed.blocks.numel()

    def num_parameters(self) -> int:
        """Parameters of the architecture as transformers counts them (a tied head once)."""
        linears = [getattr(l, n) for l in self.layers for n in ("q", "k", "v", "o", "gate", "up", "down")]
        count = sum(w.in_features * w.out_features + (w.out_features if w.bias is not None else 0) for w in linears)
        count += sum(l.ln1.numel() + l.ln2.numel() for l in self.layers) + self.norm.numel()
        count += self.embed.num_embeddings * self.embed.embedding_dim
        if not getattr(self.config, "tie_word_embeddings", False):
            count += self.head.in_features * self.head.out_features
        return count

    def new_cache(self, rows: int = 1, capacity: int = 0) -> KVCache:
        return KVCache(self.num_layers, self.kv_heads, self.head_dim, rows, capacity)

    # ---- the pass ------------------------------------------------------------------------------
    def rope_table(self, length: int) -> Tensor:
        """[≥ length, d] float32: cos of the first half-dimensions, then sin, per position."""
        if self._table.shape[0] < length:
            size = max(length, 2 * self._table.shape[0], 256)
            pos = torch.arange(size).unsqueeze(0)
            with torch.inference_mode():
                cos, sin = self.rotary(torch.zeros(1, 1, self.head_dim), pos)
            half = self.head_dim // 2
            self._table = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).float().contiguous()
        return self._table

    def _linear(self, w: QLinear, xq: Tensor, rows: int, out: Tensor) -> None:
        rc = self.lib.specdec_qgemm(w.fmt.code, xq.data_ptr(), rows, w.in_features, w.packed.data_ptr(),
                                    w.out_features, _ptr(w.bias), out.data_ptr(), out.stride(0))
        if rc:
            raise ValueError("native linear: the kernel refused its arguments")

    def _quantized(self, x: Tensor, fmts: list[BlockFormat]) -> dict[int, Tensor]:
        """x [M, K] quantized once per activation block size that `fmts` need."""
        out: dict[int, Tensor] = {}
        m, k = x.shape
        for fmt in fmts:
            if fmt.block_size not in out:
                xq = torch.empty(self.lib.specdec_quantized_bytes(fmt.code, m, k), dtype=torch.uint8)
                self.lib.specdec_quantize(fmt.code, x.data_ptr(), m, k, k, xq.data_ptr())
                out[fmt.block_size] = xq
        return out

    def forward(
        self,
        ids: Tensor,  # [T] int64
        positions: Tensor,  # [T] int64
        cache: KVCache,
        slots: Tensor,  # [T] int64: the cache slot each token's K/V go to
        prefix: Tensor,  # [T] int64: token t sees its row's slots [0, prefix[t]) ...
        vis: Tensor,  # [E] int64: ... then these slots, vis[vis_off[t]:vis_off[t+1]] (increasing)
        vis_off: Tensor,  # [T + 1] int64
        keep: Tensor | None = None,  # [R] int64: the tokens whose logits are returned (None: all)
        rows: Tensor | None = None,  # [T] int64: each token's cache row (None: row 0)
        compact: bool = False,
    ) -> Tensor:  # [R, V] float32 logits; [R, len(kept)] with `compact` and a pruned head
        """With a pruned head and `compact`, the logits of the kept tokens only (in `kept`'s ascending
        order): a drafter that reads them there saves widening to the whole vocabulary and working
        over its -inf entries."""
        t = ids.numel()
        x = self.embed(ids).float().contiguous()  # [T, D], the residual stream
        table = self.rope_table(int(positions.max()) + 1)
        model = _CModel(self.num_layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate,
                        cache.rows, cache.capacity, self.eps, self.scale, table.data_ptr(),
                        self._layers_on(cache))
        tokens = _CPass(t, *(_ptr(a) for a in (positions, rows, slots, prefix, vis, vis_off)))
        rc = self.lib.specdec_decoder_layers(ctypes.byref(model), ctypes.byref(tokens), x.data_ptr())
        if rc:
            raise ValueError(f"native forward: step {rc} refused its arguments (a cache row or slot out of range?)")
        if keep is not None and keep.numel() != t:
            x = x.index_select(0, keep).contiguous()
        hid = torch.empty_like(x)
        self.lib.specdec_rmsnorm(x.data_ptr(), None, self.norm.data_ptr(), self.eps, x.shape[0], self.hidden,
                                 hid.data_ptr())
        logits = torch.empty(hid.shape[0], self.head.out_features)
        self._linear(self.head, self._quantized(hid, [self.head.fmt])[self.head.fmt.block_size], hid.shape[0], logits)
        if self.kept is None or compact:
            return logits
        return widen(logits, self.kept, self.vocab_size)

    def _layers_on(self, cache: KVCache) -> ctypes.Array:
        """The C layer array pointing at `cache`'s buffers (updated when the cache changes)."""
        if self._c_cache != cache.version:
            for c, kt, vc in zip(self._c_layers, cache.kt, cache.vc):
                c.kt, c.vc = kt.data_ptr(), vc.data_ptr()
            self._c_cache = cache.version
        return self._c_layers


def widen(
    logits: Tensor,  # [R, K] over the kept tokens
    kept: Tensor,  # [K] int64 token ids
    vocab_size: int,
) -> Tensor:  # [R, vocab_size], -inf outside `kept`
    """A pruned head's logits over the whole vocabulary."""
    full = torch.full((logits.shape[0], vocab_size), float("-inf"), dtype=logits.dtype)
    full[:, kept] = logits
    return full


def config_unsupported(config) -> str | None:
    """Why a model of this configuration has no `NativeModel` (None: it has one)."""
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED_ARCHITECTURES:
        return f"the lean native runner covers {', '.join(SUPPORTED_ARCHITECTURES)}, not {kind}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act} (the lean runner computes SiLU)"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if kind not in ("default", "linear", "llama3"):
        return f"rope type {kind} (its frequencies may depend on the sequence length)"
    return None


def unsupported_reason(model: nn.Module) -> str | None:
    """Why `NativeModel.from_hf` cannot take this transformers model (None: it can)."""
    why = config_unsupported(model.config)
    if why:
        return why
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "embed_tokens", None), GGUFEmbedding):
        return "the token embedding is not kept as GGUF blocks"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, GGUFLinear) and module.kernel != "gguf"):
            return f"{name} is not computed by the integer kernel"
    if any(b.self_attn.o_proj.bias is not None for b in inner.layers):
        return "an output projection with a bias"
    return None
