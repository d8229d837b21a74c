"""Continuous batching: every request of a batch decodes as it would alone.

Greedy: token for token, for every method, with many requests of different prompt lengths,
lengths and stop conditions joining and leaving (fp32 tiny models). A difference is only accepted
where the two runs' top-2 target logits are tied within float32 round-off (`assert_same_or_tie`),
and none is expected on these models. Sampling: chi-square tests of mixed batches on the exact
toy model, with a leak between sequences that must fail, and seeded requests that repeat their
output whatever their batch mates.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import specdec.engine.batch as batch_module
import specdec.verify.chain as chain
import specdec.verify.mss as mss
import specdec.verify.swor as swor
from specdec.core.hardware import fingerprint
from specdec.core.sampling import SamplingConfig
from specdec.core.store import PROFILE_VERSION
from specdec.engine.batch import BatchEngine, BatchRequest
from specdec.engine.pipeline import Pipeline
from specdec.methods.registry import get_method
from specdec.models.hf import HFLanguageModel
from specdec.models.toy import MarkovLM
from tests.conftest import TINY_VOCAB, needs_kernels, tiny_hf_model
from tests.helpers import PROFILE, example_ids, every_method_example, noisy_copy
from tests.engine.test_distribution import ALPHA, L, PROMPT, V, chi_square_pvalue, detectable_effect, exact_continuations

GREEDY = SamplingConfig()
TIE = 1e-4
"""Top-2 logit gap below which float32 round-off of a different batch shape may pick either."""


@pytest.fixture(scope="module")
def models():
    target = tiny_hf_model("llama", seed=0)
    return HFLanguageModel(target), HFLanguageModel(noisy_copy(target))


@pytest.fixture(scope="module")
def eos_setting(models):
    """Prompts, lengths and an EOS that ends some of these generations early (found from plain
    greedy output), so a batch mixes stops by EOS and by length."""
    target, draft = models
    prompts = _prompts(8, seed=3)
    news = [6, 11, 4, 14, 9, 13, 7, 12]
    free = [Pipeline.from_models(target, None, draft).generate(p, "ar", k).token_ids for p, k in zip(prompts, news)]
    eos = Counter(t for out in free for t in out[2:]).most_common(1)[0][0]
    return prompts, news, eos


@pytest.fixture
def profile_file(tmp_path, one_thread):
    """A tune profile whose winner is a small Sequoia tree (for `auto` without `specdec tune`),
    made for this machine at the tests' thread count (a profile applies to the hardware it was
    measured on)."""
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"version": PROFILE_VERSION, "key": {}, "fingerprint": fingerprint("cpu"),
                                "winner": {"method": "sequoia", "mode": "greedy",
                                                                    "paths": [[0], [1], [0, 0], [0, 0, 0]]}}))
    return str(path)


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 5, 9, 17, 30, 41, 3, 12, 26][:n]
    return [torch.randint(0, TINY_VOCAB, (k,), generator=gen).tolist() for k in lengths]


METHODS = every_method_example()
"""Every registered method with the options it declares for these tests (`PROFILE`: auto's file)."""


def assert_same_or_tie(model, prompt: list[int], alone: list[int], batched: list[int]) -> int:
    """Equal token for token, or the first difference is a float32 tie of the target: 1 if so."""
    if batched == alone:
        return 0
    k = next((i for i, (a, b) in enumerate(zip(alone, batched)) if a != b), min(len(alone), len(batched)))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + alone[:k]])).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    assert gap < TIE * max(1.0, float(top2[0].abs())), (
        f"batched output differs from alone at token {k} where the target's top-2 gap is {gap:.3g}: not a tie"
    )
    return 1


def _alone(pipe: Pipeline, prompts, method, opts, news, sampling=GREEDY, seed=None):
    return [pipe.generate(p, method, k, sampling=sampling, seed=seed, **opts).token_ids for p, k in zip(prompts, news)]


