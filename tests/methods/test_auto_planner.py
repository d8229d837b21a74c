"""`auto` through the batch engine's per-step planner (docs/algorithms.md §19.5): where the tune found
that drafting pays, a single generation runs as one sequence of the adaptive engine; its greedy output
stays the target's own, and what would change a run's reproducibility stays with auto's own decoder."""

import pytest

from specdec.core.hardware import fingerprint
from specdec.core.sampling import SamplingConfig
from specdec.core.store import PROFILE_VERSION, save_profile
from specdec.engine.batch import BatchEngine
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import Pipeline, PlannedRun
from specdec.methods.auto import PLANNER_DEPTH, Planned, planned_label, planned_request
from specdec.methods.registry import get_method
from tests.conftest import tiny_lm

GREEDY = SamplingConfig()
SAMPLED = SamplingConfig(temperature=0.8)
TIMING = {"target_ms": {"1": 10.0, "2": 10.2, "4": 10.5, "8": 11.0, "16": 12.0, "32": 20.0},
          "draft_ms": {"1": 1.0, "2": 1.1, "4": 1.2, "8": 1.4, "16": 2.0}, "ar_ms_per_token": 10.0}
PROMPT = list(range(10, 24))


@pytest.fixture(autouse=True)
def _own_profiles(tmp_path, monkeypatch):
    """This file's profiles stay here: other tests expect none for these models."""
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path / "measurements"))


def _pipe(winner: dict, modes=(GREEDY, SAMPLED), candidates: list[dict] | None = None, draft_seed: int = 0) -> Pipeline:
    """Tiny models whose draft is the target (every draft is accepted; another draft with `draft_seed`),
    with a profile per mode."""
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", draft_seed))
    for sampling in modes:
        save_profile({"version": PROFILE_VERSION, "key": pipe.profile_key(sampling), "fingerprint": fingerprint("cpu"),
                      "winner": {"label": winner["method"], **winner}, "timing": TIMING,
                      **({"candidates": candidates} if candidates else {})})
    return pipe


def _run(pipe: Pipeline, max_new: int = 24, **kw):
    handle, chunks = pipe.stream(PROMPT, "auto", max_new, **kw)
    out = [t for chunk in chunks for t in chunk]
    return handle, out


def test_auto_decodes_through_the_planner_deeper_than_the_tunes_depth_and_stays_exact(one_thread, monkeypatch):
    pipe = _pipe({"method": "sps", "options": {"gamma": 2}})
    assert planned_request(pipe.context(GREEDY), get_method("auto").make_options({})) == \
        Planned("sps", {"gamma": PLANNER_DEPTH}, TIMING)
    label = planned_label(pipe.auto_plan(), "sps gamma=2")
    assert label == f"planned per step: sps gamma={PLANNER_DEPTH} (tuned: sps gamma=2)"
    assert pipe.auto_plan(SAMPLED) is not None and pipe.auto_plan(SAMPLED, seed=1) is not None

    def no_probe(self, *a, **k):
        raise AssertionError("the planner starts from the tune's pass times")

    monkeypatch.setattr(BatchEngine, "calibrate", no_probe)
    ref = pipe.generate(PROMPT, "ar", 24).token_ids
    handle, out = _run(pipe)
    assert isinstance(handle, PlannedRun) and out == ref
    stats = handle.last_stats
    assert stats is not None and stats.new_tokens == 24 and stats.draft_tokens > 0 and stats.prefill_s > 0
    # Every draft is accepted and drafts cost a tenth of the target: chains go past the tune's 2.
    assert len(stats.accepted_per_position) > 2
    assert pipe.generate(PROMPT, max_new_tokens=24).token_ids == ref  # the default method, the same engine again


def test_a_model_free_winner_runs_with_its_own_options():
    pipe = _pipe({"method": "pld", "options": {"gamma": 3}})
    assert planned_request(pipe.context(GREEDY), get_method("auto").make_options({})) == \
        Planned("pld", {"gamma": 3}, TIMING)
    handle, out = _run(pipe)
    assert isinstance(handle, PlannedRun) and out == pipe.generate(PROMPT, "ar", 24).token_ids


