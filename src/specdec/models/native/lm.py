"""`NativeModel` behind the `LanguageModel` contract: one sequence (`NativeLM`) or many rows sharing
passes (`BatchedNativeModel`, for the batch engine).

Both keep the slot-cache discipline of models/hf.py (docs/algorithms.md §4): a block of n tokens is
written at slots [kv_len + pending, …) at positions kv_len + depth, attending to the committed
prefix and to its own ancestors; `commit` keeps a chain in place or gathers a tree path's K/V by
index; `crop` rolls back. Tokens of several rows go through one pass as one flat list, each with
its row, so no padding is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from specdec.core.tree import ancestor_mask, chain_parents, depths, is_chain, validate_parents
from specdec.models.hf import commit_plan
from specdec.models.native.runner import KVCache, NativeModel

__all__ = ["NativeLM", "block_plan", "flat_visibility"]


@dataclass
class _Block:
    """What one row's block needs for the pass: positions, write slots and what each token sees."""

    positions: Tensor  # [n] int64
    slots: Tensor  # [n] int64
    prefix: Tensor  # [n] int64
    vis: list[Tensor] = field(default_factory=list)  # per token: extra visible slots (increasing)
    all_parents: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


def block_plan(kv_len: int, pending: Tensor, parents: Tensor | None, n: int, append: bool) -> _Block:
    """Positions, slots and visibility of a block of n tokens after `kv_len` committed ones.

    pending: [p] parents of the uncommitted tokens already scored (kept when `append`); parents: [n]
    within the pending region (-1 = the prefix) or None for a chain. A token sees the prefix and
    its ancestors in the pending region: when those are the region's first c slots (a chain), the
    visible slots are simply [0, kv_len + c).
    """
    prev = pending if append else pending[:0]
    n_prev = prev.shape[0]
    if parents is None and (n_prev == 0 or is_chain(prev)):
        return _chain_plan(kv_len, n_prev, n)
    if parents is None:
        parents = chain_parents(n) + n_prev
        if n_prev == 0:
            parents[0] = -1
    else:
        parents = parents.cpu().to(torch.long)
        if parents.shape != (n,):
            raise ValueError("parents and tokens must have the same length")
    all_parents = torch.cat([prev, parents])
    validate_parents(all_parents)
    start = kv_len + n_prev
    seen = ancestor_mask(all_parents)[n_prev:]  # [n, n_prev + n] bool
    counts = seen.sum(1)
    leading = seen.to(torch.int8).cumprod(1).sum(1)  # visible slots at the head of the region
    contiguous = leading == counts
    prefix = kv_len + torch.where(contiguous, counts, 0)
    vis = [torch.empty(0, dtype=torch.long) if c else seen[i].nonzero().squeeze(1) + kv_len
           for i, c in enumerate(contiguous.tolist())]
    return _Block(kv_len + depths(all_parents)[n_prev:], start + torch.arange(n), prefix, vis, all_parents)


_NOTHING = torch.empty(0, dtype=torch.long)


def _chain_plan(kv_len: int, n_prev: int, n: int) -> _Block:
    """`block_plan` of a chain after a pending chain of n_prev (the usual block: a catch-up, a draft's
    next level, a chain to verify), in a few arange calls: every token sees all slots up to its own,
    so no mask is built (a draft's one-token pass is ~8 ms, and the general plan cost ~0.15 ms of it)."""
    start = kv_len + n_prev
    return _Block(start + torch.arange(n), start + torch.arange(n), start + 1 + torch.arange(n), [_NOTHING] * n,
                  chain_parents(n_prev + n))


def flat_visibility(vis: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Ragged visible-slot lists -> (values [E], offsets [T + 1])."""
    lengths = torch.tensor([v.numel() for v in vis], dtype=torch.long)
    offsets = torch.zeros(len(vis) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    values = torch.cat(list(vis)) if offsets[-1] > 0 else torch.zeros(1, dtype=torch.long)
    return values.contiguous(), offsets


class NativeLM:
    """One sequence on a `NativeModel` (batch 1): the `LanguageModel` contract (models/base.py)."""

    def __init__(self, model: NativeModel) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        self.context_length = model.context_length
        self.num_layers = model.num_layers
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.kv_len = 0
        self.offloaded = False
        self.num_parameters = model.num_parameters()
        """The architecture's size (the SWI cost model weighs drafts by it)."""
        self.cache: KVCache = model.new_cache(1, 0)
        self._pending = torch.empty(0, dtype=torch.long)

    def reset(self, max_len: int) -> None:
        if max_len > self.context_length:
            raise ValueError(
                f"{max_len} tokens do not fit the model's context of {self.context_length} tokens; "
                "shorten the prompt or lower max-new-tokens"
            )
        if self.cache.capacity < max_len:
            self.cache.resize(1, -(-max_len // 64) * 64)
        self.kv_len = 0
        self._pending = self._pending[:0]

    @property
    def kept_ids(self) -> Tensor | None:
        """[K] int64, ascending: the tokens a pruned head computes (`compact` logits are theirs); None: all."""
        return self.model.kept

    def forward(
        self, input_ids: Tensor, parents: Tensor | None = None, last_only: bool = False, append: bool = False,
        compact: bool = False,
    ) -> Tensor:  # [n, V] (or [1, V]); [n, K] with `compact` and a pruned head
        n = input_ids.shape[0]
        plan = block_plan(self.kv_len, self._pending, parents, n, append)
        if int(plan.slots[-1]) >= self.cache.capacity:
            raise ValueError(f"cache overflow: {int(plan.slots[0])} cached + {n} new tokens > capacity "
                             f"{self.cache.capacity}")
        vis, offsets = flat_visibility(plan.vis)
        keep = torch.tensor([n - 1]) if last_only else None
        with torch.inference_mode():
            logits = self.model.forward(input_ids.cpu().to(torch.long).contiguous(), plan.positions, self.cache,
                                        plan.slots, plan.prefix, vis, offsets, keep, compact=compact)
        self._pending = plan.all_parents
        return logits

    def commit(self, keep: Tensor | int) -> None:
        count, moved = commit_plan(keep, self._pending.shape[0], self.device)
        if moved is not None:
            self.cache.gather(0, self.kv_len, self.kv_len + moved.cpu())
        self.kv_len += count
        self._pending = self._pending[:0]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.kv_len:
            raise ValueError(f"cannot crop to {length}: only {self.kv_len} tokens are cached")
        self.kv_len = length
        self._pending = self._pending[:0]

    def cached_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """K/V of the committed tokens of one layer ([1, Hkv, kv_len, d] float16 each), for tests."""
        kt, vc = self.cache.kt[layer], self.cache.vc[layer]
        return kt[:, :, :, : self.kv_len].transpose(-1, -2), vc[:, :, : self.kv_len]

