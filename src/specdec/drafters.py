"""Drafters: cheap proposers of the next tokens, behind a two-method contract.

`propose(committed_ids, gamma, generator)` returns a `Proposal` of up to γ tokens following
the committed sequence (whose last token, the pending root, the target has not cached yet).
`observe(committed_ids, num_accepted)` reports the outcome so the drafter can roll its own
state back to what was actually committed (transformers' `update_candidate_strategy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.lm import LanguageModel
from specdec.sampling import SamplingConfig, logits_to_probs, sample


@dataclass(frozen=True)
class Proposal:
    tokens: Tensor  # [γ'] int64, γ' <= γ (0 when the drafter has nothing to offer)
    draft_probs: Tensor | None  # [γ', V] distribution each token was drawn from; None = deterministic


class Drafter(Protocol):
    has_draft_probs: bool
    """True when proposals carry the distribution they were sampled from (at T > 0)."""

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        """Start a new sequence; `max_len` bounds prompt + generated + drafted tokens."""

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> Proposal:
        """Up to `gamma` tokens continuing `committed_ids` ([L] int64)."""

    def observe(self, committed_ids: Tensor, num_accepted: int) -> None:
        """`committed_ids` now ends with the accepted drafts and the recovered/bonus token."""


class ModelDrafter:
    """A small causal LM drafting a chain autoregressively with its own KV cache.

    Drafts are drawn with the same sampling operator as the target (argmax at T = 0) and the
    distribution each was drawn from is returned, as speculative sampling requires
    (algorithms.md §9.1). The cache is fed every committed token it has not seen yet, so the
    bonus token and a fully accepted last draft are never missing from it (§1.3, §9.5).
    """

    has_draft_probs = True

    def __init__(self, model: LanguageModel, sampling: SamplingConfig) -> None:
        self.model = model
        self.sampling = sampling
        self._len_at_propose = 0
        self._gamma = 0

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.model.reset(max_len)

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> Proposal:
        self._len_at_propose, self._gamma = committed_ids.shape[0], gamma
        if gamma <= 0:
            return Proposal(committed_ids.new_empty(0), None)
        unseen = committed_ids[self.model.kv_len :]  # at least the pending root
        logits = self.model.forward(unseen, last_only=True)
        self.model.commit(unseen.shape[0])
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        for i in range(gamma):
            if self.sampling.greedy:
                token = logits[-1].argmax(-1, keepdim=True)
            else:
                dist = logits_to_probs(logits[-1], self.sampling)
                token = sample(dist, generator).view(1)
                probs.append(dist)
            tokens.append(token)
            if i < gamma - 1:  # the last draft is only cached if it gets accepted (next propose)
                logits = self.model.forward(token)
                self.model.commit(1)
        return Proposal(
            torch.cat(tokens).to(committed_ids.device),
            torch.stack(probs) if probs else None,
        )

    def observe(self, committed_ids: Tensor, num_accepted: int) -> None:
        # The cache holds the old committed tokens plus drafts 1..γ-1; of those drafts only the
        # accepted ones stay valid.
        valid = self._len_at_propose + min(num_accepted, max(self._gamma - 1, 0))
        if self.model.kv_len > valid:
            self.model.crop(valid)


class PromptLookupDrafter:
    """Prompt lookup decoding: copy what followed the latest earlier occurrence of the last n-gram.

    Tries n = max_ngram down to min_ngram over prompt + output and proposes the tokens that
    followed the most recent earlier match. No model and no distribution: proposals are
    deterministic, so sampled decoding verifies them by sample-and-match.
    """

    has_draft_probs = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        pass

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> Proposal:
        return Proposal(lookup_continuation(committed_ids, gamma, self.max_ngram, self.min_ngram), None)

    def observe(self, committed_ids: Tensor, num_accepted: int) -> None:
        pass


def lookup_continuation(
    ids: Tensor,  # [L] int64
    gamma: int,
    max_ngram: int,
    min_ngram: int = 1,
) -> Tensor:  # [<= γ] int64
    """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    length = ids.shape[0]
    if gamma <= 0:
        return ids.new_empty(0)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = ids[length - n :]
        # windows[i] = ids[i : i + n] for every start i that leaves at least one token after it.
        windows = ids[: length - 1].unfold(0, n, 1)  # [length - n, n]
        hits = (windows == suffix).all(-1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1].item()) + n
            return ids[start : start + gamma]
    return ids.new_empty(0)
