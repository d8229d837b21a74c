"""Continuous batching with speculative decoding: many requests decode together, their drafts and
their verification batched (docs/algorithms.md §4.10).

`BatchEngine` holds the target and the draft models as batched models (`models.batch`: rows =
sequences). Every sequence has its own decoder — its method's drafter over its own rows, its own
exact verifier, sampling and `torch.Generator` — built and driven by the very pieces of
single-sequence decoding (`SpeculativeDecoder.start/propose/verify/commit`). One `step()`:

1. admits waiting requests while `max_batch_size`, the models' rows and the KV budget allow;
2. spends up to `prefill_chunk` tokens on *fills* (a new prompt into the target's cache, a long
   draft-model catch-up) in chunks, sharing passes across sequences; while other sequences decode,
   a step fills only about `max_fill_ms` of measured work, so a long prompt delays each running
   stream's next token by about that much. A new prompt first takes the longest stored prefix of
   its K/V from the prefix cache (`models.prefix`, native rows), and a finished sequence leaves
   its prompt and answer there;
3. runs every sequence's proposal in lockstep rounds: each round's draft-model calls on one model
   are one batched pass; a proposal whose call is a long fill waits for step 2 of later steps;
4. scores every ready sequence's tree in one target pass (split only where padding would cost
   more than another pass, `models.batch.pad_groups`);
5. verifies every sequence's tree in one batched verification (`verify.batched`), then commits each;
   finished and aborted ones leave at once.

Requests of one batch may differ in everything: method, method options, sampling, seed,
max_new_tokens. Any mix shares a step — the only cost of mixing is padding.

Speculation that knows the batch, two ways. With `adaptive`, each step gives each sequence the draft
depth that the measured pass times t(k) at the batch's total k and its recent acceptance say pays
(`engine.schedule`), down to none: plain decoding is one of the choices priced, so a loaded server
is not slower than plain decoding by more than the planner's estimates err. A sequence given none
proposes a free tree instead where that pays: the text's own continuations (suffix drafting), which
cost no draft pass and are verified by sample-and-match (`SpeculativeDecoder.propose_free`).
Independently, with more than `spec_disable_batch_size` sequences running, a step drafts nothing
(vLLM's disable-by-batch-size). The verifiers are exact whatever was drafted, so both change speed only —
and which random draws a sampled sequence makes: its distribution is the same, but a seeded request
repeats its output exactly only while the batch stays at or below the threshold (None = never
disable). The planner leaves seeded sampled requests at their method's depth for that reason,
except on a one-sequence engine whose plans follow no timing (`BatchEngine.fix_plans`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from specdec.core.options import MethodOptions
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig
from specdec.core.tree import TokenTree, tree_walk
from specdec.core.tree import depths as node_depths
from specdec.drafting.base import Proposal, check_proposal
from specdec.drafting.scored_tree import Scored, best_nodes
from specdec.engine.build import build_decoder, parse_options
from specdec.engine.cost import cost_ratios
from specdec.engine.decoder import DecodeRun, SpeculativeDecoder, prompt_tensor
from specdec.engine.schedule import (
    CALIBRATION_SIZES, POOL_DECAY, POOL_PRIOR_WEIGHT, Acceptance, Candidate, FreeRate, Load, ModeRates, PassTimes,
    Plan, expected_remaining, free_gain_floor, path_floors, plan_step, price_depths, take_free, with_free,
)
from specdec.engine.stats import DecodeStats
from specdec.methods import DEFAULT_METHOD
from specdec.methods.auto import planned_request, planner_adapts
from specdec.methods.base import MethodContext
from specdec.methods.registry import get_method
from specdec.methods.sps import ModelDrafter
from specdec.methods.suffix import suffix_scored
from specdec.models.base import LanguageModel
from specdec.models.batch import BatchedModel, ModelCall, RowView, batched_model, run_calls
from specdec.models.prefix import PrefixCache
from specdec.verify.batched import Verification, verify_batch

from specdec.engine.limits import (  # noqa: E402  (re-exported: the engine's defaults)
    DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_FILL_MS, DEFAULT_PREFILL_CHUNK, DEFAULT_SPEC_DISABLE_BATCH_SIZE, PROFILE_FIELD,
    BatchLimits, check_max_new_tokens, check_seed, context_overflow,
)


LANE_FILL = 32
"""A draft-model fill longer than this (a new prompt's catch-up) runs in the chunked fill lane, not
in a proposal round: it would pad every other sequence's call to its length."""
MIN_FILL = 16
"""Fill tokens a step runs whatever the time bound, so that a long prompt always advances."""
QUIET_STEPS = 3
"""After a plan that gave every running sequence nothing to draft and no free tree, the same batch
skips this many steps' planning, twice as many after each further plan of nothing in a row, up to
`QUIET_MAX_STEPS`: on 2 cores a plan and its free lookups cost ~4 ms, 10 % of a 4-sequence step,
paid in full on the steps where speculating does not pay (the default pair at 4 clients: 0.92-0.98x
the AR server). The next plan comes at once if a sequence joins or leaves. Only batches of at least
`QUIET_MIN_BATCH`: a lone sequence's step is where drafting pays most, and where a text that turns
repetitive must be noticed at once."""
QUIET_MAX_STEPS = 12
QUIET_MIN_BATCH = 3
USUAL_DECAY = 0.97
"""The batch's usual size (`BatchEngine.usual_batch`) rises at once with the running count and falls
towards it with this weight per step on the old value: about the last 30 steps, half a short
request's life, so the gap between one client's request and its next does not lower it, while a
lasting fall does over tens of steps (from 4 to 3 in ~25, from 8 to 1 in ~85; ~1-3 s here). An
engine that ran idle starts again from the count it then has."""
FREE_DEPTH = 6
FREE_BUDGET = 8
"""Deepest level and most nodes of a free tree (the text's own continuations, proposed where the planner
gives a sequence no draft): on the default pair's dev prompts, 6 and 8 accepted a third more than 4 and
4 on summaries, as much elsewhere."""


@dataclass(frozen=True)
class BatchRequest:
    """One generation request; every field may differ between the requests of a batch."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    method: str = DEFAULT_METHOD
    options: MethodOptions | Mapping[str, Any] = field(default_factory=dict)
    """The method's options: parsed (the server parses a request's once), or as `Method.make_options` takes them."""
    sampling: SamplingConfig = SamplingConfig()
    seed: int | None = None
    """Seed of the request's own generator (T > 0); None draws one."""


