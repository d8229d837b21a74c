"""A transformers causal LM behind the `LanguageModel` contract (models/base.py), with a slot cache.

Because a node's position equals the position it would have if accepted, its K/V during a
tree pass are exactly the K/V plain decoding would compute, so accepted entries are moved,
never recomputed (docs/algorithms.md §4). The cache is preallocated once per sequence; slots
past the committed length are stale and hidden by the mask (never zeroed: a zero key still
counts in the softmax). No modeling code is forked: the model is driven through its 4D
attention mask, explicit position ids and transformers' `Cache` API.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.core.tree import ancestor_mask, chain_parents, depths, validate_parents
from specdec.models.native.attention import EXACT_ATTENTION

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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


def _check_supported(model: "PreTrainedModel", config) -> None:
    """Refuse models whose attention our explicit 4D mask cannot express correctly."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        layer_types = ["sliding_attention"]
    odd = sorted(set(layer_types) - {"full_attention"})
    if odd:
        raise ValueError(
            f"{type(model).__name__} uses {', '.join(odd)} layers; specdec's tree attention supports full-attention "
            "decoder layers only (a custom mask would silently ignore a sliding window)"
        )
    impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
    # specdec_sequential: `models.dense.invariance.sequential_attention` (row-invariant, for reduced precision).
    if impl not in ("sdpa", "eager", EXACT_ATTENTION, "specdec_sequential"):
        raise ValueError(f"attention implementation {impl!r} is not supported; load the model with sdpa or eager")


def commit_plan(keep: Tensor | int, pending: int, device: torch.device) -> tuple[int, Tensor | None]:
    """What committing `keep` of `pending` scored entries means for a slot cache: how many enter
    it, and the pending indices to gather into the next slots (None: already in place, a prefix).

    keep: a count (the first `keep` pending entries, a chain) or [A] indices in tree order.
    """
    if isinstance(keep, int):
        if not 0 <= keep <= pending:
            raise ValueError(f"cannot commit {keep} tokens of {pending} pending")
        return keep, None
    keep = keep.to(device)
    a = keep.shape[0]
    if a and (int(keep.max()) >= pending or int(keep.min()) < 0):
        raise ValueError(f"commit indices must lie in [0, {pending})")
    in_place = bool((keep == torch.arange(a, device=device)).all())
    return a, None if in_place else keep


class HFLanguageModel:
    """A transformers causal LM behind the `LanguageModel` contract (batch 1, no forked modeling code)."""

    def __init__(self, model: "PreTrainedModel") -> None:
        self.model = model.eval()
        config = model.config.get_text_config(decoder=True)
        head = model.get_output_embeddings()
        self.vocab_size: int = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        self.context_length: int = int(getattr(config, "max_position_embeddings", 1 << 20))
        self.num_layers: int = config.num_hidden_layers
        _check_supported(model, config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns, then goes away).
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.kv_len = 0
        self.offloaded = False  # set by models.dense.offload.offload_target
        self._cache = SlotCache(self.num_layers, capacity=0)
        # Parents (relative to the first pending slot) of the uncommitted tokens after the prefix.
        self._pending_parents = torch.empty(0, dtype=torch.long)  # CPU: topology only

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
        self._pending_parents = self._pending_parents[:0]

    def forward(
        self, input_ids: Tensor, parents: Tensor | None = None, last_only: bool = False, append: bool = False
    ) -> Tensor:
        n = input_ids.shape[0]
        device = self.device
        input_ids = input_ids.to(device)
        # The pending region holds uncommitted blocks; `append` grows it (a draft tree built level
        # by level), otherwise it restarts right after the committed prefix.
        prev = self._pending_parents if append else self._pending_parents[:0]
        n_prev = prev.shape[0]
        start = self.kv_len + n_prev
        if start + n > self._cache.capacity:
            raise ValueError(f"cache overflow: {start} cached + {n} new tokens > capacity {self._cache.capacity}")
        # Topology is tiny and lives on the CPU: validate it and derive positions and the mask
        # there, then move the results once (no per-round device syncs).
        if parents is None:  # a chain, continuing the pending region when appending
            parents = chain_parents(n) + n_prev
            if n_prev == 0:
                parents[0] = -1
        else:
            parents = parents.cpu()
        all_parents = torch.cat([prev, parents])
        validate_parents(all_parents)
        position_ids = (self.kv_len + depths(all_parents)[n_prev:]).unsqueeze(0).to(device)  # [1, n]
        # Additive mask over [prefix | pending region]: the prefix is visible to all; inside the
        # region a token sees its ancestors and itself only (siblings and cousins stay hidden).
        block_visible = ancestor_mask(all_parents)[n_prev:]  # [n, n_prev + n]
        if n == 1 and bool(block_visible.all()):
            # One token that sees everything the cache returns (right after the prefix, or at the
            # end of a pending chain): no mask, which lets sdpa take its grouped-query path
            # instead of copying K/V per query head.
            mask = None
        else:
            visible = torch.ones(n, start + n, dtype=torch.bool)
            visible[:, self.kv_len :] = block_visible
            mask = torch.zeros(visible.shape, dtype=self.dtype)
            mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
            mask = mask.to(device)[None, None]
        self._cache.write_start = start
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.unsqueeze(0),
                attention_mask=mask,
                position_ids=position_ids,
                **{self._cache_arg: self._cache},
                use_cache=True,
                logits_to_keep=1 if last_only else 0,
            )
        self._pending_parents = all_parents
        return out.logits[0]

    def commit(self, keep: Tensor | int) -> None:
        count, moved = commit_plan(keep, self._pending_parents.shape[0], self.device)
        if moved is not None:
            self._cache.gather(self.kv_len, self.kv_len + moved)
        self.kv_len += count
        self._pending_parents = self._pending_parents[:0]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.kv_len:
            raise ValueError(f"cannot crop to {length}: only {self.kv_len} tokens are cached")
        self.kv_len = length
        self._pending_parents = self._pending_parents[:0]

    def cached_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """K/V of the committed tokens of one layer ([1, H, kv_len, D] each), for tests and debugging."""
        lay = self._cache.layers[layer]
        return lay.keys[:, :, : self.kv_len], lay.values[:, :, : self.kv_len]
