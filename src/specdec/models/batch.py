"""Many sequences through one model: rows of a batched slot cache, and forward calls run together.

A *row* is one sequence's share of a batched model, handed out by `new_row()` as a `LanguageModel`
(models/base.py) of its own: drafters and the decoder drive a row exactly as they drive a
single-sequence model (reset, forward, commit by index, crop). What a batched model adds is that
the blocks of several rows can be scored in ONE forward pass (`run_calls`).

`BatchedHFModel` (transformers models) keeps one K/V buffer [rows, H, capacity, D] per layer. In a
batched pass the blocks are padded to the longest one and every row gets its own 4D additive mask
(its committed prefix, then its block's ancestors; padding and stale slots hidden, never zeroed),
its own positions (its kv_len + depth) and its own write slots, so each row computes what it would
compute alone (docs/algorithms.md §4.10). Commit gathers a row's accepted K/V inside that row.
Other models batch through `RowwiseModel` (independent copies, e.g. the exact toy model: no shared
pass, same contract) or `SerialModel` (one row at a time).

`ModelCall` is one forward a caller needs: a block (as `LanguageModel.forward` takes it) or a
*fill* — tokens to run after the committed prefix and commit at once (a prompt prefill, a draft
model's catch-up) — whose result is the logits after its last token.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.core.tree import ancestor_mask, chain_parents, depths, validate_parents
from specdec.models.base import LanguageModel, kept_token_ids
from specdec.models.hf import HFLanguageModel, commit_plan
from specdec.models.native.lm import NativeLM, block_plan, flat_visibility
from specdec.models.native.runner import widen
from specdec.models.toy import MarkovLM

PAD_SLACK = 64
"""Padding tokens a shared pass may waste before a group of blocks is split into two passes.