def test_a_model_free_winner_leaves_the_planner_the_model_where_a_model_draft_also_pays(one_thread):
    """The tune's three texts rank close candidates by chance: where drafting with the model is also
    expected to beat plain decoding, the planner gets the model's chain and the free trees, and picks
    per prompt."""
    winner = {"method": "pld", "options": {"gamma": 2}, "expected_speedup": 1.22}
    opts = get_method("auto").make_options({})
    paying = _pipe(winner, candidates=[winner, {"method": "sps", "options": {"gamma": 1}, "expected_speedup": 1.19},
                                       {"method": "ar", "expected_speedup": 1.0}])
    assert planned_request(paying.context(GREEDY), opts) == Planned("sps", {"gamma": PLANNER_DEPTH}, TIMING)
    handle, out = _run(paying)
    assert out == paying.generate(PROMPT, "ar", 24).token_ids and handle.last_stats.draft_tokens > 0
    losing = _pipe(winner, candidates=[winner, {"method": "csd", "expected_speedup": 0.9},
                                       {"method": "gone-method", "expected_speedup": 2.0}])
    assert planned_request(losing.context(GREEDY), opts) == Planned("pld", {"gamma": 2}, TIMING)


def _save(pipe: Pipeline, sampling: SamplingConfig, timing: dict) -> None:
    save_profile({"version": PROFILE_VERSION, "key": pipe.profile_key(sampling), "fingerprint": fingerprint("cpu"),
                  "winner": {"label": "sps", "method": "sps", "options": {"gamma": 2}}, "timing": timing})


def _fixed_engines(pipe: Pipeline, monkeypatch) -> list[BatchEngine]:
    """Every engine the pipeline makes for a seeded sampled run, as it makes them."""
    made: list[BatchEngine] = []
    make = pipe._fixed_planner
    monkeypatch.setattr(pipe, "_fixed_planner", lambda planned: made.append(make(planned)) or made[-1])
    return made


def test_a_seeded_sampled_run_is_planned_from_the_tunes_times_alone_and_repeats(one_thread, monkeypatch):
    """A seeded sampled run goes through the planner too, on an engine made for it whose plans depend on
    no timing (`BatchEngine.fix_plans`): the same seed gives the same tokens after runs of other
    seeds, even when every pass then seems to take 10 s (a planner refining its times would stop
    drafting, and the draws would follow). The draft is another model, so acceptance varies."""
    import specdec.engine.batch as batch_module

    pipe = _pipe({"method": "sps", "options": {"gamma": 2}}, draft_seed=1)
    made = _fixed_engines(pipe, monkeypatch)
    handle, first = _run(pipe, sampling=SAMPLED, seed=5)
    assert isinstance(handle, PlannedRun) and len(first) == 24 and len(made) == 1
    assert made[0].fixed_plans and made[0] is not pipe._solo_engine
    assert handle.last_stats.draft_tokens > 0 and made[0].last_step.plan is not None  # the planner priced its steps
    others = [_run(pipe, sampling=SAMPLED, seed=seed)[1] for seed in (6, 7, 8)]
    assert any(out != first for out in others)
    clock = iter(range(0, 10**9, 10))
    with monkeypatch.context() as slow:
        slow.setattr(batch_module.time, "perf_counter", lambda: float(next(clock)))
        assert _run(pipe, sampling=SAMPLED, seed=5)[1] == first