@pytest.mark.parametrize("method,opts", METHODS, ids=example_ids(METHODS))
def test_greedy_batch_equals_alone_for_every_method(models, eos_setting, profile_file, method, opts, one_thread):
    target, draft = models
    opts = {"tree": profile_file} if opts == PROFILE else opts
    prompts, news, eos = eos_setting
    pipe = Pipeline.from_models(target, None, draft, eos_token_ids=[eos])
    alone = _alone(pipe, prompts, method, opts, news)
    assert any(len(a) < k for a, k in zip(alone, news)) and any(len(a) == k for a, k in zip(alone, news))
    # 8 requests, 5 at a time: requests join as others finish; prompts fill by chunks of 8 tokens.
    results = pipe.generate_batch(prompts, method, news, max_batch_size=5, prefill_chunk=8, **opts)
    ties = sum(assert_same_or_tie(target.model, p, a, r.token_ids) for p, a, r in zip(prompts, alone, results))
    assert ties == 0  # none expected on these models; a tie would be reported, never silently accepted
    for r, a in zip(results, alone):
        assert r.stats.new_tokens == len(a) and r.stats.stopped_by in ("eos", "length")
        if method != "ar":
            assert r.stats.target_calls <= len(a)


@pytest.fixture(scope="module")
def native_models():
    from specdec.models.native.lm import NativeLM
    from specdec.models.native.runner import NativeModel
    from tests.models.test_native import _near_native, _tiny_native

    return (NativeLM(NativeModel.from_hf(_tiny_native("Q4_K", "llama", 0))),
            NativeLM(NativeModel.from_hf(_near_native("Q4_K", "llama", 0))))


@needs_kernels
@pytest.mark.parametrize("method,opts", METHODS, ids=example_ids(METHODS))
def test_native_batch_equals_alone_bit_for_bit(native_models, profile_file, method, opts, one_thread):
    """Native rows share flat passes without padding and every token is computed as in its own
    pass: batched output equals each request alone exactly, no tie allowance."""
    target, draft = native_models
    opts = {"tree": profile_file} if opts == PROFILE else opts
    prompts, news = _prompts(8, seed=3), [6, 11, 4, 14, 9, 13, 7, 12]
    pipe = Pipeline.from_models(target, None, draft)
    alone = _alone(pipe, prompts, method, opts, news)
    results = pipe.generate_batch(prompts, method, news, max_batch_size=5, prefill_chunk=8, **opts)
    assert [r.token_ids for r in results] == alone
    if get_method(method).needs_draft_model:  # drafts kept and drafts refused, both compared
        accepted = sum(r.stats.accepted_tokens for r in results)
        assert 0 < accepted < sum(r.stats.draft_tokens for r in results), method


def test_mixed_methods_share_steps_and_each_equals_alone(models, profile_file, one_thread):
    """One batch, a different method, options and length per request, qwen2-free llama models."""
    target, draft = models
    pipe = Pipeline.from_models(target, None, draft)
    n = len(METHODS)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, TINY_VOCAB, (int(k),), generator=gen).tolist()
               for k in torch.randint(1, 42, (n,), generator=gen)]
    news = torch.randint(5, 16, (n,), generator=gen).tolist()
    reqs = []
    for (method, opts), p, k in zip(METHODS, prompts, news):
        opts = {"tree": profile_file} if opts == PROFILE else opts
        reqs.append(BatchRequest(p, k, method, opts))
    engine = pipe.batch_engine(max_batch_size=n)
    sizes = []
    ids = [engine.submit(r) for r in reqs]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            assert ev.error is None
            out[ev.request_id] += ev.tokens
        sizes.append(engine.last_step.batch_size)
    assert max(sizes) >= n - 1  # (nearly) every method in one target pass
    for req, rid in zip(reqs, ids):
        assert out[rid] == pipe.generate(req.prompt_ids, req.method, req.max_new_tokens, **req.options).token_ids


