"""Token trees whose nodes carry an estimated probability of being accepted: merging several sources
into one trie, and keeping the most probable nodes within a budget (suffix drafting, hybrid trees).

A source is (tokens [n], parents [n] (-1 = the root's child, parents first), scores [n]); a score
never grows from a node to its child, so keeping the highest-scored nodes (a parent before its
child among equals) keeps an ancestor-closed tree. Nodes are unique (parent, token) pairs: the
same path from two sources is one node, with the larger score (docs/algorithms.md §17).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specdec.core.tree import depths

Scored = tuple[Tensor, Tensor, Tensor]
"""(tokens [n] int64, parents [n] int64, scores [n] float64)."""


def empty_scored() -> Scored:
    return (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64))


def continuation_trie(conts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge token rows ([K, D], -1 after a row's end) into a trie by shared prefixes: (tokens [M],
    parents [M] (-1 = the root's child), depths [M], the node of each row at each depth [K, D]
    (-1 = none)), nodes numbered depth by depth; one `unique` per depth, of (parent, token) pairs
    packed into one integer in the pairs' lexicographic order (a unique over rows sorts them slower)."""
    k, d = conts.shape
    span = max(int(conts.max()) + 1, 1) if conts.numel() else 1  # tokens per parent in the packed key
    node_of = torch.full((k, d), -1, dtype=torch.long)
    tokens, parents, depth = [], [], []
    prev = torch.full((k,), -1, dtype=torch.long)
    alive = torch.ones(k, dtype=torch.bool)
    count = 0
    for level in range(d):
        alive = alive & (conts[:, level] >= 0)
        if not bool(alive.any()):
            break
        keys = (prev[alive] + 1) * span + conts[alive, level]  # (parent node, token) per row
        uniq, inverse = torch.unique(keys, return_inverse=True)
        node_of[alive, level] = inverse + count
        prev = node_of[:, level]
        tokens.append(uniq % span)
        parents.append(uniq // span - 1)
        depth.append(torch.full((uniq.shape[0],), level, dtype=torch.long))
        count += uniq.shape[0]
    if not tokens:
        empty = conts.new_zeros(0)
        return empty, empty, empty, node_of
    return torch.cat(tokens), torch.cat(parents), torch.cat(depth), node_of


def node_paths(tokens: Tensor, parents: Tensor) -> Tensor:  # -> [n, D] int64, -1 after each path's end
    """Every node's root-to-node tokens, one row per node (one gather per level)."""
    n = tokens.shape[0]
    if n == 0:
        return tokens.new_zeros(0, 0)
    depth = depths(parents)  # [n], 0 = the root's child
    width = int(depth.max()) + 1
    out = torch.full((n, width), -1, dtype=torch.long)
    node = torch.arange(n)
    level = depth.clone()
    rows = torch.arange(n)
    while bool((node >= 0).any()):
        live = node >= 0
        out[rows[live], level[live]] = tokens[node[live]]
        node = torch.where(live, parents[node.clamp_min(0)], node)
        level = level - 1
    return out


def merge_scored(sources: Sequence[Scored]) -> Scored:
    """One trie holding every source's nodes; a node proposed by several sources keeps the largest score."""
    kept = [s for s in sources if s[0].numel()]
    if not kept:
        return empty_scored()
    paths = [node_paths(t, p) for t, p, _ in kept]
    width = max(p.shape[1] for p in paths)
    rows = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1) for p in paths])
    scores = torch.cat([s.double() for _, _, s in kept])
    tokens, parents, _, node_of = continuation_trie(rows)
    ends = node_of.gather(1, ((rows >= 0).sum(1) - 1)[:, None]).flatten()  # the node each row ends at
    merged = torch.zeros(tokens.shape[0], dtype=torch.float64).scatter_reduce(0, ends, scores, "amax")
    return tokens, parents, merged


def best_nodes(scored: Scored, budget: int, min_score: float = 0.0, first_seen: Tensor | None = None) -> Scored:
    """The `budget` highest-scored nodes (none below `min_score`), breadth-first, renumbered.

    Ties go to the shallower node (so a parent precedes its child), then to the smaller `first_seen`
    (by default the node's index)."""
    tokens, parents, score = scored
    if tokens.numel() == 0:
        return empty_scored()
    depth = depths(parents)
    order = torch.arange(tokens.shape[0]) if first_seen is None else torch.argsort(first_seen, stable=True)
    order = order[torch.argsort(depth[order], stable=True)]
    order = order[torch.argsort(-score[order], stable=True)]
    chosen = order[:budget]
    chosen = chosen[score[chosen] >= min_score]
    if chosen.numel() == 0:
        return empty_scored()
    chosen = chosen[torch.argsort(depth[chosen] * tokens.shape[0] + chosen, stable=True)]  # breadth-first
    new_index = torch.full((tokens.shape[0],), -1, dtype=torch.long)
    new_index[chosen] = torch.arange(chosen.shape[0])
    above = parents[chosen]
    return tokens[chosen], torch.where(above >= 0, new_index[above.clamp_min(0)], above), score[chosen]
