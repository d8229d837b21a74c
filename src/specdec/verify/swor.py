"""Sequoia's verification for children drawn without replacement (SWOR; docs/algorithms.md §3, §7)."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import sample
from specdec.core.tree import TokenTree
from specdec.verify.chain import acceptance_probability, recovery_distribution
from specdec.verify.walk import walk_candidates


def without_token(
    draft_row: Tensor,  # [V] distribution the next sibling would be drawn from
    token: Tensor,  # [] int64, the sibling just drawn (and rejected)
) -> Tensor:  # [V]
    """q with `token` removed and renormalised: where the next child of a SWOR draw comes from.

    If `token` held all the remaining mass the row becomes all zeros (no further sibling can
    have been drawn), never 0/0.
    """
    q = draft_row.clone()
    q[token] = 0.0
    mass = q.sum()
    return q / mass if float(mass) > 0 else q


def swor_node(
    target_row: Tensor,  # [V] target distribution at the node
    cand_tokens: Tensor,  # [k] int64 children in sampling order (distinct)
    draft_row: Tensor,  # [V] the draft distribution the children were drawn from without replacement
) -> tuple[Tensor, Tensor]:  # ([k] acceptance probabilities, [V] final residual)
    """The deterministic core of SWOR verification at one node.

    Child j was drawn from q_j = q with children 1..j-1 removed, so it is tested against q_j:
    a_j = min(1, target_j(x_j) / q_j(x_j)); a rejection updates the target to the residual
    norm(max(target_j − q_j, 0)) computed with q_j (before x_j is removed) and only then removes x_j
    from q. Leaving out the removal is MSS on SWOR children, which is biased.
    """
    dist = target_row
    q = draft_row.to(dist.dtype)
    accept = torch.empty(cand_tokens.shape[0], dtype=target_row.dtype, device=target_row.device)
    for j in range(cand_tokens.shape[0]):  # sequential by nature: each test depends on the ones before
        accept[j] = acceptance_probability(cand_tokens[j : j + 1], q[None], dist[None])[0]
        dist = recovery_distribution(dist, q)
        q = without_token(q, cand_tokens[j])
    return accept, dist


def verify_swor(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """As MSS, but after rejecting x the draft distribution also loses x, because the next sibling
    was drawn from q without x. Siblings must be listed in the order they were drawn and share one
    draft row; re-sorting them biases the output.
    """
    if tree.num_drafted == 0:
        return VerifyResult((), int(sample(target_probs[0], generator).item()))
    if tree.draft_probs is None or tree.cand_draft_row is None:
        raise ValueError("SWOR verification needs the distribution the children were drawn from")
    draft_probs = tree.draft_probs.to(target_probs.device)

    def rule(target_row: Tensor, cand_tokens: Tensor, cand_rows: Tensor) -> tuple[Tensor, Tensor]:
        if bool((cand_rows != cand_rows[0]).any()):
            raise ValueError("SWOR siblings must all be drawn from one draft distribution (one cand_draft_row)")
        return swor_node(target_row, cand_tokens, draft_probs[cand_rows[0]])

    return walk_candidates(tree, target_probs, generator, rule)
