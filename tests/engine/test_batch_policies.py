"""The batch engine's policies: speculation that adapts to the measured costs, the time bound on a
step's prompt fill, and the prefix cache (exact on native rows: reused K/V are the recomputed bits).
"""

from __future__ import annotations

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.batch import LANE_FILL, MIN_FILL, BatchEngine, BatchRequest
from specdec.engine.pipeline import Pipeline
from specdec.engine.schedule import EXPECTED_MIN_ANSWER, PassTimes
from specdec.models.base import LanguageModel
from specdec.models.prefix import BLOCK
from specdec.models.toy import MarkovLM
from tests.conftest import TINY_VOCAB, needs_kernels
from tests.engine.test_batch import MIXED, _prompts
from tests.engine.test_distribution import ALPHA, L, PROMPT, V, chi_square_pvalue, exact_continuations
from tests.engine.test_schedule import FLAT, FREE, STEEP, _times


def _plant(engine: BatchEngine, target: PassTimes, draft: PassTimes) -> None:
    """Fix the engine's measured costs (its own timings of these tiny models are not recorded)."""
    from specdec.models.batch import run_calls

    engine._calibrated = True
    engine.times = {"target": target, "draft": draft}
    engine._run_timed = lambda key, calls: run_calls(calls)


# ---- the engine with adaptive speculation ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tests.helpers import noisy_copy
    from specdec.models.hf import HFLanguageModel
    from tests.conftest import tiny_hf_model

    target = tiny_hf_model("llama", seed=0)
    return HFLanguageModel(target), HFLanguageModel(noisy_copy(target))


def _run(engine: BatchEngine, reqs: list[BatchRequest]) -> tuple[list[list[int]], list]:
    ids = [engine.submit(r) for r in reqs]
    out = {i: [] for i in ids}
    infos = []
    while engine.has_work():
        for ev in engine.step():
            assert ev.error is None, ev.error
            out[ev.request_id] += ev.tokens
        infos.append(engine.last_step)
    return [out[i] for i in ids], infos


@pytest.mark.parametrize("costs,drafts", [(STEEP, False), (FLAT, True)])
def test_adaptive_engine_follows_the_measured_costs_and_stays_exact(tiny, costs, drafts, one_thread):
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompts, news = _prompts(5, seed=5), [10, 7, 12, 9, 11]
    engine = pipe.batch_engine(max_batch_size=5, adaptive=True)
    _plant(engine, costs, FREE)
    outs, infos = _run(engine, [BatchRequest(p, k, "sps", {"gamma": 3}) for p, k in zip(prompts, news)])
    assert outs == [pipe.generate(p, "sps", k, gamma=3).token_ids for p, k in zip(prompts, news)]
    depths = [d for info in infos for d in info.depths]
    assert depths and (any(depths) if drafts else not any(depths))


def test_adaptive_sampling_keeps_every_sequences_distribution(monkeypatch, one_thread):
    """The planner's choices vary from step to step (acceptance-driven, mid-range costs) and the
    output laws stay the target's. The requests are unseeded (seeded ones keep their depth), their
    seeds drawn from a counter here so that the test repeats."""
    import itertools
    import types

    import specdec.engine.batch as batch_module

    seeds = itertools.count(9_000)
    monkeypatch.setattr(batch_module, "secrets", types.SimpleNamespace(randbits=lambda bits: next(seeds)))
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    engine = BatchEngine(target, [MarkovLM.random(V, seed=12, sharpness=1.5)], max_batch_size=48,
                         spec_disable_batch_size=None, adaptive=True)
    _plant(engine, _times({1: 0.05, 64: 0.05 + 63 * 0.002}), FREE)
    n = 400
    reqs = [BatchRequest(PROMPT, L, m, o, s) for i in range(n) for m, s, o in MIXED]
    depths: set[int] = set()
    ids = [engine.submit(r) for r in reqs]
    out = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
        depths.update(engine.last_step.depths)
    assert len(depths) > 1, "the planner never varied its choice: the test would not exercise it"
    from collections import Counter

    for c, (method, sampling, _) in enumerate(MIXED):
        got = Counter(tuple(out[ids[i]]) for i in range(c, len(ids), len(MIXED)))
        p = chi_square_pvalue(got, exact_continuations(target, sampling, None), n)
        assert p > ALPHA, f"{method} at {sampling}, adaptive: p = {p:.2g}"


