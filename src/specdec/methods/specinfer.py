"""`specinfer`: SpecInfer token trees from one or several draft models (docs/algorithms.md §5)."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, int_list, option
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, logits_to_probs
from specdec.core.tree import TokenTree, depths, expansion_paths, paths_to_parents
from specdec.drafting.base import Proposal
from specdec.drafting.draft_model import DraftModel
from specdec.models.batch import ModelCall
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register
from specdec.models.base import LanguageModel
from specdec.verify.greedy import verify_greedy
from specdec.verify.mss import verify_mss

DEFAULT_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer's default ⟨1,1,3,1,1,1,1,1⟩


class _LocalTree:
    """One drafter's part of a tree: unique (parent, token) nodes and the draws that hit them."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.index: dict[tuple[int, int], int] = {}
        self.cands: list[tuple[int, int]] = []  # (node, row of the q table it was drawn from)
        self.slot: dict[int, int] = {}  # node -> slot in the drafter's pending block

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
        models: Sequence[LanguageModel],
        sampling: SamplingConfig,
        expansion: Sequence[int] | None = None,
        paths: list[tuple[int, ...]] | None = None,
    ) -> None:
        if not models:
            raise ValueError("TreeDrafter needs at least one draft model")
        if (expansion is None) == (paths is None):
            raise ValueError("give exactly one of expansion or paths")
        self.draft_models = list(models)
        self.drafts = [DraftModel(lm) for lm in models]
        self.sampling = sampling
        self.shape_parents, _ = paths_to_parents(paths if paths is not None else expansion_paths(list(expansion or [])))
        self.shape_size = int(self.shape_parents.shape[0])
        self._shape_children: dict[int, list[int]] = {}  # shape node (-1 = root) -> its children
        for i, p in enumerate(self.shape_parents.tolist()):
            self._shape_children.setdefault(p, []).append(i)
        self.max_depth = int(depths(self.shape_parents).max()) + 1
        self.max_nodes = self.shape_size * len(models)
        """Upper bound on the merged tree's size (the target scores at most this many drafts)."""
        self.verifier = verify_greedy if sampling.greedy else verify_mss
        self._locals: list[_LocalTree] = []
        self._global_of: list[list[int]] = []
        self._num_nodes = 0

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        for draft in self.drafts:
            draft.begin(max_len + self.shape_size)

    def forward_calls(self) -> list[int]:
        return [d.calls for d in self.drafts]

    def _grow(self, draft: DraftModel, committed_ids: Tensor, max_depth: int,
              q_rows: list[Tensor], generator: torch.Generator | None) -> Generator[ModelCall, Tensor, _LocalTree]:
        local = _LocalTree()
        logits = yield from draft.catch_up(committed_ids)
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
            slot_parents = torch.tensor([local.slot[local.parents[n]] if local.parents[n] >= 0 else -1 for n in expand])
            for n in expand:
                local.slot[n] = len(local.slot)
            level_logits = yield from draft.extend(torch.tensor([local.tokens[n] for n in expand]), slot_parents)
            frontier = {n: (level_logits[i], next_level[n]) for i, n in enumerate(expand)}
        return local

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        q_rows: list[Tensor] = []
        self._locals = []
        for d in self.drafts:
            self._locals.append((yield from self._grow(d, committed_ids, max_depth, q_rows, generator)))
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
        self._num_nodes = len(tokens) + 1
        # A node is created after its parent in every drafter's pass, so parents[i] < i holds.
        return TokenTree.from_drafted(
            int(committed_ids[-1]),
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(parents, dtype=torch.long),
            torch.tensor(cand_nodes, dtype=torch.long),
            torch.tensor(cand_rows, dtype=torch.long) if q_rows else None,
            torch.stack(q_rows) if q_rows else None,
        )

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        for draft, local, to_global in zip(self.drafts, self._locals, self._global_of):
            # Each tree node's slot in this drafter's pending block (-1: not run by this drafter).
            node_slots = torch.full((self._num_nodes,), -1, dtype=torch.long)
            for n, slot in local.slot.items():
                node_slots[to_global[n] + 1] = slot
            draft.keep(node_slots, result)

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        pass  # learns nothing from the target's logits


@dataclass(frozen=True)
class Options(MethodOptions):
    expansion: tuple[int, ...] = option(
        DEFAULT_EXPANSION, "children per tree level, e.g. 1,1,3,1,1,1,1,1 (SpecInfer's default)", int_list,
        metavar="K1,K2,...",
    )

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        # Level i holds k1·…·ki nodes; every drafter grows its own tree of that shape.
        size, level = 0, 1
        for k in self.expansion:
            level *= k
            size += level
        return size * max(num_drafts, 1)


def build(ctx: MethodContext, opts: Options) -> TreeDrafter:
    return TreeDrafter(ctx.drafts, ctx.sampling, expansion=opts.expansion)


TUNING = TuningSpace("static-tree", lambda setting: [
    {"expansion": e} for e in ((2, 1, 1, 1), (2, 2, 1), (3, 1, 1), (1, 1, 3, 1, 1), (2, 1, 1, 1, 1, 1))
])
"""Small shapes: on a CPU a target pass over k tokens grows with k, so SpecInfer's default (20 nodes) rarely pays."""

METHOD = register(Method(
    "specinfer",
    "SpecInfer token trees (--expansion; repeat --draft to merge several drafters' trees), one-pass tree verification",
    Options, build, needs_draft_model=True, list_rank=30, tuning=TUNING, examples=({"expansion": (2, 1, 2)},),
))
