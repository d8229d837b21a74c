"""Every sequence of a batch verified at once: the batch's trees flattened with offsets, one pass of
tensor operations per rule (docs/algorithms.md §4.10).

`verify_batch` takes what each sequence's own verifier would (its tree, its target logits, its
sampling, its rule and its `torch.Generator`) and returns what that verifier returns, bit for bit
given the same generator state, consuming each generator exactly as the verifier would:

- greedy (any tree, any rule at T = 0): one argmax over every node of every tree, then the path of
  matching children found for all trees together by pointer jumping over the flattened parents;
- sample-and-match, and any root-only step: a walk one level of every tree at a time; each sequence
  draws one uniform per node from its own generator, and the nodes the walks reach are processed
  and picked (`core.sampling.pick`, inverse transform) together, one batched pick per level;
- classic speculative sampling on chains (sps, MSS on a chain): the acceptance tests of every chain
  in one elementwise op, the accepted prefixes by a padded cumprod, the residuals and the recovered
  or bonus tokens in one batched step;
- MSS and SWOR on trees: a level-synchronous walk, every walking sequence's node tested together
  (the candidate loop runs over a node's candidates in proposal order, each step one [S, V] op).

What stays per sequence is drawing its own random numbers (each request has its own generator so a
seeded request repeats whatever its batch mates) and reading its result. The residual and
acceptance kernels are `chain.recovery_distribution` and `chain.ratio_acceptance`, the very ones the
per-sequence verifiers call. A rule this module does not know (a test's planted verifier) is called
as it is, on its own sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, logits_to_probs, pick, uniforms
from specdec.core.tree import TokenTree
from specdec.verify import chain as _chain
from specdec.verify.base import Verifier
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match
from specdec.verify.mss import verify_mss
from specdec.verify.swor import verify_swor


@dataclass(frozen=True)
class Verification:
    """One sequence's share of a batched verification."""

    tree: TokenTree
    sampling: SamplingConfig
    rule: Verifier
    """The verifier this sequence's decoder would call (`SpeculativeDecoder.verifier`)."""
    generator: torch.Generator | None = None


def _kind(item: Verification) -> str:
    tree, rule = item.tree, item.rule
    if item.sampling.greedy and rule is verify_greedy:
        return "greedy"
    if rule is verify_sample_and_match or (tree.num_drafted == 0 and rule in (verify_mss, verify_swor)):
        return "match"
    if rule is _chain.verify_speculative_sampling and tree.num_drafted == 0:
        return "match"
    usable = tree.draft_probs is not None and tree.cand_draft_row is not None
    if rule in (_chain.verify_speculative_sampling, verify_mss) and usable and tree.is_chain:
        return "chain"
    if rule is verify_mss and usable:
        return "mss"
    if rule is verify_swor and usable and _one_draft_row_per_node(tree):
        return "swor"
    return "own"  # planted rules and the error cases: the rule itself decides (or raises)


def _one_draft_row_per_node(tree: TokenTree) -> bool:
    """Whether the siblings of every node share one draft row, as SWOR requires (else its own rule raises)."""
    assert tree.cand_draft_row is not None
    parent, rows = tree.parents[tree.cand_nodes], tree.cand_draft_row.long()
    lo = torch.zeros(tree.num_nodes, dtype=torch.long).scatter_reduce(0, parent, rows, "amin", include_self=False)
    hi = torch.zeros(tree.num_nodes, dtype=torch.long).scatter_reduce(0, parent, rows, "amax", include_self=False)
    return bool((lo == hi).all())