def test_continuous_batching_joins_leaves_budgets_and_chunks(models, one_thread):
    target, draft = models
    pipe = Pipeline.from_models(target, None, draft)
    long_prompt = _prompts(7, seed=1)[6] * 6  # 246 tokens
    prompts = [long_prompt] + _prompts(5, seed=2)
    news = [5, 12, 12, 12, 12, 12]
    with pytest.raises(ValueError, match="KV budget"):
        pipe.batch_engine(max_kv_tokens=400).submit(BatchRequest(long_prompt, 200, "sps"))
    engine = pipe.batch_engine(max_batch_size=6, prefill_chunk=16, max_kv_tokens=2000)
    ids = [engine.submit(BatchRequest(p, k, "sps", {"gamma": 2})) for p, k in zip(prompts, news)]
    out: dict[int, list[int]] = {i: [] for i in ids}
    steps_while_long_fills = 0
    while engine.has_work():
        events = engine.step()
        info = engine.last_step
        assert info.fill_tokens <= 16  # the fill budget per step holds
        assert engine.target.slots_if_added(0) <= 2000 or engine.num_running == 0
        for ev in events:
            out[ev.request_id] += ev.tokens
        if not out[ids[0]] and any(out[i] for i in ids[1:]):
            steps_while_long_fills += 1
    # The long prompt filled 16 tokens a step while the short ones decoded beside it.
    assert steps_while_long_fills >= 5
    for rid, p, k in zip(ids, prompts, news):
        assert out[rid] == pipe.generate(p, "sps", k, gamma=2).token_ids
    assert engine.target.rows_in_use() == 0 and all(d.rows_in_use() == 0 for d in engine.drafts)


def test_kv_budget_makes_requests_wait(models, one_thread):
    target, draft = models
    pipe = Pipeline.from_models(target, None, draft)
    prompts = _prompts(6, seed=4)
    engine = pipe.batch_engine(max_batch_size=6, max_kv_tokens=3 * 60)  # three rows of 60 slots
    ids = [engine.submit(BatchRequest(p, 8, "pld")) for p in prompts]
    peak = 0
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
        peak = max(peak, engine.num_running)
    assert 1 <= peak < 6
    assert [out[i] for i in ids] == [pipe.generate(p, "pld", 8).token_ids for p in prompts]


def test_abort_and_errors_leave_at_once(models, one_thread):
    target, draft = models
    pipe = Pipeline.from_models(target, None, draft)
    engine = pipe.batch_engine(max_batch_size=4)
    with pytest.raises(ValueError, match="unknown method"):
        engine.submit(BatchRequest([1, 2], 4, "nope"))
    with pytest.raises(ValueError, match="context"):
        engine.submit(BatchRequest([1, 2], 10_000, "ar"))
    a = engine.submit(BatchRequest([1, 2, 3], 30, "sps"))
    b = engine.submit(BatchRequest([4, 5, 6], 30, "sps"))
    engine.step()
    engine.abort(a)
    events = engine.step()
    assert [(e.request_id, e.finished) for e in events if e.finished] == [(a, "abort")]
    assert engine.num_running == 1 and engine.target.rows_in_use() == 1
    engine.abort(b)
    engine.step()
    assert not engine.has_work() and engine.target.rows_in_use() == 0


