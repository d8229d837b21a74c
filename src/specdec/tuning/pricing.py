"""Pricing every method's tune candidates on the one cost model (`tuning.costmodel`).

The candidates come from the methods themselves: each method declares a `TuningSpace` in its own
file (its option sets and the rule that prices them), and `price` walks the registry, so a new
method is priced as soon as it exists. The rules below are how a candidate's tokens per call are
known; they depend on how a method drafts, never on its name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from specdec.core.options import format_option_value
from specdec.core.sampling import SamplingConfig
from specdec.core.tree import expansion_paths
from specdec.drafting.base import run_proposal
from specdec.drafting.ngram import maxgram_continuation
from specdec.drafting.sequoia_dp import SequoiaDP, sequoia_dp
from specdec.methods.base import Method, MethodContext, TuneSetting
from specdec.methods.registry import all_methods
from specdec.models.base import LanguageModel
from specdec.tuning.costmodel import (
    ChainSteps, Costs, ar_row, chain_row, decode_row, measured_overhead, replay_row, sequoia_rows, specinfer_row,
)
from specdec.tuning.decoded import decode_run
from specdec.tuning.replay import cascade_replay, replay

Row = dict[str, Any]
Texts = list[tuple[int, Tensor]]
"""(prompt length, [L] int64 prompt + the target's text) per acceptance-run prompt."""


@dataclass
class PricingInputs:
    """Everything the rules price from: the measurements, and what builds a model-free drafter."""

    costs: Costs
    chain: ChainSteps
    topk: list[float]
    swor: list[float] | None
    iid: list[float] | None
    texts: Texts
    draft_pred: list[Tensor]
    """Per text: the draft's argmax after each prefix (the cascade's replay)."""
    target: LanguageModel
    sampling: SamplingConfig
    tokenizer: Any = None
    bigram: list[int] | None = None
    """Max-Gram's fill table (next token of every token) when one is cached, else None."""
    drafts: Sequence[LanguageModel] = ()
    """The draft model, for candidates priced by decoding with it ("decode")."""
    eos_token_ids: Sequence[int] = ()
    _dps: dict[str, SequoiaDP] = field(default_factory=dict)
    _overheads: dict[str, float] = field(default_factory=dict)

    def dp(self, mode: str, size: int, depth: int) -> SequoiaDP:
        """Sequoia's DP on the mode's acceptance vector ("greedy": top-k, "swor"), solved once for
        the largest size and depth asked for."""
        dp = self._dps.get(mode)
        if dp is None or dp.max_size < size or dp.max_depth < depth:
            size, depth = max(size, dp.max_size if dp else 0), max(depth, dp.max_depth if dp else 0)
            vector = self.topk if mode == "greedy" else self.swor
            self._dps[mode] = dp = sequoia_dp(vector, size, depth)
        return dp

    def costs_of(self, method: Method, candidates: Sequence[Mapping[str, Any]]) -> Costs:
        """The costs with the loop's work per call as measured on this rule's own drafts.

        The acceptance run's comb is a tree, and what a call costs beyond the target's forward
        depends on the rule that verifies it: sampled, the comb's SWOR walk cost ~20 ms a call
        beyond the forward where a decoded `sps` chain cost ~8 (Qwen pair, 2-core EPYC), and
        charging the comb's figure to chains made plain decoding look better than `sps`. So a rule's candidates
        are charged what one of them (the middle one: by `gamma` where it has one) measured when
        decoded for real on the tune's texts, once per rule; the comb's figure where nothing was
        timed.
        """
        rule = method.tuning.rule if method.tuning is not None else ""
        if rule not in self._overheads:
            ordered = sorted(candidates, key=lambda o: o.get("gamma", 0))
            ctx = MethodContext(self.target, self.drafts, self.sampling, self.tokenizer)
            options = dict(ordered[len(ordered) // 2])
            drafter = method.build(ctx, method.make_options(options))
            run = decode_run(self.target, drafter, self.texts, self.sampling, self.eos_token_ids)
            measured = run is not None and bool(run.target_ms)
            self._overheads[rule] = measured_overhead(run, self.costs) if measured else self.costs.overhead_ms
        return replace(self.costs, overhead_ms=self._overheads[rule])

    def modes(self) -> list[str]:
        """The tree modes measured: greedy (top-k children) always, SWOR when sampling."""
        return ["greedy"] if self.swor is None else ["swor", "greedy"]


Rule = Callable[[Method, Sequence[Mapping[str, Any]], PricingInputs], list[Row]]


def label(method: str, options: Mapping[str, Any]) -> str:
    """"sps gamma=3 stop_below=0.4": a candidate as the tune's table and summary line show it."""
    return " ".join([method, *(f"{k}={format_option_value(v)}" for k, v in options.items())])


def _plain(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    return [ar_row(inputs.costs)]


def _chain(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    priced = [o for o in candidates if o["gamma"] <= inputs.chain.depth]  # longer chains were not measured
    if not priced:
        return []
    costs = inputs.costs_of(method, priced)
    return [chain_row(method.name, label(method.name, o), inputs.chain, costs, dict(o)) for o in priced]


def _tree_dp(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    sizes = [int(o["budget"]) for o in candidates]
    max_depth = max(int(o["max_depth"]) for o in candidates)
    dps = {mode: inputs.dp(mode, max(sizes), max_depth) for mode in inputs.modes()}
    return sequoia_rows(method.name, dps, inputs.costs, sizes, max_depth)


def _static_tree(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    vector = inputs.iid if inputs.iid is not None else inputs.topk
    return [specinfer_row(method.name, label(method.name, o), expansion_paths(list(o["expansion"])), vector,
                          inputs.costs, dict(o)) for o in candidates]


def _cascade(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    costs = inputs.costs_of(method, candidates) if candidates else inputs.costs
    rows = []
    for options in candidates:
        k = options["k_matrix"]
        bigram = inputs.bigram if options.get("maxgram_fill", "bigram") == "bigram" else None
        steps = cascade_replay(inputs.texts, inputs.draft_pred, k, lambda ids, n: maxgram_continuation(ids, n, bigram))
        row = replay_row(method.name, label(method.name, options), [s for s, _ in steps], costs,
                         {**options, "k_matrix": [list(r) for r in k]}, reviews=[n for _, n in steps],
                         review_rows=1 + k[1][1])
        if row is not None:
            rows.append(row)
    return rows


def _replay(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    ctx = MethodContext(inputs.target, (), inputs.sampling, inputs.tokenizer)
    costs = inputs.costs_of(method, candidates) if candidates else inputs.costs
    rows = []
    for options in candidates:
        drafter = method.build(ctx, method.make_options(dict(options)))
        steps = replay(inputs.texts, lambda ids: run_proposal(drafter.propose(ids, 1 << 20, None)),
                       start=lambda prompt, length: drafter.begin(prompt, length))
        row = replay_row(method.name, label(method.name, options), steps, costs, dict(options))
        if row is not None:
            rows.append(row)
    return rows


def _decode(method: Method, candidates: Sequence[Mapping[str, Any]], inputs: PricingInputs) -> list[Row]:
    ctx = MethodContext(inputs.target, inputs.drafts, inputs.sampling, inputs.tokenizer)
    rows = []
    for options in candidates:
        drafter = method.build(ctx, method.make_options(dict(options)))
        run = decode_run(inputs.target, drafter, inputs.texts, inputs.sampling, inputs.eos_token_ids)
        if run is not None:
            rows.append(decode_row(method.name, label(method.name, options), run, inputs.costs, dict(options)))
    return rows


RULES: dict[str, Rule] = {"plain": _plain, "chain": _chain, "tree-dp": _tree_dp, "static-tree": _static_tree,
                          "cascade": _cascade, "replay": _replay, "decode": _decode}
"""How a candidate's tokens per call are known, by the rule its method's `TuningSpace` names."""


def price(inputs: PricingInputs, has_draft: bool) -> list[Row]:
    """Every registered method's candidates on the one cost model, in listing order (plain decoding
    first, so that it wins a tie)."""
    setting = TuneSetting(bigram_cached=inputs.bigram is not None)
    rows: list[Row] = []
    for method in all_methods().values():
        space = method.tuning
        if space is None or (method.needs_draft_model and not has_draft):
            continue
        if space.rule not in RULES:
            raise ValueError(f"method {method.name!r} names the tuning rule {space.rule!r}; known rules: "
                             f"{', '.join(RULES)}")
        rows += RULES[space.rule](method, list(space.candidates(setting)), inputs)
    return rows
