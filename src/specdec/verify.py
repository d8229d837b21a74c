"""Verifiers: pure tensor functions that decide which drafted tokens the target keeps.

Vocabulary (as in vLLM's rejection sampler): of the drafted tokens, the verified prefix is
*accepted*; then exactly one more token comes from the target — the *recovered* token after a
rejection (drawn from the residual), or the *bonus* token when every draft was accepted.
Output tokens = accepted + one recovered-or-bonus token, so each target call emits >= 1.

Each rule is exact only with its matching draft sampler (algorithms.md §1.2):
- `verify_greedy`: temperature 0, any drafter; equals AR greedy token for token.
- `verify_speculative_sampling`: drafts drawn from `draft_probs` (Leviathan/Chen).
- `verify_sample_and_match`: deterministic drafters with no distribution (prompt lookup).

Inputs describe a chain of γ drafted tokens; `target_probs` has γ + 1 rows: row i is the
target's distribution after the root and the first i drafts (row γ gives the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.sampling import residual, sample


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int
    """How many drafted tokens were accepted (a prefix of the chain)."""
    next_token: int
    """The recovered token (after a rejection) or the bonus token (all accepted)."""


class Verifier(Protocol):
    def __call__(
        self,
        draft_tokens: Tensor,  # [γ] int64
        draft_probs: Tensor | None,  # [γ, V] distribution each draft was sampled from; None = deterministic drafter
        target_probs: Tensor,  # [γ + 1, V]
        generator: torch.Generator | None,
    ) -> VerifyResult: ...


def _accepted_prefix(accept: Tensor) -> int:  # accept: [γ] bool
    """Length of the leading run of True (one host sync)."""
    if accept.numel() == 0:
        return 0
    return int(accept.long().cumprod(0).sum().item())


def verify_greedy(
    draft_tokens: Tensor,  # [γ] int64
    draft_probs: Tensor | None,  # unused: greedy needs no draft distribution
    target_probs: Tensor,  # [γ + 1, V] (logits work too: only the argmax is read)
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Accept drafts while they equal the target argmax; emit the argmax at the first mismatch."""
    target_argmax = target_probs.argmax(-1)  # [γ + 1]
    n = _accepted_prefix(draft_tokens.to(target_argmax.device) == target_argmax[:-1])
    return VerifyResult(n, int(target_argmax[n].item()))


def acceptance_probability(
    draft_tokens: Tensor,  # [γ] int64
    draft_probs: Tensor,  # [γ, V]
    target_probs: Tensor,  # [≥ γ, V]
) -> Tensor:  # [γ]: min(1, target(x_i) / draft(x_i))
    """Probability of accepting each drafted token, given that it was drawn from `draft_probs`."""
    rows = torch.arange(draft_tokens.shape[0], device=target_probs.device)
    target_p = target_probs[rows, draft_tokens]
    draft_p = draft_probs[rows, draft_tokens].to(target_probs.dtype)
    # draft_p > 0 always holds for a drawn token; the guard keeps a bad caller from accepting
    # a token it could not have drawn instead of dividing by zero.
    return torch.where(draft_p > 0, (target_p / draft_p.clamp_min(1e-300)).clamp_max(1.0), 0.0)


def recovery_distribution(
    target_row: Tensor,  # [V] target distribution at the rejected position
    draft_row: Tensor,  # [V] draft distribution the rejected token was drawn from
) -> Tensor:  # [V]
    """Where the recovered token comes from after a rejection: norm(max(target − draft, 0))."""
    return residual(target_row, draft_row.to(target_row.dtype))


def verify_speculative_sampling(
    draft_tokens: Tensor,  # [γ] int64
    draft_probs: Tensor | None,  # [γ, V]
    target_probs: Tensor,  # [γ + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Classic speculative sampling: accept x_i with probability min(1, target/draft).

    On the first rejection the recovered token is drawn from norm(max(target − draft, 0)); if
    every draft passes, the bonus token is drawn from the last target row.
    """
    if draft_tokens.numel() == 0:  # nothing drafted this time: plain sampling
        return VerifyResult(0, int(sample(target_probs[0], generator).item()))
    if draft_probs is None:
        raise ValueError("speculative sampling needs the draft distribution; use sample-and-match instead")
    gamma = draft_tokens.shape[0]
    draft_tokens = draft_tokens.to(target_probs.device)
    accept_p = acceptance_probability(draft_tokens, draft_probs, target_probs)  # [γ]
    u = torch.rand(gamma, generator=generator, device=target_probs.device, dtype=target_probs.dtype)
    n = _accepted_prefix(u < accept_p)
    if n < gamma:
        dist = recovery_distribution(target_probs[n], draft_probs[n])
    else:
        dist = target_probs[gamma]
    return VerifyResult(n, int(sample(dist, generator).item()))


def verify_sample_and_match(
    draft_tokens: Tensor,  # [γ] int64
    draft_probs: Tensor | None,  # unused: the rule needs no draft distribution
    target_probs: Tensor,  # [γ + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Draw one target sample per position; keep drafts while they equal the sample.

    Every emitted token is a fresh target sample given the emitted prefix, so this is exact
    for any deterministic drafter (SpecExec's rule; HF's prompt-lookup sampling path).
    """
    draws = sample(target_probs, generator)  # [γ + 1]
    n = _accepted_prefix(draft_tokens.to(draws.device) == draws[:-1])
    return VerifyResult(n, int(draws[n].item()))


def choose_verifier(greedy: bool, has_draft_probs: bool) -> Verifier:
    """The exact rule for a chain: greedy at T=0, else by whether the drafter has a distribution."""
    if greedy:
        return verify_greedy
    return verify_speculative_sampling if has_draft_probs else verify_sample_and_match
