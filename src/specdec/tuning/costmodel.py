"""One cost model for every method and shape: expected tokens per target call over milliseconds per
call, against plain decoding's milliseconds per token (docs/algorithms.md §7.7).

    expected speedup = E[tokens per call] · t_AR / (t_target(block) + t_draft + overhead)

- t_AR: measured plain decoding, ms per token (loop included);
- t_target(k), t_draft(k): measured forward times over k new tokens, interpolated;
- overhead: the loop's own cost per speculative call (verification, commit, bookkeeping),
  measured on the acceptance run;
- E[tokens per call], by how it is known:
  * chains drafted by the model (`sps`, with or without adaptive stopping): from the chain under
    the acceptance run's top child, Rao-Blackwellised per step (the product of the exact
    acceptance probabilities along it), so no positional assumption;
  * Sequoia and SpecInfer trees: the positional acceptance vectors and Sequoia's dynamic program /
    tree value;
  * SpecExec's best-first trees, Token Recycling and hybrid trees: decoded for real on the tune's
    prompts (`tuning.decoded`; a best-first tree grown by the draft's probabilities is not the best
    static tree of its size, and pricing it as one promised 9 tokens per call where it gave 2.4);
  * prompt lookup, Max-Gram and the cascade: replayed on the text the run produced
    (`tuning.replay`), exact for their acceptance.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from specdec.core.tree import depths, paths_to_parents
from specdec.drafting.sequoia_dp import SequoiaDP, tree_value
from specdec.tuning.decoded import DecodeSteps
from specdec.tuning.replay import ReplayStep, mean


def interpolate_ms(ms: dict[int, float], k: float) -> float:
    """t(k) from measured points: piecewise linear, extended by the last segment's slope."""
    pts = sorted((int(a), float(b)) for a, b in ms.items())
    if len(pts) == 1:
        return pts[0][1]
    for (k0, t0), (k1, t1) in zip(pts, pts[1:]):
        if k <= k1 or (k1, t1) == pts[-1]:
            return max(t0 + (t1 - t0) * (k - k0) / (k1 - k0), 0.0)
    raise AssertionError("unreachable")


def draft_ms_of_tree(paths: Sequence[tuple[int, ...]], draft_ms: dict[int, float], unseen_tokens: float) -> float:
    """The draft's time for one proposal of a static tree: a pass over the committed tokens it has not
    seen (about the tokens the last call emitted), then one pass per level over that level's nodes
    that get children."""
    parents, _ = paths_to_parents(list(paths))
    node_depth = depths(parents)  # 0 = child of the root
    has_children = torch.zeros(parents.shape[0], dtype=torch.bool)
    has_children[parents[parents >= 0]] = True
    per_level = torch.bincount(node_depth[has_children], minlength=1).tolist()
    return interpolate_ms(draft_ms, max(unseen_tokens, 1.0)) + sum(interpolate_ms(draft_ms, c) for c in per_level if c)


@dataclass
class ChainSteps:
    """Per acceptance-run step, along the chain drafted under the top child: `accept[j]` = P(chain
    token j+1 is accepted | the ones before were), `confidence[j]` = the draft's largest probability
    where chain token j+1 was drawn (what adaptive stopping looks at)."""

    accept: list[list[float]] = field(default_factory=list)
    confidence: list[list[float]] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return min((len(a) for a in self.accept), default=0)


@dataclass
class ChainEstimate:
    tokens: float
    """E[tokens per call]."""
    extends: float
    """E[single-token draft forwards after the catch-up]."""
    drafted: float
    """E[drafted tokens] (the target's block is 1 + this)."""
    catch_up: float
    """E[tokens in the next catch-up pass]: the root, plus the last draft when it was accepted
    without having been run."""
    lengths: list[int] = field(default_factory=list)
    """The drafted length of each measured step."""


def chain_estimate(chain: ChainSteps, gamma: int, stop_below: float = 0.0) -> ChainEstimate:
    """A chain of up to `gamma` drafts that stops before the first position whose confidence is below
    `stop_below`, Rao-Blackwellised over the measured steps."""
    if not chain.accept or gamma > chain.depth:
        raise ValueError(f"the acceptance run measured chains of {chain.depth} tokens, not {gamma}")
    tokens = extends = drafted = catch_up = 0.0
    lengths = []
    for acc, conf in zip(chain.accept, chain.confidence):
        length = gamma
        for j in range(gamma):
            if conf[j] < stop_below:
                length = j
                break
        reach, total = 1.0, 1.0
        for j in range(length):
            reach *= acc[j]
            total += reach
        tokens += total
        # Drafts 1…L-1 are run to draw the next; a chain stopped early also ran its last draft to
        # see that the next position is unsure (no run at all when nothing was drafted).
        extends += (length - 1 if length == gamma else length) if length else 0
        drafted += length
        lengths.append(length)
        catch_up += 1.0 + (reach if length == gamma and length > 0 else 0.0)
    n = len(chain.accept)
    return ChainEstimate(tokens / n, extends / n, drafted / n, catch_up / n, lengths)


@dataclass
class Costs:
    """What the cost model prices with (milliseconds)."""

    target_ms: dict[int, float]
    draft_ms: dict[int, float]
    ar_ms: float
    overhead_ms: float

    def target(self, block: float) -> float:
        return interpolate_ms(self.target_ms, block)

    def draft(self, rows: float) -> float:
        return interpolate_ms(self.draft_ms, rows) if self.draft_ms else 0.0


