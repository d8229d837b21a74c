"""`pld`: prompt lookup decoding, a model-free drafter (docs/algorithms.md §9)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, option, positive_int
from specdec.core.tree import TokenTree
from specdec.drafting.base import ModelFreeDrafter, Proposal, finished
from specdec.drafting.ngram import lookup_continuation
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register

DEFAULT_GAMMA = 4


class PromptLookupDrafter(ModelFreeDrafter):
    """Copy what followed the latest earlier occurrence of the last n-gram of prompt + output.

    Tries n = max_ngram down to min_ngram and proposes up to `gamma` tokens that followed the most
    recent earlier match. No model and no distribution: proposals are deterministic, so sampled
    decoding verifies them by sample-and-match (greedy at T = 0).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, gamma: int = DEFAULT_GAMMA) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_depth = self.max_nodes = check_positive_int("gamma", gamma)

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        gamma = min(self.max_depth, max_depth)
        drafts = lookup_continuation(committed_ids, gamma, self.max_ngram, self.min_ngram)
        return finished(TokenTree.chain(int(committed_ids[-1]), drafts))


@dataclass(frozen=True)
class Options(MethodOptions):
    gamma: int = option(DEFAULT_GAMMA, "draft length per target call", positive_int)
    max_ngram: int = option(3, "longest n-gram to look up", positive_int)
    min_ngram: int = option(1, "shortest n-gram to look up", positive_int)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.gamma


def build(ctx: MethodContext, opts: Options) -> PromptLookupDrafter:
    return PromptLookupDrafter(opts.max_ngram, opts.min_ngram, opts.gamma)


METHOD = register(Method(
    "pld", "prompt lookup: n-gram copy from prompt + output, no draft model", Options, build, list_rank=20,
    tuning=TuningSpace("replay", lambda setting: [{"gamma": gamma} for gamma in (2, 3, 4, 6, 8)]),
    examples=({"max_ngram": 2},),
))
