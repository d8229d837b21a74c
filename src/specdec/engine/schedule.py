"""What a batch step should spend, from measurements: how many draft tokens each sequence gets, and
how many prompt tokens a step may fill (docs/algorithms.md §4.10).

`PassTimes` holds a model's measured seconds per pass by the number of tokens in it: a short probe at
start (`BatchEngine.calibrate`) and then every pass the engine runs, so the curve follows the load
and the machine. `plan_step` chooses each sequence's draft depth for one step by maximising the
step's expected tokens per second,

    Σ_i E_i(d_i) / (t_target(Σ_i (1 + n_i(d_i))) + Σ_levels t_draft(tokens drafted at that level)),

where E_i(d) = 1 + a_i + … + a_i^d is what d levels are expected to yield given the sequence's recent
per-level acceptance a_i (`Acceptance`), n_i(d) its drafted nodes at depth ≤ d (its last tree's
shape), and the all-zero choice is plain decoding. A draft level's expected gain a_i^ℓ falls with ℓ,
so the best choice for a given threshold on the gain is "every level worth at least λ"; every
threshold is priced at once (one small tensor computation) and the best wins, down to no drafts at
all. Where a sequence has a free tree (the text's own continuations, no draft pass), depth 0 is
that tree rather than the root alone (`Candidate.free_gain`), and once the depths are chosen the
free trees' nodes join while they raise the step's rate (`take_free`). Decisions read only earlier
steps (timings, acceptances), never the current step's random draws, so every verification stays
exact.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Tokens per pass the start-up probe times (bigger passes are learned from the steps themselves)."""
EMA_DOWN = 0.7
"""Weight a new timing below the estimate gets against it."""
EMA_UP = 0.1
"""Weight a new timing above the estimate gets. Timing noise is one-sided: a pass slowed by another
process (or a first call's one-off costs) reads seconds too long, never too short. A lasting
slowdown still shows within a few tens of passes."""
PRIOR_ACCEPTANCE = 0.9
PRIOR_WEIGHT = 2.0
"""The engine's acceptance starts at PRIOR_ACCEPTANCE with the weight of this many observed levels,
and a new sequence's starts at the engine's with the same weight. Optimistic on purpose: acceptance
is learnt only from steps that draft, so a prior saying "does not pay" would never be corrected (seen
on the default pair at one client with a prior of 0.6); once sequences have drafted, what they
accepted takes over."""
DECAY = 0.9
"""Each step's weight on a sequence's older acceptance counts: what is recent counts most. Steps that
draft nothing decay them too, so a sequence that stopped drafting drifts back to the engine's rate
and tries again."""
POOL_DECAY = 0.98
"""The same for the engine's acceptance, which every sequence's drafting steps feed: it follows the
last few requests."""
POOL_PRIOR_WEIGHT = 8.0
"""The engine's start (PRIOR_ACCEPTANCE) weighs this many observed levels: every new sequence starts
from the engine's rate, so a few rejected levels (one short request) must not bring it below what
pays; a few steps of real drafting still outweigh it."""