def row(method: str, label: str, tokens: float, target_ms: float, draft_ms: float, costs: Costs, basis: str,
        **spec: Any) -> dict[str, Any]:
    """One priced candidate."""
    per_call = target_ms + draft_ms + costs.overhead_ms
    return {"method": method, "label": label, "tokens_per_call": tokens, "target_ms": target_ms,
            "draft_ms": draft_ms, "overhead_ms": costs.overhead_ms, "ms_per_call": per_call,
            "expected_speedup": tokens * costs.ar_ms / per_call, "basis": basis, **spec}


def ar_row(costs: Costs) -> dict[str, Any]:
    return {"method": "ar", "label": "ar (no speculation)", "tokens_per_call": 1.0, "target_ms": costs.ar_ms,
            "draft_ms": 0.0, "overhead_ms": 0.0, "ms_per_call": costs.ar_ms, "expected_speedup": 1.0,
            "basis": "measured", "options": {}}


def chain_row(method: str, label: str, chain: ChainSteps, costs: Costs, options: dict[str, Any]) -> dict[str, Any]:
    """A model-drafted chain of up to `options["gamma"]` tokens, with adaptive stopping at
    `options["stop_below"]` (0: off), priced on the measured chains."""
    est = chain_estimate(chain, int(options["gamma"]), float(options.get("stop_below", 0.0)))
    d_ms = costs.draft(est.catch_up) + est.extends * costs.draft(1)
    t_ms = mean([costs.target(1 + n) for n in est.lengths])
    return row(method, label, est.tokens, t_ms, d_ms, costs, "measured chain", options=options)


def dp_grid(dp: SequoiaDP, sizes: Sequence[int], max_depth: int) -> Iterator[tuple[int, int, float]]:
    """(size, depth, expected tokens per call) of every tree the DP can build for these sizes and
    every depth up to `max_depth` (no deeper than the size)."""
    for size in sizes:
        for depth in range(1, min(max_depth, size) + 1):
            if dp.feasible(size, depth):  # else too many nodes for this depth and width
                yield size, depth, dp.tokens_per_call(size, depth)


def sequoia_rows(method: str, dps: dict[str, SequoiaDP], costs: Costs, sizes: Sequence[int],
                 max_depth: int) -> list[dict]:
    """Sequoia's DP trees for every mode, size and depth (positional acceptance)."""
    out = []
    for mode, dp in dps.items():
        for size, depth, tokens in dp_grid(dp, sizes, max_depth):
            paths = dp.tree(size, depth)
            out.append(row(method, f"{method} {mode} size={size} depth={depth}", tokens, costs.target(size + 1),
                           draft_ms_of_tree(paths, costs.draft_ms, tokens), costs, "positional",
                           mode=mode, size=size, depth=depth, paths=[list(p) for p in paths], options={}))
    return out


def specinfer_row(method: str, label: str, paths: Sequence[tuple[int, ...]], vector: Sequence[float], costs: Costs,
                  options: dict[str, Any]) -> dict[str, Any]:
    """A static tree shape (its path tuples) on the positional acceptance vector."""
    tokens = tree_value(list(paths), list(vector))
    return row(method, label, tokens, costs.target(len(paths) + 1), draft_ms_of_tree(paths, costs.draft_ms, tokens),
               costs, "positional", options=options)


def replay_row(method: str, label: str, steps: Sequence[ReplayStep], costs: Costs, options: dict[str, Any],
               reviews: Sequence[int] = (), review_rows: float = 1.0) -> dict[str, Any] | None:
    """A deterministic drafter from its replay: tokens per call, the target's block per step, and for
    the cascade the draft's reviews."""
    if not steps:
        return None
    tokens = 1.0 + mean([s.accepted for s in steps])
    t_ms = mean([costs.target(1 + s.proposed) for s in steps])
    d_ms = mean([r * costs.draft(review_rows) for r in reviews]) if reviews else 0.0
    return row(method, label, tokens, t_ms, d_ms, costs, "replay", options=options)


def measured_overhead(steps: DecodeSteps, costs: Costs) -> float:
    """The work a decoded call did beyond the target's forward (verification, the drafter's learning
    from the logits): its measured time past the draft, less t_target at its block."""
    modelled = mean([costs.target(1 + n) for n in steps.timed_drafted])
    return max(mean(steps.target_ms) - modelled, 0.0)


def decode_row(method: str, label: str, steps: DecodeSteps, costs: Costs, options: dict[str, Any]) -> dict[str, Any]:
    """A drafter decoded for real (`tuning.decoded`): its measured tokens per call; the target's pass
    from t_target at each step's block, the drafter's time and the work each call adds beyond the
    target's forward (verification, learning from the logits) as measured."""
    t_ms = mean([costs.target(1 + n) for n in steps.drafted])
    if steps.target_ms:
        extra, d_ms = measured_overhead(steps, costs), mean(steps.draft_ms)
    else:  # every prompt ended after one step: nothing timed beyond the first
        extra, d_ms = costs.overhead_ms, 0.0
    per_call = Costs(costs.target_ms, costs.draft_ms, costs.ar_ms, extra)
    return row(method, label, steps.tokens_per_call, t_ms, d_ms, per_call, "decoded", options=options)


def best(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fastest expected candidate (ties: the earlier, so plain decoding wins a tie)."""
    top = rows[0]
    for r in rows[1:]:
        if r["expected_speedup"] > top["expected_speedup"]:
            top = r
    return top
