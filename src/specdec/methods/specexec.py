"""`specexec`: SpecExec (Svirschevski et al. 2024), a big draft tree grown best-first and verified by
sample-and-match (docs/algorithms.md §6).

The draft grows the tree as a batched best-first search (a parallel Dijkstra over edge
weights −log q): a node's score is the sum of the draft log-probabilities along its path, and
each draft forward expands the `max_beams` best unexpanded nodes at once, proposing their
`branch_width` most likely children. The tree kept is the `budget` best-scoring nodes.

The children are a deterministic function of the draft, so the tree is verified by
sample-and-match (docs/algorithms.md §3, §6): the target draws one token at every node and the
walk follows the child holding that token. Every emitted token is a fresh target sample, which
is exact at any temperature, top-k and top-p (our nucleus filter is `sampling.logits_to_probs`,
not the authors' inverted one, §12), and at T = 0 the walk is the greedy tree walk.

Why best-first: with sample-and-match, E[tokens per target call] = 1 + Σ_v Π_{u on path(v)}
target(u | prefix(u)) (§6), and the best-first tree maximises the draft's estimate of that sum
for a given size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, option, positive_int, probability
from specdec.core.results import VerifyResult
from specdec.core.sampling import TINY_TEMPERATURE, SamplingConfig
from specdec.core.tree import TokenTree, keep_subtree
from specdec.drafting.base import Proposal
from specdec.drafting.draft_model import DraftModel, OneModelTreeDrafter
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register
from specdec.models.base import LanguageModel
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match

# Sized for a CPU, where a target pass over k tokens grows with k; SpecExec's own defaults
# (budget 1024, depth 32, 128 beams, width 32) are for offloaded targets (see `specdec tune`).
DEFAULT_BUDGET = 32
DEFAULT_MAX_DEPTH = 8
DEFAULT_MAX_BEAMS = 8
DEFAULT_BRANCH_WIDTH = 8


class SpecExecDrafter(OneModelTreeDrafter):
    """Best-first draft trees of up to `budget` nodes (one draft model, batch 1)."""

    def __init__(
        self,
        model: LanguageModel,
        sampling: SamplingConfig,
        budget: int = DEFAULT_BUDGET,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_beams: int = DEFAULT_MAX_BEAMS,
        branch_width: int = DEFAULT_BRANCH_WIDTH,
        min_prob: float = 0.0,
    ) -> None:
        self.draft = DraftModel(model)
        self.draft_models = [model]
        self.sampling = sampling
        self.budget = check_positive_int("budget", budget)
        self.max_depth = check_positive_int("max_depth", max_depth)
        self.max_beams = check_positive_int("max_beams", max_beams)
        self.branch_width = min(check_positive_int("branch_width", branch_width), model.vocab_size)
        self.max_nodes = self.budget
        """The tree never holds more nodes than the budget (the decoder sizes the target's block by it)."""
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be a probability in [0, 1], got {min_prob}")
        # Adaptive size: a node whose path probability under the draft is below min_prob is neither
        # kept nor expanded, so an unsure draft builds a small tree (docs/algorithms.md §6.7).
        self.log_min_prob = math.log(min_prob) if min_prob > 0 else -math.inf
        # The children are deterministic: sample-and-match is exact at any temperature.
        self.verifier = verify_greedy if sampling.greedy else verify_sample_and_match
        # Scores rank candidate tokens by the draft's guess of the target's probability. At T > 0
        # that is the draft at the same temperature; at T = 0 the target is one-hot and any
        # ranking works, so the plain softmax is used. Top-k/top-p are left out on purpose: a
        # token the draft filters out may still be one the target samples.
        # (Floored: scores only rank the nodes, and a near-zero temperature would overflow them.)
        self.scoring_temperature = 1.0 if sampling.greedy else max(sampling.temperature, TINY_TEMPERATURE)
        self.last_scores: Tensor | None = None
        """[N] float64: each node of the last proposed tree's score (sum of draft log-probs on its path)."""
        self._node_slots: Tensor | None = None  # [N + 1] per tree node: its slot in the draft's pending block

    def _children(
        self,
        logits: Tensor,  # [B, V] draft logits at the nodes being expanded
        parent_scores: Tensor,  # [B] float64, their scores
    ) -> tuple[Tensor, Tensor]:  # ([B, w] int64 child tokens, [B, w] float64 child scores), on the CPU
        log_q = torch.log_softmax(logits.double() / self.scoring_temperature, dim=-1)
        child_log_q, child_tokens = torch.topk(log_q, self.branch_width, dim=-1)
        scores = parent_scores[:, None] + child_log_q.cpu()
        # Below the floor: -inf, which is never expanded nor kept (the tree stays ancestor-closed,
        # since scores only fall along a path).
        return child_tokens.cpu(), scores.masked_fill(scores < self.log_min_prob, -math.inf)

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        depth_cap = min(self.max_depth, max_depth)
        root_logits = (yield from self.draft.catch_up(committed_ids))[None]  # [1, V]

        # The growing tree, one entry per node in creation order (so parents come first).
        child_tokens, child_scores = self._children(root_logits, torch.zeros(1, dtype=torch.float64))
        tokens = child_tokens.flatten()  # [M] int64
        scores = child_scores.flatten()  # [M] float64: sum of draft log-probs along the path
        parents = torch.full_like(tokens, -1)  # [M] int64, -1 = child of the root
        node_depth = torch.ones_like(tokens)  # [M] int64, 1 = child of the root
        slots = torch.full_like(tokens, -1)  # [M] int64: slot in the draft's pending region, -1 = not run
        n_run = 0
        for _ in range(depth_cap - 1):  # each draft forward adds at most one level
            # A node outside the current top-`budget` can only fall further (better nodes keep
            # arriving), and its descendants score lower still: never worth a draft forward.
            rank = _best_first_rank(scores)
            expandable = (rank < self.budget) & (slots < 0) & (node_depth < depth_cap) & torch.isfinite(scores)
            room = min(self.max_beams, self.budget - n_run)
            candidates = expandable.nonzero().flatten()
            if room <= 0 or candidates.numel() == 0:
                break
            picked = candidates[torch.argsort(rank[candidates])[:room]]  # [B] the best unexpanded nodes
            parent_of_picked = parents[picked]
            block_parents = torch.where(parent_of_picked >= 0, slots[parent_of_picked.clamp_min(0)], parent_of_picked)
            logits = yield from self.draft.extend(tokens[picked], block_parents)  # [B, V]
            slots[picked] = n_run + torch.arange(picked.shape[0])
            n_run += picked.shape[0]

            child_tokens, child_scores = self._children(logits, scores[picked])
            child_scores = child_scores.flatten()
            # Keep only children that could still make the final top-`budget`.
            pool = torch.cat([scores, child_scores])
            cutoff = torch.topk(pool, self.budget).values[-1] if pool.shape[0] > self.budget else -torch.inf
            keep = (child_scores >= cutoff) & torch.isfinite(child_scores)
            width = child_tokens.shape[1]
            tokens = torch.cat([tokens, child_tokens.flatten()[keep]])
            scores = torch.cat([scores, child_scores[keep]])
            parents = torch.cat([parents, picked.repeat_interleave(width)[keep]])
            node_depth = torch.cat([node_depth, (node_depth[picked] + 1).repeat_interleave(width)[keep]])
            slots = torch.cat([slots, torch.full((int(keep.sum()),), -1, dtype=torch.long)])

        # The final tree: the `budget` best nodes. Along a path scores never increase and a child
        # comes after its parent, so ranking by (score, creation order) keeps it ancestor-closed.
        final = (_best_first_rank(scores) < self.budget) & torch.isfinite(scores)
        self._node_slots = torch.cat([torch.tensor([-1]), slots[final]])
        self.last_scores = scores[final]
        return TokenTree.from_drafted(int(committed_ids[-1]), tokens[final], keep_subtree(parents, final))


def _best_first_rank(scores: Tensor) -> Tensor:  # scores: [M] float64 -> [M] int64 rank, 0 = best
    """Rank by descending score, ties broken by creation order (a parent before its children)."""
    order = torch.sort(-scores, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0])
    return rank


