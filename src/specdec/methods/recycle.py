"""`recycle`: Token Recycling (Luo et al. 2024) — a token tree from the target's own past top-k, no model.

Every target pass scores a token tree, and every row of its logits names the tokens the target
itself finds likely after that node. Plain decoding keeps one of them; this method keeps, for every
token of the vocabulary, the `successors` most likely next tokens the target proposed the last
time that token was scored (an adjacency table [V, successors], overwritten with each pass's
top-k, every node of the tree included, rejected branches too). A proposal expands the table
breadth-first from the pending root along a static tree shape of `budget` nodes and `max_depth`
levels: the child of rank r of a node holding token t is table[t, r] (docs/algorithms.md §16).

Before the target has scored anything, the table holds the prompt's own bigrams at rank 0 (the
latest successor of each token), so the first steps copy from the prompt as prompt lookup would.

Exactness: a proposal is a deterministic function of the committed text and of the target's
logits at *earlier* steps (the table is updated after verification, `observe_target`), so it does
not depend on this step's draws, and tree sample-and-match (greedy walk at T = 0) verifies it
exactly at any temperature, top-k and top-p (§3.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, int_up_to, option, positive_int, probability
from specdec.core.tree import TokenTree, depths, paths_to_parents
from specdec.drafting.base import ModelFreeDrafter, Proposal, finished
from specdec.drafting.scored_tree import Scored
from specdec.drafting.sequoia_dp import sequoia_dp
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register

NO_TOKEN = -1
"""A table entry the target has not filled yet: the node (and its subtree) is left out."""

RANK_RATE = 0.05
"""Weight of each step in the moving average of the acceptance by rank."""
RESHAPE_EVERY = 16
"""Steps between two solutions of the tree shape for the measured acceptance by rank."""

RANK_PRIOR = (0.55, 0.12, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008)
"""P(the child of rank r is the accepted one), the positional acceptance the tree shape is solved for
(Sequoia's DP, §7.2) before anything is measured; then the drafter's own measurement takes over
(`rank_accept`). It shapes the tree, never the output."""


def recycling_shape(accept: Tensor, budget: int, max_depth: int) -> tuple[Tensor, Tensor]:
    """(parents [N], ranks [N]) of a static tree, breadth-first (parents first, -1 = the root's
    child): the best tree of `budget` nodes within `max_depth` levels for the positional acceptance
    `accept` ([k], P(the child of rank r is the accepted one); Sequoia's DP, §7.2)."""
    vec = accept.double().clamp_min(1e-4)
    vec = vec / vec.sum().clamp_min(1.0)
    depth = min(max_depth, budget)
    dp = sequoia_dp(vec.tolist(), budget, depth)
    while not dp.feasible(budget, depth):  # more nodes than `successors` children per node allow
        budget -= 1
    return paths_to_parents(dp.tree(budget, depth))


def latest_successors(ids: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:  # ids: [L] int64
    """(tokens, their latest successor in `ids`): the prompt's bigrams, one per distinct token."""
    if ids.shape[0] < 2:
        return ids[:0], ids[:0]
    first, nxt = ids[:-1], ids[1:]
    keep = (first >= 0) & (first < vocab_size)
    first, nxt = first[keep], nxt[keep]
    uniq, inverse = torch.unique(first, return_inverse=True)
    last = torch.full((uniq.shape[0],), -1, dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(first.shape[0]), "amax")
    return uniq, nxt[last]


class RecyclingDrafter(ModelFreeDrafter):
    """Token Recycling: a tree read breadth-first from the adjacency table of the target's top-k."""

    def __init__(self, vocab_size: int, budget: int = 24, max_depth: int = 6, successors: int = 8,
                 min_prob: float = 0.0) -> None:
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.successors = min(check_positive_int("successors", successors), len(RANK_PRIOR), self.vocab_size)
        self.budget = check_positive_int("budget", budget)
        self.depth_cap = check_positive_int("max_depth", max_depth)
        self.min_prob = float(min_prob)
        """Nodes whose estimate is below this are left out (each node widens the target's pass)."""
        self.table = torch.full((self.vocab_size, self.successors), NO_TOKEN, dtype=torch.int32)
        """table[t] = the target's top-`successors` tokens after the last node holding t it scored."""
        self.rank_accept = torch.tensor(RANK_PRIOR[: self.successors], dtype=torch.float64)
        """How often the table's rank-r successor of the root was the target's pick (its argmax), a
        moving average from `RANK_PRIOR`: the tree's shape and its nodes' estimates follow it."""
        self._observed = 0
        self.reshape()
        self.max_nodes = int(self.parents.shape[0])
        self.max_depth = min(self.depth_cap, self.max_nodes)

    def reshape(self) -> None:
        """The tree shape and each node's estimate (the product of `rank_accept` along its path)."""
        self.parents, self.ranks = recycling_shape(self.rank_accept, self.budget, self.depth_cap)
        self.depth = depths(self.parents)  # [N], 0 = the root's children
        prior = self.rank_accept[self.ranks]
        self.prior_score = prior.clone()
        """P(node accepted): the product of `rank_accept` over its path (what a hybrid tree ranks it by)."""
        for level in range(1, int(self.depth.max()) + 1):  # parents first: one level at a time
            at = self.depth == level
            self.prior_score[at] = prior[at] * self.prior_score[self.parents[at]]

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.table.fill_(NO_TOKEN)
        tokens, successor = latest_successors(prompt_ids.cpu().long(), self.vocab_size)
        self.table[tokens, 0] = successor.to(torch.int32)
        self.rank_accept = torch.tensor(RANK_PRIOR[: self.successors], dtype=torch.float64)
        self._observed = 0
        self.reshape()

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        root = int(committed_ids[-1])
        tokens, parents, _ = self.expand(root, max_depth)
        return finished(TokenTree.from_drafted(root, tokens, parents))

    def expand(self, root: int, max_depth: int) -> Scored:  # ([N] tokens, [N] parents (-1 = root), [N] prior)
        """The static shape filled from the table, level by level (one gather per level); nodes whose
        entry is empty, or whose parent was left out, are dropped."""
        n = self.parents.shape[0]
        tokens = torch.full((n,), NO_TOKEN, dtype=torch.long)
        parent_tok = torch.full((n,), root, dtype=torch.long)
        for level in range(min(self.max_depth, max_depth)):
            at = (self.depth == level).nonzero().flatten()
            above = self.parents[at]
            src = torch.where(above >= 0, tokens[above.clamp_min(0)], parent_tok[at])
            ok = (src >= 0) & (src < self.vocab_size)
            tokens[at] = torch.where(ok, self.table[src.clamp(0, self.vocab_size - 1), self.ranks[at]].long(),
                                     torch.full_like(src, NO_TOKEN))
        keep = (tokens >= 0) & (self.prior_score >= self.min_prob)
        # Renumber the kept nodes; a kept node's parent is kept too (a dropped node's children read
        # NO_TOKEN as their source and are dropped with it; estimates never grow along a path).
        new_index = torch.cumsum(keep.long(), 0) - 1
        kept_parents = self.parents[keep]
        return (tokens[keep], torch.where(kept_parents >= 0, new_index[kept_parents.clamp_min(0)], kept_parents),
                self.prior_score[keep])

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        """Each scored token's row of the table becomes the target's top-k after it (where a token
        was scored at several nodes, its shallowest node: the root is the committed context)."""
        top = torch.topk(target_logits, self.successors, dim=-1).indices.cpu()  # [N + 1, k]
        scored = tree.tokens.cpu()
        # Which rank of the root's old row held the target's pick there: the acceptance by rank.
        hits = (self.table[int(scored[0])].long() == top[0, 0]).double()
        self.rank_accept += RANK_RATE * (hits - self.rank_accept)
        self._observed += 1
        if self._observed % RESHAPE_EVERY == 0:
            self.reshape()
        uniq, inverse = torch.unique(scored, return_inverse=True)
        first = torch.full((uniq.shape[0],), scored.shape[0], dtype=torch.long).scatter_reduce(
            0, inverse, torch.arange(scored.shape[0]), "amin")
        self.table[uniq] = top[first].to(torch.int32)


@dataclass(frozen=True)
class Options(MethodOptions):
    budget: int = option(24, "tree tokens the target verifies per call", positive_int)
    max_depth: int = option(6, "deepest tree level", positive_int)
    successors: int = option(8, "next tokens the table keeps per token (the target's top-k; at most 8)",
                             int_up_to(len(RANK_PRIOR)))
    min_prob: float = option(0.0, "leave out nodes whose estimated path probability is below P (0 = the whole shape)",
                             probability, metavar="P")

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.budget


def build(ctx: MethodContext, opts: Options) -> RecyclingDrafter:
    return RecyclingDrafter(ctx.target.vocab_size, opts.budget, opts.max_depth, opts.successors, opts.min_prob)


METHOD = register(Method(
    "recycle", "Token Recycling: a tree from the target's own top-k after each token, seen at earlier steps "
    "(no model)", Options, build, list_rank=27,
    tuning=TuningSpace("decode", lambda setting: [{"budget": budget, "max_depth": depth}
                                                  for budget, depth in ((8, 4), (24, 6))] + [{"budget": 24, "max_depth": 6, "min_prob": 0.1}]),
    examples=({"budget": 8, "max_depth": 4},),
))
