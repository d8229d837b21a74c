"""Token trees: the one proposal type, and the one place where depths, masks and paths come from `parents`.

A block of n tokens scored by a model is described by `parents`: parents[i] is the index
(inside the block) of token i's parent, or -1 when token i hangs directly off the committed
prefix. Parents come before their children (parents[i] < i). Depth is 0 for a token that hangs
off the prefix and grows by one per level, so a token's position is `kv_len + depth`
(docs/algorithms.md §4).

A `TokenTree` is what every drafter proposes and every verifier reads: node 0 is the pending
root (the last committed token, not yet in the target's cache, depth 0), nodes 1…N are drafted
tokens. A chain of γ drafts is the tree with parents [-1, 0, 1, …, γ-1].
"""

from __future__ import annotations

import torch
from torch import Tensor


def chain_parents(n: int, device: torch.device | str | None = None) -> Tensor:  # [n] int64
    """Parents of a chain of n tokens: [-1, 0, 1, …, n-2]."""
    return torch.arange(-1, n - 1, device=device)


def is_chain(parents: Tensor) -> bool:  # parents: [n]
    n = parents.shape[0]
    return bool((parents == torch.arange(-1, n - 1, device=parents.device)).all())


def validate_parents(parents: Tensor) -> None:
    """Raise ValueError unless parents[i] ∈ [-1, i) for every i."""
    n = parents.shape[0]
    idx = torch.arange(n, device=parents.device)
    if parents.dim() != 1 or bool(((parents < -1) | (parents >= idx)).any()):
        raise ValueError("parents must be a 1-D tensor with parents[i] in [-1, i) (parents come first)")


def depths(parents: Tensor) -> Tensor:  # [n] int64, 0 for tokens hanging off the prefix
    """Depth of every token of a block (parents come first, so one pass)."""
    n = parents.shape[0]
    if n == 0 or is_chain(parents):
        return torch.arange(n, device=parents.device)
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
    """A proposal: the pending root (node 0) and the drafted tokens below it (nodes 1…N).

    Nodes are unique (parent, token) pairs and own one KV slot each in the target's pass.
    Candidates are the draws that proposed them: several drafters (or repeated i.i.d. draws)
    proposing the same token share the node but stay separate candidates, each verified with
    the distribution it was drawn from (docs/algorithms.md §3: merging them biases the output).
    Candidates of one parent are listed in proposal order, which never depends on their values.

    `draft_probs` is None for deterministic proposals (greedy drafting, top-k, best-first,
    n-gram copies); then only greedy and sample-and-match verification apply.
    """

    def __init__(
        self,
        tokens: Tensor,  # [N + 1] int64, tokens[0] = the pending root
        parents: Tensor,  # [N + 1] int64, parents[0] = -1, parents[i] in [0, i) for i >= 1
        cand_nodes: Tensor | None = None,  # [C] node (>= 1) each candidate proposes; None = one per node
        cand_draft_row: Tensor | None = None,  # [C] row of `draft_probs` each candidate was drawn from
        draft_probs: Tensor | None = None,  # [Q, V] draft distributions; None = deterministic children
    ) -> None:
        if tokens.dim() != 1 or parents.shape != tokens.shape or tokens.shape[0] < 1:
            raise ValueError("a token tree needs 1-D tokens and parents of equal length, the root first")
        validate_parents(parents)
        if bool((parents[1:] < 0).any()) or int(parents[0]) != -1:
            raise ValueError("node 0 is the root (parent -1); every other node must descend from it")
        if draft_probs is not None and cand_draft_row is None:
            raise ValueError("a tree with draft distributions needs cand_draft_row")
        self.tokens = tokens
        self.parents = parents
        n = tokens.shape[0]
        self.cand_nodes = cand_nodes if cand_nodes is not None else torch.arange(1, n)
        self.cand_draft_row = cand_draft_row
        self.draft_probs = draft_probs
        self._is_chain: bool | None = None

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def chain(
        cls,
        root: int,
        drafts: Tensor,  # [γ] int64
        draft_probs: Tensor | None = None,  # [γ, V] distribution each draft was drawn from, or None
    ) -> "TokenTree":
        """The chain root → drafts[0] → … → drafts[γ-1]; draft i is candidate i, drawn from row i."""
        g = drafts.shape[0]
        tree = cls(
            torch.cat([torch.tensor([int(root)], dtype=torch.long), drafts.cpu().long()]),
            chain_parents(g + 1),
            None,
            torch.arange(g) if draft_probs is not None else None,
            draft_probs,
        )
        tree._is_chain = True
        return tree

    @classmethod
    def from_drafted(
        cls,
        root: int,
        tokens: Tensor,  # [N] int64 drafted tokens
        parents: Tensor,  # [N] int64: parent among the drafted nodes, -1 = child of the root
        cand_nodes: Tensor | None = None,  # [C] drafted node (0-based) of each candidate
        cand_draft_row: Tensor | None = None,  # [C]
        draft_probs: Tensor | None = None,  # [Q, V]
    ) -> "TokenTree":
        """A tree from drafted nodes numbered 0…N-1 (as drafters build them); shifts them below the root."""
        return cls(
            torch.cat([torch.tensor([int(root)], dtype=torch.long), tokens.cpu().long()]),
            torch.cat([torch.tensor([-1]), parents.cpu().long() + 1]),
            cand_nodes.cpu() + 1 if cand_nodes is not None else None,
            cand_draft_row,
            draft_probs,
        )

    # ---- views -------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        """Nodes the target scores, the root included."""
        return int(self.tokens.shape[0])

    @property
    def num_drafted(self) -> int:
        return self.num_nodes - 1

    @property
    def drafted_tokens(self) -> Tensor:  # [N] int64
        return self.tokens[1:]

    @property
    def is_chain(self) -> bool:
        """One candidate per node along one path (the chain kernels apply)."""
        if self._is_chain is None:
            self._is_chain = is_chain(self.parents) and self.cand_nodes.shape[0] == self.num_drafted
        return self._is_chain

    def depths(self) -> Tensor:  # [N + 1] int64: 0 for the root, 1 for its children
        return torch.arange(self.num_nodes) if self.is_chain else depths(self.parents)

    def max_depth(self) -> int:
        """Depth of the deepest drafted node (0 when nothing was drafted)."""
        return self.num_drafted if self.is_chain else int(self.depths().max())

    def block_parents(self) -> Tensor | None:  # [N + 1] or None for a chain
        """Parents for the target's pass over the whole tree (None = a chain, the model's default)."""
        return None if self.is_chain else self.parents

    def path(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node` (the root itself left out)."""
        return path_to(self.parents, node)[1:]


def paths_to_parents(paths: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    """Compile a static tree in path-tuple form (Medusa/vLLM: `(0,), (1,), (0, 0)`, …).

    Each tuple lists child ranks from the root. Returns (parents [N], ranks [N]) over the drafted
    nodes in breadth-first order (shorter paths first, then by ranks), so parents precede
    children; parent -1 = child of the root.
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


def tree_walk(tree: "TokenTree", text: Tensor) -> int:  # text: [T] int64, what the target said after the root
    """How many drafted tokens the greedy tree walk accepts when the target says `text`: from the
    root, the child holding the next token of the text, as long as there is one."""
    children: dict[tuple[int, int], int] = {}
    for node, (parent, token) in enumerate(zip(tree.parents.tolist(), tree.tokens.tolist())):
        if node:
            children.setdefault((parent, token), node)
    node = accepted = 0
    for token in text.tolist():
        node = children.get((node, token), -1)
        if node < 0:
            break
        accepted += 1
    return accepted