@dataclass(frozen=True)
class Options(MethodOptions):
    budget: int = option(DEFAULT_BUDGET, "tree tokens the target verifies per call", positive_int)
    max_depth: int = option(DEFAULT_MAX_DEPTH, "deepest tree level", positive_int)
    max_beams: int = option(DEFAULT_MAX_BEAMS, "nodes expanded per draft forward", positive_int)
    branch_width: int = option(DEFAULT_BRANCH_WIDTH, "children proposed per expanded node", positive_int)
    min_prob: float = option(0.0, "adaptive tree size: drop nodes whose path probability under the draft is below "
                             "this (0 = off; exact either way)", probability, metavar="P")

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        # The draft runs at most `budget` nodes and the tree keeps at most `budget`.
        return self.budget


def build(ctx: MethodContext, opts: Options) -> SpecExecDrafter:
    return SpecExecDrafter(ctx.drafts[0], ctx.sampling, opts.budget, opts.max_depth, opts.max_beams, opts.branch_width,
                           opts.min_prob)


TUNING = TuningSpace("decode", lambda setting: [
    {"budget": budget, "max_depth": depth, "max_beams": beams, "branch_width": width}
    for budget, depth, beams, width in ((8, 6, 2, 2), (16, 6, 4, 4), (32, 8, 8, 4))
])
"""Decoded for real (`tuning.decoded`): a best-first tree grown by the draft's own probabilities is not the
best static tree of its size, so no positional price fits it."""

METHOD = register(Method(
    "specexec",
    "SpecExec: a best-first draft tree of up to --budget tokens (--max-depth, --max-beams, --branch-width), "
    "sample-and-match verification",
    Options, build, needs_draft_model=True, list_rank=60, tuning=TUNING,
    examples=({"budget": 8, "max_depth": 4, "max_beams": 3, "branch_width": 3},),
))