def _bucket(k: int) -> int:
    """Measured sizes are kept per bucket: exact up to 8 tokens, then on a grid of ~1/8 octave."""
    if k <= 8:
        return max(k, 1)
    step = 1 << max(k.bit_length() - 4, 0)
    return (k // step) * step


def _ema_weight(new: float, old: float) -> float:
    return EMA_DOWN if new <= old else EMA_UP


@dataclass
class Load:
    """How much slower than their curves the models run now, one factor for every model on the
    machine: the cores are shared, so another process slows the target's and the draft's passes of
    every size alike. It is what keeps the sizes the planner stopped choosing (never measured again)
    in step with the ones it measures every step."""

    factor: float = 1.0


@dataclass
class PassTimes:
    """Seconds per pass of one model by tokens in the pass: `load.factor` × a curve that is piecewise
    linear between measured sizes, extended by the last segment's slope, flat below the smallest.

    A timing's error against the prediction goes partly into the shared load factor (it moves every
    size of every model sharing `load`) and partly into its own size's point (the curve's shape)."""

    points: dict[int, float] = field(default_factory=dict)
    load: Load = field(default_factory=Load)
    _cached: tuple | None = field(default=None, repr=False, compare=False)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or not seconds > 0:
            return
        b = _bucket(tokens)
        seconds *= b / tokens  # a pass of `tokens` stands for its bucket's size
        old = self.points.get(b)
        if old is None:  # a new size says nothing of the load: only a measured size's error does
            self.points[b] = seconds / self.load.factor
            return
        predicted = old * self.load.factor
        # Half of the weight's share of the log error goes to the load, half to this size's point.
        half = _ema_weight(seconds, predicted) / 2
        self.load.factor *= (seconds / predicted) ** half
        self.points[b] = old * (seconds / predicted) ** half

    def calibrated(self, tokens: int, seconds: float) -> None:
        """Set a size's point from a start-up probe (a best-of-several timing, taken as the truth)."""
        self.points[_bucket(tokens)] = seconds * _bucket(tokens) / tokens / self.load.factor

    @property
    def known(self) -> bool:
        return bool(self.points)

    def predict(self, tokens: torch.Tensor | float) -> torch.Tensor | float:  # seconds, same shape
        """Predicted seconds of a pass of `tokens`: a float for a number (the planner asks a dozen
        single sizes a step, where tensor ops cost more than the arithmetic), else a tensor."""
        if not isinstance(tokens, torch.Tensor):
            return self._predict_one(float(tokens))
        k = tokens.to(torch.float64)
        if not self.points:
            return torch.zeros_like(k)
        xs, ys = self._curve()
        if xs.numel() == 1:
            out = torch.where(k <= xs[0], ys[0], ys[0] * k / xs[0])
        else:
            i = torch.searchsorted(xs, k.clamp_min(xs[0])).clamp(1, xs.numel() - 1)
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            out = torch.where(k <= xs[0], ys[0], y0 + (y1 - y0) * (k - x0) / (x1 - x0)).clamp_min(0.0)
        return out * self.load.factor

    def _predict_one(self, k: float) -> float:
        """`predict` of one size, in plain arithmetic on the same curve."""
        if not self.points:
            return 0.0
        xs, ys = self._curve_lists()
        if k <= xs[0]:
            return ys[0] * self.load.factor
        if len(xs) == 1:
            return ys[0] * k / xs[0] * self.load.factor
        i = min(max(bisect.bisect_left(xs, k), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (k - x0) / (x1 - x0), 0.0) * self.load.factor

    def _curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The measured sizes and their seconds at load 1, made monotone (a bigger pass never costs less
        than a smaller one; timings are noisy); rebuilt only when a point has changed (the planner
        predicts a dozen times a step)."""
        key = tuple(self.points.items())
        if self._cached is None or self._cached[0] != key:
            xs = sorted(self.points)
            ys = list(itertools.accumulate((self.points[x] for x in xs), max))
            self._cached = (key, torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64),
                            [float(x) for x in xs], ys)
        return self._cached[1], self._cached[2]

    def _curve_lists(self) -> tuple[list[float], list[float]]:
        """`_curve` as Python lists."""
        self._curve()
        assert self._cached is not None
        return self._cached[3], self._cached[4]

    def largest_within(self, seconds: float, cap: int) -> int:
        """The most tokens (≤ cap) whose pass is predicted to take at most `seconds` (0 if none)."""
        if not self.points:
            return cap
        sizes = torch.arange(1, cap + 1)
        fits = (self.predict(sizes) <= seconds).nonzero()
        return int(fits[-1]) + 1 if fits.numel() else 0


MODE_PROBE_EVERY = 12
"""Every this many steps the planner weighs drafting as predicted, unscaled, so that a mode judged
slow is measured again."""
MODE_DECAY = 0.95
"""Weight of a batch size's older steps against each new one of that batch size, either mode."""
MODE_LOSING_DECAY = 0.99
"""The same for drafting's steps while drafting is not run and measured worse than plain decoding at
that batch size: a retry buys every lagging sequence's draft-model fill, so a mode that lost is
believed ~5 times longer (~250 plain steps back to the prediction rather than ~50; steps that plan:
a batch reusing a plan of nothing observes none)."""
MODE_PRIOR_STEPS = 1.0
"""Steps' worth of belief in the planner's own prediction (factor 1) that each mode's measured factor is
weighed against: a factor from a few steps, or from steps long past, counts for little."""


@dataclass
class ModeRates:
    """How the batch's steps with drafts and without measured against the planner's predictions, per
    batch size: the check on the planner.

    The planner prices drafting from predicted pass times and acceptances; costs no pass curve holds
    (the engine's per-sequence work, draft passes over many short rows) and acceptances that flatter
    it make it draft at a loss. For each mode this keeps decayed sums of tokens committed and
    expected, seconds taken and predicted; measured over predicted rate is (Σ tokens / Σ expected) /
    (Σ seconds / Σ predicted), sums rather than an average of per-step ratios, whose accepted
    lengths vary too much. Drafting's factor over plain decoding's then weighs the planner's drafting
    choices (`plan_step`), so each step still decides per sequence from its acceptance, only with
    drafting priced as it has measured. A step that proposed free trees counts as drafting (it
    speculated), and the same factor weighs the free trees' gains (`BatchEngine._free_options`).
    Every step of a batch size ages both modes' sums, so a mode that stopped running is believed
    less and less against the planner's prediction
    (`MODE_PRIOR_STEPS`): a mode judged slow is tried again in time, even where no probe can try it
    (every sequence's draft model would first have to catch up); drafting that lost to plain
    decoding at that size after more time (`MODE_LOSING_DECAY`). Steps that fill a prompt are not
    observed (a target's fill is neither mode's cost); the seconds of a draft model's fills are
    drafting's alone and are charged to it (`charge`). Which mode runs never changes greedy output,
    only speed."""

    sums: dict[tuple[int, bool], list[float]] = field(default_factory=dict)
    """(batch bucket, drafted) -> decayed [tokens, expected tokens, seconds, predicted seconds, steps]."""
    steps: int = 0

    def observe(self, batch: int, drafted: bool, plan: Plan, tokens: int, seconds: float) -> None:
        """One step of `batch` sequences that the planner chose as `plan` and that committed `tokens` in `seconds`."""
        if batch < 1 or tokens < 1 or not seconds > 0 or not plan.tokens > 0 or not plan.seconds > 0:
            return
        key, other = (_bucket(batch), drafted), (_bucket(batch), not drafted)
        old = self.sums.get(key, [0.0] * 5)
        new = (float(tokens), plan.tokens, seconds, plan.seconds, 1.0)
        self.sums[key] = [MODE_DECAY * o + n for o, n in zip(old, new)]
        if other in self.sums:  # ages alone: its factor stands, believed less
            decay = MODE_LOSING_DECAY if other[1] and self._losing(other[0]) else MODE_DECAY
            self.sums[other] = [decay * o for o in self.sums[other]]

    def charge(self, batch: int, seconds: float) -> None:
        """Seconds a batch of `batch` sequences spent on draft-model fills (new prompts, long catch-ups),
        added to the drafting steps' seconds at that size with no tokens: steps that fill are never
        observed, and the planner shares a fill out over the tokens its sequence may still emit, which
        at a load where drafting stops and restarts (and every new request needs a fill) it never
        earns back. Before any drafting step of that size is observed there is nothing to weigh it by."""
        s = self.sums.get((_bucket(batch), True))
        if s is not None and seconds > 0:
            s[2] += seconds

    def _losing(self, bucket: int) -> bool:
        spec, plain = self.factor(bucket, True), self.factor(bucket, False)
        return spec is not None and plain is not None and spec < plain

    def factor(self, batch: int, drafted: bool) -> float | None:
        """Measured over predicted commit rate of a mode at this batch size (None: not measured)."""
        s = self.sums.get((_bucket(batch), drafted))
        return None if s is None else (s[0] / s[1]) / (s[2] / s[3])

    def belief(self, batch: int, drafted: bool) -> float | None:
        """A mode's factor as far as its steps' weight carries it against the prediction's (1)."""
        s, f = self.sums.get((_bucket(batch), drafted)), self.factor(batch, drafted)
        return None if s is None or f is None else (s[4] * f + MODE_PRIOR_STEPS) / (s[4] + MODE_PRIOR_STEPS)

    def spec_scale(self, batch: int) -> tuple[float, bool]:
        """What the planner's drafting rates are worth against its plain rate at this batch size, for this
        step, and whether the step is a probe: drafting's `belief` over plain decoding's where both are
        measured, else the nearest smaller batch size's (drafting pays less as batches grow), else 1;
        and 1 one step in `MODE_PROBE_EVERY` where a factor exists (the probe). A single sequence is
        left to the planner: there its prices are its own measured pass times and acceptance, and
        weighing them by measured factors shut drafting off where it paid (a sequence that stops
        drafting owes its draft model a catch-up, which makes its next drafting step look dear)."""
        self.steps += 1
        if batch <= 1:  # one sequence: the planner's own setting, its prices are the measured t(k)
            return 1.0, False
        for b in sorted({k for k, _ in self.sums if 1 < k <= _bucket(batch)}, reverse=True):
            spec, plain = self.belief(b, True), self.belief(b, False)
            if spec is not None and plain is not None:
                probe = self.steps % MODE_PROBE_EVERY == 0
                return (1.0, True) if probe else (spec / plain, False)
        return 1.0, False


@dataclass
class Acceptance:
    """Recent per-level acceptance: of the levels drafted, how far verification got. A sequence's
    starts from `prior` (the engine's, which every sequence feeds) and an engine's from PRIOR_ACCEPTANCE."""

    accepted: float = 0.0
    rejected: float = 0.0
    prior: "Acceptance | None" = None
    decay: float = DECAY
    prior_weight: float = PRIOR_WEIGHT

    def observe(self, drafted_depth: int, accepted_depth: int) -> None:
        """One step that drafted `drafted_depth` levels and accepted `accepted_depth` of them (0 drafted:
        nothing learnt, only older counts fade, the prior's too)."""
        self.fade()
        if drafted_depth <= 0:
            if self.prior is not None:
                self.prior.fade()
            return
        self.accepted += accepted_depth
        self.rejected += accepted_depth < drafted_depth
        if self.prior is not None:
            self.prior.observe(drafted_depth, accepted_depth)

    def fade(self) -> None:
        """Older counts weigh less. The engine's fades on every step of a sequence that drafted nothing:
        otherwise a few rejected drafts (a short warm-up request) could leave it below what pays,
        every new sequence would start there and draft nothing, and nothing would correct it; fading,
        it drifts back to PRIOR_ACCEPTANCE until a sequence drafts again and is measured."""
        self.accepted *= self.decay
        self.rejected *= self.decay

    @property
    def rate(self) -> float:
        start = self.prior.rate if self.prior is not None else PRIOR_ACCEPTANCE
        return (self.accepted + start * self.prior_weight) / (self.accepted + self.rejected + self.prior_weight)


FREE_PRIOR = 0.4
"""Accepted tokens per estimated token that a free tree's estimates are first believed worth (on the
default pair's dev prompts, 64 greedy tokens each, they measured 0.15 for translation to 0.5 for
summarization: the estimates are shares of earlier occurrences, optimistic where text repeats little)."""
FREE_PRIOR_WEIGHT = 4.0
"""Estimated tokens' worth of belief in the prior that a sequence's own free trees are weighed against."""


@dataclass
class FreeRate:
    """How a sequence's free trees (`take_free`) turned out: its decayed accepted tokens over the sums of
    their estimates, starting from `prior` (the engine's, which every sequence feeds) or FREE_PRIOR.
    Steps without a free tree fade the counts too, so a sequence whose free trees stopped paying drifts
    back to the engine's rate and tries again."""

    accepted: float = 0.0
    estimated: float = 0.0
    prior: "FreeRate | None" = None
    decay: float = DECAY

    def observe(self, estimated: float, accepted: int) -> None:
        """One step whose free tree was estimated at `estimated` tokens and got `accepted` (0, 0: no free tree)."""
        self.accepted = self.decay * self.accepted + accepted
        self.estimated = self.decay * self.estimated + estimated
        if self.prior is not None and estimated > 0:
            self.prior.observe(estimated, accepted)

    @property
    def ratio(self) -> float:
        start = self.prior.ratio if self.prior is not None else FREE_PRIOR
        return (self.accepted + start * FREE_PRIOR_WEIGHT) / (self.estimated + FREE_PRIOR_WEIGHT)


EXPECTED_MIN_ANSWER = 32
"""The fewest tokens an answer is expected to go on for (`expected_remaining`)."""


def expected_remaining(emitted: int, cap: int) -> int:
    """Tokens an answer that has emitted `emitted` is expected to add, at most `cap` (what the request
    allows): as many again as it has, and at least `EXPECTED_MIN_ANSWER` (an answer is as likely to
    be in its first half as in its second). A draft model's fill of a long prompt is shared out over
    these: priced over the cap, it paid on paper and not on a 17-token answer to a 900-token prompt
    (a RAG question: 0.83x plain decoding end to end, the 0.5B's fill beside the 1.5B's)."""
    return max(1, min(cap, max(emitted, EXPECTED_MIN_ANSWER)))


@dataclass
class Candidate:
    """One sequence about to propose, as the planner sees it."""

    max_depth: int
    """Levels its drafter may draft now (0: none)."""
    nodes: Sequence[int]
    """nodes[d-1]: drafted nodes of a tree capped at depth d (chains: d), d = 1 … max_depth."""
    rate: float
    """Its per-level acceptance estimate (`Acceptance.rate`)."""
    catch_up: int = 0
    """Tokens its draft model must run before drafting in its first draft pass, beside the root (what
    it has not seen of the committed text)."""
    uses_draft_model: bool = True
    backlog: int = 0
    """Tokens its draft model must fill before it can draft, in a fill of their own (a new prompt, a
    long stretch without drafts): a one-off cost shared out over the tokens it is expected to emit."""
    remaining: int = 1
    """Tokens it is expected to emit still (`expected_remaining`)."""
    free_gain: float = 0.0
    """Tokens a free tree is expected to add where it drafts nothing (`take_free`): plain decoding's
    alternative is then that tree, not the root alone."""
    free_nodes: int = 0
    """That free tree's nodes."""


def _gains(cands: Sequence[Candidate], depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gain [S, D]: tokens level ℓ adds (a_i^ℓ; -1 where not allowed); nodes [S, D]: drafted nodes up
    to depth ℓ; width [S, D]: nodes of level ℓ alone."""
    s = len(cands)
    levels = torch.arange(1, depth + 1, dtype=torch.float64)
    rate = torch.tensor([c.rate for c in cands], dtype=torch.float64).clamp(0.0, 0.999)
    allowed = levels[None] <= torch.tensor([c.max_depth for c in cands], dtype=torch.float64)[:, None]
    gain = torch.where(allowed, rate[:, None] ** levels[None], -1.0)
    nodes = torch.tensor([[c.nodes[min(l, len(c.nodes)) - 1] if c.nodes else l for l in range(1, depth + 1)]
                          for c in cands], dtype=torch.float64)
    width = torch.diff(nodes, dim=1, prepend=torch.zeros(s, 1, dtype=torch.float64)).clamp_min(1.0)
    return gain, nodes, width


def _per_level(cands: Sequence[Candidate], width: torch.Tensor, depth: int) -> torch.Tensor:
    """Draft-model tokens each level of each sequence runs [S, D]: level 1 its root (its catch-up is
    priced apart, `_catch_up_share`; a chain's last draft runs only if accepted, at the next step's
    catch-up)."""
    model = torch.tensor([c.uses_draft_model for c in cands], dtype=torch.float64)
    levels = torch.arange(1, depth + 1)
    return torch.where(levels[None] == 1, 1.0, width) * model[:, None]


def _catch_up_seconds(cands: Sequence[Candidate], draft: PassTimes) -> torch.Tensor:
    """Seconds of draft-model work a sequence must run before it drafts again [S]: what its draft model
    has not seen (the tokens of steps it did not draft, a new prompt)."""
    first = torch.tensor([1.0 + c.catch_up for c in cands], dtype=torch.float64)
    backlog = torch.tensor([float(c.backlog) for c in cands], dtype=torch.float64)
    model = torch.tensor([c.uses_draft_model for c in cands], dtype=torch.float64)
    seconds = draft.predict(first) - draft.predict(1.0) + torch.where(backlog > 0, draft.predict(backlog), 0.0)
    return seconds * model


def _catch_up_share(cands: Sequence[Candidate], seconds: torch.Tensor) -> torch.Tensor:
    """Seconds of catch-up per token a sequence emits while drafting [S], from its catch-up's `seconds`
    [S]. A catch-up must be run once before the sequence drafts again, whenever that is: a one-off
    cost, shared out over the tokens it is expected to emit still (`expected_remaining`). Priced in
    full on the step that pays it, a sequence that stopped drafting would find restarting dearer
    every step it waits."""
    remaining = torch.tensor([max(c.remaining, 1) for c in cands], dtype=torch.float64)
    return seconds / remaining


@dataclass
class Plan:
    """One step's choice and what the planner expects of it."""

    depths: list[int]
    """Each candidate's draft depth; all zeros = plain decoding."""
    tokens: float
    """Tokens the step is expected to commit."""
    seconds: float
    """Its predicted seconds, catch-ups counted in full (what the step will actually run)."""
    block: float = 0.0
    """Tokens in the target's pass."""


def plan_depths(cands: Sequence[Candidate], target: PassTimes, draft: PassTimes) -> list[int]:
    """Each candidate's draft depth for this step (module docstring); all zeros = plain decoding."""
    return plan_step(cands, target, draft).depths


def plan_step(cands: Sequence[Candidate], target: PassTimes, draft: PassTimes, spec_scale: float = 1.0) -> Plan:
    """The best depths for this step (module docstring), the rates of choices that draft weighed by
    `spec_scale` against plain decoding's (what such steps measured against their predictions,
    `ModeRates.spec_scale`)."""
    if not cands:
        return Plan([], 0.0, 0.0)
    depth = max(c.max_depth for c in cands)
    if depth == 0 or not target.known:
        return Plan([c.max_depth for c in cands], 0.0, 0.0)
    gain = _gains(cands, depth)[0]  # [S, D]
    # Thresholds: every distinct gain, plus "none" (plain decoding).
    lam = torch.cat([gain[gain > 0].unique(), torch.tensor([float("inf")], dtype=torch.float64)])
    take = gain[None] >= lam[:, None, None]  # [Λ, S, D]: prefix-closed since gain falls with ℓ
    per_seq, passes, catch_up_s, seconds, block = _price(cands, take, target, draft)
    drafting = take.any(2)  # [Λ, S]
    rate_of = per_seq.sum(1) / (passes + catch_up_s)
    rate_of = torch.where(drafting.any(1), rate_of * spec_scale, rate_of)
    best = int(rate_of.argmax())
    return Plan(take[best].sum(1).tolist(), float(per_seq[best].sum()), float(seconds[best]), float(block[best]))


def price_depths(cands: Sequence[Candidate], depths: Sequence[int], target: PassTimes, draft: PassTimes) -> Plan:
    """What the planner expects of a step that drafts `depths` (which may not be its own choice: a
    drafter that ends its chain by confidence drafts other depths than the planner priced)."""
    if not cands or not target.known:
        return Plan(list(depths), 0.0, 0.0)
    depth = max(1, *depths, *(c.max_depth for c in cands))
    take = (torch.arange(1, depth + 1)[None] <= torch.tensor(list(depths))[:, None])[None]  # [1, S, D]
    per_seq, _, _, seconds, block = _price(cands, take, target, draft)
    return Plan(list(depths), float(per_seq[0].sum()), float(seconds[0]), float(block[0]))


def _price(cands: Sequence[Candidate], take: torch.Tensor, target: PassTimes, draft: PassTimes
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For choices `take` [Λ, S, D] (level ℓ of sequence s drafted; prefix-closed): expected tokens per
    sequence [Λ, S], the passes' predicted seconds [Λ], the catch-ups' seconds shared out over the
    tokens left [Λ] (what a choice is judged by), the seconds the step will actually run, catch-ups
    in full [Λ], and the tokens of the target's pass [Λ]."""
    s, depth = len(cands), take.shape[2]
    gain, nodes, width = _gains(cands, depth)  # [S, D] each
    d = take.sum(-1)  # [Λ, S]
    free_gain, free_nodes = _free_of(cands)  # [S] each
    per_seq = 1.0 + take.to(torch.float64).mul(gain.clamp_min(0)[None]).sum(2)  # [Λ, S]: E[tokens]
    per_seq = per_seq + torch.where(d > 0, 0.0, free_gain[None])
    reach = nodes[None].expand(take.shape[0], -1, -1).gather(2, (d - 1).clamp_min(0)[..., None])[..., 0]  # [Λ, S]
    block = s + torch.where(d > 0, reach, free_nodes[None]).sum(1)  # tokens in the target's pass
    # Draft rounds: level ℓ runs the sequences drafting at least ℓ levels.
    round_tokens = (_per_level(cands, width, depth)[None] * take).sum(1)  # [Λ, D]
    passes = target.predict(block) + torch.where(round_tokens > 0, draft.predict(round_tokens), 0.0).sum(1)  # [Λ]
    drafting = d > 0  # [Λ, S]
    catch_up = _catch_up_seconds(cands, draft)  # [S]
    catch_up_s = (torch.where(drafting, per_seq, 0.0) * _catch_up_share(cands, catch_up)[None]).sum(1)
    return per_seq, passes, catch_up_s, passes + torch.where(drafting, catch_up, 0.0).sum(1), block


def _free_of(cands: Sequence[Candidate]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's free tree where it drafts nothing: expected gain [S] and nodes [S]."""
    return (torch.tensor([c.free_gain for c in cands], dtype=torch.float64),
            torch.tensor([float(c.free_nodes) for c in cands], dtype=torch.float64))


def path_floors(cands: Sequence[Candidate], depths: Sequence[int], target: PassTimes, draft: PassTimes) -> list[float]:
    """For each sequence the planner lets draft, the path probability below which the next draft
    level's pass does not pay. That level costs a draft pass beside the other sequences' and the
    target's extra tokens; it yields a token when the chain so far holds (the product of the draft's
    largest probabilities, if its confidence is its acceptance) and its own draft is accepted (the
    sequence's per-level rate): worth it when that is at least what the same time yields decoding
    these sequences plainly (the planner's own expected rate would count the levels it prices as
    drafted, more than a chain ended by confidence drafts, and set the bar too high). A drafter that reads its own confidence ends its chain there
    (`ModelDrafter.path_floor`). 0 where nothing drafts."""
    if not cands or not any(depths) or not target.known:
        return [0.0 for _ in cands]
    depth = max(c.max_depth for c in cands)
    _, nodes, width = _gains(cands, depth)
    d = torch.tensor(depths)
    take = torch.arange(1, depth + 1)[None] <= d[:, None]  # [S, D]
    reach = nodes.gather(1, (d - 1).clamp_min(0)[:, None])[:, 0]
    block = len(cands) + torch.where(d > 0, reach, _free_of(cands)[1]).sum()
    round_tokens = (_per_level(cands, width, depth) * take).sum(0)  # [D]
    rate = len(cands) / target.predict(len(cands))  # plain decoding's tokens per second
    nxt = torch.cat([round_tokens, torch.zeros(1, dtype=torch.float64)])[d.clamp_max(depth)]  # [S]: its next round
    w = width.gather(1, (d - 1).clamp(0, depth - 1)[:, None])[:, 0]
    model = torch.tensor([c.uses_draft_model for c in cands], dtype=torch.float64)
    nxt_s = torch.where(nxt > 0, draft.predict(nxt), 0.0)  # an empty round costs nothing (predict is flat below 1)
    extra = (target.predict(block + w) - target.predict(block)) + model * (draft.predict(nxt + w) - nxt_s)
    rates = torch.tensor([c.rate for c in cands], dtype=torch.float64).clamp(0.05, 1.0)
    return torch.where(d > 0, extra * rate / rates, 0.0).tolist()


def take_free(plan: Plan, gains: torch.Tensor, target: PassTimes) -> int:  # gains: [N] float64, best first
    """How many free nodes to add to a planned step: nodes that cost no draft pass (the text's own
    continuations, proposed where the plan drafts nothing), each expected to add its gain in tokens and
    one token to the target's pass. The count whose step is expected to commit the most tokens per
    second, 0 where none raises the plan's own rate (ties: fewer)."""
    if gains.numel() == 0 or not target.known or not plan.seconds > 0:
        return 0
    n = torch.arange(gains.numel() + 1, dtype=torch.float64)
    tokens = plan.tokens + torch.cat([torch.zeros(1, dtype=torch.float64), gains.cumsum(0)])
    seconds = plan.seconds + target.predict(plan.block + n) - target.predict(plan.block)
    return int((tokens / seconds).argmax())


def free_gain_floor(plan: Plan, target: PassTimes, nodes: int) -> float:
    """The gain below which a free node does not pay in a step planned as `plan` where `nodes` free
    nodes would join its pass: the plan's tokens per second times a node's share of their extra
    time (`take_free`'s first comparison, averaged over the nodes). inf where nothing is priced."""
    if not target.known or not plan.seconds > 0:
        return float("inf")
    extra = float(target.predict(plan.block + nodes) - target.predict(plan.block)) / max(nodes, 1)
    return plan.tokens / plan.seconds * extra


def with_free(plan: Plan, gains: torch.Tensor, target: PassTimes) -> Plan:  # gains: [N] float64
    """The plan with free nodes of these expected gains added (`take_free`)."""
    if gains.numel() == 0 or not plan.seconds > 0:
        return plan
    extra = target.predict(plan.block + gains.numel()) - target.predict(plan.block)
    return Plan(plan.depths, plan.tokens + float(gains.sum()), plan.seconds + float(extra), plan.block + gains.numel())
