"""Falling back to plain decoding where drafting does not pay (`auto`'s drafter wrapper).

The tuner's winner pays on average, not on every prompt: on text the draft cannot guess, each
call still costs the drafting and the wider target pass while yielding about one token. The
wrapper keeps a running mean of the tokens per call its drafter's proposals earned; when it falls
below the break-even the tune measured (the winner's milliseconds per call over plain decoding's
milliseconds per token), it proposes nothing for `pause` calls — plain target steps — then drafts
again to see whether the text has changed.

Exactness: whether a step drafts depends only on earlier steps' outcomes, never on this step's
draws, so each step is either a plain target step or the inner drafter's proposal verified by the
inner drafter's own rule; both emit the target's distribution given the history
(docs/algorithms.md §2.8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.drafting.base import Drafter, Proposal, finished


class FallbackDrafter:
    """`inner` while its proposals earn at least `break_even` tokens per call, plain steps otherwise."""

    def __init__(self, inner: Drafter, break_even: float, window: int = 6, pause: int = 16,
                 smoothing: float = 0.3) -> None:
        if break_even <= 0 or window < 1 or pause < 1 or not 0 < smoothing <= 1:
            raise ValueError("break_even must be > 0, window and pause >= 1, smoothing in (0, 1]")
        self.inner = inner
        self.verifier = inner.verifier
        self.max_depth = inner.max_depth
        self.max_nodes = inner.max_nodes
        self.draft_models = inner.draft_models
        self.break_even = break_even
        self.window, self.pause, self.smoothing = window, pause, smoothing
        self.paused_steps = 0
        """Plain steps taken instead of drafting (since `begin`)."""
        self._mean: float | None = None
        self._seen = 0
        self._left = 0  # plain steps still to take
        self._drafted = False

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.inner.begin(prompt_ids, max_len)
        self._mean, self._seen, self._left, self._drafted = None, 0, 0, False
        self.paused_steps = 0

    def forward_calls(self) -> list[int]:
        return self.inner.forward_calls()

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        if self._left > 0:
            self._left -= 1
            self._drafted = False
            self.paused_steps += 1
            return finished(TokenTree.chain(int(committed_ids[-1]), committed_ids.new_empty(0)))
        self._drafted = True
        return self.inner.propose(committed_ids, max_depth, generator)

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        if not self._drafted:
            return  # a plain step: the inner drafter proposed nothing and catches up next time
        self.inner.observe(committed_ids, result)
        tokens = result.num_accepted + 1.0
        self._mean = tokens if self._mean is None else (1 - self.smoothing) * self._mean + self.smoothing * tokens
        self._seen += 1
        if self._seen >= self.window and self._mean < self.break_even:
            self._left, self._mean, self._seen = self.pause, None, 0

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        self.inner.observe_target(tree, target_logits)  # plain steps teach a learning drafter too
