"""The two ways a verifier walks a tree: by matching one target choice per node, or candidate by candidate."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import sample
from specdec.core.tree import TokenTree, ancestor_mask

NodeRule = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""(target_row [V], cand_tokens [k], cand_rows [k] rows of tree.draft_probs) -> (accept [k], leftover [V])."""


def accepted_prefix(accept: Tensor) -> int:  # accept: [γ] bool
    """Length of the leading run of True (one host sync)."""
    if accept.numel() == 0:
        return 0
    return int(accept.long().cumprod(0).sum().item())


def follow_matching_children(
    tree: TokenTree,
    choice: Tensor,  # [N + 1] the token the target picks after every node (root included)
) -> VerifyResult:
    """Descend from the root while some child's token equals the target's pick at its parent.

    Siblings hold distinct tokens, so the nodes whose whole path matches form one path; it is
    found for all nodes at once (a prefix scan on a chain, the ancestor mask on a tree).
    """
    if tree.num_drafted == 0:
        return VerifyResult((), int(choice[0].item()))
    tokens = tree.tokens[1:].to(choice.device)
    if tree.is_chain:
        n = accepted_prefix(tokens == choice[:-1])
        return VerifyResult(tuple(range(1, n + 1)), int(choice[n].item()))
    parents = tree.parents.to(choice.device)
    match = torch.cat([torch.ones(1, dtype=torch.bool, device=choice.device), tokens == choice[parents[1:]]])  # [N + 1]
    anc = ancestor_mask(parents)  # [N + 1, N + 1]
    on_path = ~(anc & ~match[None, :]).any(-1)  # every node on the way matched
    depth_if_on = torch.where(on_path, anc.sum(-1) - 1, torch.zeros_like(match, dtype=torch.long))
    deepest = int(depth_if_on.argmax().item())  # the root (0) when nothing matched
    return VerifyResult(tuple(tree.path(deepest)), int(choice[deepest].item()))


def follow_drawn_children(
    tree: TokenTree,
    draw: Callable[[int], int],  # node -> the target's pick after it, drawn when the walk asks
) -> VerifyResult:
    """`follow_matching_children` where the target's pick after a node is drawn only once the walk
    reaches that node: a sampled pick costs a pass over the vocabulary, and the walk reaches one
    path's nodes, not the tree's. One tensor comparison per level finds the matching child."""
    parents, tokens = tree.parents, tree.tokens
    path: list[int] = []
    node = 0
    while True:
        token = draw(node)
        child = ((parents == node) & (tokens == token)).nonzero()  # siblings hold distinct tokens: ≤ 1
        if child.numel() == 0:
            return VerifyResult(tuple(path), token)
        node = int(child[0, 0])
        path.append(node)


def walk_candidates(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V]
    generator: torch.Generator | None,
    node_rule: NodeRule,
) -> VerifyResult:
    """Walk from the root: at each node test its candidates in proposal order with `node_rule`.

    The first candidate whose uniform draw falls under its (conditional) acceptance probability is
    accepted and the walk descends into its node; with none accepted, the recovered token is
    drawn from the rule's final residual. Only the nodes on the accepted path are visited.
    """
    device = target_probs.device
    cand_parent = tree.parents[tree.cand_nodes]  # [C] node whose children each candidate proposes
    path: list[int] = []
    node = 0
    while True:
        cands = (cand_parent == node).nonzero().flatten()  # this node's candidates, in proposal order
        if cands.numel() == 0:
            return VerifyResult(tuple(path), int(sample(target_probs[node], generator).item()))
        cand_nodes = tree.cand_nodes[cands]
        accept, leftover = node_rule(target_probs[node], tree.tokens[cand_nodes].to(device), tree.cand_draft_row[cands])
        u = torch.rand(cands.numel(), generator=generator, device=device, dtype=accept.dtype)
        hits = (u < accept).nonzero()
        if hits.numel() == 0:
            return VerifyResult(tuple(path), int(sample(leftover, generator).item()))
        node = int(cand_nodes[int(hits[0])])
        path.append(node)
