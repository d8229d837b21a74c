"""Sequoia's dynamic program: the tree shape with the most expected tokens per target call
(docs/algorithms.md §7).

Given a positional acceptance vector accept[k] = P(the k-th child of a node is the one accepted),
`sequoia_dp` gives, for every size n (drafted nodes) and depth d, the best expected tokens per
target call F(n, d) and the tree that achieves it, as path tuples (child rank by child rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from specdec.core.options import check_positive_int

Paths = list[tuple[int, ...]]


def check_accept(accept: Any) -> Tensor:  # -> [W] float64
    """An acceptance vector as a tensor, or a ValueError saying what is wrong with it."""
    if isinstance(accept, str):
        try:
            accept = [float(v) for v in accept.replace(" ", "").strip("[]()").split(",") if v]
        except ValueError:
            raise ValueError(f"an acceptance vector looks like 0.7,0.1,0.05 (one probability per child rank), "
                             f"got {accept!r}") from None
    vec = torch.as_tensor(accept, dtype=torch.float64).flatten()
    # Measured vectors are means of float32 probabilities: their sum may exceed 1 by round-off.
    if vec.numel() == 0 or not bool(torch.isfinite(vec).all()) or bool((vec < 0).any()) or float(vec.sum()) > 1 + 1e-6:
        raise ValueError(f"an acceptance vector needs >= 1 non-negative entries summing to <= 1, got {vec.tolist()}")
    total = float(vec.sum())
    return vec / total if total > 1 else vec


@dataclass
class SequoiaDP:
    """The solved DP for every tree size up to `max_size` and depth up to `max_depth`."""

    accept: Tensor  # [W] float64
    value: Tensor  # [max_size + 1, max_depth + 1] float64: F(n, d), -inf where no such tree exists
    best_children: Tensor  # [max_size + 2, max_depth + 2] int64: b* for (m nodes incl. root, l levels incl. root)
    split: Tensor  # [max_depth + 2, W + 1, max_size + 2] int64: y, the nodes left before the b-th child's subtree

    @property
    def max_size(self) -> int:
        return self.value.shape[0] - 1

    @property
    def max_depth(self) -> int:
        return self.value.shape[1] - 1

    def feasible(self, size: int, depth: int) -> bool:
        """Whether some tree has exactly `size` drafted nodes, at most `depth` levels and at most
        len(accept) children per node."""
        return 0 <= size <= self.max_size and 0 <= depth <= self.max_depth and bool(torch.isfinite(self.value[size, depth]))

    def tokens_per_call(self, size: int, depth: int) -> float:
        """F(size, depth): expected tokens per target call (the target's own token included)."""
        self._check(size, depth)
        return float(self.value[size, depth])

    def tree(self, size: int, depth: int) -> Paths:
        """The optimal tree with exactly `size` drafted nodes and at most `depth` levels, as path tuples."""
        self._check(size, depth)
        paths: Paths = []

        def build(nodes: int, levels: int, prefix: tuple[int, ...]) -> None:
            # Undo the recurrence: the b-th child's subtree has nodes - y nodes, then b - 1 children remain.
            sizes = []
            for b in range(int(self.best_children[nodes, levels]), 0, -1):
                y = int(self.split[levels, b, nodes])
                sizes.append(nodes - y)
                nodes = y
            for rank, sub in enumerate(reversed(sizes)):
                paths.append(prefix + (rank,))
                build(sub, levels - 1, prefix + (rank,))

        build(size + 1, depth + 1, ())
        return paths

    def _check(self, size: int, depth: int) -> None:
        if not (0 <= size <= self.max_size and 0 <= depth <= self.max_depth):
            raise ValueError(f"the DP was solved for size <= {self.max_size}, depth <= {self.max_depth}; "
                             f"asked for size {size}, depth {depth}")
        if not bool(torch.isfinite(self.value[size, depth])):
            raise ValueError(f"no tree has {size} drafted nodes within {depth} levels "
                             f"and at most {self.accept.numel()} children per node")


def sequoia_dp(accept: Any, max_size: int, max_depth: int) -> SequoiaDP:
    """Solve Sequoia's recurrence (docs/algorithms.md §7) for all sizes <= max_size and depths <= max_depth.

    With m nodes (root included) and l levels (root included):
        T[1][l][0] = 1;  F(m, l) = max_b T[m][l][b]
        T[m][l][b] = max_{1 <= y < m} T[y][l][b-1] + accept[b] · F(m - y, l - 1)
    (b = 1 is the same formula, since T[y][l][0] exists only for y = 1). The inner max over y is
    a max-plus convolution, done for all m at once as one [m, y] tensor.
    """
    accept = check_accept(accept)
    max_size = check_positive_int("max_size", max_size)
    max_depth = check_positive_int("max_depth", max_depth)
    width = min(accept.numel(), max_size)  # a node never has more children than the tree has nodes
    n_m = max_size + 2  # m = 0 (padding) .. max_size + 1
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    F = torch.full((n_m, max_depth + 2), float("-inf"), dtype=torch.float64)  # F[m, l]
    best_children = torch.zeros((n_m, max_depth + 2), dtype=torch.long)
    split = torch.zeros((max_depth + 2, width + 1, n_m), dtype=torch.long)
    m_idx = torch.arange(n_m)[:, None]
    y_idx = torch.arange(n_m)[None, :]
    valid = (y_idx >= 1) & (y_idx < m_idx)  # [m, y]
    sub_size = (m_idx - y_idx).clamp_min(0)  # [m, y]: nodes in the new child's subtree
    for levels in range(1, max_depth + 2):
        t_prev = torch.full((n_m,), float("-inf"), dtype=torch.float64)  # T[·][l][b-1], starting at b - 1 = 0
        t_prev[1] = 1.0
        best = t_prev.clone()
        below = F[:, levels - 1]  # F(·, l - 1)
        for b in range(1, width + 1):
            # accept[b] · F, keeping -inf where no subtree exists (0 · -inf would be nan).
            child_value = torch.where(torch.isfinite(below), accept[b - 1] * below, neg_inf)
            cand = torch.where(valid, t_prev[None, :] + child_value[sub_size], neg_inf)  # [m, y]
            t_b, y_best = cand.max(dim=1)
            split[levels, b] = y_best
            better = t_b > best  # strict: prefer fewer children on ties
            best = torch.where(better, t_b, best)
            best_children[:, levels] = torch.where(better, b, best_children[:, levels])
            t_prev = t_b
        F[:, levels] = best
    # Public indexing by drafted nodes n = m - 1 and drafted levels d = l - 1.
    return SequoiaDP(accept, F[1:, 1:].clone(), best_children, split)


def tree_value(paths: Paths, accept: Any) -> float:
    """1 + Σ over nodes of Π accept[rank] along the node's path: the expected tokens per call of a
    tree under positional acceptance (a rank beyond the vector has probability 0)."""
    accept = check_accept(accept).tolist()
    total = 1.0
    for path in set(tuple(p) for p in paths):
        prob = 1.0
        for rank in path:
            prob *= accept[rank] if rank < len(accept) else 0.0
        total += prob
    return total


def chain_paths(depth: int) -> Paths:
    return [(0,) * d for d in range(1, depth + 1)]


def star_paths(width: int) -> Paths:
    return [(k,) for k in range(width)]