def test_speculation_off_above_the_batch_threshold(models, one_thread):
    target, draft = models
    pipe = Pipeline.from_models(target, None, draft)
    prompts = _prompts(5, seed=5)
    engine = pipe.batch_engine(max_batch_size=5, spec_disable_batch_size=3)
    ids = [engine.submit(BatchRequest(p, 10, "sps")) for p in prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    drafting = []
    while engine.has_work():
        for ev in engine.step():
            out[ev.request_id] += ev.tokens
        drafting.append((engine.last_step.running, engine.last_step.drafting))
    assert (5, False) in drafting and all(d == (r <= 3) for r, d in drafting)
    assert [out[i] for i in ids] == [pipe.generate(p, "sps", 10).token_ids for p in prompts]


def test_stop_strings_in_generate_batch(models, one_thread):
    target, draft = models

    class Digits:  # a tokenizer whose text is the ids themselves
        eos_token_id = None
        clean_up_tokenization_spaces = False

        def decode(self, ids, skip_special_tokens=True):
            return "".join(f"<{i}>" for i in ids)

    pipe = Pipeline.from_models(target, Digits(), draft)
    prompt = _prompts(4, seed=3)[3]
    full = pipe.generate(prompt, "sps", 12).token_ids
    stop = f"<{full[4]}>"
    cut = full.index(full[4]) + 1
    (res,) = pipe.generate_batch([prompt], "sps", 12, stop=[stop])
    assert res.stats.stopped_by == "stop" and res.token_ids == full[:cut]
    assert res.text == "".join(f"<{i}>" for i in full[: cut - 1])
    # The statistics count the tokens returned, not the rest of the step that completed the stop
    # (a stop at each token in turn: some complete inside a step that accepted more drafts).
    for token in full[:8]:
        cut = full.index(token) + 1
        (res,) = pipe.generate_batch([prompt], "sps", 12, stop=[f"<{token}>"])
        stats = res.stats
        assert len(res.token_ids) == stats.new_tokens == cut
        assert stats.tokens_per_call == pytest.approx(cut / stats.target_calls) and stats.accepted_tokens <= cut - 1


def test_stats_cut_to_the_tokens_returned():
    from specdec.engine.stats import DecodeStats

    stats = DecodeStats(new_tokens=10, target_calls=4, accepted_tokens=6, wall_s=2.0, prefill_s=1.0, ttft_s=1.2,
                        decode_tokens_per_s=8 / 0.8, after_prefill_tokens_per_s=10.0)
    stats.cut_to(7)  # the last step's bonus token and two of its accepted drafts
    assert (stats.new_tokens, stats.accepted_tokens) == (7, 4)
    assert stats.tokens_per_call == 7 / 4 and stats.mean_accepted_per_call == 1.0 and stats.tokens_per_s == 3.5
    assert stats.decode_tokens_per_s == pytest.approx(5 / 0.8) and stats.after_prefill_tokens_per_s == 7.0
    assert stats.cut_to(9).new_tokens == 7  # never more than it has


# ---- sampling under batching (exact toy model) ------------------------------------------------
MIXED = [
    ("sps", SamplingConfig(temperature=1.0), {"gamma": 2}),
    ("specinfer", SamplingConfig(temperature=0.7, top_p=0.9), {"expansion": (2, 1)}),
    ("sequoia", SamplingConfig(temperature=1.0), {"budget": 4, "max_depth": 2}),
    ("pld", SamplingConfig(temperature=1.0, top_k=3), {"max_ngram": 2}),
]


def _toy_engine(**kw) -> tuple[MarkovLM, BatchEngine]:
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    draft = MarkovLM.random(V, seed=12, sharpness=1.5)
    return target, BatchEngine(target, [draft], **kw)


def _mixed_counts(n: int, seed: int) -> tuple[MarkovLM, dict[int, Counter]]:
    """n requests of every configuration in MIXED, interleaved in one continuous batch."""
    target, engine = _toy_engine(max_batch_size=48, spec_disable_batch_size=None)  # speculation at every size
    reqs = [BatchRequest(PROMPT, L, m, o, s, seed=seed * 100_000 + i) for i in range(n) for m, s, o in MIXED]
    outs = engine.run_all(reqs)
    counts: dict[int, Counter] = {c: Counter() for c in range(len(MIXED))}
    accepted = 0
    for i, (tokens, stats, finished) in enumerate(outs):
        counts[i % len(MIXED)][tuple(tokens)] += 1
        accepted += stats.accepted_tokens
        assert finished == "length"
    assert accepted > 0.2 * n, "drafts were rarely accepted: verification would not be exercised"
    return target, counts


def _pvalue(counts: Counter, expected: dict, n: int) -> float:
    try:
        return chi_square_pvalue(counts, expected, n)
    except AssertionError:  # an impossible sequence was generated
        return 0.0


def test_mixed_batches_keep_every_sequences_distribution(one_thread):
    """n = 700 per configuration, over 30, 9, 30 and 21 cells: power ≥ 0.99 at alpha = 1e-3 against any
    law at total variation ≥ 0.155, 0.129, 0.155 and 0.146 from the target's (chi-square divergence
    ≥ 0.096, 0.067, 0.096, 0.086): coarse, for what batching could add; the single-sequence tests
    (tests/engine/test_distribution.py, tests/methods/) detect 0.04–0.10. The residual mutation
    below diverges by 0.13–0.18 in every row that has a residual."""
    n = 700
    target, counts = _mixed_counts(n, seed=1)
    for c, (method, sampling, _) in enumerate(MIXED):
        expected = exact_continuations(target, sampling, None)
        assert detectable_effect(n, expected).tv < 0.16
        p = chi_square_pvalue(counts[c], expected, n)
        assert p > ALPHA, f"{method} at {sampling} in a mixed batch: p = {p:.2g}"


def test_mutation_residual_equals_target_fails_in_every_row_that_has_one(monkeypatch, one_thread):
    """The subtle bug (recovered token drawn from the target, not norm(max(0, target − draft))) in the
    chain, MSS and SWOR verifiers: chi-square divergence 0.13 (sps), 0.18 (SpecInfer) and 0.13
    (Sequoia) at n = 700, from 10 000 mutated batches: power ≥ 0.9997 in each row. `pld` has no
    residual and keeps its law."""
    for module in (chain, mss, swor):
        monkeypatch.setattr(module, "recovery_distribution", lambda t, d: t)
    n = 700
    target, counts = _mixed_counts(n, seed=1)
    ps = {method: chi_square_pvalue(counts[c], exact_continuations(target, sampling, None), n)
          for c, (method, sampling, _) in enumerate(MIXED)}
    assert max(ps["sps"], ps["specinfer"], ps["sequoia"]) < ALPHA, ps
    assert ps["pld"] > ALPHA


def test_a_leak_between_sequences_fails_the_chi_square(monkeypatch, one_thread):
    """Mutation: the target pass hands each sequence its neighbour's logits (a row mix-up)."""
    real = batch_module.run_calls

    def leaky(calls):
        outs = real(calls)
        # Rotate among calls of equal shape: what a wrong row index in a shared pass would do.
        by_size: dict[int, list[int]] = {}
        for i, c in enumerate(calls):
            by_size.setdefault(c.size, []).append(i)
        out = list(outs)
        for idx in by_size.values():
            for a, b in zip(idx, idx[1:] + idx[:1]):
                out[a] = outs[b]
        return out

    monkeypatch.setattr(batch_module, "run_calls", leaky)
    n = 300
    target, counts = _mixed_counts(n, seed=2)
    ps = [_pvalue(counts[c], exact_continuations(target, s, None), n) for c, (_, s, _) in enumerate(MIXED)]
    assert min(ps) < ALPHA


@pytest.mark.parametrize("leak", [False, True])
def test_seeded_requests_repeat_whatever_their_batch_mates(monkeypatch, leak, one_thread):
    """A seeded sampled request gives the same tokens alone and among different companions; sharing
    one generator between sequences (the mutation) breaks that."""
    if leak:
        shared = torch.Generator().manual_seed(0)
        monkeypatch.setattr(batch_module.torch, "Generator", lambda device=None: shared)
    sampling = SamplingConfig(temperature=1.0)
    probe = BatchRequest(PROMPT, 12, "sps", {"gamma": 2}, sampling, seed=1234)

    def run_with(companions: list[BatchRequest]) -> list[int]:
        _, engine = _toy_engine(max_batch_size=8)
        return engine.run_all([probe] + companions)[0][0]

    alone = run_with([])
    mates = [BatchRequest(PROMPT[:k], 12, m, o, SamplingConfig(temperature=0.8), seed=k) for k, (m, _, o) in
             zip(range(2, 8), MIXED * 2)] + [BatchRequest(PROMPT, 9, "ar", {}, sampling, seed=5)]
    outputs = [run_with(mates[:j]) for j in (1, 3, 7)]
    if leak:
        assert any(o != alone for o in outputs)
    else:
        assert all(o == alone for o in outputs)