def test_a_seeded_sampled_request_keeps_its_depth_and_repeats_its_output(tiny, one_thread):
    """Under costs where the planner drafts nothing, a seeded sampled request still drafts its
    method's depth, so its output is the one it gets served alone; greedy ones adapt."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompts = _prompts(2, seed=8)
    hot = SamplingConfig(temperature=1.0)
    reqs = [BatchRequest(prompts[0], 9, "sps", {"gamma": 3}, hot, seed=123),
            BatchRequest(prompts[1], 9, "sps", {"gamma": 3})]
    engine = pipe.batch_engine(max_batch_size=2, adaptive=True)
    _plant(engine, STEEP, FREE)
    outs, infos = _run(engine, reqs)
    alone = pipe.generate(prompts[0], "sps", 9, sampling=hot, seed=123, gamma=3).token_ids
    assert outs[0] == alone and outs[1] == pipe.generate(prompts[1], "sps", 9, gamma=3).token_ids
    assert all(d == 0 for info in infos for d in info.depths)  # only the greedy one was planned, to none


def test_a_request_filling_its_prompt_leaves_its_draft_model_alone_where_nothing_drafts(tiny, one_thread):
    """Under costs where the planner drafts nothing, a request joining a decoding batch never fills its
    draft model's prompt (it would be filled only for the planner to decide against drafting)."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    short, prompt = _prompts(2, seed=4)[0], _prompts(7, seed=1)[6] * 3
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=32, adaptive=True)
    _plant(engine, STEEP, FREE)
    keys: list[str] = []
    run = engine._run_timed
    engine._run_timed = lambda key, calls: keys.append(key) or run(key, calls)
    first = engine.submit(BatchRequest(short, 30, "sps", {"gamma": 3}))
    engine.step()
    engine.step()  # the first one decodes (plainly)
    second = engine.submit(BatchRequest(prompt, 6, "sps", {"gamma": 3}))
    out: dict[int, list[int]] = {first: [], second: []}
    fills = 0
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
        fills += engine.last_step.fill_tokens > 0
    assert out[second] == pipe.generate(prompt, "sps", 6, gamma=3).token_ids
    assert fills > 1  # the prompt filled over several steps
    assert "target" in keys and "draft" not in keys


@pytest.mark.parametrize("max_new,drafts", [(4, False), (200, True)])
def test_a_lone_request_fills_its_draft_model_only_where_drafting_pays_it_back(tiny, max_new, drafts, one_thread):
    """Alone, a request fills its draft model's prompt beside the target's only if drafting can earn
    that fill back over the tokens it may emit: a long prompt and a 4-token answer decode plainly
    and never run the draft model; the same prompt with 200 tokens to go drafts from its first step."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompt = _prompts(7, seed=1)[6] * 3
    assert len(prompt) > 2 * LANE_FILL
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=LANE_FILL, adaptive=True)  # a fill over steps
    _plant(engine, FLAT, _times({1: 0.005, 64: 0.32}))  # each draft token 5 ms, a target pass 50 ms
    keys: list[str] = []
    run = engine._run_timed
    engine._run_timed = lambda key, calls: keys.append(key) or run(key, calls)
    rid = engine.submit(BatchRequest(prompt, max_new, "sps", {"gamma": 3}))
    out: list[int] = []
    before_first_token: list[str] = []
    while engine.has_work():
        out += [t for ev in engine.step() if ev.request_id == rid for t in ev.tokens]
        if not out:
            before_first_token = list(keys)
    assert out == pipe.generate(prompt, "sps", max_new, gamma=3).token_ids
    assert ("draft" in before_first_token) is drafts  # the draft model's prompt filled beside the target's
    assert ("draft" in keys) is drafts


def test_a_long_prompts_draft_fill_waits_until_the_answer_has_gone_on(tiny, one_thread):
    """The fill is priced over the tokens the answer is expected to add (as many again as it has, at
    least `EXPECTED_MIN_ANSWER`), not over what the request allows: with a fill that 32 tokens do not
    earn back, a request allowed 200 decodes its first tokens without the draft model and fills it
    once the answer has gone on long enough (priced over the 200, it filled at once)."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompt = _prompts(7, seed=1)[6] * 3
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=LANE_FILL, adaptive=True)
    _plant(engine, FLAT, _times({1: 0.005, 64: 0.7}))  # a fill of this prompt: ~1.3 s, a target pass 50 ms
    keys: list[str] = []
    run = engine._run_timed
    engine._run_timed = lambda key, calls: keys.append(key) or run(key, calls)
    rid = engine.submit(BatchRequest(prompt, 200, "sps", {"gamma": 3}))
    out: list[int] = []
    first_draft_at = None
    while engine.has_work():
        out += [t for ev in engine.step() if ev.request_id == rid for t in ev.tokens]
        if first_draft_at is None and "draft" in keys:
            first_draft_at = len(out)
    assert out == pipe.generate(prompt, "sps", 200, gamma=3).token_ids
    assert first_draft_at is not None and EXPECTED_MIN_ANSWER <= first_draft_at < 150


