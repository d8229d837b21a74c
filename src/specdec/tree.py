"""Token-tree topology: the one place where depth, ancestor masks and paths come from `parents`.

A block of n new tokens is described by `parents`: parents[i] is the index (inside the
block) of token i's parent, or -1 when token i hangs directly off the committed prefix.
Parents always come before their children (parents[i] < i). A chain is
parents = [-1, 0, 1, …, n-2]; a speculative tree is the pending root (parents[0] = -1)
followed by drafted nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chain_parents(n: int, device: torch.device | str | None = None) -> Tensor:  # [n] int64
    """Parents of a chain of n tokens: [-1, 0, 1, …, n-2]."""
    return torch.arange(-1, n - 1, device=device)


def validate_parents(parents: Tensor) -> None:
    """Raise ValueError unless parents[i] ∈ [-1, i) for every i."""
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    if parents.dim() != 1 or bool(((parents < -1) | (parents >= idx)).any()):
        raise ValueError("parents must be a 1-D tensor with parents[i] in [-1, i) (parents come first)")


def depths(parents: Tensor) -> Tensor:  # [n] int64, 0 for tokens attached to the prefix
    """Depth of every token below the committed prefix (parents come first, so one pass)."""
    n = parents.shape[0]
    if n == 0 or bool((parents == torch.arange(-1, n - 1, device=parents.device)).all()):
        return torch.arange(n, device=parents.device)  # a chain
    depth = [0] * n
    for i, p in enumerate(parents.tolist()):
        depth[i] = depth[p] + 1 if p >= 0 else 0
    return torch.tensor(depth, dtype=torch.long, device=parents.device)


def ancestor_mask(parents: Tensor) -> Tensor:  # [n, n] bool; [i, j] = j is i or an ancestor of i
    """Which tokens of the block each token may attend to (besides the committed prefix)."""
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    if n > 1 and bool((parents == idx - 1).all()):  # chain: plain causal mask, no walk needed
        return torch.ones(n, n, dtype=torch.bool, device=parents.device).tril()
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    anc = parents.clone()
    while bool((anc >= 0).any()):
        alive = anc >= 0
        mask[idx[alive], anc[alive]] = True
        anc = torch.where(alive, parents[anc.clamp_min(0)], anc)
    return mask


def path_to(parents: Tensor, node: int) -> list[int]:
    """Block indices from the topmost ancestor down to `node` (inclusive)."""
    path: list[int] = []
    plist = parents.tolist()
    while node >= 0:
        path.append(node)
        node = plist[node]
    return path[::-1]


class TokenTree:
    """A drafted token tree below the pending root, with its verification candidates.

    Nodes are unique (parent, token) pairs and own one KV slot each. Candidates are the draws
    that proposed them: several drafters (or repeated i.i.d. draws) proposing the same token
    share the node but stay separate candidates, each verified with the distribution it was
    drawn from (algorithms.md §1.2: merging them into one candidate biases the output).
    Candidates of one parent are listed in proposal order, which never depends on their values.
    """

    def __init__(
        self,
        tokens: Tensor,  # [N] int64
        parents: Tensor,  # [N] int64: parent among drafted nodes, -1 = child of the root; parents[i] < i
        cand_nodes: Tensor | None = None,  # [C] node each candidate proposes; None = one per node
        cand_draft_row: Tensor | None = None,  # [C] row of `draft_probs` each candidate was drawn from
        draft_probs: Tensor | None = None,  # [Q, V] draft distributions; None = deterministic children
    ) -> None:
        validate_parents(parents)
        self.tokens = tokens
        self.parents = parents
        self.cand_nodes = cand_nodes if cand_nodes is not None else torch.arange(tokens.shape[0])
        self.cand_draft_row = cand_draft_row
        self.draft_probs = draft_probs
        if draft_probs is not None and cand_draft_row is None:
            raise ValueError("a tree with draft distributions needs cand_draft_row")

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    def depths(self) -> Tensor:  # [N], 1 for children of the root
        return depths(self.parents) + 1

    def max_depth(self) -> int:
        return int(self.depths().max()) if self.num_nodes else 0

    def target_parents(self) -> Tensor:  # [N + 1]: the block the target scores, root first
        """Parents for the target pass over [root, nodes…]: node i sits at block index i + 1."""
        return torch.cat([torch.tensor([-1]), self.parents.cpu() + 1])

    def path(self, node: int) -> list[int]:
        return path_to(self.parents, node)


def paths_to_parents(paths: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    """Compile a static tree in path-tuple form (Medusa/vLLM: `(0,), (1,), (0, 0)`, …).

    Each tuple lists child ranks from the root. Returns (parents [N], ranks [N]) with nodes in
    breadth-first order (shorter paths first, then by ranks), so parents precede children.
    """
    uniq = sorted(set(tuple(p) for p in paths), key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(uniq)}
    parents, ranks = [], []
    for p in uniq:
        if not p or min(p) < 0:
            raise ValueError(f"bad path {p!r}: paths are non-empty tuples of child ranks >= 0")
        if len(p) > 1 and p[:-1] not in index:
            raise ValueError(f"path {p!r} has no parent path {p[:-1]!r}")
        parents.append(index[p[:-1]] if len(p) > 1 else -1)
        ranks.append(p[-1])
    return torch.tensor(parents, dtype=torch.long), torch.tensor(ranks, dtype=torch.long)


def expansion_paths(expansion: list[int]) -> list[tuple[int, ...]]:
    """SpecInfer's expansion ⟨k1,…,km⟩: every node at depth i-1 gets k_i children."""
    if not expansion or min(expansion) < 1:
        raise ValueError(f"expansion must be a non-empty list of positive integers, got {expansion!r}")
    level: list[tuple[int, ...]] = [()]
    paths: list[tuple[int, ...]] = []
    for k in expansion:
        level = [p + (r,) for p in level for r in range(k)]
        paths.extend(level)
    return paths


def keep_subtree(
    parents: Tensor,  # [N] int64, parents[i] < i
    keep: Tensor,  # [N] bool, ancestor-closed: a kept node's parent is kept too
) -> Tensor:  # [K] int64: the kept nodes' parents, renumbered among the kept nodes
    """Drop the nodes outside `keep` and renumber the rest, preserving their order (parents first)."""
    kept_parents = parents[keep]
    has_parent = kept_parents >= 0
    if bool((has_parent & ~keep[kept_parents.clamp_min(0)]).any()):
        raise ValueError("keep must be ancestor-closed: a kept node's parent was dropped")
    new_index = keep.long().cumsum(0) - 1  # [N] position of each node among the kept ones
    return torch.where(has_parent, new_index[kept_parents.clamp_min(0)], kept_parents)
