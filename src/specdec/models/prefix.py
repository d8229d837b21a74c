"""A prefix cache: K/V of token prefixes kept across sequences (system prompts, conversation history),
copied into a new sequence's row instead of being computed again.

Prefixes are stored in blocks of `BLOCK` tokens, each keyed by its parent block and its own token ids
(the key holds the ids themselves, so a hit is an exact match, never a hash collision). A lookup
walks the chain of blocks matching a sequence's tokens from the start and returns the longest
stored prefix; eviction drops the least recently used blocks that no other block extends until the
cache fits its byte budget.

Reusing K/V is exact only where a token's K/V are the same bits however they were computed: on the
native rows (`BatchedNativeModel`), every token is computed alike whether its prefix ran in one pass,
in chunks, inside a tree or alone (docs/algorithms.md §15.4), so the copied K/V equal recomputed
ones bit for bit. Dense transformers rows compute a token's K/V in padded passes whose shape changes
its round-off, so they keep no prefix cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 32
"""Tokens per stored block: a prefix is reused up to its last whole block."""


@dataclass(eq=False)
class _Block:
    key: tuple[int, int, bytes]  # (model, parent block id, token ids)
    id: int
    keys: Tensor  # [L, Hkv, d, BLOCK]
    values: Tensor  # [L, Hkv, BLOCK, d]
    children: int = 0

    @property
    def nbytes(self) -> int:
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()


class PrefixCache:
    """Blocks of K/V by token prefix, for any number of models, within one byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.bytes = 0
        self._blocks: OrderedDict[tuple[int, int, bytes], _Block] = OrderedDict()  # least recently used first
        self._by_id: dict[int, _Block] = {}
        self._next_id = 1
        self.hits = 0
        """Tokens whose K/V were copied instead of computed, since the start."""
        self.queries = 0
        """Tokens looked up, since the start."""

    def __len__(self) -> int:
        return len(self._blocks)

    @staticmethod
    def _ids(tokens: Tensor) -> list[bytes]:  # tokens [n] -> one key part per whole block
        raw = tokens[: tokens.shape[0] // BLOCK * BLOCK].to(torch.int64).contiguous().numpy().tobytes()
        size = BLOCK * 8
        return [raw[i : i + size] for i in range(0, len(raw), size)]

    def lookup(self, model: int, tokens: Tensor, limit: int) -> list[_Block]:
        """The stored blocks of the longest prefix of `tokens` (at most `limit` tokens) for `model`."""
        found: list[_Block] = []
        parent = 0
        for part in self._ids(tokens[:limit]):
            block = self._blocks.get((model, parent, part))
            if block is None:
                break
            self._blocks.move_to_end(block.key)
            found.append(block)
            parent = block.id
        return found

    def count(self, hit_tokens: int, query_tokens: int) -> None:
        self.hits += hit_tokens
        self.queries += query_tokens

    def insert(self, model: int, tokens: Tensor, read: Callable[[int, int], tuple[Tensor, Tensor]]) -> int:
        """Store the whole blocks of `tokens`, whose K/V `read(start, end)` copies out of a row
        (only the blocks not stored yet are read); the blocks stored anew."""
        if self.budget <= 0:
            return 0
        parts = self._ids(tokens)
        parent, start, added = 0, 0, 0
        for part in parts:  # the blocks stored already (their recency refreshed)
            block = self._blocks.get((model, parent, part))
            if block is None:
                break
            self._blocks.move_to_end(block.key)
            parent, start = block.id, start + 1
        if start == len(parts):
            return 0
        keys, values = read(start * BLOCK, len(parts) * BLOCK)
        for j, part in enumerate(parts[start:]):
            k = keys[..., j * BLOCK : (j + 1) * BLOCK].clone()
            v = values[..., j * BLOCK : (j + 1) * BLOCK, :].clone()
            block = _Block((model, parent, part), self._next_id, k, v)
            self._next_id += 1
            if parent:
                self._by_id[parent].children += 1
            self._blocks[block.key] = block
            self._by_id[block.id] = block
            self.bytes += block.nbytes
            parent, added = block.id, added + 1
        self._evict()
        return added

    def _evict(self) -> None:
        while self.bytes > self.budget:
            leaf = next((b for b in self._blocks.values() if b.children == 0), None)
            if leaf is None:
                return
            del self._blocks[leaf.key]
            del self._by_id[leaf.id]
            self.bytes -= leaf.nbytes
            if leaf.key[1]:
                self._by_id[leaf.key[1]].children -= 1

    @staticmethod
    def join(blocks: list[_Block]) -> tuple[Tensor, Tensor]:
        """The blocks' K/V one after the other: keys [L, Hkv, d, n], values [L, Hkv, n, d]."""
        return torch.cat([b.keys for b in blocks], dim=-1), torch.cat([b.values for b in blocks], dim=-2)
