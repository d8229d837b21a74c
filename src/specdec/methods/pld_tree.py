"""`pld-tree`: prompt lookup with every earlier continuation at once, as a token tree.

Prompt lookup (`pld`) copies what followed the *latest* earlier occurrence of the text's last
n-gram. When the n-gram occurred several times with different continuations (code that repeats a
pattern with different arguments, a list, a template), only one of them can be right and `pld`
bets on the latest. This method proposes them all: the continuations of every earlier occurrence of
the longest matching n-gram, latest first, merged into a trie of at most `budget` nodes and
`max_depth` levels, scored by the target in one pass. The children are a deterministic function of
the text, so sample-and-match verifies them exactly at any temperature (greedy walk at T = 0;
docs/algorithms.md §3, §9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, option, positive_int
from specdec.core.tree import TokenTree
from specdec.drafting.base import ModelFreeDrafter, Proposal, finished
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register


def lookup_tree(
    ids: Tensor,  # [L] int64: the committed text
    max_depth: int,
    budget: int,
    max_ngram: int,
    min_ngram: int = 1,
) -> tuple[Tensor, Tensor]:  # ([N] tokens, [N] parents among them, -1 = child of the root), N <= budget
    """The trie of what followed each earlier occurrence of the longest matching suffix n-gram."""
    length = ids.shape[0]
    starts: list[int] = []
    n = 0
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        # windows[i] = ids[i : i + n] for every start i that leaves at least one token after it.
        windows = ids[: length - 1].unfold(0, n, 1)  # [length - n, n]
        starts = (windows == ids[length - n :]).all(-1).nonzero().flatten().tolist()
        if starts:
            break
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}
    for start in reversed(starts):  # the latest occurrence first, as prompt lookup ranks them
        parent = -1
        for tok in ids[start + n : start + n + max_depth].tolist():
            node = index.get((parent, tok))
            if node is None:
                if len(tokens) == budget:
                    break
                node = index[(parent, tok)] = len(tokens)
                tokens.append(tok)
                parents.append(parent)
            parent = node
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)


class PromptLookupTreeDrafter(ModelFreeDrafter):
    """Every earlier continuation of the text's last n-gram, merged into one tree (no model)."""

    def __init__(self, budget: int = 16, max_depth: int = 6, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_nodes = check_positive_int("budget", budget)
        self.max_depth = check_positive_int("max_depth", max_depth)
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        tokens, parents = lookup_tree(committed_ids, min(self.max_depth, max_depth), self.max_nodes,
                                      self.max_ngram, self.min_ngram)
        return finished(TokenTree.from_drafted(int(committed_ids[-1]), tokens, parents))


@dataclass(frozen=True)
class Options(MethodOptions):
    budget: int = option(16, "tree tokens the target verifies per call", positive_int)
    max_depth: int = option(6, "deepest tree level", positive_int)
    max_ngram: int = option(3, "longest n-gram to look up", positive_int)
    min_ngram: int = option(1, "shortest n-gram to look up", positive_int)

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.budget  # the tree never holds more than `budget` drafted nodes

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")


def build(ctx: MethodContext, opts: Options) -> PromptLookupTreeDrafter:
    return PromptLookupTreeDrafter(opts.budget, opts.max_depth, opts.max_ngram, opts.min_ngram)


METHOD = register(Method(
    "pld-tree", "prompt lookup with every earlier continuation of the last n-gram, as one token tree (no model)",
    Options, build, list_rank=25,
    tuning=TuningSpace("replay", lambda setting: [{"budget": budget, "max_depth": depth}
                                                  for budget in (4, 8, 16) for depth in (3, 6)]),
    examples=({"budget": 8, "max_depth": 4, "max_ngram": 2},),
))
