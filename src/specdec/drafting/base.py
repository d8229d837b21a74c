"""The drafter protocol: everything the decoding engine reads from a drafter is declared here.

A drafter proposes a `TokenTree` below the pending root (a chain is a tree), names the exact rule
that verifies it, and is told what was committed so it can roll its own state back
(transformers' `update_candidate_strategy`; docs/algorithms.md §4).

A proposal is a coroutine (`Proposal`): it yields every draft-model forward pass it needs as a
`ModelCall`, receives that pass's logits, and returns the tree. Whoever drives it decides how the
passes run: `run_proposal` runs them one by one for a single sequence; the batch engine drives
every sequence's proposal in lockstep and runs each round's calls on one draft model as one
batched pass (docs/algorithms.md §4.10).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.models.base import LanguageModel
from specdec.models.batch import ModelCall
from specdec.verify.base import Verifier
from specdec.verify.match import verify_sample_and_match

Proposal = Generator[ModelCall, Tensor, TokenTree]
"""A proposal in progress: yields draft-model calls, is sent their logits, returns the tree."""


class Drafter(Protocol):
    verifier: Verifier
    """The exact rule for this drafter's proposals (it depends on how the children are drawn)."""
    max_depth: int
    """Deepest level a proposal can reach (acceptance statistics are kept per level)."""
    max_nodes: int
    """Most drafted nodes in one proposal: the target's block is at most 1 + max_nodes tokens."""
    draft_models: Sequence[LanguageModel]
    """The models whose forward passes the SWI cost model charges, largest first (none = free)."""

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        """Start a new sequence; `max_len` bounds prompt + generated tokens + the target's block."""

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        """A tree below the pending root `committed_ids[-1]` ([L] int64), at most `max_depth` levels deep.

        Every draft-model pass goes through a yielded `ModelCall` (never a direct forward), so a
        batch engine can share it with other sequences' passes; random draws use `generator` only.
        """

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        """`committed_ids` now ends with the accepted drafts and the recovered/bonus token."""

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        """The target's raw logits at every node of the tree it just scored ([N + 1, V]; row i follows
        node i's path), after verification: what the target itself would say there, for drafters
        that learn from it (Token Recycling). Called on every step, plain ones included (the tree
        is then the root alone). It may only change later proposals, so the step stays exact.
        """

    def forward_calls(self) -> list[int]:
        """Forward passes of each of `draft_models` since `begin` (for the SWI cost model)."""


def run_proposal(proposal: Proposal) -> TokenTree:
    """Drive one proposal alone: run each draft-model call as it comes; the tree it returns."""
    check_proposal(proposal)
    try:
        call = next(proposal)
        while True:
            call = proposal.send(call.run())
    except StopIteration as done:
        return done.value


def check_proposal(proposal: object) -> None:
    """TypeError unless `proposal` is a generator (a drafter written for the old, direct protocol
    returns its tree instead)."""
    if not isinstance(proposal, Generator):
        raise TypeError(
            f"a drafter's propose must return a Proposal (a generator), got {type(proposal).__name__}; a drafter "
            "without draft-model calls returns finished(tree) (specdec.drafting.base)"
        )


def finished(tree: TokenTree) -> Proposal:
    """A proposal that needs no draft-model call (model-free drafters, or nothing to draft)."""
    return tree
    yield  # unreachable; makes this function a generator


class ModelFreeDrafter:
    """The parts every drafter without a draft model shares: deterministic proposals (verified by
    sample-and-match, greedy at T = 0), free in the SWI cost model, and nothing to keep between steps
    unless a subclass says otherwise. Subclasses set `max_depth` and `max_nodes` and write `propose`."""

    verifier = staticmethod(verify_sample_and_match)
    draft_models: tuple[LanguageModel, ...] = ()
    max_depth: int
    max_nodes: int

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        pass

    def forward_calls(self) -> list[int]:
        return []

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        pass

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        pass  # learns nothing from the target's logits