@pytest.mark.parametrize("long_prompt", [True, False])
def test_a_request_in_a_dip_of_the_load_fills_its_draft_model_only_once_the_load_stays_low(tiny, long_prompt,
                                                                                         one_thread):
    """Where the batch usually holds 12 sequences and drafting pays only in a small batch, a request that
    finds itself alone (a dip between two clients' requests) first decodes plainly rather than fill its
    draft model's prompt (a long one: a fill of its own; a short one: a catch-up in its first draft
    pass), which would pay back only while the batch stays small; once the batch has stayed small
    (`usual_batch`) it fills and drafts. Its output equals plain decoding's."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompt = _prompts(7, seed=1)[6] * 3 if long_prompt else _prompts(7, seed=1)[6][:12]
    assert (len(prompt) > LANE_FILL) is long_prompt and len(prompt) > 4
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=LANE_FILL, adaptive=True)
    _plant(engine, _times({1: 0.05, 8: 0.05, 64: 0.4}), _times({1: 0.005, 64: 0.32}))  # flat to 8 tokens
    keys: list[str] = []
    run = engine._run_timed
    engine._run_timed = lambda key, calls: keys.append(key) or run(key, calls)
    short = engine.submit(BatchRequest(_prompts(2, seed=4)[0], 2, "ar"))
    engine.step()  # the engine was idle: its usual size restarts at 1
    engine.usual_batch = 12.0  # as if 11 others had just left the short request
    rid = engine.submit(BatchRequest(prompt, 200, "sps", {"gamma": 3}))
    out: list[int] = []
    plain_tokens = 0
    while engine.has_work():
        out += [t for ev in engine.step() if ev.request_id == rid for t in ev.tokens]
        if "draft" not in keys:
            plain_tokens = len(out)
    assert short != rid and out == pipe.generate(prompt, "sps", 200, gamma=3).token_ids
    assert plain_tokens >= 5  # decoded plainly while the usual load was high
    assert "draft" in keys and engine.usual_batch < 2


def test_the_usual_batch_size_rises_at_once_and_an_idle_engine_forgets_it(tiny, one_thread):
    """Four requests make the usual size 4 on their first step; it falls slowly as they finish, and a
    request that finds the engine idle starts it again at 1 (a lone client after a busy spell drafts
    at once rather than decode plainly for tens of steps)."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    engine = pipe.batch_engine(max_batch_size=4, adaptive=True)
    _plant(engine, FLAT, _times({1: 0.005, 64: 0.32}))
    prompts = _prompts(4, seed=2)
    for prompt in prompts:
        engine.submit(BatchRequest(prompt, 6, "sps", {"gamma": 2}))
    engine.step()
    assert engine.usual_batch == 4
    while engine.has_work():
        engine.step()
    assert engine.usual_batch > 3
    engine.submit(BatchRequest(prompts[0], 4, "sps", {"gamma": 2}))
    engine.step()
    assert engine.usual_batch == 1


