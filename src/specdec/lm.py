"""The model layer: any transformers causal LM driven as a tree-capable scorer.

Contract (`LanguageModel`): the cache holds `kv_len` committed tokens in contiguous slots
[0, kv_len). `forward(tokens, parents)` writes a block of n new tokens into slots
[kv_len, kv_len + n) — each at position kv_len + depth, attending to the prefix and to its
own ancestors only — and returns their logits without committing anything. `commit(keep)`
then makes part of that block permanent: either the first `keep` tokens (a chain, no copy)
or the listed block indices in path order, whose K/V are gathered into slots
[kv_len, kv_len + len(keep)). `crop(n)` forgets everything past n.

Because a node's position equals the position it would have if accepted, its K/V during a
tree pass are exactly the K/V plain decoding would compute, so accepted entries are moved,
never recomputed (algorithms.md §1.3). The cache is preallocated once per sequence; slots past
the committed length are stale and hidden by the mask (never zeroed: a zero key still
counts in the softmax).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.tree import ancestor_mask, chain_parents, depths

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@runtime_checkable
class LanguageModel(Protocol):
    """What drafters and the decoder need from a model (real or toy)."""

    vocab_size: int
    kv_len: int
    context_length: int

    def reset(self, max_len: int) -> None:
        """Start a new sequence with room for `max_len` tokens (prefix + any block)."""

    def forward(
        self,
        input_ids: Tensor,  # [n] int64
        parents: Tensor | None = None,  # [n] int64 block-relative parents (-1 = prefix); None = chain
        last_only: bool = False,
    ) -> Tensor:  # [n, V] logits (or [1, V] when last_only)
        """Score a block of n tokens placed after the committed prefix; commits nothing."""

    def commit(self, keep: Tensor | int) -> None:
        """Keep the first `keep` tokens of the last block, or the given block indices in order."""

    def crop(self, length: int) -> None:
        """Forget committed tokens past `length`."""


class _SlotLayer(CacheLayerMixin):
    """One layer's preallocated K/V, written at explicit slots by the owning `SlotCache`.

    `update` writes the block at [start, start + n) and returns views of [0, start + n) so
    attention never touches the unused tail of the buffer.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "SlotCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        batch, heads, _, k_dim = key_states.shape
        cap = self.owner.capacity
        self.keys = key_states.new_zeros((batch, heads, cap, k_dim))
        self.values = value_states.new_zeros((batch, heads, cap, value_states.shape[-1]))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized or self.keys.shape[2] < self.owner.capacity:
            self.lazy_initialization(key_states, value_states)
        start = self.owner.write_start
        end = start + key_states.shape[2]
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.write_start + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.write_start

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """A transformers `Cache` whose layers are `_SlotLayer`s sharing one write position."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.write_start = 0
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def gather(self, dst_start: int, src_slots: Tensor) -> None:  # src_slots: [a] int64
        """Copy the K/V at `src_slots` to the contiguous slots [dst_start, dst_start + a)."""
        a = src_slots.shape[0]
        with torch.inference_mode():  # the buffers were created under inference mode
            for layer in self.layers:
                if layer.is_initialized:
                    # index_select copies first, so overlapping source and destination are safe.
                    layer.keys[:, :, dst_start : dst_start + a] = layer.keys.index_select(2, src_slots)
                    layer.values[:, :, dst_start : dst_start + a] = layer.values.index_select(2, src_slots)


class HFLanguageModel:
    """A transformers causal LM behind the `LanguageModel` contract (batch 1, no forked modeling code)."""

    def __init__(self, model: "PreTrainedModel") -> None:
        self.model = model.eval()
        config = model.config.get_text_config(decoder=True)
        head = model.get_output_embeddings()
        self.vocab_size: int = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        self.context_length: int = int(getattr(config, "max_position_embeddings", 1 << 20))
        self.num_layers: int = config.num_hidden_layers
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.kv_len = 0
        self._cache = SlotCache(self.num_layers, capacity=0)
        self._block_start = 0  # slot of the first token of the last forward block
        self._block_len = 0

    # ---- sequence management -------------------------------------------------------------
    def reset(self, max_len: int) -> None:
        if max_len > self.context_length:
            raise ValueError(
                f"{max_len} tokens do not fit the model's context of {self.context_length} tokens; "
                "shorten the prompt or lower max-new-tokens"
            )
        if self._cache.capacity < max_len:
            self._cache = SlotCache(self.num_layers, capacity=max_len)
        self.kv_len = 0
        self._block_len = 0

    def forward(self, input_ids: Tensor, parents: Tensor | None = None, last_only: bool = False) -> Tensor:
        n = input_ids.shape[0]
        if self.kv_len + n > self._cache.capacity:
            raise ValueError(
                f"cache overflow: {self.kv_len} cached + {n} new tokens > capacity {self._cache.capacity}"
            )
        device = self.device
        input_ids = input_ids.to(device)
        if parents is None:
            parents = chain_parents(n, device=device)
        else:
            parents = parents.to(device)
        position_ids = (self.kv_len + depths(parents)).unsqueeze(0)  # [1, n]
        # Additive mask over [prefix | block]: the prefix is visible to all, inside the block a
        # token sees its ancestors and itself only (siblings and cousins stay hidden).
        visible = torch.ones(n, self.kv_len + n, dtype=torch.bool, device=device)
        visible[:, self.kv_len :] = ancestor_mask(parents)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        self._cache.write_start = self.kv_len
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.unsqueeze(0),
                attention_mask=mask[None, None],
                position_ids=position_ids,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1 if last_only else 0,
            )
        self._block_start, self._block_len = self.kv_len, n
        return out.logits[0]

    def commit(self, keep: Tensor | int) -> None:
        if isinstance(keep, int):
            if not 0 <= keep <= self._block_len:
                raise ValueError(f"cannot commit {keep} tokens of a block of {self._block_len}")
            self.kv_len = self._block_start + keep
        else:
            keep = keep.to(self.device)
            a = keep.shape[0]
            idx = torch.arange(a, device=self.device)
            if not bool((keep == idx).all()):  # already in place for a chain prefix
                self._cache.gather(self._block_start, self._block_start + keep)
            self.kv_len = self._block_start + a
        self._block_len = 0

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.kv_len:
            raise ValueError(f"cannot crop to {length}: only {self.kv_len} tokens are cached")
        self.kv_len = length
        self._block_len = 0

    def cached_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """K/V of the committed tokens of one layer ([1, H, kv_len, D] each), for tests and debugging."""
        lay = self._cache.layers[layer]
        return lay.keys[:, :, : self.kv_len], lay.values[:, :, : self.kv_len]
