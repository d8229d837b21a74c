"""SpecInfer's multi-step speculative sampling (MSS) for i.i.d.-drawn children (docs/algorithms.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.verify.chain import acceptance_probability, recovery_distribution, verify_speculative_sampling
from specdec.verify.walk import walk_candidates


def mss_node(
    target_row: Tensor,  # [V] target distribution at the node
    cand_tokens: Tensor,  # [k] int64 candidates in proposal order
    cand_draft_probs: Tensor,  # [k, V] distribution each candidate was drawn from
) -> tuple[Tensor, Tensor]:  # ([k] acceptance probabilities, [V] final residual)
    """The deterministic core of MSS at one node.

    Returns a_j = P(accept candidate j | candidates before it were rejected), computed against
    the target distribution as updated by the earlier rejections (target ← norm(max(target − q_i, 0)),
    q unchanged), and the residual left after rejecting every candidate.
    """
    dist = target_row
    accept = torch.empty(cand_tokens.shape[0], dtype=target_row.dtype, device=target_row.device)
    for j in range(cand_tokens.shape[0]):  # sequential by nature: each test sees the residual of the ones before
        draft_row = cand_draft_probs[j].to(dist.dtype)
        accept[j] = acceptance_probability(cand_tokens[j : j + 1], draft_row[None], dist[None])[0]
        dist = recovery_distribution(dist, draft_row)
    return accept, dist


def verify_mss(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """At each node try the candidates in proposal order: candidate x drawn from q is accepted with
    probability min(1, target(x)/q(x)); after a rejection the target distribution becomes
    norm(max(target − q, 0)) while q stays as it is. With no candidate left, the recovered token
    is drawn from the final residual. On a chain this is classic speculative sampling, done by the
    chain kernel in one tensor operation.
    """
    if tree.is_chain:  # nothing drafted included: the chain kernel then samples the target
        return verify_speculative_sampling(tree, target_probs, generator)
    if tree.draft_probs is None or tree.cand_draft_row is None:
        raise ValueError("MSS needs the distribution each child was drawn from; use sample-and-match instead")
    draft_probs = tree.draft_probs.to(target_probs.device)

    def rule(target_row: Tensor, cand_tokens: Tensor, cand_rows: Tensor) -> tuple[Tensor, Tensor]:
        return mss_node(target_row, cand_tokens, draft_probs[cand_rows])

    return walk_candidates(tree, target_probs, generator, rule)
