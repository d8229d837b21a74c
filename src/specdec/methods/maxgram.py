"""`maxgram`: Max-Gram alone, the statistical bottom level of CS Drafting used as a free drafter
(docs/algorithms.md §8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, choice, option, positive_int
from specdec.core.tree import TokenTree
from specdec.drafting.base import ModelFreeDrafter, Proposal, finished
from specdec.drafting.bigram import BigramTable, table_for_tokenizer
from specdec.drafting.ngram import maxgram_continuation
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register

DEFAULT_GAMMA = 4
FILLS = ("bigram", "none")


class MaxGramDrafter(ModelFreeDrafter):
    """Max-Gram's chain of up to `gamma` tokens, verified by the target (greedy / sample-and-match).

    No model and no distribution; its SWI cost is zero, so its SWI is its tokens per target call.
    """

    def __init__(self, bigram: BigramTable | None = None, gamma: int = DEFAULT_GAMMA) -> None:
        self.bigram = bigram
        self.max_depth = self.max_nodes = check_positive_int("gamma", gamma)
        self._next_token: list[int] | None = None

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        # The prompt's own bigrams win over the corpus's; a list makes the fill walk cheap.
        self._next_token = self.bigram.with_prompt(prompt_ids).next_token.tolist() if self.bigram else None

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        drafts = maxgram_continuation(committed_ids, min(self.max_depth, max_depth), self._next_token)
        return finished(TokenTree.chain(int(committed_ids[-1]), drafts))


def context_bigram(ctx: MethodContext, fill: str) -> BigramTable | None:
    """The bigram table Max-Gram fills from (the target tokenizer's), or None with fill "none"."""
    if fill == "none":
        return None
    if ctx.tokenizer is None:
        raise ValueError(
            "Max-Gram's bigram fill needs the target's tokenizer to build its table; "
            "this pipeline has none (pass maxgram_fill='none' to copy from the context only)"
        )
    return table_for_tokenizer(ctx.tokenizer, ctx.target.vocab_size)


FILL_HELP = ("fill Max-Gram's proposals from the tokenizer's bigram table (bigram, the default; built and cached "
             "on first use, see `specdec bigram build`) or not at all (none)")


@dataclass(frozen=True)
class Options(MethodOptions):
    gamma: int = option(DEFAULT_GAMMA, "draft length per target call", positive_int)
    maxgram_fill: str = option("bigram", FILL_HELP, choice(*FILLS), choices=FILLS)

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.gamma


def build(ctx: MethodContext, opts: Options) -> MaxGramDrafter:
    return MaxGramDrafter(context_bigram(ctx, opts.maxgram_fill), opts.gamma)


TUNING = TuningSpace("replay", lambda setting: [
    {"gamma": gamma, "maxgram_fill": "bigram" if setting.bigram_cached else "none"} for gamma in (2, 3, 4, 6, 8)
])

METHOD = register(Method(
    "maxgram", "Max-Gram: longest earlier match of the text's suffix, then a bigram table; no draft model",
    Options, build, list_rank=50, tuning=TUNING, examples=({"maxgram_fill": "none"},),
))