@dataclass
class StepEvent:
    """What one step did for one request."""

    request_id: int
    tokens: list[int]
    """Tokens committed this step (empty while the prompt is being filled)."""
    finished: str = ""
    """"" while it goes on; then "eos", "length", "abort" (`BatchEngine.abort`) or "error"."""
    stats: DecodeStats | None = None
    """The request's statistics so far (None when it never started)."""
    error: BaseException | None = None
    cached_tokens: int = 0
    """Prompt tokens whose target K/V came from the prefix cache."""


@dataclass
class StepInfo:
    """What one step did as a whole (the server's per-step metrics)."""

    batch_size: int = 0
    """Sequences whose trees the target scored."""
    running: int = 0
    """Sequences admitted (decoding or filling their prompt)."""
    admitted: list[int] = field(default_factory=list)
    """Requests that joined the batch this step."""
    target_tokens: int = 0
    """Tokens of the scored trees (padding not counted)."""
    fill_tokens: int = 0
    """Prompt and catch-up tokens filled in chunks."""
    drafting: bool = True
    """False when the batch was above `spec_disable_batch_size` (no drafts this step)."""
    depths: list[int] = field(default_factory=list)
    """The draft depth the planner gave each sequence that started a proposal (adaptive speculation)."""
    plan: Plan | None = None
    """What the planner expects of this step, when it planned for every running sequence; where several
    run (what the check weighs, `ModeRates`), priced once the trees are drafted at the depths they reached."""
    prefix_hit_tokens: int = 0
    """Prompt tokens whose target K/V the prefix cache supplied this step."""
    prefix_query_tokens: int = 0
    """Prompt tokens looked up in the prefix cache this step (target)."""
    free_nodes: int = 0
    """Nodes of free trees proposed this step (sequences the planner gave no draft)."""
    wall_s: float = 0.0


@dataclass
class _Fill:
    """A fill spread over steps: `call.tokens` go in by chunks; the last chunk's logits end it."""

    call: ModelCall
    done: int = 0
    logits: Tensor | None = None
    start: int | None = None
    """The row's cached tokens when the fill began (0: the fill's tokens start the sequence; None: not yet)."""

    @property
    def remaining(self) -> int:
        return self.call.size - self.done


@dataclass(eq=False)  # compared and hashed by identity
class _Sequence:
    request_id: int
    request: BatchRequest
    decoder: SpeculativeDecoder
    run: DecodeRun
    target_row: LanguageModel
    draft_rows: list[LanguageModel]
    prompt_fill: _Fill | None = None
    """The target's prompt prefill, while it runs."""
    proposal: Proposal | None = None
    call: ModelCall | None = None
    """The proposal's pending draft-model call."""
    parked: _Fill | None = None
    """A long fill the proposal waits for (its `call`, moved to the fill lane)."""
    tree: TokenTree | None = None
    """This step's proposal, once complete."""
    acceptance: Acceptance = field(default_factory=Acceptance)
    free_rate: FreeRate = field(default_factory=FreeRate)
    free_option: Scored | None = None
    """This step's free tree as the planner priced it, or as proposed (unscaled estimates); None: none."""
    shape: list[int] = field(default_factory=list)
    """Drafted nodes of its last tree by depth (cumulative), what the planner expects a tree to cost."""
    cached_tokens: int = 0


