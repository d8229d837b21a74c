"""Row-invariant targets: a block of k tokens scored in one pass must give each token exactly the
logits (and K/V) a one-token pass gives it, or greedy verification can disagree with plain decoding.

In float32 the two differ by round-off only, which almost never moves an argmax. In bfloat16 or
float16 they can differ in the last bits of every activation: on SmolLM2 in bfloat16 a 5-token pass
and five 1-token passes gave logits up to 0.5 apart, and greedy outputs of speculative methods
drifted from plain decoding. Two causes were found here. PyTorch's CPU `scaled_dot_product_attention`
takes another kernel path for one query than for several. And even eager attention (matmul,
softmax, matmul) sums differently when a tree block hides a sibling between a node and its
ancestors: the hidden key's exact zero shifts which SIMD lane every later key lands in, so the
softmax denominator and the weighted sum of values change in their last bits.

`sequential_attention` removes both: every sum in attention (the dot product over the head
dimension, the softmax denominator, the weighted sum of values) is one sequential float32
`cumsum` in key order, where a hidden key adds an exact zero and changes nothing, and the result
depends only on the visible keys in order — exactly what a one-token pass sees. Its cost is
memory traffic proportional to queries x keys x head size (chunked over keys); `specdec profile
--dtype bfloat16` shows it. The linear layers become `ExactLinear` (`models.dense.exact_linear`:
one fixed float32 order per output, whatever the number of rows) where the compiled kernels are
available on the CPU, else they keep one path for every block size (`models.dense.kernel_choice`,
`single_path`), which is not enough where the GEMM itself sums rows differently by row count.
`make_row_invariant` checks at load, on a probe text, that a chain pass and tree passes equal
one-token passes bit for bit; if they do not, the caller warns.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from specdec.core.tree import path_to
from specdec.models.hf import HFLanguageModel

log = logging.getLogger(__name__)

SEQUENTIAL = "specdec_sequential"
"""The name `sequential_attention` is registered under in transformers' attention interface."""
KEY_CHUNK = 256
"""Keys per chunk of the sequential sums (bounds the [queries, keys, head] float32 products)."""


def sequential_attention(
    module: nn.Module,
    query: Tensor,  # [B, H, n, d]
    key: Tensor,  # [B, H_kv, S, d]
    value: Tensor,  # [B, H_kv, S, d]
    attention_mask: Tensor | None,  # [B, 1, n, S] additive, or None (everything visible)
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:  # ([B, n, H, d], no weights)
    """Attention whose every sum is sequential in key order (see the module docstring)."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [B, H, S, d]
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    S = k.shape[2]
    q = query.float().unsqueeze(-2)  # [B, H, n, 1, d]
    scores = torch.empty(*query.shape[:3], S, dtype=torch.float32, device=query.device)  # [B, H, n, S]
    for s0 in range(0, S, KEY_CHUNK):  # each score is its own sequential dot product over d
        kc = k[:, :, s0 : s0 + KEY_CHUNK].float().unsqueeze(2)  # [B, H, 1, c, d]
        scores[..., s0 : s0 + KEY_CHUNK] = (q * kc).cumsum(-1)[..., -1]
    scores = scores * scaling
    if attention_mask is not None:
        scores = scores + attention_mask.float()
    top = scores.amax(-1, keepdim=True)  # exact whatever the order
    weights = torch.exp(scores - top)  # hidden keys: exactly 0
    weights = weights / weights.cumsum(-1)[..., -1:]  # [B, H, n, S]
    total = torch.zeros(*query.shape[:3], 1, query.shape[-1], dtype=torch.float32, device=query.device)
    for s0 in range(0, S, KEY_CHUNK):  # one sequential sum over all keys, carried across chunks
        part = weights[..., s0 : s0 + KEY_CHUNK].unsqueeze(-1) * v[:, :, s0 : s0 + KEY_CHUNK].float().unsqueeze(2)
        total = torch.cat([total, part], dim=-2).cumsum(-2)[..., -1:, :]  # [B, H, n, 1, d]
    out = total.squeeze(-2).to(query.dtype)  # [B, H, n, d]
    return out.transpose(1, 2).contiguous(), None


def register_sequential_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SEQUENTIAL, sequential_attention)


TREES = (
    [-1, 0, 1, 2, 3, 4],  # a chain
    [-1, 0, 0, 2],  # two children of the first token, the second with a child
    [-1, 0, 0, 1, 2, 3, 0, 6],  # three branches: hidden siblings between nodes and their ancestors
)
"""Blocks the check scores (parents within the block), each against one-token passes along every path."""


def rows_agree(lm: HFLanguageModel, ids: Tensor) -> bool:  # ids: [L >= 12] int64
    """Whether block passes (a chain and trees) give every token bit-identical logits to one-token
    passes along its path."""
    width = max(len(t) for t in TREES)
    ctx, block = ids[:-width], ids[-width:]
    lm.reset(ids.shape[0] + width + 2)
    lm.forward(ctx, last_only=True)
    lm.commit(ctx.shape[0])
    singles: dict[tuple[int, ...], Tensor] = {}  # token path -> logits after its last token, one at a time
    ok = True
    for parents in TREES:
        par = torch.tensor(parents)
        tokens = block[: len(parents)]
        logits = lm.forward(tokens, par)  # [m, V]
        for node in range(len(parents)):
            path = tuple(int(tokens[i]) for i in path_to(par, node))
            if path not in singles:
                lm.crop(ctx.shape[0])
                for t in path:
                    out = lm.forward(torch.tensor([t]))[-1]
                    lm.commit(1)
                singles[path] = out
                lm.crop(ctx.shape[0])
            ok = ok and torch.equal(logits[node], singles[path])
    lm.crop(0)
    return bool(ok)


def make_row_invariant(model: nn.Module, probe: Tensor) -> bool:
    """Switch `model` to exact linear layers (where available) and `sequential_attention`, and check
    on `probe` ([L >= 12] ids) that block passes equal one-token passes bit for bit; False when they
    do not (the caller warns)."""
    from specdec.models.dense.exact_linear import use_exact_linears

    use_exact_linears(model)
    register_sequential_attention()
    model.set_attn_implementation(SEQUENTIAL)
    ok = rows_agree(HFLanguageModel(model), probe)
    if not ok:
        log.warning("block passes still differ from one-token passes after switching to sequential attention")
    return ok