def test_a_request_joining_a_drafting_batch_fills_its_draft_model_only_where_that_pays(tiny, one_thread):
    """Beside a sequence that drafts, a new request with a long prompt and a 4-token answer is priced
    with it: its draft model's prompt fill would cost more than its drafts save, so its draft row is
    never run, while the first sequence goes on drafting; both outputs equal plain decoding's."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    short, prompt = _prompts(2, seed=4)[0], _prompts(7, seed=1)[6] * 3
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=LANE_FILL, adaptive=True)
    _plant(engine, FLAT, _times({1: 0.005, 64: 0.32}))
    rows: list[LanguageModel] = []
    run = engine._run_timed
    engine._run_timed = lambda key, calls: rows.extend(c.lm for c in calls) or run(key, calls)
    first = engine.submit(BatchRequest(short, 40, "sps", {"gamma": 3}))
    early = [t for _ in range(2) for ev in engine.step() for t in ev.tokens]
    second = engine.submit(BatchRequest(prompt, 4, "sps", {"gamma": 3}))
    out: dict[int, list[int]] = {first: early, second: []}
    drafted = []
    joined = None
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
        joined = joined or next((s for s in engine._running if s.request_id == second), None)
        drafted.append(any(engine.last_step.depths))
    assert out[first] == pipe.generate(short, "sps", 40, gamma=3).token_ids
    assert out[second] == pipe.generate(prompt, "sps", 4, gamma=3).token_ids
    assert joined is not None and all(row is not joined.draft_rows[0] for row in rows)
    assert any(drafted)


def test_a_draft_models_fill_beside_other_sequences_is_charged_to_drafting(tiny, one_thread):
    """A request joining a drafting batch with a prompt too long for a proposal round fills its draft
    model in the lane; those seconds are drafting's cost at that batch size (`ModeRates.charge`),
    never plain decoding's. Outputs equal plain decoding's."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    short, prompt = _prompts(2, seed=4)[0], _prompts(7, seed=1)[6] * 3
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=LANE_FILL, adaptive=True)
    _plant(engine, FLAT, FREE)  # drafting pays: the joining request fills its draft model
    charged: list[tuple[int, float]] = []
    charge = engine.modes.charge
    engine.modes.charge = lambda batch, seconds: charged.append((batch, seconds)) or charge(batch, seconds)
    first = engine.submit(BatchRequest(short, 40, "sps", {"gamma": 3}))
    out: dict[int, list[int]] = {first: [t for _ in range(2) for ev in engine.step() for t in ev.tokens]}
    second = engine.submit(BatchRequest(prompt, 30, "sps", {"gamma": 3}))
    out[second] = []
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
    assert out[first] == pipe.generate(short, "sps", 40, gamma=3).token_ids
    assert out[second] == pipe.generate(prompt, "sps", 30, gamma=3).token_ids
    assert charged and all(batch == 2 and seconds > 0 for batch, seconds in charged), charged


