"""Verifiers: pure tensor functions that decide which drafted tokens the target keeps.

Vocabulary (as in vLLM's rejection sampler): of the drafted tokens, the verified prefix is
*accepted*; then exactly one more token comes from the target — the *recovered* token after a
rejection (drawn from the residual), or the *bonus* token when every draft was accepted.
Output tokens = accepted + one recovered-or-bonus token, so each target call emits >= 1.

Each rule is exact only with its matching draft sampler (algorithms.md §1.2):
- `verify_greedy`: temperature 0, any drafter; equals AR greedy token for token.
- `verify_speculative_sampling`: drafts drawn from `draft_probs` (Leviathan/Chen).
- `verify_sample_and_match`: deterministic drafters with no distribution (prompt lookup).
Tree forms: greedy tree walk, MSS (i.i.d. children), SWOR (children drawn without replacement,
Sequoia) and tree sample-and-match (deterministic children: top-k, best-first / SpecExec).

Inputs describe a chain of γ drafted tokens; `target_probs` has γ + 1 rows: row i is the
target's distribution after the root and the first i drafts (row γ gives the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.sampling import residual, sample
from specdec.tree import TokenTree, ancestor_mask


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int
    """How many drafted tokens were accepted (the length of the accepted path)."""
    next_token: int
    """The recovered token (after a rejection) or the bonus token (all accepted)."""
    accepted_nodes: tuple[int, ...] | None = None
    """Tree verifiers: drafted node indices of the accepted path, root first; None for chains
    (where the accepted nodes are simply 0 … num_accepted-1)."""

    def path(self) -> tuple[int, ...]:
        return self.accepted_nodes if self.accepted_nodes is not None else tuple(range(self.num_accepted))


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


# ---- trees ---------------------------------------------------------------------------------
# `target_probs` has N + 1 rows: row 0 is the target's distribution after the root, row i + 1
# the distribution after drafted node i (following its root-to-node path).


class TreeVerifier(Protocol):
    def __call__(
        self, tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None  # target_probs: [N + 1, V]
    ) -> VerifyResult: ...


def _follow_matching_children(
    tree: TokenTree,
    choice: Tensor,  # [N + 1] the token the target picks at the root and at every node
) -> VerifyResult:
    """Descend from the root while some child's token equals the target's pick at its parent.

    Siblings hold distinct tokens, so the nodes whose whole path matches form one path; it is
    found for all nodes at once through the ancestor mask (no walk in Python).
    """
    n = tree.num_nodes
    if n == 0:
        return VerifyResult(0, int(choice[0].item()), ())
    tokens = tree.tokens.to(choice.device)
    parent_rows = tree.parents.to(choice.device) + 1
    match = tokens == choice[parent_rows]  # [N]
    anc = ancestor_mask(tree.parents.to(choice.device))  # [N, N]
    on_path = ~(anc & ~match[None, :]).any(-1)  # every node on the way matched
    depth_if_on = torch.where(on_path, anc.sum(-1), torch.zeros_like(match, dtype=torch.long))
    deepest_depth = int(depth_if_on.max().item())
    if deepest_depth == 0:
        return VerifyResult(0, int(choice[0].item()), ())
    deepest = int(depth_if_on.argmax().item())
    path = tuple(tree.path(deepest))
    return VerifyResult(len(path), int(choice[deepest + 1].item()), path)


def verify_tree_greedy(tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None = None) -> VerifyResult:
    """Greedy tree verification: follow the child equal to the target argmax; emit the argmax."""
    return _follow_matching_children(tree, target_probs.argmax(-1))


def verify_tree_sample_and_match(
    tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None = None
) -> VerifyResult:
    """Sample-and-match on a tree of deterministic children (top-k, best-first): exact at any T."""
    return _follow_matching_children(tree, sample(target_probs, generator))


def mss_node(
    target_row: Tensor,  # [V] target distribution at the node
    cand_tokens: Tensor,  # [k] int64 candidates in proposal order
    cand_draft_probs: Tensor,  # [k, V] distribution each candidate was drawn from
) -> tuple[Tensor, Tensor]:  # ([k] acceptance probabilities, [V] final residual)
    """The deterministic core of MSS at one node.

    Returns a_j = P(accept candidate j | candidates before it were rejected), computed against
    the target distribution as updated by the earlier rejections (p ← norm(max(p − q_i, 0)),
    q unchanged), and the residual left after rejecting every candidate.
    """
    dist = target_row
    accept = torch.empty(cand_tokens.shape[0], dtype=target_row.dtype, device=target_row.device)
    for j in range(cand_tokens.shape[0]):
        draft_row = cand_draft_probs[j].to(dist.dtype)
        accept[j] = acceptance_probability(cand_tokens[j : j + 1], draft_row[None], dist[None])[0]
        dist = recovery_distribution(dist, draft_row)
    return accept, dist


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
    """The deterministic core of SWOR verification (Sequoia) at one node.

    Child j was drawn from q_j = q with children 1..j-1 removed, so it is tested against q_j:
    a_j = min(1, p_j(x_j) / q_j(x_j)); a rejection updates the target to the residual
    norm(max(p_j − q_j, 0)) computed with q_j (before x_j is removed) and only then removes x_j
    from q. Leaving out the removal is MSS on SWOR children, which is biased (algorithms.md §1.2).
    """
    dist = target_row
    q = draft_row.to(dist.dtype)
    accept = torch.empty(cand_tokens.shape[0], dtype=target_row.dtype, device=target_row.device)
    for j in range(cand_tokens.shape[0]):  # sequential by nature: each test depends on the ones before
        accept[j] = acceptance_probability(cand_tokens[j : j + 1], q[None], dist[None])[0]
        dist = recovery_distribution(dist, q)
        q = without_token(q, cand_tokens[j])
    return accept, dist


def _walk_candidates(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V]
    generator: torch.Generator | None,
    node_rule,  # (target_row [V], cand_tokens [k], cand_rows [k] int64 rows of tree.draft_probs) -> (accept [k], leftover [V])
) -> VerifyResult:
    """Walk from the root: at each node test its candidates in proposal order with `node_rule`.

    The first candidate whose uniform draw falls under its (conditional) acceptance probability is
    accepted and the walk descends into its node; with none accepted, the recovered token is
    drawn from the rule's final residual. Only the nodes on the accepted path are visited.
    """
    device = target_probs.device
    cand_parent = tree.parents[tree.cand_nodes]  # [C] node (-1 = root) whose children each candidate proposes
    path: list[int] = []
    node = -1
    while True:
        cands = (cand_parent == node).nonzero().flatten()  # this node's candidates, in proposal order
        if cands.numel() == 0:
            return VerifyResult(len(path), int(sample(target_probs[node + 1], generator).item()), tuple(path))
        cand_nodes = tree.cand_nodes[cands]
        accept, leftover = node_rule(target_probs[node + 1], tree.tokens[cand_nodes].to(device), tree.cand_draft_row[cands])
        u = torch.rand(cands.numel(), generator=generator, device=device, dtype=accept.dtype)
        hits = (u < accept).nonzero()
        if hits.numel() == 0:
            return VerifyResult(len(path), int(sample(leftover, generator).item()), tuple(path))
        node = int(cand_nodes[int(hits[0])])
        path.append(node)


def verify_tree_mss(tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None = None) -> VerifyResult:
    """SpecInfer's multi-step speculative sampling, for children drawn i.i.d. from their q.

    At each node the candidates are tried in proposal order; candidate x drawn from q is
    accepted with probability min(1, p(x)/q(x)); after a rejection the target distribution
    becomes norm(max(p − q, 0)) while q stays as it is (`mss_node`). With no candidate left,
    the recovered token is drawn from the final residual.
    """
    if tree.draft_probs is None or tree.cand_draft_row is None:
        raise ValueError("MSS needs the distribution each child was drawn from; use sample-and-match instead")
    draft_probs = tree.draft_probs.to(target_probs.device)

    def rule(target_row: Tensor, cand_tokens: Tensor, cand_rows: Tensor) -> tuple[Tensor, Tensor]:
        return mss_node(target_row, cand_tokens, draft_probs[cand_rows])

    return _walk_candidates(tree, target_probs, generator, rule)


def verify_tree_swor(tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None = None) -> VerifyResult:
    """Sequoia's verification, for children drawn without replacement (in sampling order) from one q.

    As MSS, but after rejecting x the draft distribution also loses x (`swor_node`), because
    the next sibling was drawn from q without x. Siblings must be listed in the order they were
    drawn and share one draft row; re-sorting them biases the output (algorithms.md §1.2).
    """
    if tree.draft_probs is None or tree.cand_draft_row is None:
        raise ValueError("SWOR verification needs the distribution the children were drawn from")
    draft_probs = tree.draft_probs.to(target_probs.device)

    def rule(target_row: Tensor, cand_tokens: Tensor, cand_rows: Tensor) -> tuple[Tensor, Tensor]:
        if bool((cand_rows != cand_rows[0]).any()):
            raise ValueError("SWOR siblings must all be drawn from one draft distribution (one cand_draft_row)")
        return swor_node(target_row, cand_tokens, draft_probs[cand_rows[0]])

    return _walk_candidates(tree, target_probs, generator, rule)


def choose_tree_verifier(greedy: bool, has_draft_probs: bool) -> TreeVerifier:
    """Greedy at T=0; MSS for i.i.d.-sampled children; sample-and-match for deterministic ones."""
    if greedy:
        return verify_tree_greedy
    return verify_tree_mss if has_draft_probs else verify_tree_sample_and_match
