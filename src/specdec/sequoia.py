"""Sequoia (Chen et al. 2024): DP-optimal static trees, children drawn without replacement.

Three parts:
- `sequoia_dp`: the dynamic program of algorithms.md §5 over a positional acceptance vector
  accept[k] = P(the k-th child of a node is the one accepted). It gives, for every size n
  (drafted nodes) and depth d, the best expected tokens per target call F(n, d) and the tree
  that achieves it (as path tuples, child rank by child rank).
- `SequoiaDrafter`: grows that static shape with one draft forward per level. At T > 0 the
  children of a node are drawn without replacement (SWOR) from the draft's processed
  distribution, in sampling order, and verified by `verify_tree_swor`; in greedy mode (and
  always at T = 0) the children are the draft's top-k, verified by sample-and-match (the
  greedy tree walk at T = 0).
- `make_sequoia_drafter` / `make_auto_drafter`: the `sequoia` and `auto` methods, with the tree from
  the DP, or from a `specdec tune` profile (`--tree auto`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from specdec.lm import LanguageModel
from specdec.sampling import SamplingConfig, logits_to_probs
from specdec.specexec import commit_accepted_slots, option, positive_int
from specdec.tree import TokenTree, depths, keep_subtree, paths_to_parents
from specdec.verify import VerifyResult, verify_tree_greedy, verify_tree_sample_and_match, verify_tree_swor

if TYPE_CHECKING:
    from specdec.pipeline import Pipeline

Paths = list[tuple[int, ...]]

DEFAULT_BUDGET = 16
DEFAULT_MAX_DEPTH = 6
# Used only when no acceptance vector is given (`--accept`) and none was measured
# (`specdec tune`): a typical shape for a draft from the target's own family — the top child
# wins most of the time, later ones rarely. Any vector gives a lossless tree; a measured one
# gives a faster one.
PRIOR_ACCEPT = (0.7, 0.1, 0.04, 0.02, 0.01, 0.01, 0.005, 0.005)
MODES = ("swor", "greedy")


# ---- the dynamic program -----------------------------------------------------------------------
def check_accept(accept: Any) -> Tensor:  # -> [W] float64
    """An acceptance vector as a tensor, or a ValueError saying what is wrong with it."""
    if isinstance(accept, str):
        try:
            accept = [float(v) for v in accept.replace(" ", "").strip("[]()").split(",") if v]
        except ValueError:
            raise ValueError(f"an acceptance vector looks like 0.7,0.1,0.05 (one probability per child rank), "
                             f"got {accept!r}") from None
    vec = torch.as_tensor(accept, dtype=torch.float64).flatten()
    if vec.numel() == 0 or not bool(torch.isfinite(vec).all()) or bool((vec < 0).any()) or float(vec.sum()) > 1 + 1e-9:
        raise ValueError(f"an acceptance vector needs >= 1 non-negative entries summing to <= 1, got {vec.tolist()}")
    return vec


@dataclass
class SequoiaDP:
    """The solved DP for every tree size up to `max_size` and depth up to `max_depth`."""

    accept: Tensor  # [W] float64
    value: Tensor  # [max_size + 1, max_depth + 1] float64: F(n, d), -inf where no such tree exists
    best_children: Tensor  # [max_size + 2, max_depth + 2] int64: b* for (m nodes incl. root, l levels incl. root)
    split: Tensor  # [max_depth + 2, W + 1, max_size + 2] int64: y, the nodes left before the b-th child's subtree

    @property
    def max_size(self) -> int:
        return self.value.shape[0] - 1

    @property
    def max_depth(self) -> int:
        return self.value.shape[1] - 1

    def feasible(self, size: int, depth: int) -> bool:
        """Whether some tree has exactly `size` drafted nodes, at most `depth` levels and at most
        len(accept) children per node."""
        return 0 <= size <= self.max_size and 0 <= depth <= self.max_depth and bool(torch.isfinite(self.value[size, depth]))

    def tokens_per_call(self, size: int, depth: int) -> float:
        """F(size, depth): expected tokens per target call (the target's own token included)."""
        self._check(size, depth)
        return float(self.value[size, depth])

    def tree(self, size: int, depth: int) -> Paths:
        """The optimal tree with exactly `size` drafted nodes and at most `depth` levels, as path tuples."""
        self._check(size, depth)
        paths: Paths = []

        def build(nodes: int, levels: int, prefix: tuple[int, ...]) -> None:
            # Undo the recurrence: the b-th child's subtree has nodes - y nodes, then b - 1 children remain.
            sizes = []
            for b in range(int(self.best_children[nodes, levels]), 0, -1):
                y = int(self.split[levels, b, nodes])
                sizes.append(nodes - y)
                nodes = y
            for rank, sub in enumerate(reversed(sizes)):
                paths.append(prefix + (rank,))
                build(sub, levels - 1, prefix + (rank,))

        build(size + 1, depth + 1, ())
        return paths

    def _check(self, size: int, depth: int) -> None:
        if not (0 <= size <= self.max_size and 0 <= depth <= self.max_depth):
            raise ValueError(f"the DP was solved for size <= {self.max_size}, depth <= {self.max_depth}; "
                             f"asked for size {size}, depth {depth}")
        if not bool(torch.isfinite(self.value[size, depth])):
            raise ValueError(f"no tree has {size} drafted nodes within {depth} levels "
                             f"and at most {self.accept.numel()} children per node")


def sequoia_dp(accept: Any, max_size: int, max_depth: int) -> SequoiaDP:
    """Solve Sequoia's recurrence (algorithms.md §5) for all sizes <= max_size and depths <= max_depth.

    With m nodes (root included) and l levels (root included):
        T[1][l][0] = 1;  F(m, l) = max_b T[m][l][b]
        T[m][l][b] = max_{1 <= y < m} T[y][l][b-1] + accept[b] · F(m - y, l - 1)
    (b = 1 is the same formula, since T[y][l][0] exists only for y = 1). The inner max over y is
    a max-plus convolution, done for all m at once as one [m, y] tensor.
    """
    accept = check_accept(accept)
    max_size = positive_int("max_size", max_size)
    max_depth = positive_int("max_depth", max_depth)
    width = min(accept.numel(), max_size)  # a node never has more children than the tree has nodes
    n_m = max_size + 2  # m = 0 (padding) .. max_size + 1
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float64)
    F = torch.full((n_m, max_depth + 2), float("-inf"), dtype=torch.float64)  # F[m, l]
    best_children = torch.zeros((n_m, max_depth + 2), dtype=torch.long)
    split = torch.zeros((max_depth + 2, width + 1, n_m), dtype=torch.long)
    m_idx = torch.arange(n_m)[:, None]
    y_idx = torch.arange(n_m)[None, :]
    valid = (y_idx >= 1) & (y_idx < m_idx)  # [m, y]
    sub_size = (m_idx - y_idx).clamp_min(0)  # [m, y]: nodes in the new child's subtree
    for levels in range(1, max_depth + 2):
        t_prev = torch.full((n_m,), float("-inf"), dtype=torch.float64)  # T[·][l][b-1], starting at b - 1 = 0
        t_prev[1] = 1.0
        best = t_prev.clone()
        below = F[:, levels - 1]  # F(·, l - 1)
        for b in range(1, width + 1):
            # accept[b] · F, keeping -inf where no subtree exists (0 · -inf would be nan).
            child_value = torch.where(torch.isfinite(below), accept[b - 1] * below, neg_inf)
            cand = torch.where(valid, t_prev[None, :] + child_value[sub_size], neg_inf)  # [m, y]
            t_b, y_best = cand.max(dim=1)
            split[levels, b] = y_best
            better = t_b > best  # strict: prefer fewer children on ties
            best = torch.where(better, t_b, best)
            best_children[:, levels] = torch.where(better, b, best_children[:, levels])
            t_prev = t_b
        F[:, levels] = best
    # Public indexing by drafted nodes n = m - 1 and drafted levels d = l - 1.
    return SequoiaDP(accept, F[1:, 1:].clone(), best_children, split)


