"""`sequoia`: Sequoia (Chen et al. 2024), DP-optimal static trees with children drawn without
replacement (docs/algorithms.md §7).

The tree shape comes from Sequoia's dynamic program (`drafting.sequoia_dp`) for `--budget` nodes and
`--max-depth` levels under an acceptance vector (`--accept`: given, measured by `specdec tune`, or a
typical prior), or is the tuned winner (`--tree auto`). At T > 0 the children of a node are drawn
without replacement (SWOR) from the draft's processed distribution, in sampling order, and verified
by `verify_swor`; in greedy mode (and always at T = 0) the children are the draft's top-k, verified
by sample-and-match (the greedy tree walk at T = 0).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, choice, option, positive_int
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, logits_to_probs
from specdec.core.hardware import fingerprint
from specdec.core import store
from specdec.core.tree import TokenTree, depths, keep_subtree, paths_to_parents
from specdec.drafting.base import Proposal
from specdec.drafting.draft_model import DraftModel, OneModelTreeDrafter
from specdec.drafting.sequoia_dp import Paths, check_accept, sequoia_dp
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register
from specdec.models.base import LanguageModel
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match
from specdec.verify.swor import verify_swor

DEFAULT_BUDGET = 16
DEFAULT_MAX_DEPTH = 6
# Used only when no acceptance vector is given (`--accept`) and none was measured
# (`specdec tune`): a typical shape for a draft from the target's own family — the top child
# wins most of the time, later ones rarely. Any vector gives a lossless tree; a measured one
# gives a faster one.
PRIOR_ACCEPT = (0.7, 0.1, 0.04, 0.02, 0.01, 0.01, 0.005, 0.005)
MODES = ("swor", "greedy")


class SequoiaDrafter(OneModelTreeDrafter):
    """Drafts a static tree shape (path tuples) level by level, with distinct children per node.

    mode "swor": at T > 0, each node's children are drawn without replacement from the draft's
    processed distribution (the target's sampling operator), the r-th draw filling child rank r,
    and the tree is verified by SWOR; a node whose distribution has fewer tokens than the
    shape asks for gets fewer children (their subtrees are dropped). mode "greedy", and any
    mode at T = 0: the children are the draft's top-k tokens, verified by sample-and-match.
    """

    def __init__(self, model: LanguageModel, sampling: SamplingConfig, paths: Paths, mode: str = "swor",
                 record_confidence: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"sequoia mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not paths:
            raise ValueError("a Sequoia tree needs at least one drafted node")
        self.draft = DraftModel(model)
        self.draft_models = [model]
        self.sampling = sampling
        self.mode = mode
        self.paths = [tuple(p) for p in paths]
        self.shape_parents, self.shape_ranks = paths_to_parents(self.paths)  # [N] each, breadth-first
        self.max_nodes = int(self.shape_parents.shape[0])
        shape_depth = depths(self.shape_parents) + 1  # [N], 1 = child of the root
        self.max_depth = int(shape_depth.max())
        widest = int(self.shape_ranks.max()) + 1
        if widest > model.vocab_size:
            raise ValueError(f"the tree gives a node {widest} children but the vocabulary has {model.vocab_size} tokens")
        # Breadth-first order puts each level in one contiguous run, siblings in rank order.
        self._levels = [torch.nonzero(shape_depth == d).flatten() for d in range(1, self.max_depth + 1)]
        n_children = torch.bincount(self.shape_parents + 1, minlength=self.max_nodes + 1)  # [N + 1], 0 = root
        self._has_children = n_children[1:] > 0  # [N]
        self.sampled = mode == "swor" and not sampling.greedy
        if self.sampled:
            self.verifier = verify_swor
        else:
            self.verifier = verify_greedy if sampling.greedy else verify_sample_and_match
        self._node_slots: Tensor | None = None  # [N + 1] per tree node: its slot in the draft's pending block
        self.record_confidence = record_confidence
        self.last_confidence: Tensor | None = None
        """With `record_confidence`: [N] per drafted node of the last tree, the draft's largest
        probability where the node was drawn (its processed q at T > 0, its softmax at T = 0)."""

    def _rank_children(
        self,
        logits: Tensor,  # [P, V] draft logits at the nodes whose children are drawn now
        n_ranks: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:  # ([P, k] tokens, [P, k] bool drawn, [P, V] q or None)
        """The first `n_ranks` children of every node at once, in sampling order."""
        if not self.sampled:
            return torch.topk(logits, n_ranks, dim=-1).indices, torch.ones(logits.shape[0], n_ranks, dtype=torch.bool), None
        draft_probs = logits_to_probs(logits, self.sampling)  # [P, V] what the children are drawn from
        # Gumbel-top-k: the order of log q + Gumbel noise is a draw without replacement, in
        # sampling order (equivalent to Sequoia's exponential keys log(u)/q).
        u = torch.rand(draft_probs.shape, generator=generator, device=draft_probs.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
        keys = torch.log(draft_probs.double()) + gumbel  # -inf where q = 0: never drawn
        top = torch.topk(keys, n_ranks, dim=-1)
        return top.indices, torch.isfinite(top.values), draft_probs

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        n = self.max_nodes
        depth_cap = min(self.max_depth, max_depth)
        logits = (yield from self.draft.catch_up(committed_ids))[None]  # [1, V]: the root's children come from here
        tokens = torch.zeros(n, dtype=torch.long)  # [N] per shape node
        exists = torch.zeros(n, dtype=torch.bool)  # [N] drawn (and its parent exists)
        slots = torch.full((n,), -1, dtype=torch.long)  # [N] slot in the draft's pending region
        q_row = torch.full((n,), -1, dtype=torch.long)  # [N] row of draft_probs each node was drawn from
        conf = torch.zeros(n, dtype=torch.float64) if self.record_confidence else None  # [N]
        q_tables: list[Tensor] = []
        n_q = n_run = 0
        logits_row = torch.full((n + 1,), -1, dtype=torch.long)  # [N + 1] shape node + 1 -> row of `logits`
        logits_row[0] = 0  # the root
        for level in range(depth_cap):
            nodes = self._levels[level]  # [L] shape nodes of this level
            rows = logits_row[self.shape_parents[nodes] + 1]  # [L] parent's logits row, -1 = parent absent
            alive = rows >= 0
            ranks = self.shape_ranks[nodes]
            child_tokens, drawn, draft_probs = self._rank_children(logits, int(ranks.max()) + 1, generator)
            tokens[nodes] = child_tokens.cpu()[rows.clamp_min(0), ranks]
            exists[nodes] = alive & drawn.cpu()[rows.clamp_min(0), ranks]
            if conf is not None:
                dist = draft_probs if draft_probs is not None else torch.softmax(logits.float(), -1)  # [P, V]
                conf[nodes] = dist.max(-1).values.double().cpu()[rows.clamp_min(0)]
            if draft_probs is not None:
                q_row[nodes] = n_q + rows
                q_tables.append(draft_probs)
                n_q += draft_probs.shape[0]
            if level + 1 == depth_cap:
                break
            expand = nodes[exists[nodes] & self._has_children[nodes]]  # [P'] nodes whose children come next
            if expand.numel() == 0:
                break
            parent_of = self.shape_parents[expand]
            block_parents = torch.where(parent_of >= 0, slots[parent_of.clamp_min(0)], parent_of)
            logits = yield from self.draft.extend(tokens[expand], block_parents)  # [P', V]
            slots[expand] = n_run + torch.arange(expand.shape[0])
            n_run += expand.shape[0]
            logits_row.fill_(-1)
            logits_row[expand + 1] = torch.arange(expand.shape[0])
        self._node_slots = torch.cat([torch.tensor([-1]), slots[exists]])
        self.last_confidence = conf[exists] if conf is not None else None
        parents = keep_subtree(self.shape_parents, exists)
        root = int(committed_ids[-1])
        if not self.sampled:
            return TokenTree.from_drafted(root, tokens[exists], parents)
        return TokenTree.from_drafted(root, tokens[exists], parents, None, q_row[exists], torch.cat(q_tables))


TREE_HELP = ("dp (default: the DP tree for --budget/--max-depth/--accept) or auto (the `specdec tune` winner for "
             "this model pair, device, dtype and temperature)")


def parse_tree(value: Any) -> str:
    if value in ("dp", "auto"):
        return str(value)
    if isinstance(value, str) and value.endswith(".json"):
        return value  # a tune profile file (command line and Python API)
    raise ValueError(f"must be dp, auto or a tune profile .json, got {value!r}")


def parse_accept(value: Any) -> Any:
    if value == "auto":
        return "auto"
    return tuple(check_accept(value).tolist())


@dataclass(frozen=True)
class Options(MethodOptions):
    budget: int = option(DEFAULT_BUDGET, "tree tokens the target verifies per call", positive_int)
    max_depth: int = option(DEFAULT_MAX_DEPTH, "deepest tree level", positive_int)
    tree: str = option("dp", TREE_HELP, parse_tree, metavar="dp|auto|PROFILE.json", file_path=True,
                       symbols=("dp", "auto"))
    accept: Any = option(None, "with --tree dp: acceptance vector, e.g. 0.7,0.1,0.05 (P(k-th child accepted)), or auto "
                         "(measured by `specdec tune`; default: a typical prior)", parse_accept, metavar="P1,P2,...")
    sequoia_mode: str | None = option(None, "swor (default; children drawn without replacement, SWOR verification) "
                                      "or greedy (top-k children, sample-and-match); at T=0 both are top-k with the "
                                      "greedy walk",
                               choice(*MODES), choices=MODES)

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int | None:
        return self.budget if self.tree == "dp" else None


@functools.lru_cache(maxsize=64)
def dp_tree(accept: tuple[float, ...], budget: int, depth: int) -> tuple[tuple[int, ...], ...]:
    """Sequoia's DP tree for an acceptance vector, size and depth, solved once per process: every
    request and batch sequence with the same options reuses it (the DP grows with budget²·depth)."""
    return tuple(sequoia_dp(list(accept), budget, depth).tree(budget, depth))


def tuned_profile(ctx: MethodContext, tree: str = "auto") -> dict[str, Any]:
    """The `specdec tune` profile for this setting (`tree` = "auto"), or the one in a given file."""
    device = ctx.target.device
    # Through the module, not names bound at import: a test that replaces `store.read_profile`
    # must see every read this makes.
    if tree not in ("auto", "dp"):
        return store.read_profile(tree, fingerprint(device))
    if ctx.profile_key is None:
        raise ValueError("the tuned tree needs a tune profile key (target, draft, device, dtype); load models by name")
    return store.find_profile(ctx.profile_key, fingerprint(device))


def tuned_drafter(ctx: MethodContext, profile: dict[str, Any], mode: str | None = None) -> "SequoiaDrafter | None":
    """The profile's winner: a Sequoia drafter, or None when plain decoding won."""
    winner = profile["winner"]
    if winner["method"] != "sequoia":
        return None
    return SequoiaDrafter(ctx.drafts[0], ctx.sampling, [tuple(p) for p in winner["paths"]], mode or winner["mode"])


def build(ctx: MethodContext, opts: Options) -> SequoiaDrafter:
    if opts.tree == "dp":
        mode = opts.sequoia_mode or "swor"
        accept = opts.accept
        if accept == "auto":  # the vector `specdec tune` measured for this mode
            kind = "swor" if mode == "swor" and not ctx.sampling.greedy else "topk"
            accept = tuned_profile(ctx)["acceptance"][kind]
            if accept is None:
                raise ValueError(f"the tune profile has no {kind} acceptance vector for this setting")
        accept = check_accept(PRIOR_ACCEPT if accept is None else accept)
        # A tree of n nodes is at most n levels deep: solving for deeper ones only costs time.
        paths = dp_tree(tuple(accept.tolist()), opts.budget, min(opts.max_depth, opts.budget))
        return SequoiaDrafter(ctx.drafts[0], ctx.sampling, list(paths), mode)
    profile = tuned_profile(ctx, opts.tree)
    drafter = tuned_drafter(ctx, profile, opts.sequoia_mode)
    if drafter is None:
        winner = profile["winner"]
        why = "no tree was faster than plain decoding" if winner["method"] == "ar" else "not a Sequoia tree"
        raise ValueError(f"the tuned winner for this setting is {winner.get('label', winner['method'])!r}: {why}; "
                         "use --method auto (which follows the winner) or --tree dp")
    return drafter


TUNING = TuningSpace("tree-dp", lambda setting: [{"budget": size, "max_depth": 8} for size in (2, 4, 8, 16, 32, 64)])
"""Every size, and every depth up to 8, in both modes (the profile's winner keeps its paths)."""

METHOD = register(Method(
    "sequoia",
    "Sequoia: a DP-optimal tree (--budget, --max-depth, --accept; --tree auto = the `specdec tune` winner), "
    "children drawn without replacement and SWOR-verified (--sequoia-mode greedy: top-k, sample-and-match)",
    Options, build, needs_draft_model=True, list_rank=70, tuning=TUNING, examples=({"budget": 6, "max_depth": 3},),
))
