"""`hybrid`: one token tree from free speculators and, only where they fall short, the draft model
(SpecInfer's merge of several speculators, with suffix drafting and Token Recycling as the free ones).

Every step first asks the free speculators, which cost no model pass: suffix drafting over the text
(`suffix`, each node with its estimated probability) and Token Recycling (`recycle`, the target's
own top-k after each token at earlier steps, each node with its rank prior). Their trees are merged
by shared prefixes into one trie (a node two speculators propose is one node). When the free nodes'
estimates promise at least `model_below` accepted tokens (their sum over the `budget` best), the
step sends that tree alone: no draft pass. Otherwise the draft model drafts its greedy chain from the
root, up to `gamma` tokens, stopping before a position where its largest probability is below
`stop_below`; each chain node's estimate is the product of those probabilities. The chain joins the
merge and the `budget` best nodes form the tree (docs/algorithms.md §18).

Exactness: every node, the model's included, is a deterministic function of the committed text and
of earlier steps (the chain is the draft's argmax, never a draw), so tree sample-and-match verifies
the whole tree exactly at any temperature (greedy walk at T = 0; §3.5). The price is acceptance: a
sampled chain under speculative sampling accepts with Σ min(p, q) per token, an argmax chain under
sample-and-match with p(argmax), which is lower at high temperatures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, number_at_least, option, positive_int, probability
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig
from specdec.core.tree import TokenTree
from specdec.drafting.base import Proposal
from specdec.drafting.draft_model import DraftModel
from specdec.drafting.scored_tree import Scored, best_nodes, empty_scored, merge_scored
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.recycle import RecyclingDrafter
from specdec.methods.registry import register
from specdec.methods.suffix import suffix_scored
from specdec.models.base import LanguageModel
from specdec.verify.match import verify_sample_and_match


class HybridDrafter:
    """Suffix drafting and Token Recycling merged into one tree, with the draft model's greedy chain
    added only when their estimates promise fewer than `model_below` accepted tokens."""

    verifier = staticmethod(verify_sample_and_match)

    def __init__(self, model: LanguageModel, sampling: SamplingConfig, budget: int = 16, max_depth: int = 6,
                 gamma: int = 4, stop_below: float = 0.3, model_below: float = 1.5, max_ngram: int = 8,
                 min_prob: float = 0.0) -> None:
        self.model = model
        self.draft = DraftModel(model)
        self.draft_models = [model]
        self.sampling = sampling
        self.max_nodes = check_positive_int("budget", budget)
        self.gamma = min(check_positive_int("gamma", gamma), self.max_nodes)  # the chain lives in the tree
        # No tree of `budget` nodes is deeper than that (the free speculators allocate per level).
        self.max_depth = min(max(check_positive_int("max_depth", max_depth), self.gamma), self.max_nodes)
        self.stop_below, self.model_below, self.max_ngram = float(stop_below), float(model_below), max_ngram
        self.min_prob = float(min_prob)
        self.recycle = RecyclingDrafter(model.vocab_size, budget, max_depth)
        self.model_steps = 0
        """Steps whose tree included a draft-model chain (since `begin`)."""
        self._chain: list[int] = []  # the chain drafted this step (its pending block, less the last token)

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.recycle.begin(prompt_ids, max_len)
        self.draft.begin(max_len + self.gamma)
        self.model_steps = 0
        self._chain = []

    def forward_calls(self) -> list[int]:
        return [self.draft.calls]

    def free_tree(self, committed_ids: Tensor, depth: int) -> Scored:
        """The free speculators' nodes merged, the `budget` most probable."""
        suffix = suffix_scored(committed_ids, depth, self.max_nodes, self.max_ngram)
        recycled = self.recycle.expand(int(committed_ids[-1]), depth)
        return best_nodes(merge_scored([suffix, recycled]), self.max_nodes, self.min_prob)

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        depth = min(self.max_depth, max_depth)
        root = int(committed_ids[-1])
        free = self.free_tree(committed_ids, depth)
        self._chain = []
        if float(free[2].sum()) < self.model_below:
            chain = yield from self.model_chain(committed_ids, min(self.gamma, depth))
            if chain[0].numel():
                self.model_steps += 1
                free = best_nodes(merge_scored([free, chain]), self.max_nodes, self.min_prob)
        return TokenTree.from_drafted(root, free[0], free[1])

    def model_chain(self, committed_ids: Tensor, gamma: int):  # -> Proposal-style sub-coroutine returning Scored
        """The draft's argmax chain, ending before a position whose top probability is below `stop_below`."""
        logits = yield from self.draft.catch_up(committed_ids)  # [V]
        tokens: list[int] = []
        scores: list[float] = []
        reach = 1.0
        for i in range(gamma):  # autoregressive by nature: each token conditions the next pass
            probs = torch.softmax(logits.float(), -1)
            top, token = probs.max(-1)
            if float(top) < self.stop_below:
                break
            reach *= float(top)
            tokens.append(int(token))
            scores.append(reach)
            if i < gamma - 1:
                logits = (yield from self.draft.extend(token.view(1)))[-1]
        if not tokens:
            return empty_scored()
        self._chain = tokens[: self.draft.pending]
        n = len(tokens)
        return (torch.tensor(tokens, dtype=torch.long), torch.arange(-1, n - 1),
                torch.tensor(scores, dtype=torch.float64))

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        # The draft keeps the run chain tokens the target accepted (the accepted path follows the
        # chain's tokens for as long as it runs through the chain's nodes).
        accepted = committed_ids[committed_ids.shape[0] - 1 - result.num_accepted : -1].tolist()
        kept = 0
        while kept < min(len(accepted), len(self._chain)) and accepted[kept] == self._chain[kept]:
            kept += 1
        self.draft.keep_chain(kept)
        self._chain = []

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        self.recycle.observe_target(tree, target_logits)


@dataclass(frozen=True)
class Options(MethodOptions):
    budget: int = option(16, "tree tokens the target verifies per call", positive_int)
    max_depth: int = option(6, "deepest tree level of the free speculators", positive_int)
    gamma: int = option(4, "draft length of the model's chain", positive_int)
    stop_below: float = option(0.3, "end the model's chain before a position where its largest probability is "
                               "below this", probability, metavar="P")
    model_below: float = option(1.5, "call the draft model only when the free nodes promise fewer accepted tokens "
                                "than this (0 = never; the method still loads one: without a draft model use "
                                "suffix or recycle)", number_at_least(0.0), metavar="TOKENS")
    min_prob: float = option(0.0, "leave out nodes whose estimated path probability is below P (0 = fill the budget)",
                             probability, metavar="P")

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.budget


def build(ctx: MethodContext, opts: Options) -> HybridDrafter:
    return HybridDrafter(ctx.drafts[0], ctx.sampling, opts.budget, opts.max_depth, opts.gamma, opts.stop_below,
                         opts.model_below, min_prob=opts.min_prob)


METHOD = register(Method(
    "hybrid", "one tree from free speculators (suffix drafting, Token Recycling) and, only where they promise "
    "little, the draft model's chain", Options, build, needs_draft_model=True, list_rank=35,
    tuning=TuningSpace("decode", lambda setting: [
        {"budget": budget, "gamma": gamma, "model_below": below, "min_prob": 0.1}
        for budget, gamma, below in ((8, 3, 1.0), (12, 4, 2.0))]),
    examples=({"budget": 8, "max_depth": 4, "gamma": 3}, {"budget": 6, "gamma": 2, "model_below": 100.0}),
))