def tree_value(paths: Paths, accept: Any) -> float:
    """1 + Σ over nodes of Π accept[rank] along the node's path: the expected tokens per call of a
    tree under positional acceptance (a rank beyond the vector has probability 0)."""
    accept = check_accept(accept).tolist()
    total = 1.0
    for path in set(tuple(p) for p in paths):
        prob = 1.0
        for rank in path:
            prob *= accept[rank] if rank < len(accept) else 0.0
        total += prob
    return total


def chain_paths(depth: int) -> Paths:
    return [(0,) * d for d in range(1, depth + 1)]


def star_paths(width: int) -> Paths:
    return [(k,) for k in range(width)]


# ---- the drafter -------------------------------------------------------------------------------
class SequoiaDrafter:
    """Drafts a static tree shape (path tuples) level by level, with distinct children per node.

    mode "swor": at T > 0, each node's children are drawn without replacement from the draft's
    processed distribution (the target's sampling operator), the r-th draw filling child rank r,
    and the tree is verified by SWOR; a node whose distribution has fewer tokens than the
    shape asks for gets fewer children (their subtrees are dropped). mode "greedy", and any
    mode at T = 0: the children are the draft's top-k tokens, verified by sample-and-match.
    """

    def __init__(self, model: LanguageModel, sampling: SamplingConfig, paths: Paths, mode: str = "swor") -> None:
        if mode not in MODES:
            raise ValueError(f"sequoia mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not paths:
            raise ValueError("a Sequoia tree needs at least one drafted node")
        self.model = model
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
        self.has_draft_probs = self.sampled
        if self.sampled:
            self.tree_verifier = verify_tree_swor
        else:
            self.tree_verifier = verify_tree_greedy if sampling.greedy else verify_tree_sample_and_match
        self._slots: Tensor | None = None  # [N] per proposed node: its slot in the draft's pending region
        self._calls = 0

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.model.reset(max_len + self.max_nodes)
        self._calls = 0

    def forward_calls(self) -> list[int]:
        """Draft forward passes since `begin` (for the SWI cost model)."""
        return [self._calls]

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

    def propose(self, committed_ids: Tensor, gamma: int, generator: torch.Generator | None) -> TokenTree:
        lm = self.model
        n = self.max_nodes
        depth_cap = min(self.max_depth, gamma)
        unseen = committed_ids[lm.kv_len :]
        logits = lm.forward(unseen, last_only=True)  # [1, V]: the root's children come from here
        lm.commit(unseen.shape[0])
        self._calls += 1
        tokens = torch.zeros(n, dtype=torch.long)  # [N] per shape node
        exists = torch.zeros(n, dtype=torch.bool)  # [N] drawn (and its parent exists)
        slots = torch.full((n,), -1, dtype=torch.long)  # [N] slot in the draft's pending region
        q_row = torch.full((n,), -1, dtype=torch.long)  # [N] row of draft_probs each node was drawn from
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
            logits = lm.forward(tokens[expand], block_parents, append=True)  # [P', V]
            self._calls += 1
            slots[expand] = n_run + torch.arange(expand.shape[0])
            n_run += expand.shape[0]
            logits_row.fill_(-1)
            logits_row[expand + 1] = torch.arange(expand.shape[0])
        self._slots = slots[exists]
        parents = keep_subtree(self.shape_parents, exists)
        if not self.sampled:
            return TokenTree(tokens[exists], parents)
        return TokenTree(tokens[exists], parents, None, q_row[exists], torch.cat(q_tables))

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        if self._slots is not None:
            commit_accepted_slots(self.model, self._slots, result)
            self._slots = None


# ---- methods -----------------------------------------------------------------------------------
def _mode(opts: dict[str, Any], default: str = "swor") -> str:
    return str(option(opts, "sequoia_mode", default))


def make_sequoia_drafter(pipe: "Pipeline", sampling: SamplingConfig, opts: dict[str, Any]) -> SequoiaDrafter:
    """`--method sequoia`: the tree from the DP (`--tree dp`, the default: `--budget` nodes,
    `--max-depth` levels, acceptance vector `--accept`, `auto` = the tuned one, else a prior), or the
    tuned winner (`--tree auto`, or `--tree PROFILE.json`)."""
    from specdec.tune import apply_offload_option, load_profile_for, read_profile

    assert pipe.draft_lm is not None
    apply_offload_option(pipe, opts)
    tree = str(option(opts, "tree", "dp"))
    if tree == "dp":
        accept = option(opts, "accept", None)
        if accept == "auto":  # the vector `specdec tune` measured for this mode
            kind = "swor" if _mode(opts) == "swor" and not sampling.greedy else "topk"
            accept = load_profile_for(pipe, sampling)["acceptance"][kind]
            if accept is None:
                raise ValueError(f"the tune profile has no {kind} acceptance vector for this setting")
        accept = check_accept(PRIOR_ACCEPT if accept is None else accept)
        size = positive_int("budget", option(opts, "budget", DEFAULT_BUDGET))
        depth = positive_int("max_depth", option(opts, "max_depth", DEFAULT_MAX_DEPTH))
        paths = sequoia_dp(accept, size, depth).tree(size, depth)
        return SequoiaDrafter(pipe.draft_lm, sampling, paths, _mode(opts))
    profile = load_profile_for(pipe, sampling) if tree == "auto" else read_profile(tree)
    winner = profile["winner"]
    if winner["method"] != "sequoia":
        raise ValueError(
            "the tune profile found no tree faster than plain decoding for this setting; use --method auto "
            "(which then decodes without speculation) or --tree dp"
        )
    return SequoiaDrafter(pipe.draft_lm, sampling, [tuple(p) for p in winner["paths"]], _mode(opts, winner["mode"]))


def make_auto_drafter(pipe: "Pipeline", sampling: SamplingConfig, opts: dict[str, Any]) -> SequoiaDrafter | None:
    """`--method auto`: whatever `specdec tune` found fastest here — a Sequoia tree, or no speculation."""
    from specdec.tune import apply_offload_option, load_profile_for, read_profile

    apply_offload_option(pipe, opts)
    tree = option(opts, "tree", "auto")
    profile = load_profile_for(pipe, sampling) if tree in ("auto", "dp") else read_profile(str(tree))
    winner = profile["winner"]
    if winner["method"] == "ar":
        return None
    assert pipe.draft_lm is not None
    return SequoiaDrafter(pipe.draft_lm, sampling, [tuple(p) for p in winner["paths"]], _mode(opts, winner["mode"]))