def test_a_draft_catch_up_parked_in_a_free_lane_runs_in_the_same_step(tiny, one_thread):
    """A sequence that decoded plainly for a while and then drafts owes its draft model a catch-up too
    long for a proposal round, which is parked in the fill lane; with the lane otherwise unused it
    runs at once, so the sequence loses no step."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompt = _prompts(2, seed=3)[0]
    engine = pipe.batch_engine(max_batch_size=2, adaptive=True)
    _plant(engine, STEEP, FREE)  # plain decoding pays: the draft model falls behind
    rid = engine.submit(BatchRequest(prompt, 60, "sps", {"gamma": 3}))
    out, after = [], []
    while engine.has_work():
        if len(out) >= LANE_FILL + 8:
            engine.times["target"] = FLAT  # now drafting pays
        got = [t for ev in engine.step() if ev.request_id == rid for t in ev.tokens]
        if engine.times["target"] is FLAT:
            after.append((engine.last_step.fill_tokens, len(got), any(engine.last_step.depths)))
        out += got
    assert out == pipe.generate(prompt, "sps", 60, gamma=3).token_ids
    assert after and all(n > 0 for _, n, _ in after)
    assert after[0][0] > LANE_FILL and after[0][2]  # that step filled the catch-up and drafted


# ---- chunked prefill under a time bound ------------------------------------------------------
def test_fill_is_cut_to_the_time_bound_while_others_decode(tiny, one_thread):
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    long_prompt = _prompts(7, seed=1)[6] * 6  # 246 tokens
    engine = pipe.batch_engine(max_batch_size=2, prefill_chunk=128, max_fill_ms=100)
    # 10 ms a token: about 10 tokens fit 100 ms; MIN_FILL is the floor.
    _plant(engine, _times({1: 0.01, 64: 0.64}), _times({1: 0.01, 64: 0.64}))
    short = engine.submit(BatchRequest(_prompts(2, seed=2)[1], 30, "ar"))
    engine.step()  # the short one starts decoding
    engine.submit(BatchRequest(long_prompt, 4, "ar"))
    fills = []
    while engine.has_work():
        engine.step()
        if engine.last_step.fill_tokens:
            fills.append(engine.last_step.fill_tokens)
    assert short == 0 and fills
    decoding_fills = fills[:-1]
    assert max(decoding_fills) <= max(MIN_FILL, 10) and min(decoding_fills) >= min(MIN_FILL, 10)


# ---- the prefix cache --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def native():
    from specdec.models.native.lm import NativeLM
    from specdec.models.native.runner import NativeModel
    from tests.models.test_native import _tiny_native

    return (NativeLM(NativeModel.from_hf(_tiny_native("Q4_K", "llama", 0))),
            NativeLM(NativeModel.from_hf(_tiny_native("Q4_K", "llama", 1))))


def _prefix_prompts() -> tuple[list[int], list[int], list[int]]:
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(0, TINY_VOCAB, (3 * BLOCK + 7,), generator=gen).tolist()
    a = shared + torch.randint(0, TINY_VOCAB, (9,), generator=gen).tolist()
    b = shared + torch.randint(0, TINY_VOCAB, (5,), generator=gen).tolist()
    return shared, a, b


@needs_kernels
@pytest.mark.parametrize("method", ["ar", "sps"])
def test_a_reused_prefix_is_the_recomputed_kv_bit_for_bit(native, method, one_thread):
    target, draft = native
    pipe = Pipeline.from_models(target, None, draft)
    shared, a, b = _prefix_prompts()
    engine = pipe.batch_engine(max_batch_size=2, prefix_cache_mb=64, prefill_chunk=40)
    first, _ = _run(engine, [BatchRequest(a, 6, method)])
    rid = engine.submit(BatchRequest(b, 6, method))
    hits, out, checked = 0, [], False
    while engine.has_work():
        for ev in engine.step():
            out += ev.tokens
            assert ev.cached_tokens in (0, 3 * BLOCK)
        hits += engine.last_step.prefix_hit_tokens
        seq = next((s for s in engine._running if s.request_id == rid), None)
        if seq is not None and seq.prompt_fill is None and not checked:
            # The prompt is in: the row's K/V equal those of a plain prefill of the same tokens.
            n = len(b) - 1
            target.reset(len(b) + 8)
            target.forward(torch.tensor(b[:-1]), last_only=True)
            target.commit(n)
            for layer in range(2):
                for got, want in zip(seq.target_row.cached_kv(layer), target.cached_kv(layer)):
                    assert torch.equal(got[:, :, :n], want)
            checked = True
    assert checked
    assert hits == 3 * BLOCK  # the three whole blocks of the shared prefix
    assert first == [pipe.generate(a, method, 6).token_ids]
    assert out == pipe.generate(b, method, 6).token_ids
    assert engine.prefix.hits == 3 * BLOCK and engine.prefix.queries == len(a) - 1 + len(b) - 1


@needs_kernels
def test_the_prefix_cache_stays_within_its_budget_and_dense_rows_keep_none(native, tiny, one_thread):
    target, _ = native
    shared, a, b = _prefix_prompts()
    engine = Pipeline.from_models(target, None, None).batch_engine(prefix_cache_mb=0.07)  # two 32 KB blocks
    outs, _ = _run(engine, [BatchRequest(a, 4, "ar"), BatchRequest(b, 4, "ar")])
    assert 0 < engine.prefix.bytes <= engine.prefix.budget and len(engine.prefix) == 2
    assert outs == [Pipeline.from_models(target, None, None).generate(p, "ar", 4).token_ids for p in (a, b)]
    dense, _ = tiny
    engine = Pipeline.from_models(dense, None, None).batch_engine(prefix_cache_mb=64)
    _run(engine, [BatchRequest(a, 4, "ar"), BatchRequest(b, 4, "ar")])
    assert len(engine.prefix) == 0 and engine.prefix.hits == 0


def test_the_check_weighs_each_step_at_the_depths_its_drafters_reached(tiny, one_thread):
    """The planner prices depths, but a drafter that ends its chain by its confidence drafts others;
    the check (`ModeRates`) must weigh what ran against what that was predicted to do."""
    from tests.engine.test_schedule import _times

    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    engine = pipe.batch_engine(max_batch_size=4, adaptive=True)
    _plant(engine, _times({1: 0.05, 4: 0.052, 16: 0.08, 64: 0.4}), _times({1: 0.01, 4: 0.011, 64: 0.1}))
    _, infos = _run(engine, [BatchRequest(p, 14, "sps", {"gamma": 4}) for p in _prompts(4, seed=8)])
    planned = [i for i in infos if i.plan is not None and 1 < i.batch_size == len(i.plan.depths)]
    assert any(any(i.plan.depths) for i in planned)
    for info in planned:  # chains: a tree of depth d holds d + 1 tokens; free trees their nodes
        assert sum(d + 1 for d in info.plan.depths) + info.free_nodes == info.target_tokens == info.plan.block


# ---- free trees: the text's own continuations where the planner gives no draft -----------------
COSTLY_DRAFT = _times({1: 1.0, 64: 64.0})  # a draft token costs twenty target passes: never worth it


def test_free_trees_fill_the_steps_that_draft_nothing_and_greedy_output_stays_exact(tiny, one_thread):
    """Where drafting with the model never pays but the target's pass is flat, sequences propose the
    text's continuations instead (repeating prompts have them); greedy output is AR's. An AR request
    is never given one, and with free trees off none is proposed."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompts = [p * 3 for p in _prompts(3, seed=4)]
    reqs = [BatchRequest(prompts[0], 40, "sps", {"gamma": 3}), BatchRequest(prompts[1], 30, "sps", {"gamma": 2}),
            BatchRequest(prompts[2], 10, "ar")]
    for free in (True, False):
        engine = pipe.batch_engine(max_batch_size=3, adaptive=True)
        engine.free_drafts = free
        _plant(engine, FLAT, COSTLY_DRAFT)
        ids = [engine.submit(r) for r in reqs]
        outs, stats, infos = {i: [] for i in ids}, {}, []
        while engine.has_work():
            for ev in engine.step():
                assert ev.error is None, ev.error
                outs[ev.request_id] += ev.tokens
                stats[ev.request_id] = ev.stats
            infos.append(engine.last_step)
        assert [outs[i] for i in ids] == [pipe.generate(r.prompt_ids, "ar", r.max_new_tokens).token_ids for r in reqs]
        assert not any(d for info in infos for d in info.depths)
        assert (sum(info.free_nodes for info in infos) > 0) is free
        assert any(speculated for _, speculated in engine.modes.sums) is free  # the check counts them as speculating
        assert stats[ids[2]].draft_tokens == 0
        if free:
            assert stats[ids[0]].accepted_tokens + stats[ids[1]].accepted_tokens > 0, [stats[i].draft_tokens for i in ids]


