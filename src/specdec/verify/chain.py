"""Classic speculative sampling on a chain (Leviathan et al.; Chen et al.; docs/algorithms.md §2).

The chain kernel: all γ acceptance tests in one tensor operation and one host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import residual, sample
from specdec.core.tree import TokenTree
from specdec.verify.walk import accepted_prefix


def acceptance_probability(
    draft_tokens: Tensor,  # [γ] int64
    draft_probs: Tensor,  # [γ, V] distribution each token was drawn from
    target_probs: Tensor,  # [≥ γ, V]
) -> Tensor:  # [γ]: min(1, target(x_i) / draft(x_i))
    """Probability of accepting each drafted token, given that it was drawn from `draft_probs`."""
    rows = torch.arange(draft_tokens.shape[0], device=target_probs.device)
    return ratio_acceptance(target_probs[rows, draft_tokens], draft_probs[rows, draft_tokens])


def ratio_acceptance(
    target_p: Tensor,  # [...] target probability of each drawn token
    draft_p: Tensor,  # [...] probability the draft gave it
) -> Tensor:  # [...]: min(1, target_p / draft_p)
    """The acceptance test's probability from the two probabilities of the drawn tokens (elementwise,
    so one call serves one chain or every sequence of a batch)."""
    draft_p = draft_p.to(target_p.dtype)
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
    tree: TokenTree,  # a chain whose drafts were drawn from tree.draft_probs
    target_probs: Tensor,  # [γ + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Accept draft x_i with probability min(1, target/draft), left to right.

    On the first rejection the recovered token is drawn from norm(max(target − draft, 0)); if
    every draft passes, the bonus token is drawn from the last target row.
    """
    gamma = tree.num_drafted
    if gamma == 0:  # nothing drafted this time: plain sampling
        return VerifyResult((), int(sample(target_probs[0], generator).item()))
    if tree.draft_probs is None or tree.cand_draft_row is None:
        raise ValueError("speculative sampling needs the draft distribution; use sample-and-match instead")
    if not tree.is_chain:
        raise ValueError("classic speculative sampling verifies a chain; use MSS or SWOR for trees")
    device = target_probs.device
    draft_tokens = tree.tokens[1:].to(device)
    draft_probs = tree.draft_probs.to(device)[tree.cand_draft_row.to(device)]  # [γ, V], row i for draft i
    accept_p = acceptance_probability(draft_tokens, draft_probs, target_probs)  # [γ]
    u = torch.rand(gamma, generator=generator, device=device, dtype=target_probs.dtype)
    n = accepted_prefix(u < accept_p)
    if n < gamma:
        dist = recovery_distribution(target_probs[n], draft_probs[n])
    else:
        dist = target_probs[gamma]
    return VerifyResult(tuple(range(1, n + 1)), int(sample(dist, generator).item()))
