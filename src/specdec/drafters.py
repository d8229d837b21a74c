"""Drafters: cheap proposers of the next tokens, behind a two-method contract.

`propose(committed_ids, gamma, generator)` returns a `Proposal` of up to γ tokens following
the committed sequence (whose last token, the pending root, the target has not cached yet).
`observe(committed_ids, num_accepted)` reports the outcome so the drafter can roll its own
state back to what was actually committed (transformers' `update_candidate_strategy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from specdec.lm import LanguageModel
from specdec.sampling import SamplingConfig, logits_to_probs, sample
from specdec.tree import TokenTree, depths, expansion_paths, paths_to_parents
from specdec.verify import VerifyResult


@dataclass(frozen=True)
class Proposal:
    tokens: Tensor  # [γ'] int64, γ' <= γ (0 when the drafter has nothing to offer)
    draft_probs: Tensor | None  # [γ', V] distribution each token was drawn from; None = deterministic


class Drafter(Protocol):
    has_draft_probs: bool
    """True when proposals carry the distribution they were sampled from (at T > 0)."""

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        """Start a new sequence; `max_len` bounds prompt + generated + drafted tokens."""

    def propose(
        self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None
    ) -> Proposal | TokenTree:
        """Up to `gamma` tokens continuing `committed_ids` ([L] int64): a chain, or a tree
        (tree drafters bound their size themselves and read `gamma` as a cap on depth)."""

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        """`committed_ids` now ends with the accepted drafts and the recovered/bonus token."""


class ModelDrafter:
    """A small causal LM drafting a chain autoregressively with its own KV cache.

    Drafts are drawn with the same sampling operator as the target (argmax at T = 0) and the
    distribution each was drawn from is returned, as speculative sampling requires
    (algorithms.md §9.1). The cache is fed every committed token it has not seen yet, so the
    bonus token and a fully accepted last draft are never missing from it (§1.3, §9.5).
    """

    has_draft_probs = True

    def __init__(self, model: LanguageModel, sampling: SamplingConfig) -> None:
        self.model = model
        self.draft_models = [model]
        self.sampling = sampling
        self._len_at_propose = 0
        self._gamma = 0
        self._calls = 0

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.model.reset(max_len)
        self._calls = 0

    def forward_calls(self) -> list[int]:
        """Forward passes of the draft model since `begin` (for SWI, `specdec.cost`)."""
        return [self._calls]

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> Proposal:
        self._len_at_propose, self._gamma = committed_ids.shape[0], gamma
        if gamma <= 0:
            return Proposal(committed_ids.new_empty(0), None)
        unseen = committed_ids[self.model.kv_len :]  # at least the pending root
        logits = self.model.forward(unseen, last_only=True)
        self.model.commit(unseen.shape[0])
        self._calls += 1
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        for i in range(gamma):
            if self.sampling.greedy:
                token = logits[-1].argmax(-1, keepdim=True)
            else:
                dist = logits_to_probs(logits[-1], self.sampling)
                token = sample(dist, generator).view(1)
                probs.append(dist)
            tokens.append(token)
            if i < gamma - 1:  # the last draft is only cached if it gets accepted (next propose)
                logits = self.model.forward(token)
                self.model.commit(1)
                self._calls += 1
        return Proposal(
            torch.cat(tokens).to(committed_ids.device),
            torch.stack(probs) if probs else None,
        )

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        # The cache holds the old committed tokens plus drafts 1..γ-1; of those drafts only the
        # accepted ones stay valid.
        valid = self._len_at_propose + min(result.num_accepted, max(self._gamma - 1, 0))
        if self.model.kv_len > valid:
            self.model.crop(valid)


class PromptLookupDrafter:
    """Prompt lookup decoding: copy what followed the latest earlier occurrence of the last n-gram.

    Tries n = max_ngram down to min_ngram over prompt + output and proposes the tokens that
    followed the most recent earlier match. No model and no distribution: proposals are
    deterministic, so sampled decoding verifies them by sample-and-match.
    """

    has_draft_probs = False

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        pass

    draft_models: tuple[LanguageModel, ...] = ()  # none: prompt lookup is free in the SWI cost model

    def forward_calls(self) -> list[int]:
        return []

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> Proposal:
        return Proposal(lookup_continuation(committed_ids, gamma, self.max_ngram, self.min_ngram), None)

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        pass


def lookup_continuation(
    ids: Tensor,  # [L] int64
    gamma: int,
    max_ngram: int,
    min_ngram: int = 1,
) -> Tensor:  # [<= γ] int64
    """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram."""
    length = ids.shape[0]
    if gamma <= 0:
        return ids.new_empty(0)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = ids[length - n :]
        # windows[i] = ids[i : i + n] for every start i that leaves at least one token after it.
        windows = ids[: length - 1].unfold(0, n, 1)  # [length - n, n]
        hits = (windows == suffix).all(-1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1].item()) + n
            return ids[start : start + gamma]
    return ids.new_empty(0)


class _LocalTree:
    """One drafter's part of a tree: unique (parent, token) nodes and the draws that hit them."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.index: dict[tuple[int, int], int] = {}
        self.cands: list[tuple[int, int]] = []  # (node, row of the q table it was drawn from)
        self.forwarded: dict[int, int] = {}  # node -> slot in the drafter's pending region

    def add(self, parent: int, token: int, q_row: int) -> int:
        key = (parent, token)
        node = self.index.get(key)
        if node is None:
            node = self.index[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
        self.cands.append((node, q_row))
        return node


class TreeDrafter:
    """SpecInfer token trees from one or several draft models (expansion- and merge-based).

    Each drafter grows a tree of a static shape (an expansion ⟨k1,…,km⟩ or path tuples) with
    one draft forward per level over all nodes of that level that get children. When sampling,
    children are i.i.d. draws from the drafter's processed distribution (what MSS needs); when
    greedy, the top-k tokens. Identical tokens under one parent share a node — and one KV slot
    in the target — but every draw stays its own candidate with its own distribution. Trees of
    several drafters are merged the same way, by shared prefixes.
    """

    def __init__(
        self,
        models: list[LanguageModel],
        sampling: SamplingConfig,
        expansion: list[int] | None = None,
        paths: list[tuple[int, ...]] | None = None,
    ) -> None:
        if not models:
            raise ValueError("TreeDrafter needs at least one draft model")
        if (expansion is None) == (paths is None):
            raise ValueError("give exactly one of expansion or paths")
        self.models = models
        self.model = models[0]  # for vocabulary checks
        self.sampling = sampling
        self.shape_parents, _ = paths_to_parents(paths if paths is not None else expansion_paths(expansion or []))
        self.shape_size = int(self.shape_parents.shape[0])
        self._shape_children: dict[int, list[int]] = {}  # shape node (-1 = root) -> its children
        for i, p in enumerate(self.shape_parents.tolist()):
            self._shape_children.setdefault(p, []).append(i)
        self.max_depth = int(depths(self.shape_parents).max()) + 1
        self.max_nodes = self.shape_size * len(models)
        """Upper bound on the merged tree's size (the target scores at most this many drafts)."""
        self.has_draft_probs = not sampling.greedy
        self._locals: list[_LocalTree] = []
        self._global_of: list[list[int]] = []

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        for lm in self.models:
            lm.reset(max_len + self.shape_size)

    def _grow(self, lm: LanguageModel, committed_ids: Tensor, max_depth: int,
              q_rows: list[Tensor], generator: torch.Generator | None) -> _LocalTree:
        local = _LocalTree()
        unseen = committed_ids[lm.kv_len :]
        logits = lm.forward(unseen, last_only=True)[-1]
        lm.commit(unseen.shape[0])
        shape_children = self._shape_children
        # frontier: local node (-1 = root) -> (its draft logits, the shape nodes it stands for)
        frontier: dict[int, tuple[Tensor, list[int]]] = {-1: (logits, [-1])}
        for _ in range(max_depth):
            next_level: dict[int, list[int]] = {}
            for parent, (node_logits, shape_nodes) in frontier.items():
                wanted = [c for s in shape_nodes for c in shape_children.get(s, [])]
                if not wanted:
                    continue
                if self.sampling.greedy:
                    k = min(len(wanted), node_logits.shape[-1])
                    draws = torch.topk(node_logits, k).indices.tolist()
                    wanted, q_row = wanted[:k], -1
                else:
                    q = logits_to_probs(node_logits, self.sampling)
                    q_row = len(q_rows)
                    q_rows.append(q)
                    draws = torch.multinomial(q, len(wanted), replacement=True, generator=generator).tolist()
                for shape_node, token in zip(wanted, draws):
                    node = local.add(parent, token, q_row)
                    next_level.setdefault(node, []).append(shape_node)
            # Only nodes that will get children need a draft forward.
            expand = [n for n, s in next_level.items() if any(shape_children.get(x) for x in s)]
            if not expand:
                break
            block_parents = torch.tensor(
                [local.forwarded[local.parents[n]] if local.parents[n] >= 0 else -1 for n in expand]
            )
            for n in expand:
                local.forwarded[n] = len(local.forwarded)
            level_logits = lm.forward(torch.tensor([local.tokens[n] for n in expand]), block_parents, append=True)
            frontier = {n: (level_logits[i], next_level[n]) for i, n in enumerate(expand)}
        return local

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> TokenTree:
        q_rows: list[Tensor] = []
        self._locals = [self._grow(lm, committed_ids, gamma, q_rows, generator) for lm in self.models]
        # Merge the drafters' trees by shared prefixes into one target-side tree.
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}
        cand_nodes: list[int] = []
        cand_rows: list[int] = []
        self._global_of = []
        for local in self._locals:
            to_global: list[int] = []
            for tok, par in zip(local.tokens, local.parents):
                key = (to_global[par] if par >= 0 else -1, tok)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(key[0])
                to_global.append(index[key])
            self._global_of.append(to_global)
            for node, row in local.cands:
                cand_nodes.append(to_global[node])
                cand_rows.append(row)
        # A node is created after its parent in every drafter's pass, so parents[i] < i holds.
        return TokenTree(
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            torch.tensor(cand_nodes, dtype=torch.long),
            torch.tensor(cand_rows, dtype=torch.long) if q_rows else None,
            torch.stack(q_rows) if q_rows else None,
        )

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        accepted = set(result.path())
        for lm, local, to_global in zip(self.models, self._locals, self._global_of):
            # This drafter's accepted nodes that it has run through its model, in path order.
            keep = [local.forwarded[n] for n in range(len(local.tokens))
                    if to_global[n] in accepted and n in local.forwarded]
            lm.commit(torch.tensor(sorted(keep), dtype=torch.long))