def test_a_sequence_learns_its_text_repeats_where_the_engines_prior_says_free_trees_never_pay(tiny, one_thread):
    """A free tree that does not pay at the sequence's rate is still judged in hindsight, so a sequence
    that starts from a prior of other texts (here: free trees never accepted) learns that its own text
    repeats, and proposes free trees; greedy output stays AR's."""
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    prompt = _prompts(1, seed=4)[0] * 3
    engine = pipe.batch_engine(max_batch_size=1, adaptive=True)
    _plant(engine, _times({1: 0.05, 16: 0.09}), COSTLY_DRAFT)  # a free node pays at ≥ ~0.05 expected tokens
    engine.free_rate.accepted, engine.free_rate.estimated = 0.0, 1e6
    rid = engine.submit(BatchRequest(prompt, 40, "sps", {"gamma": 3}))
    out, free = [], []
    while engine.has_work():
        for ev in engine.step():
            assert ev.error is None, ev.error
            out += ev.tokens if ev.request_id == rid else []
        free.append(engine.last_step.free_nodes)
    assert out == pipe.generate(prompt, "ar", 40).token_ids
    assert free[0] == 0 and sum(free) > 0, free


def test_where_no_free_node_can_pay_a_batch_looks_up_about_one_free_tree_a_step(tiny, one_thread, monkeypatch):
    """The hindsight lookups of trees that cannot pay are spread out: each of n sequences on one step in
    n, so that a loaded batch does not pay n suffix lookups a step for nothing."""
    import specdec.engine.batch as batch_module

    calls = []
    real = batch_module.suffix_scored
    monkeypatch.setattr(batch_module, "suffix_scored", lambda *a, **k: calls.append(1) or real(*a, **k))
    target, draft = tiny
    engine = Pipeline.from_models(target, None, draft).batch_engine(max_batch_size=4, adaptive=True)
    _plant(engine, _times({1: 0.05, 16: 0.09}), COSTLY_DRAFT)
    engine.free_rate.accepted, engine.free_rate.estimated = 0.0, 1e6
    for p in _prompts(4, seed=5):
        engine.submit(BatchRequest(p * 2, 24, "sps", {"gamma": 3}))
    full = 0
    while engine.has_work():
        before = len(calls)
        engine.step()
        if engine.last_step.batch_size == 4 and engine.last_step.running == 4:
            full += 1
            assert len(calls) - before <= 2, len(calls) - before
    assert full > 4 and len(calls) > 0