def verify_batch(items: Sequence[Verification], logits: Sequence[Tensor]) -> list[VerifyResult]:
    """Each sequence's `VerifyResult`, as its own rule would give it; logits[i]: [N_i + 1, V]."""
    kinds = [_kind(it) for it in items]
    results: list[VerifyResult | None] = [None] * len(items)
    for i, kind in enumerate(kinds):
        if kind == "own":
            item = items[i]
            results[i] = item.rule(item.tree, logits_to_probs(logits[i], item.sampling), item.generator)
    groups: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
    if "greedy" in groups:
        idx = groups["greedy"]
        flat = joined([logits[i] for i in idx])
        choice = flat.to(torch.float64 if flat.dtype == torch.float64 else torch.float32).argmax(-1)
        _put(results, idx, follow_matching_batch([items[i].tree for i in idx], choice))
    by_dtype: dict[torch.dtype, list[int]] = {}  # joined, logits of two dtypes would promote each other
    for i in groups.get("match", []):
        by_dtype.setdefault(logits[i].dtype, []).append(i)
    for idx in by_dtype.values():
        _put(results, idx, match_batch([items[i] for i in idx], [logits[i] for i in idx]))
    sampled = [i for k in ("chain", "mss", "swor") for i in groups.get(k, [])]
    if sampled:
        probs = _processed(items, logits, sampled)
        if "chain" in groups:
            idx = groups["chain"]
            _put(results, idx, chains_batch([items[i] for i in idx], [probs[i] for i in idx]))
        for kind in ("mss", "swor"):
            if kind in groups:
                idx = groups[kind]
                _put(results, idx, walk_batch([items[i] for i in idx], [probs[i] for i in idx], kind == "swor"))
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def joined(parts: Sequence[Tensor]) -> Tensor:  # parts: [n_i, V] each -> [Σ n_i, V]
    """The parts one after the other: a view when they already lie so in one buffer (a batched pass's
    logits, split by sequence), else a copy."""
    first = parts[0]
    if len(parts) == 1:
        return first
    offset, ptr = first.storage_offset(), first.untyped_storage().data_ptr()
    for part in parts:
        if not part.is_contiguous() or part.untyped_storage().data_ptr() != ptr or part.storage_offset() != offset \
                or part.dtype != first.dtype or part.shape[1:] != first.shape[1:]:
            return torch.cat(list(parts))
        offset += part.numel()
    return torch.as_strided(first, (sum(p.shape[0] for p in parts), *first.shape[1:]), first.stride(),
                            first.storage_offset())


def _put(results: list, idx: Sequence[int], values: Sequence[VerifyResult]) -> None:
    for i, v in zip(idx, values):
        results[i] = v


def _processed(items: Sequence[Verification], logits: Sequence[Tensor], idx: Sequence[int]) -> dict[int, Tensor]:
    """The processed target distributions of the sampled sequences: one `logits_to_probs` per distinct
    sampling setting (row-wise, so each row is what the sequence's own call gives)."""
    by_cfg: dict[SamplingConfig, list[int]] = {}
    for i in idx:
        by_cfg.setdefault(items[i].sampling, []).append(i)
    out: dict[int, Tensor] = {}
    for cfg, members in by_cfg.items():
        probs = logits_to_probs(joined([logits[i] for i in members]), cfg)
        for i, part in zip(members, probs.split([logits[i].shape[0] for i in members])):
            out[i] = part
    return out


def _processed_rows(items: Sequence[Verification], logits: Tensor, rows: Tensor, item: Tensor) -> Tensor:
    """The processed target distributions of flat `rows` of `logits` [T, V] ([R] global rows, `item` [R]
    each one's sequence): one `logits_to_probs` per distinct sampling setting, row-wise, so each row
    is what the sequence's own verification computes for it."""
    settings = [items[i].sampling for i in item.tolist()]
    if all(cfg == settings[0] for cfg in settings):
        return logits_to_probs(logits[rows], settings[0])
    out = torch.empty(rows.shape[0], logits.shape[1], dtype=torch.float64 if logits.dtype == torch.float64
                      else torch.float32, device=logits.device)
    for cfg in dict.fromkeys(settings):
        mine = torch.tensor([c == cfg for c in settings], device=logits.device)
        out[mine] = logits_to_probs(logits[rows[mine]], cfg)
    return out


