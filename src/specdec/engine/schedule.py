"""What a batch step should spend, from measurements: how many draft tokens each sequence gets, and
how many prompt tokens a step may fill (docs/algorithms.md §4.10).

`PassTimes` holds a model's measured seconds per pass by the number of tokens in it: a short probe at
start (`BatchEngine.calibrate`) and then every pass the engine runs, so the curve follows the load
and the machine. `plan_depths` chooses each sequence's draft depth for one step by maximising the
step's expected tokens per second,

    Σ_i E_i(d_i) / (t_target(Σ_i (1 + n_i(d_i))) + Σ_levels t_draft(tokens drafted at that level)),

where E_i(d) = 1 + a_i + … + a_i^d is what d levels are expected to yield given the sequence's recent
per-level acceptance a_i (`Acceptance`), n_i(d) its drafted nodes at depth ≤ d (its last tree's
shape), and the all-zero choice is plain decoding. A draft level's expected gain a_i^ℓ falls with ℓ,
so the best choice for a given threshold on the gain is "every level worth at least λ"; every
threshold is priced at once (one small tensor computation) and the best wins, down to no drafts at
all. Decisions read only earlier steps (timings, acceptances), never the current step's random
draws, so every verification stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Tokens per pass the start-up probe times (bigger passes are learned from the steps themselves)."""
EMA_DOWN = 0.7
"""Weight a new timing below the bucket's estimate gets against it."""
EMA_UP = 0.1
"""Weight a new timing above the bucket's estimate gets. Timing noise is one-sided: a pass slowed
by another process (or a first call's one-off costs) reads seconds too long, never too short, and a
cost estimated too high is never measured again where the planner stops choosing it. A lasting
slowdown still shows within a few tens of passes."""
PRIOR_ACCEPTANCE = 0.9
PRIOR_WEIGHT = 2.0
"""A sequence's acceptance starts at PRIOR_ACCEPTANCE with the weight of this many observed levels.
Optimistic on purpose: acceptance is learnt only from steps that draft, so a sequence whose prior
said "does not pay" would never draft and never learn otherwise (seen on the default pair at one
client with a prior of 0.6); with this one it drafts, and its measured rate takes over in a few steps."""
DECAY = 0.9
"""Each step's weight on a sequence's older acceptance counts: what is recent counts most."""


