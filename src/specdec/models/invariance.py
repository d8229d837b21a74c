"""Row-invariant targets: a block of k tokens scored in one pass must give each token exactly the
logits (and K/V) a one-token pass gives it, or greedy verification can disagree with plain decoding.

In float32 the two differ by round-off only, which almost never moves an argmax. In bfloat16 or
float16 they can differ in the last bits of every activation, and on SmolLM2 in bfloat16 a 5-token
pass and five 1-token passes gave logits up to 0.5 apart, so greedy outputs of speculative methods
drifted from plain decoding. The cause here was attention: PyTorch's CPU `scaled_dot_product_attention`
takes another kernel path (and summation order) for one query than for several. With transformers'
eager attention (matmul, float32 softmax, matmul) the passes agreed bit for bit.

So a reduced-precision target is made row-invariant at load (`make_row_invariant`): eager
attention, one linear path for every block size (`models.kernel_choice`, `single_path`), then a
check on a probe text that a chain and a tree pass equal token-by-token passes bit for bit. If
they still differ, attention is computed one query at a time (`per_query_attention`, so every
query takes the one-query kernel) and checked again; if that fails too the result says so and the
caller warns that greedy equality with plain decoding is not guaranteed on this machine.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from specdec.models.hf import HFLanguageModel

log = logging.getLogger(__name__)

PER_QUERY = "specdec_per_query"
"""The name `per_query_attention` is registered under in transformers' attention interface."""
LEVELS = ("eager", PER_QUERY)


def per_query_attention(
    module: nn.Module,
    query: Tensor,  # [B, H, n, d]
    key: Tensor,  # [B, H_kv, S, d]
    value: Tensor,  # [B, H_kv, S, d]
    attention_mask: Tensor | None,  # [B, 1, n, S] additive
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:  # ([B, n, H, d], [B, H, n, S])
    """Attention computed as n one-query products (a batch of [1, d] x [d, S] matmuls), so a query's
    result does not depend on how many queries share the pass."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key  # [B, H, S, d]
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    weights = torch.matmul(query.unsqueeze(-2), k.transpose(2, 3).unsqueeze(2)).squeeze(-2) * scaling  # [B, H, n, S]
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.unsqueeze(-2), v.unsqueeze(2)).squeeze(-2)  # [B, H, n, d]
    return out.transpose(1, 2).contiguous(), weights


def register_per_query_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PER_QUERY, per_query_attention)


def rows_agree(lm: HFLanguageModel, ids: Tensor) -> bool:  # ids: [L >= 12] int64
    """Whether a chain pass and a tree pass give every token bit-identical logits to one-token passes."""
    ctx, block = ids[:-6], ids[-6:]
    lm.reset(ids.shape[0] + 8)
    lm.forward(ctx, last_only=True)
    lm.commit(ctx.shape[0])
    chain = lm.forward(block)  # [6, V]
    # A tree: block[1] and block[2] both children of block[0], block[3] a child of block[2].
    tree = lm.forward(block[[0, 1, 2, 3]], torch.tensor([-1, 0, 0, 2]))  # [4, V]

    def one_by_one(tokens: Tensor) -> Tensor:  # [m] -> [m, V]
        lm.crop(ctx.shape[0])
        rows = []
        for t in tokens:
            rows.append(lm.forward(t.view(1))[-1])
            lm.commit(1)
        return torch.stack(rows)

    along_chain = one_by_one(block)
    along_branch = one_by_one(block[[0, 2, 3]])
    lm.crop(0)
    return (torch.equal(chain, along_chain) and torch.equal(tree[:2], along_chain[:2])
            and torch.equal(tree[2:], along_branch[1:]))


def make_row_invariant(model: nn.Module, probe: Tensor) -> str | None:
    """Switch `model` to the first attention that makes it row-invariant on `probe` ([L >= 12] ids):
    returns "eager", PER_QUERY, or None when neither does (the model is left on PER_QUERY)."""
    register_per_query_attention()
    for level in LEVELS:
        model.set_attn_implementation(level)
        if rows_agree(HFLanguageModel(model), probe):
            return level
        log.info("attention %s is not row-invariant here", level)
    return None
