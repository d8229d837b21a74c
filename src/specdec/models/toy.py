"""Toy language models with exactly known distributions, for tests and demonstrations.

`MarkovLM` is a second-order Markov table behind the full `LanguageModel` contract (blocks,
trees, commit by index, crop), so the real decoding loop runs on it unchanged while every
sequence probability can be computed exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.sampling import SamplingConfig, logits_to_probs


class MarkovLM:
    """logits(next | …, a, b) = table[a, b]: the next token depends on the last two tokens."""

    def __init__(self, table: Tensor, context_length: int = 4096) -> None:  # table: [V, V, V] logits
        if table.dim() != 3 or not (table.shape[0] == table.shape[1] == table.shape[2]):
            raise ValueError("table must have shape [V, V, V]")
        self.table = table
        self.vocab_size = table.shape[-1]
        self.context_length = context_length
        self.device = table.device
        self.dtype = table.dtype
        self.kv_len = 0
        self.calls = 0
        self._tokens: list[int] = []
        self._pending: list[int] = []  # uncommitted tokens after the prefix
        self._pending_parents: list[int] = []

    @classmethod
    def random(cls, vocab_size: int, seed: int, sharpness: float = 1.0, dtype=torch.float64) -> "MarkovLM":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(vocab_size, vocab_size, vocab_size, generator=g, dtype=dtype) * sharpness)

    def reset(self, max_len: int) -> None:
        if max_len > self.context_length:
            raise ValueError(f"{max_len} tokens exceed the context of {self.context_length}")
        self.kv_len = 0
        self._tokens = []
        self._pending, self._pending_parents = [], []

    def forward(
        self, input_ids: Tensor, parents: Tensor | None = None, last_only: bool = False, append: bool = False
    ) -> Tensor:
        n = input_ids.shape[0]
        prev_tokens = self._pending if append else []
        prev_parents = self._pending_parents if append else []
        if parents is None:
            first = len(prev_tokens) - 1 if prev_tokens else -1
            plist = [first] + list(range(len(prev_tokens), len(prev_tokens) + n - 1))
        else:
            plist = parents.tolist()
        tokens = prev_tokens + input_ids.tolist()
        last_committed = self._tokens[-1] if self._tokens else 0
        before = [tokens[p] if p >= 0 else last_committed for p in plist]  # the token each node follows
        logits = self.table[torch.tensor(before), input_ids.cpu()]  # [n, V]
        self.calls += 1
        self._pending, self._pending_parents = tokens, prev_parents + plist
        return logits[-1:] if last_only else logits

    def commit(self, keep: Tensor | int) -> None:
        kept = self._pending[:keep] if isinstance(keep, int) else [self._pending[i] for i in keep.tolist()]
        self._tokens.extend(kept)
        self.kv_len = len(self._tokens)
        self._pending, self._pending_parents = [], []

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.kv_len:
            raise ValueError(f"cannot crop to {length}")
        del self._tokens[length:]
        self.kv_len = length
        self._pending, self._pending_parents = [], []

    def next_probs(self, a: int, b: int, sampling: SamplingConfig) -> Tensor:  # [V]
        """The processed distribution of the token after (…, a, b)."""
        return logits_to_probs(self.table[a, b], sampling)