def match_batch(items: Sequence[Verification], logits: Sequence[Tensor]) -> list[VerifyResult]:
    """Sample-and-match (`match.verify_sample_and_match`) on many trees at once, one level of every walk
    at a time: each sequence draws one uniform per node from its own generator, as its own rule
    does, and a node's distribution is processed and picked only where its walk reaches it."""
    trees = [it.tree for it in items]
    flat = joined(logits)  # [T, V]
    device = flat.device
    offsets, item_of, _ = _segments([t.num_nodes for t in trees], device)
    parent = _flat_parents(trees, offsets)  # [T] global, -1 at roots
    tokens = torch.cat([t.tokens for t in trees]).to(device)
    u = torch.cat([uniforms(t.num_nodes, it.generator, device) for t, it in zip(trees, items)])  # [T]
    out: list[VerifyResult | None] = [None] * len(items)
    paths: list[list[int]] = [[] for _ in items]
    live = torch.arange(len(items), device=device)
    at, offs = offsets.clone(), offsets.tolist()  # [S]: the node each walk is at (global); each tree's root
    while live.numel():
        rows = at[live]
        choice = pick(_processed_rows(items, flat, rows, live), u[rows])  # [A]
        wanted = torch.full((len(items),), -1, dtype=torch.long, device=device)
        wanted[live] = choice
        # The child of each walk's node that holds its pick (siblings hold distinct tokens: ≤ 1 each).
        hit = (parent >= 0) & (parent == at[item_of]) & (tokens == wanted[item_of])
        child = torch.full((len(items),), -1, dtype=torch.long, device=device)
        child[item_of[hit]] = hit.nonzero().flatten()
        found = child[live] >= 0
        for i, c, f, token in zip(live.tolist(), child[live].tolist(), found.tolist(), choice.tolist()):
            if f:
                paths[i].append(c - offs[i])
            else:
                out[i] = VerifyResult(tuple(paths[i]), int(token))
        at = torch.where(child >= 0, child, at)
        live = live[found]
    return out  # type: ignore[return-value]


