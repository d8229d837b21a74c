"""The model contract every drafter, verifier loop and tuner drives (real or toy models).

The cache holds `kv_len` committed tokens in contiguous slots [0, kv_len). `forward(tokens,
parents)` writes a block of n new tokens into slots [kv_len, kv_len + n) — each at position
kv_len + depth, attending to the prefix and to its own ancestors only — and returns their logits
without committing anything. `commit(keep)` then makes part of that block permanent: either the
first `keep` tokens (a chain, no copy) or the listed block indices in path order, whose K/V are
gathered into slots [kv_len, kv_len + len(keep)). `crop(n)` forgets everything past n
(docs/algorithms.md §4).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class LanguageModel(Protocol):
    """What drafters and the decoder need from a model (real or toy)."""

    vocab_size: int
    kv_len: int
    context_length: int
    device: torch.device  # where its logits live
    dtype: torch.dtype  # of its logits

    def reset(self, max_len: int) -> None:
        """Start a new sequence with room for `max_len` tokens (prefix + any block)."""

    def forward(
        self,
        input_ids: Tensor,  # [n] int64
        parents: Tensor | None = None,  # [n] int64 parents within the pending region (-1 = prefix); None = chain
        last_only: bool = False,
        append: bool = False,
    ) -> Tensor:  # [n, V] logits (or [1, V] when last_only)
        """Score a block of n tokens placed after the committed prefix; commits nothing.

        With `append`, the block joins the uncommitted tokens of earlier calls (the pending
        region) and `parents` index into that whole region, so a tree can be grown level by level.
        """

    def commit(self, keep: Tensor | int) -> None:
        """Keep the first `keep` pending tokens, or the given pending indices in path order."""

    def crop(self, length: int) -> None:
        """Forget committed tokens past `length`."""


def kept_token_ids(lm: LanguageModel) -> Tensor | None:
    """[K] int64, ascending: the tokens a model with a pruned head computes logits for, or None (all).

    Such a model (`NativeLM`, a row of a batched native model) also takes `forward(..., compact=True)`
    and then returns [n, K] logits over these tokens in this order, leaving out the -inf of every
    other token. Models without a pruned head return None here and are never asked for compact
    logits (`ModelCall.run`); a batched row may accept the argument and ignore it.
    """
    return getattr(lm, "kept_ids", None)