class BatchEngine:
    """Continuous batching over a target and its draft models (module docstring).

    Not thread-safe except `abort`: call `submit` and `step` from one thread.
    """

    def __init__(
        self,
        target: LanguageModel,
        drafts: Sequence[LanguageModel] = (),
        *,
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        profile_key: Callable[[SamplingConfig], dict[str, Any] | None] | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_kv_tokens: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        spec_disable_batch_size: int | None = DEFAULT_SPEC_DISABLE_BATCH_SIZE,
        adaptive: bool = False,
        max_fill_ms: float | None = DEFAULT_MAX_FILL_MS,
        prefix_cache_mb: float = 0,
    ) -> None:
        """target, drafts: the loaded single-sequence models (the engine makes their batched forms;
        they are used as they are only to check requests).

        max_batch_size, max_kv_tokens, prefill_chunk, spec_disable_batch_size, adaptive, max_fill_ms,
            prefix_cache_mb: the engine's limits and policies (`engine.limits.BatchLimits`, which checks them).
        """
        self.limits = BatchLimits(max_batch_size, max_kv_tokens, prefill_chunk, spec_disable_batch_size, adaptive,
                                  max_fill_ms, prefix_cache_mb)
        self.target_lm, self.draft_lms = target, list(drafts)
        self.target: BatchedModel = batched_model(target, max_batch_size)
        self.drafts: list[BatchedModel] = [batched_model(d, max_batch_size) for d in drafts]
        self.tokenizer, self.eos_token_ids, self.profile_key = tokenizer, list(eos_token_ids), profile_key
        self.max_batch_size, self.max_kv_tokens = max_batch_size, max_kv_tokens
        self.prefill_chunk, self.spec_disable_batch_size = prefill_chunk, spec_disable_batch_size
        self.device = target.device
        ratios = cost_ratios(target, self.draft_lms) if self.draft_lms else []
        self._draft_ratios: list[float] | None = ratios
        self._waiting: deque[tuple[int, BatchRequest, int]] = deque()
        self._running: list[_Sequence] = []
        self._next_id = 0
        self._block_sizes: dict[str, int] = {}  # a request setting's largest target block
        self._aborts: set[int] = set()
        self._lock = threading.Lock()
        self.last_step = StepInfo()
        load = Load()
        self.times = {"target": PassTimes(load=load), "draft": PassTimes(load=load)}
        """Measured seconds per pass by tokens (`engine.schedule`): `calibrate` and every step feed them;
        one load factor for both, since they share the cores."""
        self.modes, self.acceptance, self.free_rate = self._fresh_pools()
        """modes: how steps with drafts and without measured against the planner's predictions, per
        batch size; acceptance: what recent sequences accepted per drafted level, and free_rate: how
        their free trees fared against their estimates, a new sequence's priors."""
        self.fixed_plans = False
        """Whether every plan is a function of the request's own text and draws (`fix_plans`)."""
        self.free_drafts = True
        """With `adaptive`: a sequence the planner gives no draft proposes a free tree where it pays."""
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        """K/V of prompt prefixes reused across requests (native rows only; `models.prefix`)."""
        self._calibrated = False
        self._planned: dict[_Sequence, Candidate] = {}  # this step's candidates, when it planned for all
        self._free: dict[_Sequence, Scored] = {}  # this step's free trees
        self._free_gains = torch.zeros(0, dtype=torch.float64)  # their nodes' expected gains, as priced
        # of plans of nothing: (batch, steps left to skip, plans of nothing in a row)
        self._quiet: tuple[frozenset[int], int, int] = (frozenset(), 0, 0)
        self.usual_batch = 1.0
        """Sequences running: at least the count now, falling slowly after a dip (`USUAL_DECAY`); what
        a draft model's fill is priced against (`_usual_caps`)."""

    # ---- requests ------------------------------------------------------------------------------
    def context(self, sampling: SamplingConfig, target: LanguageModel, drafts: Sequence[LanguageModel]) -> MethodContext:
        key = self.profile_key(sampling) if self.profile_key is not None else None
        return MethodContext(target, tuple(drafts), sampling, self.tokenizer, key)

    def block_size(self, request: BatchRequest) -> int:
        """The largest block the target scores for the request's method, options and sampling;
        ValueError for a bad method or option, a missing draft model or a missing tune profile.
        Only the drafter knows it, so one is built per such setting, the first time it is asked for;
        the request's own decoder is built when it is admitted."""
        options = parse_options(request.method, request.options)
        key = repr((request.method, options, request.sampling))
        if key not in self._block_sizes:
            probe = build_decoder(self.context(request.sampling, self.target_lm, self.draft_lms), request.method,
                                  request.sampling, options, self.eos_token_ids)
            self._block_sizes[key] = probe.block_size()
        return self._block_sizes[key]

    def check(self, request: BatchRequest) -> int:
        """The request's KV need (prompt + new tokens + its largest block); ValueError when it can
        never run: a bad method or option, a missing draft model, too long for the context or the
        KV budget."""
        block = self.block_size(request)
        if not 0 < len(request.prompt_ids):
            raise ValueError("the prompt is empty; give at least one token")
        check_max_new_tokens(request.max_new_tokens)
        need = len(request.prompt_ids) + request.max_new_tokens + block
        context = self.target_lm.context_length
        if need > context:
            raise ValueError(context_overflow(len(request.prompt_ids), request.max_new_tokens, block, context))
        if self.max_kv_tokens is not None and need > self.max_kv_tokens:
            raise ValueError(
                f"the request needs {need} KV slots (prompt {len(request.prompt_ids)} + {request.max_new_tokens} new "
                f"tokens + drafts), more than the engine's KV budget of {self.max_kv_tokens}"
            )
        return need

    def submit(self, request: BatchRequest) -> int:
        """Queue a request (checked now, see `check`); its id names it in `step`'s events."""
        # The ids and the seed checked and made plain ints once, here (`check` takes them as such).
        request = replace(request, options=parse_options(request.method, request.options), seed=check_seed(request.seed),
                          prompt_ids=prompt_tensor(request.prompt_ids, self.target_lm.vocab_size).tolist())
        request = self._as_planned(request)
        need = self.check(request)
        rid = self._next_id
        self._next_id += 1
        self._waiting.append((rid, request, need))
        return rid

    def _as_planned(self, request: BatchRequest) -> BatchRequest:
        """An `auto` request as the planner runs it, where it adapts this request's depth (greedy, or
        sampled without a seed): the method and options of `methods.auto.planned_request`
        (docs/algorithms.md §19.5) rather than auto's own bandit, whose shapes the planner would cap."""
        if request.method != "auto" or not self.limits.adaptive or \
                not (self.fixed_plans or planner_adapts(request.sampling, request.seed)):
            return request
        ctx = self.context(request.sampling, self.target_lm, self.draft_lms)
        planned = planned_request(ctx, request.options)  # type: ignore[arg-type]  # auto's, parsed by submit
        if planned is None:
            return request
        return replace(request, method=planned.method, options=parse_options(planned.method, planned.options))

    def abort(self, request_id: int) -> None:
        """Stop a request at the next step (thread-safe); its rows are freed then."""
        with self._lock:
            self._aborts.add(request_id)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def kv_slots_in_use(self) -> int:
        """K/V slots the target's batched cache reserves for the running sequences (what the budget bounds)."""
        return self.target.slots_in_use()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[StepEvent]:
        """Admit, fill, propose, score, verify and commit once (module docstring); the events."""
        t0 = time.perf_counter()
        events: list[StepEvent] = []
        info = StepInfo()
        idle = not self._running
        self._planned, self._free, self._free_gains = {}, {}, torch.zeros(0, dtype=torch.float64)
        if self.limits.adaptive and not self._calibrated and not self._running:
            self.calibrate()
        self._apply_aborts(events)
        self._admit(events, info)
        info.running = len(self._running)
        if self._running:  # an engine that was idle forgets the load it had
            n = float(len(self._running))
            self.usual_batch = n if idle else max(n, USUAL_DECAY * self.usual_batch + (1 - USUAL_DECAY) * n)
        self._fill_lane(info, events)
        self._propose(info, events)
        if not info.fill_tokens and any(s.parked is not None for s in self._running):
            # A draft model's catch-up parked by this step's proposals: with the lane unused, it runs
            # now, and the proposals go on, rather than leaving those sequences a step without a token.
            self._fill_lane(info, events)
            self._propose(info, events)
        self._score(info, events)
        info.wall_s = time.perf_counter() - t0
        if info.plan is not None and info.running > 1 and not info.fill_tokens and not info.admitted:
            # one sequence's steps are never weighed (`ModeRates.spec_scale`); a step that proposed free
            # trees speculated, as one that drafted did
            self.modes.observe(info.running, any(d > 0 for d in info.plan.depths) or info.free_nodes > 0, info.plan,
                               sum(len(e.tokens) for e in events), info.wall_s)
        self.last_step = info
        return events

    def _apply_aborts(self, events: list[StepEvent]) -> None:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        if not aborts:
            return
        for item in [w for w in self._waiting if w[0] in aborts]:
            self._waiting.remove(item)
            events.append(StepEvent(item[0], [], "abort"))
        for seq in [s for s in self._running if s.request_id in aborts]:
            self._leave(seq)
            events.append(StepEvent(seq.request_id, [], "abort", seq.run.stats))

    def _rows_free(self, request: BatchRequest) -> bool:
        models = [self.target] + (self.drafts if get_method(request.method).loads_draft_model else [])
        return all(m.max_rows is None or m.rows_in_use() < m.max_rows for m in models)

    def _admit(self, events: list[StepEvent], info: StepInfo) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            rid, request, need = self._waiting[0]
            if self._running and self.max_kv_tokens is not None and self.target.slots_if_added(need) > self.max_kv_tokens:
                return  # waits for room; first come, first served
            if not self._rows_free(request):
                return
            self._waiting.popleft()
            try:
                self._running.append(self._start(rid, request))
                info.admitted.append(rid)
            except Exception as exc:  # noqa: BLE001 - reported as this request's error, the others go on
                events.append(StepEvent(rid, [], "error", None, exc))

    def _start(self, rid: int, request: BatchRequest) -> _Sequence:
        if self.fixed_plans:  # each request from the engine's start, not from the ones before it
            self.modes, self.acceptance, self.free_rate = self._fresh_pools()
        target_row = self.target.new_row()
        draft_rows: list[LanguageModel] = []
        try:
            if get_method(request.method).loads_draft_model:
                draft_rows = [m.new_row() for m in self.drafts]
            ctx = self.context(request.sampling, target_row, draft_rows)
            decoder = build_decoder(ctx, request.method, request.sampling, request.options, self.eos_token_ids)
            if decoder.drafter is not None:
                decoder.set_cost_ratios(self._ratios_of(decoder.drafter.draft_models, draft_rows))
            generator = None
            if not request.sampling.greedy:
                generator = torch.Generator(device=self.device)
                # An unseeded request draws its seed without touching torch's global RNG.
                generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
            run = decoder.start(request.prompt_ids, request.max_new_tokens, generator, prefill=False)
        except BaseException:
            self._release(target_row, draft_rows)
            raise
        seq = _Sequence(rid, request, decoder, run, target_row, draft_rows,
                        acceptance=Acceptance(prior=self.acceptance), free_rate=FreeRate(prior=self.free_rate))
        if run.prompt.numel() > 1:  # the last prompt token is the first pending root
            seq.prompt_fill = _Fill(ModelCall(target_row, run.prompt[:-1], fill=True))
        return seq

    def _ratios_of(self, models: Sequence[LanguageModel], rows: Sequence[LanguageModel]) -> list[float]:
        """SWI cost ratios of a drafter's models (rows of the engine's drafts); [] = unknown (no SWI)."""
        if not self._draft_ratios:
            return []
        index = {id(row): i for i, row in enumerate(rows)}
        if any(id(m) not in index for m in models):
            return []
        return [self._draft_ratios[index[id(m)]] for m in models]

    # ---- measured costs -------------------------------------------------------------------------
    def calibrate(self, sizes: Sequence[int] = CALIBRATION_SIZES, repeats: int = 4) -> None:
        """Time passes of `sizes` tokens on the target and the first draft model (the best of `repeats`
        rounds, after one untimed pass of each), what adaptive speculation and the fill bound start
        from; the steps refine them. Needs a free row on each.

        The untimed pass matters: a model's first pass pays one-off costs (seconds on a 1.5B model),
        and a cost the planner believes too high is never measured again where it stops choosing it.
        Each round times every size of both models, so that a burst of another process's work slows
        one round of all of them, which the best of the rounds drops, not every repeat of one size."""
        self._calibrated = True
        pairs = [("target", self.target)] + ([("draft", self.drafts[0])] if self.drafts else [])
        rows: list[tuple[str, BatchedModel, LanguageModel]] = []
        try:
            for key, model in pairs:
                try:
                    rows.append((key, model, model.new_row()))
                except ValueError:  # every row busy: the steps will measure
                    continue
                rows[-1][2].reset(max(sizes))
            tokens = torch.arange(max(sizes)) % self.target_lm.vocab_size
            best: dict[tuple[str, int], float] = {}
            for r in range(repeats + 1):
                for key, _, row in rows:
                    for k in sorted(set(sizes)):
                        # A draft pass as the chain drafter asks for it (a pruned head's kept logits only).
                        call = ModelCall(row, tokens[:k], compact=key == "draft")
                        seconds = self._timed(lambda: run_calls([call]))
                        if r > 0:  # round 0 is the untimed one
                            best[key, k] = min(best.get((key, k), seconds), seconds)
            for (key, k), seconds in best.items():
                self.times[key].calibrated(k, seconds)
        finally:
            for _, model, row in rows:
                model.release(row)

    def assume_times(self, target_ms: Mapping[int, float], draft_ms: Mapping[int, float]) -> None:
        """Start from pass times measured before on this machine (milliseconds by tokens, as a tune
        profile keeps them) instead of `calibrate`; the steps refine them as they do calibrated ones."""
        self._calibrated = True
        for key, table in (("target", target_ms), ("draft", draft_ms)):
            for k, ms in table.items():
                self.times[key].calibrated(int(k), float(ms) / 1e3)

    def fix_plans(self) -> None:
        """Plan from the pass times as assumed (`assume_times`), which the steps no longer refine,
        each request from the engine's initial priors rather than the requests' before it, and with
        no prefix cache (what a fill finds there depends on earlier requests): every plan is then a
        function of the request's own text and draws, so a seeded sampled request is planned too
        and still repeats its output (a run's draws follow what it drafts). One sequence at a time:
        beside others, a sequence's plan would depend on theirs. What `Pipeline` runs a seeded
        sampled `auto` generation through."""
        if self.max_batch_size != 1 or not self.limits.adaptive or self.prefix is not None:
            raise ValueError("fixed plans need an adaptive engine of one sequence (max_batch_size=1) without a "
                             "prefix cache: otherwise a sequence's plan depends on other requests")
        if not self.times["target"].known or (self.drafts and not self.times["draft"].known):
            raise ValueError("fixed plans start from assumed pass times of every model: call assume_times first")
        if self.has_work():
            raise ValueError("fix the plans before the first request")
        self.fixed_plans = True

    @staticmethod
    def _fresh_pools() -> tuple[ModeRates, Acceptance, FreeRate]:
        return ModeRates(), Acceptance(decay=POOL_DECAY, prior_weight=POOL_PRIOR_WEIGHT), FreeRate(decay=POOL_DECAY)

    @staticmethod
    def _timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def _run_timed(self, key: str, calls: list[ModelCall]) -> list[Tensor]:
        """run_calls, its wall time recorded as one pass of that many tokens (`self.times[key]`)."""
        t0 = time.perf_counter()
        outs = run_calls(calls)
        if not self.fixed_plans:
            self.times[key].observe(sum(c.size for c in calls), time.perf_counter() - t0)
        return outs

    # ---- fills (prompts, long catch-ups) and the prefix cache --------------------------------------
    def _fill_lane(self, info: StepInfo, events: list[StepEvent]) -> None:
        """Spend the step's fill budget on prompt prefills and parked catch-ups, oldest first: up to
        `prefill_chunk` tokens, and while other sequences decode, about `max_fill_ms` of measured work."""
        budget = self.prefill_chunk
        decoding = any(s.prompt_fill is None and s.parked is None for s in self._running)
        seconds = self.limits.max_fill_ms / 1e3 if decoding and self.limits.max_fill_ms is not None else None
        jobs: list[tuple[_Sequence, _Fill, ModelCall]] = []
        for seq in self._running:
            for fill in (seq.prompt_fill, seq.parked):
                if fill is None or budget <= 0:
                    continue
                if fill.start is None:
                    self._reuse_prefix(seq, fill, info)
                k = min(fill.remaining, budget)
                times = self.times["target" if fill.call.lm is seq.target_row else "draft"]
                if seconds is not None:
                    k = min(k, max(times.largest_within(seconds, k), 0 if jobs else MIN_FILL))
                    if k <= 0:
                        continue
                    seconds -= float(times.predict(k))
                jobs.append((seq, fill, replace(fill.call, tokens=fill.call.tokens[fill.done : fill.done + k])))
                budget -= k
        for key in ("target", "draft"):
            part = [job for job in jobs if (job[2].lm is job[0].target_row) == (key == "target")]
            if part:
                self._run_fills(key, part, info, events)

    def _run_fills(self, key: str, jobs: list[tuple[_Sequence, _Fill, ModelCall]], info: StepInfo,
                   events: list[StepEvent]) -> None:
        t0 = time.perf_counter()
        try:
            outs = self._run_timed(key, [call for _, _, call in jobs])
        except Exception as exc:  # noqa: BLE001 - a failed shared pass fails the sequences in it
            for seq in dict.fromkeys(seq for seq, _, _ in jobs):
                self._fail(seq, exc, events)
            return
        if key == "draft":  # only drafting needs a draft model's fill
            self.modes.charge(len(self._running), time.perf_counter() - t0)
        for (seq, fill, call), out in zip(jobs, outs):
            fill.done += call.size
            info.fill_tokens += call.size
            if fill.remaining == 0:
                fill.logits = out
                self._remember(fill.call.lm, fill.call.tokens if fill.start == 0 else None)
        for seq in dict.fromkeys(seq for seq, _, _ in jobs):
            if seq.prompt_fill is not None and seq.prompt_fill.remaining == 0:
                seq.prompt_fill = None
                seq.run.stats.prefill_s = time.perf_counter() - seq.run.acct.t_start  # its wait in the lane included
            if seq.parked is not None and seq.parked.remaining == 0:
                logits, seq.parked = seq.parked.logits, None
                self._send(seq, logits, events)

    def _reuse_prefix(self, seq: _Sequence, fill: _Fill, info: StepInfo) -> None:
        """Start a fill from the longest cached prefix of its tokens (the fill then computes the rest;
        at least its last token, whose logits the fill returns)."""
        row = fill.call.lm
        fill.start = row.kv_len
        if self.prefix is None or not isinstance(row, RowView) or not row.owner.exact_prefixes or row.kv_len:
            return
        blocks = self.prefix.lookup(id(row.owner), fill.call.tokens, fill.call.size - 1)
        hit = len(blocks) * (blocks[0].keys.shape[-1] if blocks else 0)
        if row is seq.target_row:
            info.prefix_query_tokens += fill.call.size
            info.prefix_hit_tokens += hit
            seq.cached_tokens = hit
            self.prefix.count(hit, fill.call.size)
        if blocks:
            row.owner.load_prefix(row.index, *PrefixCache.join(blocks))
            fill.done = hit

    def _remember(self, row: LanguageModel, tokens: Tensor | None) -> None:
        """Keep the K/V of a row's first tokens (`tokens`, all cached in the row) in the prefix cache."""
        if self.prefix is None or tokens is None or not isinstance(row, RowView) or not row.owner.exact_prefixes:
            return
        owner, index = row.owner, row.index
        self.prefix.insert(id(owner), tokens[: row.kv_len], lambda a, b: owner.read_slots(index, a, b))

    # ---- proposals -------------------------------------------------------------------------------
    def _propose(self, info: StepInfo, events: list[StepEvent]) -> None:
        """Every sequence's proposal, in lockstep rounds of batched draft-model passes."""
        threshold = self.spec_disable_batch_size
        info.drafting = threshold is None or len(self._running) <= threshold
        t0 = time.perf_counter()
        proposing = [s for s in self._running if s.tree is None]
        caps = self._plan([s for s in proposing if s.proposal is None], info)
        for seq in proposing:
            if seq.proposal is None:
                try:
                    free = self._free.get(seq)
                    seq.proposal = seq.decoder.propose(seq.run, caps.get(seq)) if free is None else \
                        seq.decoder.propose_free(seq.run, free[0], free[1])
                    check_proposal(seq.proposal)
                except Exception as exc:  # noqa: BLE001 - this sequence's drafter failed; the others go on
                    seq.proposal = None
                    self._fail(seq, exc, events)
                    continue
                self._send(seq, None, events)
        while True:
            live = [s for s in self._running if s.call is not None]
            batch: list[_Sequence] = []
            for seq in live:
                assert seq.call is not None
                if seq.call.fill and seq.call.size > LANE_FILL:
                    seq.parked, seq.call = _Fill(seq.call), None
                else:
                    batch.append(seq)
            if not batch:
                break
            try:
                outs = self._run_timed("draft", [seq.call for seq in batch])  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - a failed shared pass fails the sequences in it
                for seq in batch:
                    self._fail(seq, exc, events)
                continue
            for seq, out in zip(batch, outs):
                self._send(seq, out, events)
        elapsed = time.perf_counter() - t0
        for seq in proposing:
            seq.run.stats.draft_s += elapsed

    def _plan(self, starting: list[_Sequence], info: StepInfo) -> dict[_Sequence, int | None]:
        """The depth cap of each sequence starting a proposal: 0 above the batch threshold; with adaptive
        speculation the planner's choice for those whose tree the target scores this step (where it
        gives none, a free tree may take its place, `_free_trees`), and for those still filling their
        prompt `_filling_caps`; else none.

        A seeded sampled request keeps its method's depth: its random draws depend on what it drafts,
        and the planner's choices depend on timings, so adapting it would make its output change from
        run to run (greedy output never depends on the drafts, unseeded output is random anyway);
        except with `fixed_plans`, where no plan depends on timings."""
        if not info.drafting:
            return {s: 0 for s in starting}
        if not self.limits.adaptive or not starting:
            return {}
        adaptable = [s for s in starting if self.fixed_plans or planner_adapts(s.request.sampling, s.request.seed)]
        ready = [s for s in adaptable if s.prompt_fill is None]
        if self._still_quiet(ready, adaptable):
            info.depths = [0] * len(ready)
            return {s: 0 for s in ready}
        scale, probe = self.modes.spec_scale(len(self._running))
        options = self._free_options(ready, scale) if self.free_drafts else {}
        bare = [self._candidate(s) for s in ready]
        cands = [replace(c, free_gain=options[s][1], free_nodes=options[s][2]) if s in options else c
                 for s, c in zip(ready, bare)]
        target, draft = self.times["target"], self.times["draft"]
        if probe:  # a look at drafting as predicted, never at the price of a draft model's prompt fill
            cands = [replace(c, max_depth=0) if c.backlog else c for c in cands]
        plan = plan_step(self._usual_caps(cands, scale), target, draft, scale)
        depths = list(plan.depths)  # made caps below; the plan keeps what it priced
        base = price_depths(bare, depths, target, draft) if options else plan  # free trees priced apart
        if len(cands) == len(self._running):
            info.plan, self._planned = base, dict(zip(ready, bare))
        floors = path_floors(cands, depths, target, draft)
        for i, (seq, cand, floor) in enumerate(zip(ready, cands, floors)):
            drafter = seq.decoder.drafter
            if isinstance(drafter, ModelDrafter):
                # It ends its chain by its own confidence, so it may go as deep as its method allows.
                drafter.path_floor = floor
                depths[i] = cand.max_depth if depths[i] > 0 else 0
        info.depths = list(depths)
        plain = {s: options[s][0] for s, d in zip(ready, depths) if d == 0 and s in options}
        self._free_trees(plain, base, scale, info)
        caps = dict(zip(ready, depths))
        caps.update(self._filling_caps([s for s in adaptable if s.prompt_fill is not None], cands, depths, scale, probe))
        quiet = len(ready) == len(adaptable) == len(self._running) >= QUIET_MIN_BATCH and not any(depths) \
            and not info.free_nodes
        batch = frozenset(s.request_id for s in ready)
        streak = self._quiet[2] + 1 if quiet and batch == self._quiet[0] else int(quiet)
        self._quiet = (batch, min(QUIET_STEPS << max(streak - 1, 0), QUIET_MAX_STEPS) if quiet else 0, streak)
        return caps

    def _still_quiet(self, ready: list[_Sequence], adaptable: list[_Sequence]) -> bool:
        """Whether this step reuses the last plan of nothing (`QUIET_STEPS`): the same sequences, all
        ready and all adapted by the planner, none joined or left. Their free options are dropped, as
        a plan that looked none up would leave them (`_learn` judges only this step's)."""
        batch, left, streak = self._quiet
        same = len(ready) == len(adaptable) == len(self._running) and frozenset(s.request_id for s in ready) == batch
        if not (left > 0 and same):
            return False
        self._quiet = (batch, left - 1, streak)
        for seq in ready:
            seq.free_option = None
        return True

    def _free_options(self, seqs: list[_Sequence], scale: float) -> dict[_Sequence, tuple[Scored, float, int]]:
        """The free tree each sequence could propose this step, should the planner give it no draft
        (docs/algorithms.md §4.10): the text's own continuations (suffix drafting), with the gain and
        nodes the planner prices it at — its nodes whose estimate, scaled by how the sequence's free
        trees fared (`FreeRate`) and by what speculating steps measured against plain ones at this
        batch size (`scale`, `ModeRates.spec_scale`), pays beside plain decoding (`free_gain_floor`)."""
        target = self.times["target"]
        n = len(seqs)
        floor = free_gain_floor(Plan([0] * n, float(n), float(target.predict(n)), float(n)), target, FREE_BUDGET * n)
        options: dict[_Sequence, tuple[Scored, float, int]] = {}
        for seq in seqs:
            seq.free_option = None
            dec, run = seq.decoder, seq.run
            remaining = run.max_new_tokens - run.stats.new_tokens
            # The row holds the request's largest block past its last token: a tree of more nodes than
            # the drafter's may run only where the answer's unused room makes up the difference.
            budget = min(FREE_BUDGET, dec.block_size() - 1 + remaining - 1)
            ratio = seq.free_rate.ratio * scale
            if dec.drafter is None or remaining < 2 or budget < 1:
                continue
            # Where not even a certain node pays, the tree is still looked up and judged in hindsight
            # (`_learn`), or a sequence whose rate starts low (the engine's prior, from other texts) would
            # never learn that its own text repeats; on one step in n, so that the lookups of a batch of n
            # cost about one lookup a step.
            if ratio < floor and (run.stats.target_calls + seq.request_id) % n:
                continue
            scored = suffix_scored(run.committed, min(FREE_DEPTH, remaining - 1), budget)
            paying = scored[2] * ratio >= floor
            seq.free_option = best_nodes(scored, int(paying.sum())) if bool(paying.any()) else scored
            if bool(paying.any()):
                options[seq] = (scored, float((scored[2] * ratio)[paying].sum()), int(paying.sum()))
        return options

    def _free_trees(self, options: dict[_Sequence, Scored], plan: Plan, scale: float, info: StepInfo) -> None:
        """The free trees of the sequences the plan gives no draft (`options`: each one's, unscaled):
        of all their nodes, best first by estimate scaled by the sequence's `FreeRate`, as many as the
        predicted pass times say raise the step's tokens per second (`take_free`, the gains weighed by
        `scale` as in `_free_options`; the plan the check weighs keeps them unweighed). They cost no
        draft pass, only the target's tokens, which cost little where the batch is small."""
        if not options:
            return
        gains = torch.cat([est * seq.free_rate.ratio for seq, (_, _, est) in options.items()])
        owner = torch.cat([torch.full((sc[0].numel(),), i) for i, sc in enumerate(options.values())])
        order = torch.argsort(gains, descending=True, stable=True)
        n = take_free(plan, gains[order] * scale, self.times["target"])
        counts = torch.bincount(owner[order[:n]], minlength=len(options)).tolist()
        for (seq, sc), k in zip(options.items(), counts):
            if k:
                self._free[seq] = seq.free_option = best_nodes(sc, k)
        self._free_gains = torch.cat([self._free_gains, gains[order[:n]]])
        info.free_nodes += n
        if info.plan is not None:
            info.plan = with_free(info.plan, gains[order[:n]], self.times["target"])

    def _filling_caps(self, filling: list[_Sequence], ready: list[Candidate], depths: Sequence[int],
                      scale: float, probe: bool) -> dict[_Sequence, int]:
        """Caps of the sequences still filling their prompt (`ready`: the others' candidates, `depths`
        their plan). Where the others decode plainly, one proposes its root alone and the planner judges
        its draft model's prompt fill once it decodes (`Candidate.backlog`): at high load, where no step
        drafts, filling it for every new request was pure loss. Else (alone, or beside a batch that
        drafts) the planner prices that fill as a backlog shared over the tokens it is expected to emit
        (`expected_remaining`), and where drafting pays it back the sequence drafts from its first
        step, its draft model's prompt filled beside the target's; a long prompt does once its answer
        has gone on long enough. A probe step fills none."""
        if not filling:
            return {}
        if probe or (ready and not any(depths)):
            return {s: 0 for s in filling}
        cands = self._usual_caps([*ready, *(self._candidate(s) for s in filling)], scale)
        plan = plan_step(cands, self.times["target"], self.times["draft"], scale)
        return {s: 0 for s, depth in zip(filling, plan.depths[len(ready):]) if depth == 0}

    def _usual_caps(self, cands: list[Candidate], scale: float) -> list[Candidate]:
        """`cands`, those whose draft model fell behind (a fill of its own, `Candidate.backlog`, or a
        catch-up longer than a drafting step leaves, `Candidate.catch_up` > 1) kept from drafting unless
        it would pay in a batch of the usual size (`usual_batch`, the others decoding plainly). A
        catch-up bought in a dip of the load (clients between two requests) pays back only while the
        batch stays small; at the usual load its sequence would not draft again (seen at 4 clients:
        two sequences left alone a moment caught up ~20 tokens each and drafted, a 200 ms step for a
        few tokens, and the next requests arrived on the following step)."""
        extra = int(self.usual_batch + 0.5) - len(cands)
        behind = [bool(c.backlog) or c.catch_up > 1 for c in cands]
        if extra <= 0 or not any(behind):
            return cands
        plain = Candidate(0, [], 0.0, 0, False)
        # Drafting against plain decoding alone: a free tree keeps the nodes priced for this step's
        # batch, which in the padded one would make the plain choice dear and drafting look better.
        bare = [replace(c, free_gain=0.0, free_nodes=0) for c in cands]
        usual = plan_step([*bare, *[plain] * extra], self.times["target"], self.times["draft"], scale)
        return [replace(c, max_depth=0) if b and d == 0 else c for c, b, d in zip(cands, behind, usual.depths)]

    def _candidate(self, seq: _Sequence) -> Candidate:
        dec, run = seq.decoder, seq.run
        if dec.drafter is None:
            return Candidate(0, [], 0.0, 0, False)
        remaining = run.max_new_tokens - run.stats.new_tokens
        depth = max(0, min(dec.gamma, remaining - 1))
        expected = expected_remaining(run.stats.new_tokens, remaining)
        models = list(dec.drafter.draft_models)
        unseen = max((run.committed.numel() - m.kv_len for m in models), default=0)
        shape = seq.shape
        if not shape:  # no tree yet: the drafter's largest, spread evenly over its levels
            nodes = dec.drafter.max_nodes
            shape = [max(d, -(-nodes * d // max(dec.gamma, 1))) for d in range(1, dec.gamma + 1)]
        if unseen <= LANE_FILL:  # in its first draft pass, beside the root
            return Candidate(depth, shape, seq.acceptance.rate, max(unseen - 1, 0), bool(models), remaining=expected)
        backlog = unseen - max((self._cached(m, run.committed[:-1]) for m in models), default=0)
        return Candidate(depth, shape, seq.acceptance.rate, 0, bool(models), backlog, expected)

    def _cached(self, row: LanguageModel, tokens: Tensor) -> int:
        """Tokens of a fill a fresh row would find in the prefix cache (`_reuse_prefix`)."""
        if self.prefix is None or not isinstance(row, RowView) or not row.owner.exact_prefixes or row.kv_len:
            return 0
        blocks = self.prefix.lookup(id(row.owner), tokens, tokens.numel() - 1)
        return len(blocks) * (blocks[0].keys.shape[-1] if blocks else 0)

    def _send(self, seq: _Sequence, value: Tensor | None, events: list[StepEvent]) -> None:
        """Advance a sequence's proposal with the logits of its last call (None: start it)."""
        assert seq.proposal is not None
        try:
            seq.call = seq.proposal.send(value)  # type: ignore[arg-type]
        except StopIteration as done:
            seq.tree, seq.proposal, seq.call = done.value, None, None
        except Exception as exc:  # noqa: BLE001 - this sequence's drafter failed; the others go on
            self._fail(seq, exc, events)

    def _score(self, info: StepInfo, events: list[StepEvent]) -> None:
        """One target pass over every ready tree, one batched verification, then each sequence's commit."""
        ready = [s for s in self._running if s.tree is not None and s.prompt_fill is None]
        if not ready:
            return
        t0 = time.perf_counter()
        trees: list[TokenTree] = [s.tree for s in ready]  # type: ignore[misc]
        calls = [ModelCall(s.target_row, t.tokens, t.block_parents()) for s, t in zip(ready, trees)]
        try:
            outs = self._run_timed("target", calls)
        except Exception as exc:  # noqa: BLE001 - a failed shared pass fails the sequences in it
            for seq in ready:
                self._fail(seq, exc, events)
            return
        info.batch_size = len(ready)
        info.target_tokens = sum(c.size for c in calls)
        if info.plan is not None and 1 < len(ready) == len(self._planned) and all(s in self._planned for s in ready):
            # What the check weighs: the prediction for the depths drafted, which a drafter ending its
            # chain by confidence chose, not the planner's (`ModeRates`).
            depths = [0 if s in self._free else t.max_depth() for s, t in zip(ready, trees)]
            info.plan = with_free(price_depths([self._planned[s] for s in ready], depths, self.times["target"],
                                               self.times["draft"]), self._free_gains, self.times["target"])
        results = self._verify(ready, trees, outs, events)
        for seq, tree, result in zip(ready, trees, results):
            seq.tree = None
            if result is None:
                continue
            seq.run.stats.target_s += time.perf_counter() - t0
            self._learn(seq, tree, result)
            try:
                new = seq.decoder.commit(seq.run, tree, result)
            except Exception as exc:  # noqa: BLE001 - this sequence fails; the others go on
                self._fail(seq, exc, events)
                continue
            events.append(StepEvent(seq.request_id, new, seq.run.stopped, seq.run.stats, cached_tokens=seq.cached_tokens))
            if seq.run.stopped:
                self._leave(seq)

    def _verify(self, ready: list[_Sequence], trees: list[TokenTree], logits: list[Tensor],
                events: list[StepEvent]) -> list[VerifyResult | None]:
        """Every sequence's exact rule in one batched verification (`verify.batched`); should it fail,
        each sequence on its own, so that only a failing one fails."""
        items = [Verification(t, s.decoder.sampling, s.decoder.rule(s.run), s.run.generator)
                 for s, t in zip(ready, trees)]
        try:
            return list(verify_batch(items, logits))
        except Exception:  # noqa: BLE001 - find the sequence at fault
            pass
        results: list[VerifyResult | None] = []
        for seq, tree, out in zip(ready, trees, logits):
            try:
                results.append(seq.decoder.verify(seq.run, tree, out))
            except Exception as exc:  # noqa: BLE001 - this sequence fails; the others go on
                self._fail(seq, exc, events)
                results.append(None)
        return results

    @staticmethod
    def _learn(seq: _Sequence, tree: TokenTree, result: VerifyResult) -> None:
        """What the planner knows of a sequence: its per-level acceptance, its trees' shape and how its free
        trees fared."""
        BatchEngine._judge_free(seq, tree, result)
        depth = 0 if seq.run.free else tree.max_depth()
        seq.acceptance.observe(depth, result.num_accepted)  # a step without drafts only fades older counts
        if depth == 0:
            return
        per_depth = torch.bincount(tree.depths()[1:], minlength=depth + 1)[1:].cumsum(0).tolist()
        old = seq.shape[len(per_depth):]
        shape = per_depth + old
        for i in range(1, len(shape)):  # deeper levels hold at least one more node
            shape[i] = max(shape[i], shape[i - 1] + 1)
        seq.shape = shape

    @staticmethod
    def _judge_free(seq: _Sequence, tree: TokenTree, result: VerifyResult) -> None:
        """How the sequence's free tree fared (`FreeRate`): where it was proposed, what it accepted against
        its estimates; where it was only priced, in hindsight: the nodes of the tokens this step emitted
        that it held (the greedy walk, exact at T = 0), against the estimates of its nodes no deeper
        than those tokens (deeper ones cannot be judged yet). So a sequence's free trees are judged on
        every step, not only on those that chose them."""
        option, seq.free_option = seq.free_option, None
        if option is None:
            seq.free_rate.observe(0.0, 0)  # older counts fade
            return
        tokens, parents, estimates = option
        if seq.run.free:
            seq.free_rate.observe(float(estimates.sum()), result.num_accepted)
            return
        emitted = torch.cat([tree.tokens[list(result.accepted_nodes)], torch.tensor([result.next_token])])
        held = tree_walk(TokenTree.from_drafted(int(tree.tokens[0]), tokens, parents), emitted)
        seq.free_rate.observe(float(estimates[node_depths(parents) < emitted.numel()].sum()), held)

    # ---- leaving ---------------------------------------------------------------------------------
    def _fail(self, seq: _Sequence, exc: BaseException, events: list[StepEvent]) -> None:
        if seq in self._running:
            self._leave(seq, keep_prefix=False)
            events.append(StepEvent(seq.request_id, [], "error", seq.run.stats, exc))

    def _leave(self, seq: _Sequence, keep_prefix: bool = True) -> None:
        if seq.proposal is not None:
            seq.proposal.close()
        if keep_prefix and seq.prompt_fill is None:  # what the target cached: the prompt and the answer so far
            kept = min(seq.target_row.kv_len, seq.run.committed.numel())
            self._remember(seq.target_row, seq.run.committed[:kept])
        self._running.remove(seq)
        self._release(seq.target_row, seq.draft_rows)

    def _release(self, target_row: LanguageModel, draft_rows: Sequence[LanguageModel]) -> None:
        self.target.release(target_row)
        for model, row in zip(self.drafts, draft_rows):
            model.release(row)

    # ---- running to the end ----------------------------------------------------------------------
    def run_all(self, requests: Sequence[BatchRequest],
                on_event: Callable[[StepEvent], None] | None = None) -> list[tuple[list[int], DecodeStats | None, str]]:
        """Submit every request, step until all finish: (tokens, stats, finished) per request, in order.

        `on_event` sees every event as it happens (it may `abort` requests, e.g. at a stop string).
        """
        ids = [self.submit(r) for r in requests]
        out: dict[int, tuple[list[int], DecodeStats | None, str]] = {i: ([], None, "") for i in ids}
        while self.has_work():
            for event in self.step():
                if event.request_id not in out:
                    continue
                tokens, _, _ = out[event.request_id]
                tokens.extend(event.tokens)
                out[event.request_id] = (tokens, event.stats, event.finished)
                if event.error is not None:
                    raise RuntimeError(f"request {event.request_id} failed: {event.error}") from event.error
                if on_event is not None:
                    on_event(event)
        return [out[i] for i in ids]


def kv_bytes_per_token(lm: LanguageModel) -> int:
    """Bytes of K/V one cached token costs a transformers model (all layers); 0 when unknown."""
    model = getattr(lm, "model", None)
    config = getattr(model, "config", None)
    if config is None:
        return 0
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = torch.empty(0, dtype=lm.dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def kv_budget_for_memory(target: LanguageModel, drafts: Sequence[LanguageModel], fraction: float) -> int | None:
    """A KV budget (target slots; each sequence's draft rows come along) that fills `fraction` of the
    memory available now on the target's device; None when the sizes are unknown."""
    per_token = kv_bytes_per_token(target) + sum(kv_bytes_per_token(d) for d in drafts)
    device = torch.device(target.device)
    if per_token == 0:
        return None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return max(int(free * fraction) // per_token, 1)