A pass costs a fixed weight-streaming part plus a part per token; splitting pays the fixed part
again, so small amounts of padding are cheaper than a second pass (see `pad_groups`)."""


@dataclass(frozen=True)
class ModelCall:
    """One forward pass a caller needs from a model (maybe batched with other rows' calls)."""

    lm: LanguageModel
    tokens: Tensor  # [n] int64
    parents: Tensor | None = None  # [n] int64 within the pending region (-1 = prefix); None = a chain
    last_only: bool = False
    append: bool = False
    fill: bool = False
    """Run `tokens` as a chain right after the committed prefix and commit them all; the result is
    the logits after the last one ([1, V], or [1, K] with `compact`). Callers may split a long fill
    into chunks (`dataclasses.replace`, so that the flags stay)."""
    compact: bool = False
    """On a model with a pruned head (`models.base.kept_token_ids`), return the kept tokens' logits
    only ([n, K]); other models ignore it."""

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def run(self) -> Tensor:
        """Run this call alone."""
        extra = {"compact": True} if self.compact and kept_token_ids(self.lm) is not None else {}
        if self.fill:
            logits = self.lm.forward(self.tokens, last_only=True, **extra)
            self.lm.commit(self.size)
            return logits
        return self.lm.forward(self.tokens, self.parents, last_only=self.last_only, append=self.append, **extra)


class RowView:
    """One row of a batched model, behind the single-sequence `LanguageModel` contract."""

    def __init__(self, owner: "BatchedHFModel | BatchedNativeModel", index: int) -> None:
        self.owner = owner
        self.index = index

    @property
    def vocab_size(self) -> int:
        return self.owner.vocab_size

    @property
    def context_length(self) -> int:
        return self.owner.context_length

    @property
    def device(self) -> torch.device:
        return self.owner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.owner.dtype

    @property
    def model(self) -> Any:
        """The owner's model (the SWI cost model counts its parameters)."""
        return self.owner.model

    @property
    def num_parameters(self) -> int | None:
        """The model's size where the owner states it (native models), for the SWI cost model."""
        return getattr(self.owner, "num_parameters", None)

    @property
    def kv_len(self) -> int:
        return self.owner.row_kv_len(self.index)

    def reset(self, max_len: int) -> None:
        self.owner.reserve(self.index, max_len)

    @property
    def kept_ids(self) -> Tensor | None:
        """The owner's pruned head's tokens (`models.base.kept_token_ids`)."""
        return self.owner.kept_ids

    def forward(
        self,
        input_ids: Tensor,  # [n] int64
        parents: Tensor | None = None,  # [n] int64 within the pending region; None = a chain
        last_only: bool = False,
        append: bool = False,
        compact: bool = False,  # a pruned head's kept logits only (`ModelCall.compact`)
    ) -> Tensor:  # [n, V] (or [1, V]); [.., K] with `compact` on a pruned native model
        return self.owner.forward_rows([ModelCall(self, input_ids, parents, last_only, append, compact=compact)])[0]

    def commit(self, keep: Tensor | int) -> None:
        self.owner.commit(self.index, keep)

    def crop(self, length: int) -> None:
        self.owner.crop(self.index, length)

    def cached_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """K/V of this row's committed tokens ([1, H, kv_len, D] each), for tests and debugging."""
        return self.owner.cached_kv(self.index, layer)


@dataclass
class _Row:
    kv_len: int = 0
    need: int = 0
    """Slots reserved by the last `reset` (prefix + generated tokens + any block)."""
    pending: Tensor | None = None  # [p] int64 parents of the uncommitted tokens after the prefix (CPU)


class _BatchLayer(CacheLayerMixin):
    """One layer's K/V for every row, written at explicit (row, slot) positions by `_BatchCache`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: "_BatchCache") -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.keys = key_states.new_zeros((0, key_states.shape[1], 0, key_states.shape[-1]))
        self.values = value_states.new_zeros((0, value_states.shape[1], 0, value_states.shape[-1]))
        self.is_initialized = True

    def resize(self, rows: int, capacity: int) -> None:
        """Reallocate to [rows, H, capacity, D], keeping what fits (stale slots stay stale)."""
        old_k, old_v = self.keys, self.values
        self.keys = old_k.new_zeros((rows, old_k.shape[1], capacity, old_k.shape[-1]))
        self.values = old_v.new_zeros((rows, old_v.shape[1], capacity, old_v.shape[-1]))
        r, c = min(rows, old_k.shape[0]), min(capacity, old_k.shape[2])
        self.keys[:r, :, :c] = old_k[:r, :, :c]
        self.values[:r, :, :c] = old_v[:r, :, :c]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        if self.keys.shape[0] != o.rows or self.keys.shape[2] != o.capacity:
            self.resize(o.rows, o.capacity)
        # Each row's block goes to its own slots: [B, H, n, D] -> rows × slots.
        self.keys[o.write_rows[:, None], :, o.write_slots] = key_states.transpose(1, 2)
        self.values[o.write_rows[:, None], :, o.write_slots] = value_states.transpose(1, 2)
        end = o.read_len
        if o.first_row is not None:  # the rows are consecutive: a view, no copy
            lo, hi = o.first_row, o.first_row + key_states.shape[0]
            return self.keys[lo:hi, :, :end], self.values[lo:hi, :, :end]
        return self.keys[:, :, :end].index_select(0, o.write_rows), self.values[:, :, :end].index_select(0, o.write_rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.read_len, 0

    def get_seq_length(self) -> int:
        return self.owner.read_len - self.owner.query_len

    def get_max_length(self) -> int:
        return self.owner.capacity


class _BatchCache(Cache):
    """A transformers `Cache` whose layers are `_BatchLayer`s sharing one write plan per pass."""

    def __init__(self, num_layers: int) -> None:
        self.rows = 0
        self.capacity = 0
        self.write_rows = torch.empty(0, dtype=torch.long)  # [B] row of each block
        self.write_slots = torch.empty(0, 0, dtype=torch.long)  # [B, n] slot of each block token
        self.first_row: int | None = None  # set when the rows are first_row, first_row + 1, …
        self.read_len = 0  # slots [0, read_len) of each row are attention's keys
        self.query_len = 0
        super().__init__(layers=[_BatchLayer(self) for _ in range(num_layers)])

    def gather(self, row: int, dst_start: int, src_slots: Tensor) -> None:  # src_slots: [a] int64
        """Copy one row's K/V at `src_slots` to its contiguous slots [dst_start, dst_start + a)."""
        a = src_slots.shape[0]
        with torch.inference_mode():  # the buffers were created under inference mode
            for layer in self.layers:
                if layer.is_initialized and layer.keys.shape[0] > row:
                    # index_select copies first, so overlapping source and destination are safe.
                    layer.keys[row, :, dst_start : dst_start + a] = layer.keys[row].index_select(1, src_slots)
                    layer.values[row, :, dst_start : dst_start + a] = layer.values[row].index_select(1, src_slots)

    def resize_all(self, rows: int, capacity: int) -> None:
        self.rows, self.capacity = rows, capacity
        with torch.inference_mode():
            for layer in self.layers:
                if layer.is_initialized:
                    layer.resize(rows, capacity)


def _logits_index_supported() -> bool:
    # transformers keeps per-row positions (a 2-D bool `logits_to_keep`) since 5.x; older versions
    # compute every position's logits instead.
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    return "bool" in inspect.getsource(slice_logits_to_keep)


class _RowPool:
    """The rows of a batched model: handed out lowest-index first and freed at once (so a continuous
    batch keeps them dense), their reservations, commits and crops. The cache itself is the
    subclass's (`_cache_shape`, `_resize`, `_gather`).

    The buffers are sized to what the rows in use need (rows × the longest reservation) and resized
    when that changes: `slots_if_added` tells a scheduler what admitting one more sequence would cost.
    """

    pads = True
    """Whether a shared pass pads every block to the longest (`run_calls` then groups blocks)."""
    exact_prefixes = False
    """Whether a token's K/V are the same bits however its prefix was computed, so that a prefix's
    K/V may be copied between rows (`models.prefix`): native rows only."""
    kept_ids: Tensor | None = None
    """The tokens a pruned head computes (`models.base.kept_token_ids`): native models only."""

    def __init__(self, vocab_size: int, context_length: int, device: torch.device, dtype: torch.dtype,
                 max_rows: int | None) -> None:
        self.vocab_size, self.context_length = vocab_size, context_length
        self.device, self.dtype = device, dtype
        self.max_rows = max_rows
        self._rows: list[_Row | None] = []

    def _cache_shape(self) -> tuple[int, int]:  # (rows, capacity) of the buffers now
        raise NotImplementedError

    def _resize(self, rows: int, capacity: int) -> None:
        raise NotImplementedError

    def _gather(self, index: int, dst: int, src: Tensor) -> None:  # row `index`: slots dst + i <- src[i]
        raise NotImplementedError

    # ---- rows ---------------------------------------------------------------------------------
    def new_row(self) -> RowView:
        free = [i for i, r in enumerate(self._rows) if r is None]
        if not free and self.max_rows is not None and len(self._rows) >= self.max_rows:
            raise ValueError(f"all {self.max_rows} rows of the batched model are in use")
        index = free[0] if free else len(self._rows)
        if index == len(self._rows):
            self._rows.append(None)
        self._rows[index] = _Row(pending=torch.empty(0, dtype=torch.long))
        return RowView(self, index)  # type: ignore[arg-type]

    def release(self, row: LanguageModel) -> None:
        assert isinstance(row, RowView) and row.owner is self
        self._rows[row.index] = None
        while self._rows and self._rows[-1] is None:
            self._rows.pop()
        if not self._rows:  # idle: give the memory back
            self._resize(0, 0)

    def rows_in_use(self) -> int:
        return sum(r is not None for r in self._rows)

    def slots_in_use(self) -> int:
        """K/V slots per layer (rows × capacity) the rows in use reserve."""
        needs = [r.need for r in self._rows if r is not None]
        return len(self._rows) * max(needs) if needs else 0

    def slots_if_added(self, need: int) -> int:
        """K/V slots per layer (rows × capacity) the buffers hold once a row reserving `need` joins."""
        free = [i for i, r in enumerate(self._rows) if r is None]
        rows = len(self._rows) + (0 if free else 1)
        return rows * max([need] + [r.need for r in self._rows if r is not None])

    def _fit(self, read_len: int) -> None:
        """Size the buffers to the rows in use: grown to exactly what they need (so a scheduler's
        `slots_if_added` budget holds), shrunk once they hold more than twice that."""
        rows = len(self._rows)
        capacity = max([read_len] + [r.need for r in self._rows if r is not None])
        have_rows, have_cap = self._cache_shape()
        if have_rows < rows or have_cap < capacity or have_rows * have_cap > 2 * rows * capacity:
            # Rounded up a little, so a pass whose padding reaches past the reservations does not
            # resize the buffers again on the next step.
            self._resize(rows, -(-capacity // 64) * 64)

    def _row(self, index: int) -> _Row:
        row = self._rows[index] if index < len(self._rows) else None
        if row is None:
            raise ValueError(f"row {index} of the batched model is not in use")
        return row

    def row_kv_len(self, index: int) -> int:
        return self._row(index).kv_len

    def reserve(self, index: int, max_len: int) -> None:
        """Start a new sequence in row `index` with room for `max_len` tokens (`LanguageModel.reset`)."""
        if max_len > self.context_length:
            raise ValueError(
                f"{max_len} tokens do not fit the model's context of {self.context_length} tokens; "
                "shorten the prompt or lower max-new-tokens"
            )
        row = self._row(index)
        row.kv_len, row.need, row.pending = 0, max_len, torch.empty(0, dtype=torch.long)

    # ---- per-row commit and crop ------------------------------------------------------------------
    def commit(self, index: int, keep: Tensor | int) -> None:
        row = self._row(index)
        assert row.pending is not None
        count, moved = commit_plan(keep, row.pending.shape[0], self.device)
        if moved is not None:
            self._gather(index, row.kv_len, row.kv_len + moved)
        row.kv_len += count
        row.pending = row.pending[:0]

    def crop(self, index: int, length: int) -> None:
        row = self._row(index)
        if not 0 <= length <= row.kv_len:
            raise ValueError(f"cannot crop to {length}: only {row.kv_len} tokens are cached")
        assert row.pending is not None
        row.kv_len = length
        row.pending = row.pending[:0]


class BatchedHFModel(_RowPool):
    """A transformers causal LM serving many sequences (rows) from one batched slot cache."""

    def __init__(self, lm: HFLanguageModel, max_rows: int | None = None) -> None:
        super().__init__(lm.vocab_size, lm.context_length, lm.device, lm.dtype, max_rows)
        self.base = lm
        self.model = lm.model
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._cache = _BatchCache(lm.num_layers)
        self._index_logits = _logits_index_supported()

    def _cache_shape(self) -> tuple[int, int]:
        return self._cache.rows, self._cache.capacity

    def _resize(self, rows: int, capacity: int) -> None:
        self._cache.resize_all(rows, capacity)

    def _gather(self, index: int, dst: int, src: Tensor) -> None:
        self._cache.gather(index, dst, src)

    # ---- one batched pass ------------------------------------------------------------------------
    def forward_rows(self, calls: Sequence[ModelCall]) -> list[Tensor]:
        """Score the blocks of distinct rows in one pass: the logits each row's call asks for.

        Fills are not committed here (`run_calls` does that); each call is checked as
        `LanguageModel.forward` checks it.
        """
        if not calls:
            return []
        order = sorted(range(len(calls)), key=lambda i: calls[i].lm.index)  # type: ignore[attr-defined]
        calls = [calls[i] for i in order]
        index = [c.lm.index for c in calls]  # type: ignore[attr-defined]
        if len(set(index)) != len(index):
            raise ValueError("one batched pass takes at most one block per row")
        rows = [self._row(i) for i in index]
        plans = [self._plan(call, row) for call, row in zip(calls, rows)]
        read_len = max(start for _, _, start in plans) + max(c.size for c in calls)  # every padded block fits
        self._fit(read_len)
        input_ids, position_ids, mask, keep = self._padded_inputs(calls, rows, plans, read_len, index)
        sparse = self._index_logits and not bool(keep.all())
        device = self.device
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device)[:, None],
                position_ids=position_ids.to(device), **{self._cache_arg: self._cache}, use_cache=True,
                logits_to_keep=keep.to(device) if sparse else 0,
            )
        logits = out.logits  # [B, n_max, V], or [kept, V] when only some positions were kept
        results: list[Tensor] = []
        offset = 0
        for j, (row, (all_parents, _, _)) in enumerate(zip(rows, plans)):
            row.pending = all_parents
            kept = int(keep[j].sum())
            results.append(logits[offset : offset + kept] if sparse else logits[j, keep[j].to(logits.device)])
            offset += kept
        back = [torch.empty(0)] * len(results)
        for pos, i in enumerate(order):
            back[i] = results[pos]
        return back

    @staticmethod
    def _plan(call: ModelCall, row: _Row) -> tuple[Tensor, int, int]:
        """(every pending parent after the block, pending count before it, first write slot) of a call."""
        assert row.pending is not None
        if call.size < 1:
            raise ValueError("every block needs at least one token")
        prev = row.pending if call.append and not call.fill else row.pending[:0]
        n_prev = prev.shape[0]
        if call.parents is None or call.fill:
            parents = chain_parents(call.size) + n_prev
            if n_prev == 0:
                parents[0] = -1
        else:
            parents = call.parents.cpu()
            if parents.shape != call.tokens.shape:
                raise ValueError("parents and tokens must have the same length")
        all_parents = torch.cat([prev, parents])
        validate_parents(all_parents)
        start = row.kv_len + n_prev
        if start + call.size > max(row.need, 1):
            raise ValueError(f"cache overflow: {start} cached + {call.size} new tokens > capacity {row.need}")
        return all_parents, n_prev, start

    def _padded_inputs(self, calls: Sequence[ModelCall], rows: list[_Row], plans: list, read_len: int,
                       index: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Ids, positions, the additive mask [B, n_max, read_len] and the kept positions of one padded
        pass; sets the cache's write plan."""
        b, n_max = len(calls), max(c.size for c in calls)
        input_ids = torch.zeros(b, n_max, dtype=torch.long)
        position_ids = torch.zeros(b, n_max, dtype=torch.long)
        write_slots = torch.zeros(b, n_max, dtype=torch.long)
        visible = torch.zeros(b, n_max, read_len, dtype=torch.bool)
        keep = torch.zeros(b, n_max, dtype=torch.bool)  # positions whose logits are returned
        steps = torch.arange(n_max)
        for j, (call, row, (all_parents, n_prev, start)) in enumerate(zip(calls, rows, plans)):
            n = call.size
            input_ids[j, :n] = call.tokens.cpu()
            position_ids[j, :n] = row.kv_len + depths(all_parents)[n_prev:]
            position_ids[j, n:] = row.kv_len
            write_slots[j] = start + steps
            # The prefix is visible to the whole block; inside the pending region a token sees its
            # ancestors and itself only. Padding queries see only their own slot (their output is
            # dropped; a row of nothing but masked keys would be 0/0 in some kernels).
            visible[j, :n, : row.kv_len] = True
            visible[j, :n, row.kv_len : start + n] = ancestor_mask(all_parents)[n_prev:]
            visible[j, steps[n:], start + steps[n:]] = True
            if call.last_only or call.fill:
                keep[j, n - 1] = True
            else:
                keep[j, :n] = True
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, torch.finfo(self.dtype).min)
        cache = self._cache
        cache.write_rows = torch.tensor(index, dtype=torch.long, device=self.device)
        cache.write_slots = write_slots.to(self.device)
        cache.first_row = index[0] if index == list(range(index[0], index[0] + b)) else None
        cache.read_len, cache.query_len = read_len, n_max
        return input_ids, position_ids, mask, keep

    def cached_kv(self, index: int, layer: int) -> tuple[Tensor, Tensor]:
        n = self._row(index).kv_len
        lay = self._cache.layers[layer]
        return lay.keys[index : index + 1, :, :n], lay.values[index : index + 1, :, :n]


class BatchedNativeModel(_RowPool):
    """A `NativeModel` serving many sequences (rows) from one float16 cache [rows, …, capacity, …].

    The blocks of several rows go through one pass as one flat list of tokens, each with its row,
    position, write slot and visible slots (`native.lm.block_plan`), so nothing is padded: every
    token is computed exactly as it would be in its row's own pass.
    """

    pads = False
    exact_prefixes = True

    def __init__(self, lm: NativeLM, max_rows: int | None = None) -> None:
        super().__init__(lm.vocab_size, lm.context_length, lm.device, lm.dtype, max_rows)
        self.base = lm
        self.model = lm.model
        self.num_parameters = lm.num_parameters
        self.kept_ids = lm.kept_ids
        self._cache = lm.model.new_cache(0, 0)

    def _cache_shape(self) -> tuple[int, int]:
        return self._cache.rows, self._cache.capacity

    def _resize(self, rows: int, capacity: int) -> None:
        self._cache.resize(rows, capacity)

    def _gather(self, index: int, dst: int, src: Tensor) -> None:
        self._cache.gather(index, dst, src.cpu())

    def forward_rows(self, calls: Sequence[ModelCall]) -> list[Tensor]:
        """Score the blocks of distinct rows in one pass: the logits each call asks for (fills are not
        committed here; `run_calls` does that)."""
        if not calls:
            return []
        index = [c.lm.index for c in calls]  # type: ignore[attr-defined]
        if len(set(index)) != len(index):
            raise ValueError("one batched pass takes at most one block per row")
        rows = [self._row(i) for i in index]
        plans = []
        for call, row in zip(calls, rows):
            assert row.pending is not None
            if call.size < 1:
                raise ValueError("every block needs at least one token")
            plan = block_plan(row.kv_len, row.pending, None if call.fill else call.parents, call.size,
                              call.append and not call.fill)
            if int(plan.slots[-1]) >= max(row.need, 1):
                raise ValueError(f"cache overflow: {int(plan.slots[0])} cached + {call.size} new tokens > capacity "
                                 f"{row.need}")
            plans.append(plan)
        self._fit(max(int(p.slots[-1]) + 1 for p in plans))
        sizes = [c.size for c in calls]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        keep = torch.cat([torch.tensor([st + n - 1]) if c.last_only or c.fill else st + torch.arange(n)
                          for c, st, n in zip(calls, starts, sizes)])
        vis, offsets = flat_visibility([v for p in plans for v in p.vis])
        with torch.inference_mode():
            logits = self.model.forward(
                torch.cat([c.tokens.cpu().to(torch.long) for c in calls]).contiguous(),
                torch.cat([p.positions for p in plans]), self._cache, torch.cat([p.slots for p in plans]),
                torch.cat([p.prefix for p in plans]), vis, offsets, keep,
                torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in zip(index, sizes)]),
                compact=self.kept_ids is not None,
            )
        out, at = [], 0
        for call, row, plan in zip(calls, rows, plans):
            row.pending = plan.all_parents
            kept = 1 if call.last_only or call.fill else call.size
            part = logits[at : at + kept]
            wide = self.kept_ids is not None and not call.compact
            out.append(widen(part, self.kept_ids, self.vocab_size) if wide else part)
            at += kept
        return out

    def read_slots(self, index: int, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Copies of row `index`'s K/V at slots [start, end) (`runner.KVCache.read`), for the prefix cache."""
        return self._cache.read(index, start, end)

    def load_prefix(self, index: int, keys: Tensor, values: Tensor) -> None:
        """Start row `index` (reserved, nothing cached yet) with n committed tokens whose K/V are given
        (keys [L, Hkv, d, n], values [L, Hkv, n, d]): what a fill of those tokens would have cached."""
        row = self._row(index)
        n = keys.shape[-1]
        assert row.pending is not None
        if row.kv_len or row.pending.numel() or n > row.need:
            raise ValueError(f"a prefix of {n} tokens goes only into an empty row with room for it")
        self._fit(n)
        self._cache.write(index, 0, keys, values)
        row.kv_len = n

    def cached_kv(self, index: int, layer: int) -> tuple[Tensor, Tensor]:
        n = self._row(index).kv_len
        kt, vc = self._cache.kt[layer][index : index + 1], self._cache.vc[layer][index : index + 1]
        return kt[:, :, :, :n].transpose(-1, -2), vc[:, :, :n]


class RowwiseModel:
    """Rows as independent single-sequence models made by `factory` (no shared pass, same contract).

    For models whose copies are cheap and whose per-sequence arithmetic should stay exactly that of
    one sequence: the toy Markov model of the sampling tests.
    """

    def __init__(self, factory: Callable[[], LanguageModel], max_rows: int | None = None) -> None:
        self.factory = factory
        self.max_rows = max_rows
        self._in_use: list[Any] = []
        probe = factory()
        self.vocab_size, self.context_length = probe.vocab_size, probe.context_length

    def new_row(self) -> LanguageModel:
        if self.max_rows is not None and len(self._in_use) >= self.max_rows:
            raise ValueError(f"all {self.max_rows} rows are in use")
        row = self.factory()
        self._in_use.append(row)
        return row

    def release(self, row: LanguageModel) -> None:
        self._in_use = [r for r in self._in_use if r is not row]

    def rows_in_use(self) -> int:
        return len(self._in_use)

    def slots_if_added(self, need: int) -> int:
        return need * (len(self._in_use) + 1)

    def slots_in_use(self) -> int:
        return sum(getattr(row, "kv_len", 0) for row in self._in_use)


class SerialModel:
    """Any `LanguageModel` as a batched model of one row (it has one cache): sequences take turns."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.max_rows = 1
        self.vocab_size, self.context_length = lm.vocab_size, lm.context_length
        self._busy = False

    def new_row(self) -> LanguageModel:
        if self._busy:
            raise ValueError("this model serves one sequence at a time")
        self._busy = True
        return self.lm

    def release(self, row: LanguageModel) -> None:
        self._busy = False

    def rows_in_use(self) -> int:
        return int(self._busy)

    def slots_if_added(self, need: int) -> int:
        return need

    def slots_in_use(self) -> int:
        return self.lm.kv_len if self._busy else 0


BatchedModel = BatchedHFModel | BatchedNativeModel | RowwiseModel | SerialModel


def batched_model(lm: LanguageModel, max_rows: int | None = None) -> BatchedModel:
    """The batched form of a loaded model: transformers and native models share passes; the toy
    Markov model gets independent rows; anything else serves one sequence at a time."""
    if isinstance(lm, HFLanguageModel):
        return BatchedHFModel(lm, max_rows)
    if isinstance(lm, NativeLM):
        return BatchedNativeModel(lm, max_rows)
    if isinstance(lm, MarkovLM):
        def fresh() -> MarkovLM:
            row = MarkovLM(lm.table, lm.context_length)
            if hasattr(lm, "num_parameters"):  # tests state a size for the SWI cost model
                row.num_parameters = lm.num_parameters  # type: ignore[attr-defined]
            return row
        return RowwiseModel(fresh, max_rows)
    return SerialModel(lm)


# ---- running calls -------------------------------------------------------------------------------
def pad_groups(sizes: Sequence[int], slack: int = PAD_SLACK) -> list[list[int]]:
    """Split blocks into passes: indices of `sizes` per group, longest first.

    A block joins the current group while the padding it would cause (every block padded to the
    group's longest) stays within max(slack, half the group's real tokens): a little padding is
    cheaper than another pass over the weights, a lot is not.
    """
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            group = groups[-1]
            longest = sizes[group[0]]
            useful = sum(sizes[g] for g in group) + sizes[i]
            if longest * (len(group) + 1) - useful <= max(slack, useful // 2):
                group.append(i)
                continue
        groups.append([i])
    return groups


def run_calls(calls: Sequence[ModelCall]) -> list[Tensor]:
    """Run forward calls, one padded pass per batched model and group (`pad_groups`); calls on
    other models run one by one. Fills are committed. Results come back in the calls' order.

    Each row takes at most one call per `run_calls` (a batch engine drives every sequence one call
    at a time); `forward_rows` refuses a row twice.
    """
    results: list[Tensor | None] = [None] * len(calls)
    shared: dict[int, list[int]] = {}
    owners: dict[int, BatchedHFModel | BatchedNativeModel] = {}
    for i, call in enumerate(calls):
        if isinstance(call.lm, RowView):
            owners[id(call.lm.owner)] = call.lm.owner
            shared.setdefault(id(call.lm.owner), []).append(i)
        else:
            results[i] = call.run()
    for key, idx in shared.items():
        sizes = [calls[i].size for i in idx]
        for group in pad_groups(sizes) if owners[key].pads else [list(range(len(idx)))]:
            members = [idx[g] for g in group]
            outs = owners[key].forward_rows([calls[i] for i in members])
            for i, out in zip(members, outs):
                if calls[i].fill:
                    calls[i].lm.commit(calls[i].size)
                results[i] = out
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