def _bucket(k: int) -> int:
    """Measured sizes are kept per bucket: exact up to 8 tokens, then on a grid of ~1/8 octave."""
    if k <= 8:
        return max(k, 1)
    step = 1 << max(k.bit_length() - 4, 0)
    return (k // step) * step


@dataclass
class PassTimes:
    """Seconds per pass of one model by tokens in the pass (piecewise linear between measured sizes,
    extended by the last segment's slope; flat below the smallest)."""

    points: dict[int, float] = field(default_factory=dict)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or not seconds > 0:
            return
        b = _bucket(tokens)
        seconds *= b / tokens  # a pass of `tokens` stands for its bucket's size
        old = self.points.get(b)
        weight = EMA_DOWN if old is None or seconds <= old else EMA_UP
        self.points[b] = seconds if old is None else weight * seconds + (1 - weight) * old

    @property
    def known(self) -> bool:
        return bool(self.points)

    def predict(self, tokens: torch.Tensor | float) -> torch.Tensor:  # seconds, same shape
        k = torch.as_tensor(tokens, dtype=torch.float64)
        if not self.points:
            return torch.zeros_like(k)
        xs = torch.tensor(sorted(self.points), dtype=torch.float64)
        ys = torch.tensor([self.points[int(x)] for x in xs], dtype=torch.float64)
        # Monotone: a bigger pass never costs less than a smaller one (timings are noisy).
        ys = torch.cummax(ys, 0).values
        if xs.numel() == 1:
            return torch.where(k <= xs[0], ys[0], ys[0] * k / xs[0])
        i = torch.searchsorted(xs, k.clamp_min(xs[0])).clamp(1, xs.numel() - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return torch.where(k <= xs[0], ys[0], y0 + (y1 - y0) * (k - x0) / (x1 - x0)).clamp_min(0.0)

    def largest_within(self, seconds: float, cap: int) -> int:
        """The most tokens (≤ cap) whose pass is predicted to take at most `seconds` (0 if none)."""
        if not self.points:
            return cap
        sizes = torch.arange(1, cap + 1)
        fits = (self.predict(sizes) <= seconds).nonzero()
        return int(fits[-1]) + 1 if fits.numel() else 0


@dataclass
class Acceptance:
    """A sequence's recent per-level acceptance: of the levels it drafted, how far verification got."""

    accepted: float = 0.0
    rejected: float = 0.0

    def observe(self, drafted_depth: int, accepted_depth: int) -> None:
        """One step that drafted `drafted_depth` levels and accepted `accepted_depth` of them (0 drafted: nothing learnt)."""
        if drafted_depth <= 0:
            return
        self.accepted = DECAY * self.accepted + accepted_depth
        self.rejected = DECAY * self.rejected + (accepted_depth < drafted_depth)

    @property
    def rate(self) -> float:
        return (self.accepted + PRIOR_ACCEPTANCE * PRIOR_WEIGHT) / (self.accepted + self.rejected + PRIOR_WEIGHT)


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
    """Tokens its draft model must run before drafting (the root and what it has not seen)."""
    uses_draft_model: bool = True


def plan_depths(cands: Sequence[Candidate], target: PassTimes, draft: PassTimes) -> list[int]:
    """Each candidate's draft depth for this step (module docstring); all zeros = plain decoding."""
    if not cands:
        return []
    depth = max(c.max_depth for c in cands)
    if depth == 0 or not target.known:
        return [c.max_depth for c in cands]
    s = len(cands)
    levels = torch.arange(1, depth + 1, dtype=torch.float64)
    rate = torch.tensor([c.rate for c in cands], dtype=torch.float64).clamp(0.0, 0.999)
    allowed = levels[None] <= torch.tensor([c.max_depth for c in cands], dtype=torch.float64)[:, None]
    gain = torch.where(allowed, rate[:, None] ** levels[None], -1.0)  # [S, D]: tokens level ℓ adds
    nodes = torch.tensor([[c.nodes[min(l, len(c.nodes)) - 1] if c.nodes else l for l in range(1, depth + 1)]
                          for c in cands], dtype=torch.float64)  # [S, D]
    width = torch.diff(nodes, dim=1, prepend=torch.zeros(s, 1, dtype=torch.float64)).clamp_min(1.0)
    first = torch.tensor([1.0 + c.catch_up for c in cands], dtype=torch.float64)
    model = torch.tensor([c.uses_draft_model for c in cands], dtype=torch.float64)
    # Thresholds: every distinct gain, plus "none" (plain decoding).
    lam = torch.cat([gain[gain > 0].unique(), torch.tensor([float("inf")], dtype=torch.float64)])
    take = gain[None] >= lam[:, None, None]  # [Λ, S, D]: prefix-closed since gain falls with ℓ
    d = take.sum(-1)  # [Λ, S]
    tokens = s + take.to(torch.float64).mul(gain.clamp_min(0)[None]).sum((1, 2))  # E[tokens]
    reach = nodes[None].expand(lam.numel(), -1, -1).gather(2, (d - 1).clamp_min(0)[..., None])[..., 0]  # [Λ, S]
    block = s + torch.where(d > 0, reach, 0.0).sum(1)  # tokens in the target's pass
    # Draft rounds: level ℓ runs the sequences drafting at least ℓ levels (the first one with its
    # catch-up); a chain's last draft runs only if accepted, at the next step's catch-up.
    per_level = torch.where(levels[None, None] == 1, first[None, :, None], width[None]) * take * model[None, :, None]
    round_tokens = per_level.sum(1)  # [Λ, D]
    draft_s = torch.where(round_tokens > 0, draft.predict(round_tokens), 0.0).sum(1)
    rate_of = tokens / (target.predict(block) + draft_s)
    best = int(rate_of.argmax())
    return d[best].tolist()
