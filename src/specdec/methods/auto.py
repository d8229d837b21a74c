"""`auto` (the default method): whatever the tune found fastest for this machine, model pair, dtypes
and greedy or sampling decoding — any method and shape, or no speculation at all.

The profile is found by key (`core.store.find_profile`). When there is none, or it cannot be
used (unreadable, older, from other hardware, left by an interrupted tune), the context's `tuner`
— supplied by the pipeline when a tuner is registered (`tuning.autotune`) — runs the quick tune
once and saves it; without a tuner the problem is reported with the command that fixes it. The
winner is built through the registry like any method, so it is verified by its own exact rule.

Where the winner drafts, a request does not run the winner as it was tuned: it runs as a sequence
of the batch engine's per-step planner (`planned_request`, docs/algorithms.md §19.5) — alone for
`Pipeline.stream` (a seeded sampled one on an engine whose plans depend on no timing, so that it
repeats), beside the others in an adaptive engine (`serve`; greedy or unseeded
requests only) — which chooses each step's depth, or a free tree, from pass times and this
prompt's acceptance. `build` is auto as one decoder: the winner and the bandit over the tune's
best candidates (§19), what the other runs use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from specdec.core.options import MethodOptions, choice, flag, option, positive_int
from specdec.core.sampling import SamplingConfig
from specdec.core.store import ProfileProblem
from specdec.drafting.bandit import Arm, BanditDrafter
from specdec.drafting.base import Drafter
from specdec.drafting.fallback import FallbackDrafter
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import get_method, register
from specdec.methods.sequoia import MODES, SequoiaDrafter, parse_tree, tuned_profile


@dataclass(frozen=True)
class Options(MethodOptions):
    tree: str = option("auto", "auto (the tuned profile for this setting; tuned on first use) or a tune profile "
                       ".json", parse_tree, metavar="auto|PROFILE.json", file_path=True, symbols=("auto", "dp"))
    sequoia_mode: str | None = option(None, "override the tuned tree's mode (swor or greedy)", choice(*MODES),
                                      choices=MODES)
    no_fallback: bool = option(False, "always follow the winner (by default auto switches, step by step, between the "
                               "tune's best candidates and plain decoding by what each earns on this prompt)", flag,
                               flag=True)
    arms: int = option(3, "how many of the tune's best candidates (of different methods) auto switches between, "
                       "plain decoding besides", positive_int)
    no_planner: bool = option(False, "decode with the tune's winner and its fallback as one decoder, rather than "
                              "through the batch engine's per-step planner (by default, where the tune found "
                              "drafting pays, each step drafts as deep as measured times and acceptance say, or "
                              "proposes the text's own continuations)", flag, flag=True)

    def draft_tokens_per_step(self, num_drafts: int = 1) -> None:
        return None  # the tuned tree's size is in its profile, which the operator chose


def auto_profile(ctx: MethodContext, tree: str = "auto") -> dict[str, Any]:
    """The profile auto follows: a given file, the saved one for this setting, or a fresh tune."""
    given = tree not in ("auto", "dp")
    if not given and ctx.profile_key is None:
        raise ValueError("auto is tuned for one draft model at a time; give a single --draft (or a --method)")
    try:
        return _runnable(tuned_profile(ctx, tree), tree if given else None, ctx.profile_key)
    except ProfileProblem as exc:
        if given or ctx.tuner is None:  # an operator's file is reported, never replaced by a tune
            raise
        return ctx.tuner(str(exc))


def _runnable(profile: dict[str, Any], given: str | None, key: dict[str, Any] | None) -> dict[str, Any]:
    """`profile`, or a ProfileProblem naming its file where this version cannot follow it: a winner
    whose method it lacks or whose options it refuses (a hand-edited file, another version's), or
    candidates that are not rows. Candidates it cannot run are left out of what auto considers (a
    method this version no longer has: the tune's other rows still stand)."""
    from specdec.core import store

    where = given or (str(store.profile_path(key)) if key is not None else "the tune profile")
    command = store.tune_command(key) if key is not None and given is None else None
    again = f"; run `{command}`" if command else "; tune again"
    winner, candidates = profile["winner"], profile.get("candidates", [])
    if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
        raise ProfileProblem(f"{where}: its candidates are not a list of rows{again}", command)
    try:
        _check_row(winner)
    except (ValueError, TypeError) as exc:
        raise ProfileProblem(f"{where}: its winner {winner.get('label', winner.get('method'))!r} is not one this "
                             f"specdec can run ({exc}){again}", command) from None
    runnable = []
    for row in candidates:
        try:
            _check_row(row)
        except (ValueError, TypeError):
            continue
        runnable.append(row)
    return profile if len(runnable) == len(candidates) else {**profile, "candidates": runnable}


def _check_row(row: dict[str, Any]) -> None:
    """ValueError/TypeError unless this version has the row's method and takes its options."""
    options = row.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"options {options!r} are not a mapping")
    get_method(str(row.get("method"))).make_options(options)


PLANNER_DEPTH = 6
"""The deepest draft-model chain auto's planner may give a step (`planned_request`): the tune's depth is
the best fixed one for its prompts, while the planner ends each chain where its acceptance says."""


class Planned(NamedTuple):
    """What auto decodes with through the per-step planner (`planned_request`)."""

    method: str
    options: dict[str, Any]
    timing: dict[str, Any]
    """The tune's pass times ({"target_ms": {k: ms}, "draft_ms": …}), what the planner starts from."""


def planner_adapts(sampling: SamplingConfig, seed: int | None) -> bool:
    """Whether a run may go through a per-step planner that follows measured timings: greedy, or sampled
    without a seed. A seeded sampled run must repeat its output, and its draws follow what it drafts;
    alone it may go through one whose plans follow no timing (`BatchEngine.fix_plans`)."""
    return sampling.greedy or seed is None


def planned_request(ctx: MethodContext, opts: Options) -> Planned | None:
    """What auto decodes with through the batch engine's per-step planner as one sequence
    (docs/algorithms.md §19.5), or None where it decodes with its own drafter (`build`): with
    `no_planner`, `no_fallback` or `sequoia_mode`, or where the tune's winner is plain decoding.

    Where drafting with the draft model pays on the tune's texts (the winner drafts with it, or a
    model-free winner leads a model-drafting candidate that is also faster than plain decoding), the
    planner runs that model's chain (sps) and gives each step the depth that the measured pass
    times and this prompt's acceptance say pays, down to none, and a free tree of the text's own
    continuations where it gives none: so a prompt that the model drafts well (reasoning, short
    answers) gets the model and one that repeats its own text gets free trees, whichever led on
    the tune's few texts. Where no model draft pays, the model-free winner, each step capped by the
    planner. Tuned on first use as `build` is."""
    if opts.no_planner or opts.no_fallback or opts.sequoia_mode is not None:
        return None
    profile = auto_profile(ctx, opts.tree)
    winner, timing = profile["winner"], dict(profile.get("timing") or {})
    name = str(winner.get("method"))
    if name == "ar":
        return None
    if get_method(name).loads_draft_model or (ctx.drafts and model_draft_pays(profile)):
        return Planned("sps", {"gamma": PLANNER_DEPTH}, timing)
    return Planned(name, dict(winner.get("options") or {}), timing)


def model_draft_pays(profile: dict[str, Any]) -> bool:
    """Whether the tune expected some candidate that drafts with the draft model to beat plain decoding."""
    def drafts_with_model(method: Any) -> bool:
        try:
            return get_method(str(method)).loads_draft_model
        except ValueError:  # a method this version no longer has
            return False

    return any(drafts_with_model(c.get("method")) and float(c.get("expected_speedup") or 0.0) > 1.0
               for c in profile.get("candidates") or [] if isinstance(c, dict))


def planned_label(planned: Planned, tuned: str) -> str:
    """How reports name a run through the planner: what drafts, and the tune's winner (`tuned`)."""
    options = "".join(f" {k}={v}" for k, v in planned.options.items())
    return f"planned per step: {planned.method}{options} (tuned: {tuned})"


def drafter_for(ctx: MethodContext, winner: dict[str, Any], sequoia_mode: str | None = None) -> Drafter | None:
    """The drafter a profile's winner describes (None: plain decoding)."""
    name = winner.get("method")
    if name == "ar":
        return None
    if name == "sequoia":
        return SequoiaDrafter(ctx.drafts[0], ctx.sampling, [tuple(p) for p in winner["paths"]],
                              sequoia_mode or winner["mode"])
    method = get_method(str(name))
    if method.needs_draft_model and not ctx.drafts:
        raise ValueError(f"the tuned winner {name!r} needs a draft model, and none is loaded")
    return method.build(ctx, method.make_options(winner.get("options") or {}))


def break_even(profile: dict[str, Any]) -> float | None:
    """Tokens per call the winner needs to match plain decoding, from the tune's measurements."""
    winner = profile["winner"]
    ar_ms = (profile.get("timing") or {}).get("ar_ms_per_token")
    if ar_ms is None:  # the full Sequoia tune: plain decoding's row of the candidate table
        ar_ms = next((r.get("target_ms") for r in profile.get("candidates", []) if r.get("method") == "ar"), None)
    per_call = winner.get("ms_per_call")
    if per_call is None and "target_ms" in winner and "draft_ms" in winner:
        per_call = winner["target_ms"] + winner["draft_ms"]
    if per_call is None:  # older full-tune winners keep their costs in the candidate table only
        per_call = next((r["target_ms"] + r["draft_ms"] for r in profile.get("candidates", [])
                         if r.get("method") == winner.get("method") and r.get("size") == winner.get("size")
                         and r.get("depth") == winner.get("depth") and r.get("mode") == winner.get("mode")), None)
    if not ar_ms or not per_call:
        return None
    return float(per_call) / float(ar_ms)


PROBE_FLOOR = 0.75
"""Where the tune found that nothing beats plain decoding, candidates it priced at this share of plain
decoding's speed or more are still probed while generating: the tune's prompts are not the user's."""


def bandit_arms(ctx: MethodContext, profile: dict[str, Any], winner: Drafter | None, count: int,
                sequoia_mode: str | None = None) -> list[Arm] | None:
    """The winner (unless it is plain decoding) and the next best candidates of other methods that beat
    plain decoding in the tune, or come within `PROBE_FLOOR` of it where the winner is plain decoding
    (at most `count` in all), with the tune's figures; plus, when none of them is model-free, the
    tune's best model-free candidate, which the bandit peeks at every step (`BanditDrafter.peek_free`:
    it costs no model pass, so it needs no price to be worth a look); None when the profile lacks the
    figures (older tunes)."""
    rows = [r for r in profile.get("candidates", []) if r.get("method") != "ar"]
    if not all("ms_per_call" in r and "tokens_per_call" in r for r in rows + [profile["winner"]]):
        return None
    w = profile["winner"]
    arms = [] if winner is None else \
        [Arm(winner, float(w["ms_per_call"]), float(w["tokens_per_call"]), str(w.get("label", "")))]
    methods = {w.get("method")}
    floor = 1.0 if winner is not None else PROBE_FLOOR
    ranked = sorted(rows, key=lambda r: -float(r["expected_speedup"]))
    for r in ranked:
        if len(arms) >= count or float(r["expected_speedup"]) < floor or \
                (winner is not None and float(r["expected_speedup"]) <= 1.0):
            break
        if r["method"] in methods or (get_method(r["method"]).needs_draft_model and not ctx.drafts):
            continue
        methods.add(r["method"])
        arms.append(arm_of(ctx, r, sequoia_mode))
    if not any(a.drafter is not None and not a.drafter.draft_models for a in arms):
        free = free_candidate(ranked)
        if free is not None:
            arms.append(arm_of(ctx, free, sequoia_mode))
    return arms


def free_candidate(ranked: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The model-free arm to peek at: the best-priced method among those that draft from the text alone
    (tuning rule "replay": prompt lookup, suffix drafting, Max-Gram), with its candidate that drafts
    the most tokens per step. Their proposals are empty where the text does not repeat, which is what
    makes a peek informative (Token Recycling fills its tree every step, and the tune on the rank
    table's few steps, at 0.99x here, chose its 24-node tree: auto fell from 1.23x to 1.06x of AR on
    the dev set). The tune's short texts hardly repeat, so they cannot tell lengths apart, while the
    peek prices each proposal by its size and the arm's measured share of accepted nodes."""
    free = [r for r in ranked if not get_method(r["method"]).loads_draft_model
            and (get_method(r["method"]).tuning or TuningSpace("")).rule == "replay"]
    if not free:
        return None
    method = get_method(free[0]["method"])

    def width(row: dict[str, Any]) -> int:
        return method.make_options(row.get("options") or {}).draft_tokens_per_step() or 0

    return max((r for r in free if r["method"] == method.name), key=width)


def arm_of(ctx: MethodContext, row: dict[str, Any], sequoia_mode: str | None = None) -> Arm:
    """A tune candidate as a bandit arm: its drafter and the tune's figures."""
    return Arm(drafter_for(ctx, row, sequoia_mode), float(row["ms_per_call"]), float(row["tokens_per_call"]),
               str(row.get("label", "")))


def piecewise_ms(table: dict[str, Any] | None) -> Callable[[float], float] | None:
    """t(k) from a profile's timing table ({"k": ms}): piecewise linear, the last segment extended."""
    points = sorted((int(k), float(v)) for k, v in (table or {}).items())
    if len(points) < 2:
        return None

    def ms(k: float) -> float:
        for (k0, t0), (k1, t1) in zip(points, points[1:]):
            if k <= k1 or (k1, t1) == points[-1]:
                return max(t0 + (t1 - t0) * (k - k0) / (k1 - k0), 0.0)
        raise AssertionError("unreachable")

    return ms


def block_cost(timing: dict[str, Any]) -> Callable[[int], float] | None:
    """Milliseconds of a step that scores the root and n drafted nodes and runs no draft model: plain
    decoding's step plus what the wider target pass adds (the tune's forward times)."""
    target_ms, ar_ms = piecewise_ms(timing.get("target_ms")), timing.get("ar_ms_per_token")
    if target_ms is None or not ar_ms:
        return None
    base = target_ms(1)
    return lambda drafted: float(ar_ms) + max(target_ms(1 + drafted) - base, 0.0)


def build(ctx: MethodContext, opts: Options) -> Drafter | None:
    profile = auto_profile(ctx, opts.tree)
    drafter = drafter_for(ctx, profile["winner"], opts.sequoia_mode)
    if opts.no_fallback:
        return drafter
    timing = profile.get("timing") or {}
    ar_ms = timing.get("ar_ms_per_token")
    arms = bandit_arms(ctx, profile, drafter, opts.arms, opts.sequoia_mode) if ar_ms else None
    if arms:
        # The best few candidates and plain decoding, switched by what each earns on this prompt.
        return BanditDrafter(arms, float(ar_ms), block_ms=block_cost(timing),
                             prefill_ms=piecewise_ms(timing.get("draft_ms")))
    if drafter is None:
        return None
    need = break_even(profile)
    # Where the winner does not pay on this text, plain steps instead (exact either way).
    return drafter if need is None else FallbackDrafter(drafter, need)


METHOD = register(Method(
    "auto",
    "the default: whatever the tune found fastest here for this model pair, dtypes and greedy or sampling "
    "decoding (any method and shape, or none); tuned on first use",
    Options, build, needs_draft_model=False, wants_draft_model=True, list_rank=100, examples=None,
))
