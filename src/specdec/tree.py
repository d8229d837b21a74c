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
    """Depth of every token below the committed prefix (vectorised by pointer jumping)."""
    n = parents.shape[0]
    depth = torch.zeros(n, dtype=torch.long, device=parents.device)
    anc = parents.clone()
    # Each round adds 1 for every token whose current ancestor pointer is still inside the block;
    # at most max-depth rounds, each one tensor op instead of a Python loop over nodes.
    while bool((anc >= 0).any()):
        alive = anc >= 0
        depth += alive.long()
        anc = torch.where(alive, parents[anc.clamp_min(0)], anc)
    return depth


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