def _segments(sizes: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets [S], the item of every flat row [T], and a padded index [S, n_max] (-1 past each item)."""
    n = torch.tensor(list(sizes), dtype=torch.long, device=device)
    offsets = n.cumsum(0) - n
    item_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), n)
    steps = torch.arange(int(n.max()), device=device)
    padded = torch.where(steps[None] < n[:, None], offsets[:, None] + steps[None], -1)
    return offsets, item_of, padded


def _flat_parents(trees: Sequence[TokenTree], offsets: Tensor) -> Tensor:  # [T]: global parent, -1 at roots
    parents = torch.cat([t.parents for t in trees]).to(offsets.device)
    base = torch.repeat_interleave(offsets, torch.tensor([t.num_nodes for t in trees], device=offsets.device))
    return torch.where(parents >= 0, parents + base, -1)


def follow_matching_batch(trees: Sequence[TokenTree], choice: Tensor) -> list[VerifyResult]:
    """`walk.follow_matching_children` for many trees at once; choice [T]: the target's pick after
    every node of every tree, the trees' nodes one after the other."""
    device = choice.device
    offsets, item_of, padded = _segments([t.num_nodes for t in trees], device)
    parent = _flat_parents(trees, offsets)
    tokens = torch.cat([t.tokens for t in trees]).to(device)
    on = torch.where(parent >= 0, tokens == choice[parent.clamp_min(0)], True)  # this node matches its parent's pick
    depth = (parent >= 0).long()
    up = parent
    while bool((up >= 0).any()):  # pointer jumping: `on` becomes "every node from here to the root matched"
        has = up >= 0
        at = up.clamp_min(0)
        on, depth, up = on & torch.where(has, on[at], True), depth + torch.where(has, depth[at], 0), \
            torch.where(has, up[at], -1)
    score = torch.where(on, depth, -1)
    deepest = torch.where(padded >= 0, score[padded.clamp_min(0)], -2).argmax(1)  # [S] local node
    nxt = choice[offsets + deepest]
    keep = on & (parent >= 0)  # the matched path: one node per depth, in node order
    sizes = torch.tensor([t.num_nodes for t in trees], device=device)
    counts = torch.zeros(len(trees), dtype=torch.long, device=device).index_add_(0, item_of, keep.long())
    local = (torch.arange(tokens.shape[0], device=device) - torch.repeat_interleave(offsets, sizes))[keep]
    paths = local.tolist()
    out, at = [], 0
    for c, token in zip(counts.tolist(), nxt.tolist()):
        out.append(VerifyResult(tuple(paths[at : at + c]), int(token)))
        at += c
    return out


def chains_batch(items: Sequence[Verification], probs: Sequence[Tensor]) -> list[VerifyResult]:
    """Classic speculative sampling (`chain.verify_speculative_sampling`) on many chains at once."""
    device, dtype = probs[0].device, probs[0].dtype
    gammas = [it.tree.num_drafted for it in items]
    # Each sequence's randomness, in its own verifier's order: γ uniforms, then the final draw's.
    u = [torch.rand(g, generator=it.generator, device=device, dtype=dtype) for it, g in zip(items, gammas)]
    final_u = [uniforms(1, it.generator, device) for it in items]
    target = joined(probs)  # [T, V]
    offsets, _, _ = _segments([g + 1 for g in gammas], device)
    drafted = torch.cat([it.tree.tokens[1:] for it in items]).to(device)  # [G]
    # Draft j's row of its tree's draft distributions (the one it was drawn from), and what that row
    # gives draft j: read in place, as the rows are wide and only the stopping one is needed whole.
    q_rows = [it.tree.draft_probs.to(device) for it in items]  # type: ignore[union-attr]  # [n_i, V] each
    q_row_of = [it.tree.cand_draft_row.to(device) for it in items]  # type: ignore[union-attr]  # [γ_i] each
    q_drafted = torch.cat([q[r, it.tree.tokens[1:].to(device)] for q, r, it in zip(q_rows, q_row_of, items)])  # [G]
    row = torch.repeat_interleave(offsets, torch.tensor(gammas, device=device)) + torch.cat(
        [torch.arange(g, device=device) for g in gammas])  # target row of each draft
    accept_p = _chain.ratio_acceptance(target[row, drafted], q_drafted)
    steps = torch.arange(max(gammas), device=device)
    valid = steps[None] < torch.tensor(gammas, device=device)[:, None]
    passed = torch.zeros(len(items), max(gammas), dtype=torch.bool, device=device)
    passed[valid] = torch.cat(u) < accept_p
    n = passed.long().cumprod(1).sum(1)  # [S] accepted drafts
    rejected = n < torch.tensor(gammas, device=device)
    at = offsets + n
    rows = target[at]  # [S, V]: the target where the walk stopped
    # The draft distribution where each walk stopped (any row where none was rejected: unused there).
    draft_at = torch.stack([q[r[min(k, g - 1)]] for q, r, k, g in zip(q_rows, q_row_of, n.tolist(), gammas)])
    dist = torch.where(rejected[:, None], _chain.recovery_distribution(rows, draft_at), rows)
    token = pick(dist, torch.cat(final_u))
    return [VerifyResult(tuple(range(1, k + 1)), int(t)) for k, t in zip(n.tolist(), token.tolist())]


def _without(q: Tensor, token: Tensor) -> Tensor:  # q [S, V], token [S] -> `swor.without_token` row-wise
    q = q.scatter(1, token[:, None], 0.0)
    mass = q.sum(-1, keepdim=True)
    return torch.where(mass > 0, q / mass, q)


def walk_batch(items: Sequence[Verification], probs: Sequence[Tensor], swor: bool) -> list[VerifyResult]:
    """MSS (`mss.verify_mss`) or SWOR (`swor.verify_swor`) on many trees: one level of every walk at a time."""
    device, dtype = probs[0].device, probs[0].dtype
    target = joined(probs)  # [T, V]
    offsets, _, _ = _segments([it.tree.num_nodes for it in items], device)
    q_sizes = [it.tree.draft_probs.shape[0] for it in items]  # type: ignore[union-attr]
    q_all = torch.cat([it.tree.draft_probs.to(device, dtype) for it in items])  # type: ignore[union-attr]
    q_off = torch.tensor(q_sizes, device=device).cumsum(0) - torch.tensor(q_sizes, device=device)
    # Every candidate, grouped by the node it hangs off (stable: proposal order kept within a node).
    c_node = torch.cat([it.tree.cand_nodes.to(device) + o for it, o in zip(items, offsets.tolist())])
    c_row = torch.cat([it.tree.cand_draft_row.to(device) + o for it, o in zip(items, q_off.tolist())])  # type: ignore[union-attr]
    c_parent = _flat_parents([it.tree for it in items], offsets)[c_node]
    order = torch.sort(c_parent, stable=True).indices
    c_node, c_row, c_parent = c_node[order], c_row[order], c_parent[order]
    count = torch.zeros(target.shape[0], dtype=torch.long, device=device).index_add_(
        0, c_parent, torch.ones_like(c_parent))
    first = count.cumsum(0) - count
    tokens = torch.cat([it.tree.tokens for it in items]).to(device)
    out: list[VerifyResult | None] = [None] * len(items)
    paths: list[list[int]] = [[] for _ in items]
    live = list(range(len(items)))
    cur = offsets.clone()  # [S] the node each walk is at (global)
    while live:
        at = cur[live]
        k = count[at]
        ks = k.tolist()
        kmax = max(ks)
        u = torch.full((len(live), max(kmax, 1)), 2.0, dtype=dtype, device=device)  # 2.0: never accepted
        for j, (i, kk) in enumerate(zip(live, ks)):
            if kk:
                u[j, :kk] = torch.rand(kk, generator=items[i].generator, device=device, dtype=dtype)
        slot = first[at][:, None] + torch.arange(max(kmax, 1), device=device)[None]
        valid = torch.arange(max(kmax, 1), device=device)[None] < k[:, None]
        slot = torch.where(valid, slot, 0).clamp_max(max(c_node.shape[0] - 1, 0))
        dist = target[at]  # [A, V]
        accept = torch.zeros(len(live), max(kmax, 1), dtype=dtype, device=device)
        q = q_all[c_row[slot[:, 0]]] if kmax else None
        rows = torch.arange(len(live), device=device)
        for j in range(kmax):
            x = tokens[c_node[slot[:, j]]]
            qj = q if swor else q_all[c_row[slot[:, j]]]
            assert qj is not None
            accept[:, j] = _chain.ratio_acceptance(dist[rows, x], qj[rows, x])
            keep = valid[:, j : j + 1]
            dist = torch.where(keep, _chain.recovery_distribution(dist, qj), dist)
            if swor:
                q = torch.where(keep, _without(qj, x), qj)
        hit = (u < accept) & valid
        found = hit.any(1)
        first_hit = hit.long().argmax(1)
        chosen = c_node[slot[rows, first_hit]]
        stop = [j for j, f in enumerate(found.tolist()) if not f]
        for j, (i, f, node) in enumerate(zip(live, found.tolist(), chosen.tolist())):
            if f:
                paths[i].append(node - int(offsets[i]))
        if stop:
            ends = torch.tensor(stop, device=device)
            final = pick(dist[ends], torch.cat([uniforms(1, items[live[j]].generator, device)
                                                for j in stop])).tolist()
            for j, token in zip(stop, final):
                out[live[j]] = VerifyResult(tuple(paths[live[j]]), int(token))
        cur[live] = torch.where(found, chosen, at)
        live = [i for j, i in enumerate(live) if bool(found[j])]
    return out  # type: ignore[return-value]