def test_free_trees_keep_every_sequences_distribution(monkeypatch, one_thread):
    """Free trees at T > 0 are verified by sample-and-match whatever the method's own rule (their nodes
    carry no draft distribution): the output laws stay the target's. Unseeded requests (their seeds
    from a counter here, so that the test repeats)."""
    import itertools
    import types
    from collections import Counter

    import specdec.engine.batch as batch_module

    seeds = itertools.count(7_000)
    monkeypatch.setattr(batch_module, "secrets", types.SimpleNamespace(randbits=lambda bits: next(seeds)))
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    engine = BatchEngine(target, [MarkovLM.random(V, seed=12, sharpness=1.5)], max_batch_size=48,
                         spec_disable_batch_size=None, adaptive=True)
    _plant(engine, FLAT, COSTLY_DRAFT)
    settings = [("sps", SamplingConfig(temperature=1.0), {"gamma": 2}),
                ("specinfer", SamplingConfig(temperature=0.7, top_p=0.9), {"expansion": (2, 1)})]
    n = 500
    ids = [engine.submit(BatchRequest(PROMPT, L, m, o, s)) for _ in range(n) for m, s, o in settings]
    out = {i: [] for i in ids}
    free = 0
    while engine.has_work():
        for ev in engine.step():
            assert ev.error is None, ev.error
            out[ev.request_id] += ev.tokens
        free += engine.last_step.free_nodes
        assert not any(engine.last_step.depths)
    assert free > n, "few free trees: the test would not exercise them"
    for c, (method, sampling, _) in enumerate(settings):
        got = Counter(tuple(out[ids[i]]) for i in range(c, len(ids), len(settings)))
        p = chi_square_pvalue(got, exact_continuations(target, sampling, None), n)
        assert p > ALPHA, f"{method} at {sampling} with free trees: p = {p:.2g}"


