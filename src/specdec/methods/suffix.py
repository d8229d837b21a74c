"""`suffix`: suffix drafting over the prompt and everything generated so far, several continuations as
one token tree, no model (after SuffixDecoding, Oliaro et al. 2024).

Every earlier place where the text's last tokens occurred is a guess at what comes next. Prompt
lookup (`pld`) copies the latest occurrence of the longest match; `pld-tree` merges the
continuations of every occurrence of the longest match in insertion order. This method weighs
them: each earlier position gets its match length (how many of the text's last tokens, up to
`max_ngram`, end there), the continuations of the `occurrences` best-matching positions are merged
into a trie, and each trie node gets an estimated probability from counts — for every match length
n, the share of positions matching at least n tokens whose continuation starts with the node's
path, discounted by `BACKOFF` per token of match below the longest; a node's estimate is the best
over n. The `budget` most probable nodes (at most `max_depth` levels; none below `min_prob`) form
the tree; the estimate never grows along a path, so the tree is ancestor-closed
(docs/algorithms.md §17).

Proposals are a deterministic function of the text, so tree sample-and-match verifies them exactly
at any temperature (greedy walk at T = 0; §3.5), and the quick tune replays them on text (§13).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, option, positive_int, probability
from specdec.core.tree import TokenTree
from specdec.drafting.base import ModelFreeDrafter, Proposal, finished
from specdec.drafting.scored_tree import Scored, best_nodes, continuation_trie, empty_scored
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register

BACKOFF = 0.5
"""Discount of a shorter context's estimate, per token of match below the longest one found."""


def match_lengths(ids: Tensor, max_ngram: int) -> Tensor:  # ids: [L] int64 -> [L - 1] int64
    """For every position e < L - 1 (a token follows it): how many of the text's last tokens (at most
    `max_ngram`) end at e — ids[e - n + 1 : e + 1] == ids[L - n :] — one tensor op per n."""
    length = ids.shape[0]
    if length < 2:
        return ids.new_zeros(0)
    ends = torch.arange(length - 1)
    alive = ids[: length - 1] == ids[length - 1]
    matched = alive.long()
    for n in range(1, min(max_ngram, length - 1)):
        alive = alive & (ends >= n) & (ids[(ends - n).clamp_min(0)] == ids[length - 1 - n])
        if not bool(alive.any()):
            break
        matched += alive.long()
    return matched


def suffix_scored(
    ids: Tensor,  # [L] int64: the committed text
    max_depth: int,
    budget: int,
    max_ngram: int = 8,
    occurrences: int = 64,
    min_prob: float = 0.0,
) -> Scored:  # N <= budget nodes, breadth-first, parents -1 = child of the root, with their estimates
    """The most probable continuation trie (module docstring) and each node's estimated probability."""
    ids = ids.cpu().long()
    matched = match_lengths(ids, max_ngram)  # [L - 1]
    if matched.numel() == 0 or int(matched.max()) == 0:
        return empty_scored()
    # The best-matching positions, the latest first among equals.
    key = matched * ids.shape[0] + torch.arange(matched.shape[0])
    pick = torch.topk(key, min(occurrences, int((matched > 0).sum()))).indices  # [K] end positions
    length = ids.shape[0]
    offsets = pick[:, None] + 1 + torch.arange(max_depth)  # [K, D]
    conts = torch.where(offsets < length, ids[offsets.clamp_max(length - 1)], torch.full_like(offsets, -1))
    tokens, parents, _, node_of = continuation_trie(conts)
    if tokens.numel() == 0:
        return empty_scored()
    score = node_scores(matched[pick], node_of, tokens.shape[0])
    # Among equally probable nodes, the one first reached by the latest occurrence.
    first_seen = torch.full((tokens.shape[0],), pick.shape[0], dtype=torch.long)
    rows = torch.arange(pick.shape[0])[:, None].expand_as(node_of)
    first_seen.scatter_reduce_(0, node_of[node_of >= 0], rows[node_of >= 0], "amin")
    return best_nodes((tokens, parents, score), budget, min_prob, first_seen)


def suffix_tree(ids: Tensor, max_depth: int, budget: int, max_ngram: int = 8, occurrences: int = 64,
                min_prob: float = 0.0) -> tuple[Tensor, Tensor]:  # ([N] tokens, [N] parents), N <= budget
    """`suffix_scored` without the estimates."""
    tokens, parents, _ = suffix_scored(ids, max_depth, budget, max_ngram, occurrences, min_prob)
    return tokens, parents


def node_scores(matched: Tensor, node_of: Tensor, num_nodes: int) -> Tensor:  # -> [M] float64
    """Each node's estimated probability: the best over match lengths n of the share of positions
    matching >= n tokens that pass through it, times BACKOFF^(longest - n)."""
    longest = int(matched.max())
    ns = torch.arange(1, longest + 1)  # [n]
    member = (matched[:, None] >= ns).double()  # [K, n]: position k counts at match length n
    counts = torch.zeros(num_nodes, ns.shape[0], dtype=torch.float64)
    valid = node_of >= 0
    rows = torch.arange(node_of.shape[0])[:, None].expand_as(node_of)[valid]
    counts.index_add_(0, node_of[valid], member[rows])
    share = counts / member.sum(0).clamp_min(1)  # [M, n]
    return (share * BACKOFF ** (longest - ns).double()).max(1).values


class SuffixDrafter(ModelFreeDrafter):
    """The most probable continuations of the text's suffix, merged into one tree (no model)."""

    def __init__(self, budget: int = 16, max_depth: int = 6, max_ngram: int = 8, occurrences: int = 64,
                 min_prob: float = 0.0) -> None:
        self.max_nodes = check_positive_int("budget", budget)
        # A tree of `budget` nodes is never deeper than that (and the continuations are [K, depth]).
        self.max_depth = min(check_positive_int("max_depth", max_depth), self.max_nodes)
        self.max_ngram = check_positive_int("max_ngram", max_ngram)
        self.occurrences = check_positive_int("occurrences", occurrences)
        self.min_prob = float(min_prob)

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        tokens, parents = suffix_tree(committed_ids, min(self.max_depth, max_depth), self.max_nodes,
                                      self.max_ngram, self.occurrences, self.min_prob)
        return finished(TokenTree.from_drafted(int(committed_ids[-1]), tokens, parents))


@dataclass(frozen=True)
class Options(MethodOptions):
    budget: int = option(16, "tree tokens the target verifies per call", positive_int)
    max_depth: int = option(6, "deepest tree level", positive_int)
    max_ngram: int = option(8, "longest n-gram to look up", positive_int)
    occurrences: int = option(64, "earlier positions (the best-matching) whose continuations are merged", positive_int)
    min_prob: float = option(0.0, "leave out nodes whose estimated path probability is below P (0 = fill the budget)",
                             probability, metavar="P")

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.budget


def build(ctx: MethodContext, opts: Options) -> SuffixDrafter:
    return SuffixDrafter(opts.budget, opts.max_depth, opts.max_ngram, opts.occurrences, opts.min_prob)


METHOD = register(Method(
    "suffix", "suffix drafting: the most probable continuations of the text's suffix (prompt and output), "
    "as one token tree (no model)", Options, build, list_rank=26,
    tuning=TuningSpace("replay", lambda setting: [
        {"budget": budget, "max_depth": depth, **({"min_prob": p} if p else {})}
        for budget in (4, 8, 16) for depth in (4, 8) for p in (0.0, 0.1)]),
    examples=({"budget": 8, "max_depth": 4, "max_ngram": 3}, {"budget": 6, "max_depth": 3, "min_prob": 0.2}),
))