def test_a_fixed_engine_ignores_its_timings_and_the_requests_before(one_thread, monkeypatch):
    """The engine itself, reused: pass times stay as assumed and each request starts from the initial
    priors, so a request repeats after others and under any clock (mutations: the times refined, the
    priors carried over; both fail it)."""
    import specdec.engine.batch as batch_module
    from specdec.engine.batch import BatchRequest

    pipe = _pipe({"method": "sps", "options": {"gamma": 2}}, draft_seed=1)
    engine = pipe.batch_engine(max_batch_size=1, adaptive=True)
    engine.assume_times({int(k): v for k, v in TIMING["target_ms"].items()},
                        {int(k): v for k, v in TIMING["draft_ms"].items()})
    engine.fix_plans()

    def run(seed: int) -> list[int]:
        return engine.run_all([BatchRequest(PROMPT, 24, "sps", {"gamma": 6}, SAMPLED, seed)])[0][0]

    first = run(5)
    points = {key: dict(t.points) for key, t in engine.times.items()}
    assert any(run(seed) != first for seed in (6, 7, 8))
    clock = iter(range(0, 10**9, 10))
    with monkeypatch.context() as slow:
        slow.setattr(batch_module.time, "perf_counter", lambda: float(next(clock)))
        assert run(5) == first
    assert {key: dict(t.points) for key, t in engine.times.items()} == points


def test_a_seeded_run_follows_the_profile_now_and_streams_interleave(one_thread):
    """A retune changes a seeded run's plans (its pass times), and changing it back gives the same
    tokens again, whatever ran in between; two seeded streams read in turns give each its own tokens."""
    pipe = _pipe({"method": "sps", "options": {"gamma": 2}}, draft_seed=1)
    expected = _run(pipe, sampling=SAMPLED, seed=5)[1]
    steep = {"target_ms": {"1": 10.0, "2": 20.0, "64": 640.0}, "draft_ms": {"1": 9.0, "64": 576.0}}
    _save(pipe, SAMPLED, steep)
    assert _run(pipe, sampling=SAMPLED, seed=5)[1] != expected
    _save(pipe, SAMPLED, TIMING)
    assert _run(pipe, sampling=SAMPLED, seed=5)[1] == expected
    other = _run(pipe, sampling=SAMPLED, seed=6)[1]
    streams = [pipe.stream(PROMPT, "auto", 24, sampling=SAMPLED, seed=s)[1] for s in (5, 6)]
    outs: list[list[int]] = [[], []]
    live = [True, True]
    while any(live):
        for i, chunks in enumerate(streams):
            if live[i]:
                chunk = next(chunks, None)
                live[i] = chunk is not None
                outs[i] += chunk or []
    assert outs == [expected, other]


def test_fixed_plans_refuse_what_would_make_plans_depend_on_other_requests():
    from specdec.engine.batch import BatchRequest

    pipe = _pipe({"method": "sps", "options": {"gamma": 2}})
    target_ms, draft_ms = {1: 10.0}, {1: 1.0}
    with pytest.raises(ValueError, match="one sequence"):
        pipe.batch_engine(max_batch_size=2, adaptive=True).fix_plans()
    with pytest.raises(ValueError, match="one sequence"):
        pipe.batch_engine(max_batch_size=1, adaptive=True, prefix_cache_mb=1).fix_plans()
    with pytest.raises(ValueError, match="assume_times"):
        pipe.batch_engine(max_batch_size=1, adaptive=True).fix_plans()
    half = pipe.batch_engine(max_batch_size=1, adaptive=True)
    half.assume_times(target_ms, {})
    with pytest.raises(ValueError, match="assume_times"):
        half.fix_plans()
    busy = pipe.batch_engine(max_batch_size=1, adaptive=True)
    busy.assume_times(target_ms, draft_ms)
    busy.submit(BatchRequest(PROMPT, 4, "sps"))
    with pytest.raises(ValueError, match="before the first request"):
        busy.fix_plans()