def test_a_free_tree_is_judged_in_hindsight_where_the_model_drafted():
    """A free tree priced but not proposed is judged on the tokens the step emitted: the nodes it held
    of them, against the estimates of its nodes no deeper than they reach; proposed, on what it
    accepted against all its estimates."""
    from types import SimpleNamespace

    from specdec.core.results import VerifyResult
    from specdec.core.tree import TokenTree
    from specdec.engine.schedule import FreeRate

    # Free tree: 5 -> 6 -> 7 (chain) and 5 -> 9; estimates by node.
    option = (torch.tensor([5, 9, 6, 7]), torch.tensor([-1, -1, 0, 2]),
              torch.tensor([0.9, 0.3, 0.8, 0.5], dtype=torch.float64))
    chain = TokenTree.chain(1, torch.tensor([5, 4]))  # the model's chain; it kept 5, then the target said 6
    emitted = VerifyResult((1,), 6)
    seq = SimpleNamespace(free_option=option, run=SimpleNamespace(free=False), free_rate=FreeRate(decay=1.0))
    BatchEngine._judge_free(seq, chain, emitted)
    # Emitted 5, 6: the free tree held both; judged are its nodes at depths 1-2 (0.9 + 0.3 + 0.8).
    assert (seq.free_rate.accepted, seq.free_rate.estimated) == pytest.approx((2, 2.0))
    assert seq.free_option is None
    seq.free_option, seq.run.free = option, True
    BatchEngine._judge_free(seq, TokenTree.from_drafted(1, option[0], option[1]), VerifyResult((1,), 4))
    assert (seq.free_rate.accepted, seq.free_rate.estimated) == pytest.approx((3, 4.5))
    BatchEngine._judge_free(seq, chain, emitted)  # no free tree this step: nothing judged
    assert (seq.free_rate.accepted, seq.free_rate.estimated) == pytest.approx((3, 4.5))


def test_a_batch_that_plans_nothing_replans_ever_less_often_and_at_once_when_it_changes(tiny, one_thread,
                                                                                         monkeypatch):
    """Where the planner gives a full batch no draft and no free tree, the next `QUIET_STEPS` steps reuse
    that plan instead of paying for planning again, twice as many after each further such plan (up to
    `QUIET_MAX_STEPS`); a sequence leaving (or joining) ends the reuse. Greedy output stays AR's."""
    from specdec.engine.batch import QUIET_MAX_STEPS, QUIET_STEPS
    import specdec.engine.batch as batch_module

    plans = []
    real = batch_module.plan_step
    monkeypatch.setattr(batch_module, "plan_step", lambda *a, **k: plans.append(1) or real(*a, **k))
    target, draft = tiny
    pipe = Pipeline.from_models(target, None, draft)
    engine = pipe.batch_engine(max_batch_size=4, adaptive=True)
    _plant(engine, _times({1: 0.05, 16: 0.4}), COSTLY_DRAFT)  # neither drafts nor free trees pay
    engine.free_rate.accepted, engine.free_rate.estimated = 0.0, 1e6
    prompts, news = _prompts(4, seed=6), [60, 60, 60, 40]  # leaves mid-way through a reuse
    ids = [engine.submit(BatchRequest(p, k, "sps", {"gamma": 3})) for p, k in zip(prompts, news)]
    out = {i: [] for i in ids}
    planned_at = []
    while engine.has_work():
        before = len(plans)
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
        planned_at.append((engine.last_step.running, len(plans) > before))
    assert [out[i] for i in ids] == [pipe.generate(p, "ar", k).token_ids for p, k in zip(prompts, news)]
    full = [i for i, (running, planned) in enumerate(planned_at) if running == 4 and planned]
    gaps = [b - a for a, b in zip(full, full[1:])]
    skips = [min(QUIET_STEPS << k, QUIET_MAX_STEPS) + 1 for k in range(len(gaps))]
    assert len(gaps) >= 4 and gaps == skips, (gaps, planned_at)  # 4, 7, 13, 13 ... steps apart
    three = [planned for running, planned in planned_at if running == 3]
    assert three and three[0], ("a sequence left: the next step plans again", planned_at)