def test_auto_keeps_its_own_decoder_where_the_planner_does_not_apply(one_thread):
    pipe = _pipe({"method": "sps", "options": {"gamma": 2}})
    handle, _ = _run(pipe, sampling=SAMPLED)  # unseeded: random either way
    assert isinstance(handle, PlannedRun)
    untimed = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 0))
    save_profile({"version": PROFILE_VERSION, "key": untimed.profile_key(SAMPLED), "fingerprint": fingerprint("cpu"),
                  "winner": {"label": "sps", "method": "sps", "options": {"gamma": 2}}})
    # A seeded sampled run whose profile has no pass times to plan from keeps auto's own decoder.
    seeded = [_run(untimed, sampling=SAMPLED, seed=5) for _ in range(2)]
    assert all(isinstance(h, SpeculativeDecoder) for h, _ in seeded) and seeded[0][1] == seeded[1][1]
    for opts in ({"no_planner": True}, {"no_fallback": True}, {"sequoia_mode": "greedy"}):
        handle, _ = _run(pipe, 8, **opts)
        assert isinstance(handle, SpeculativeDecoder), opts
    plain = _pipe({"method": "ar"})
    handle, out = _run(plain)
    assert isinstance(handle, SpeculativeDecoder) and handle.last_stats.draft_tokens == 0


def test_an_abandoned_or_failed_planned_stream_leaves_the_engine_clean(one_thread):
    pipe = _pipe({"method": "sps", "options": {"gamma": 2}})
    ref = pipe.generate(PROMPT, "ar", 16).token_ids
    handle, chunks = pipe.stream(PROMPT, "auto", 16)
    assert next(chunks)
    chunks.close()
    engine = pipe._solo_engine
    assert not engine.has_work() and engine.kv_slots_in_use() == 0
    with pytest.raises(ValueError, match="exceeds the target's context"):
        _run(pipe, 10**6)
    assert not engine.has_work()
    assert pipe.generate(PROMPT, max_new_tokens=16).token_ids == ref


def test_the_batch_engine_runs_auto_requests_as_the_planner_does(one_thread):
    """`serve` and `generate_batch`: an adaptive engine runs an auto request (greedy, or sampled without a
    seed) as `planned_request` says; a seeded sampled one, and any auto request of a fixed-depth engine,
    keeps auto's own drafter. Greedy output is AR's either way."""
    from specdec.engine.batch import BatchRequest

    pipe = _pipe({"method": "sps", "options": {"gamma": 2}})
    ref = pipe.generate(PROMPT, "ar", 12).token_ids
    for adaptive in (True, False):
        engine = pipe.batch_engine(max_batch_size=3, adaptive=adaptive)
        for sampling, seed in ((GREEDY, None), (SAMPLED, None), (SAMPLED, 3)):
            engine.submit(BatchRequest(PROMPT, 12, "auto", {}, sampling, seed=seed))
        methods = [request.method for _, request, _ in engine._waiting]
        assert methods == (["sps", "sps", "auto"] if adaptive else ["auto"] * 3)
        outs = engine.run_all([BatchRequest(PROMPT, 12, "auto")])
        assert outs[0][0] == ref


def test_unseeded_streams_read_in_turns_each_get_their_own_tokens(one_thread):
    """Unseeded auto runs share the pipeline's one-row engine: reading a second stream to its end drives
    the first request too, and the first stream's tokens are kept for it; an abandoned third one's
    rows are freed while the others go on."""
    pipe = _pipe({"method": "sps", "options": {"gamma": 2}})
    ref = pipe.generate(PROMPT, "ar", 24).token_ids
    other = [5, 9, 2, 7, 7, 3]
    ref_other = pipe.generate(other, "ar", 20).token_ids
    first = pipe.stream(PROMPT, "auto", 24)[1]
    head = next(first)
    abandoned = pipe.stream(other, "auto", 20)[1]
    second = pipe.stream(other, "auto", 20)[1]
    assert next(abandoned)  # it waited for the first (one row), which ran to its end meanwhile
    abandoned.close()
    assert [t for chunk in second for t in chunk] == ref_other
    assert head + [t for chunk in first for t in chunk] == ref
    engine = pipe._solo_engine
    assert not engine.has_work() and engine.kv_slots_in_use() == 0
