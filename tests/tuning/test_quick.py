"""The quick tune over every method and `auto` as the default: the cost model's estimates against
exact values and real runs, the whole tune on tiny models, auto's tune on first use (and only
then), and every kind of unusable profile giving a clear message and a re-tune."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specdec
import specdec.tuning.autotune as autotune
import specdec.tuning.quick as quick
from specdec.cli import main
from specdec.core.hardware import fingerprint
from specdec.core.sampling import SamplingConfig
from specdec.core.store import (
    ProfileProblem, begin_tune, find_profile, interrupted_tune, profile_path, save_profile, tune_marker,
)
from specdec.drafting.ngram import lookup_continuation, maxgram_continuation
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import Pipeline, register_tuner, registered_tuner
from specdec.methods.maxgram import MaxGramDrafter
from specdec.methods.registry import all_methods
from specdec.methods.pld import PromptLookupDrafter
from specdec.models.toy import MarkovLM
from specdec.tuning.costmodel import ChainSteps, Costs, chain_estimate, chain_row, interpolate_ms
from specdec.tuning.quick import QuickSettings, format_quick, quick_tune, run_acceptance
from specdec.tuning.replay import replay
from tests.conftest import tiny_lm

GREEDY = SamplingConfig()
SMALL = QuickSettings(target_ks=(1, 2, 4, 8), draft_ks=(1, 2, 4), context=16, num_prompts=2, gen_tokens=8,
                      ar_tokens=3, width=3, chain_depth=3)
PROMPTS = [list(range(5, 20)), list(range(30, 41))]


@pytest.fixture(autouse=True)
def _measurements(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path / "measurements"))


@pytest.fixture
def tuner_calls(monkeypatch):
    """auto may tune (small settings, no progress bar); the list records every tune's reason."""
    calls = []

    def tuner(pipe, sampling, reason):
        calls.append(reason)
        return autotune.tune_pipeline(pipe, sampling, reason, settings=SMALL, prompts=PROMPTS, progress=False)

    old = registered_tuner()
    register_tuner(tuner)
    monkeypatch.setenv("SPECDEC_AUTOTUNE", "1")
    yield calls
    if old is not None:
        register_tuner(old)


# ---- the cost model ----------------------------------------------------------------------------
def test_chain_estimate_by_hand():
    chain = ChainSteps(accept=[[1.0, 0.5, 0.5], [0.0, 1.0, 1.0]], confidence=[[0.9, 0.3, 0.9], [0.9, 0.9, 0.9]])
    est = chain_estimate(chain, 3)
    # step 1: 1 + 1 + 0.5 + 0.25; step 2: 1 + 0
    assert est.tokens == pytest.approx((2.75 + 1.0) / 2) and est.extends == 2 and est.drafted == 3
    assert est.catch_up == pytest.approx(1 + (0.25 + 0.0) / 2)  # the last draft, accepted and never run
    stopped = chain_estimate(chain, 3, stop_below=0.5)  # step 1 stops before its 2nd draft
    assert stopped.lengths == [1, 3] and stopped.tokens == pytest.approx((2.0 + 1.0) / 2)
    assert stopped.extends == pytest.approx((1 + 2) / 2)  # the stopped chain ran its draft to see the next q
    with pytest.raises(ValueError, match="chains of 3 tokens"):
        chain_estimate(chain, 4)
    costs = Costs({1: 10.0, 4: 16.0}, {1: 1.0, 2: 1.5}, 10.0, 0.5)
    row = chain_row("sps", "sps gamma=3", chain, costs, {"gamma": 3})
    assert row["expected_speedup"] == pytest.approx(est.tokens * 10.0 / (16.0 + row["draft_ms"] + 0.5))
    assert interpolate_ms({1: 10.0, 3: 14.0}, 2) == 12.0


def _context_free(vocab=5, seed=4, noise=0.8):
    gen = torch.Generator().manual_seed(seed)
    target_row = torch.randn(vocab, generator=gen, dtype=torch.float64)
    draft_row = target_row + noise * torch.randn(vocab, generator=gen, dtype=torch.float64)
    target = MarkovLM(target_row.expand(vocab, vocab, vocab).clone())
    draft = MarkovLM(draft_row.expand(vocab, vocab, vocab).clone())
    return target, draft, torch.softmax(target_row, -1), torch.softmax(draft_row, -1)


def test_measured_chains_give_the_exact_chain_law_on_a_context_free_toy(one_thread):
    """Same p and q everywhere: E[tokens per call] of sps is (1 - a^(g+1)) / (1 - a), a = sum min(p, q)."""
    target, draft, p, q = _context_free()
    alpha = float(torch.minimum(p, q).sum())
    settings = QuickSettings(num_prompts=2, gen_tokens=300, width=3, chain_depth=4)
    m, _, _ = run_acceptance(target, draft, [[0, 1], [2, 3]], SamplingConfig(temperature=1.0), settings, ())
    assert len(m.chain.accept) > 60
    for gamma in (1, 2, 4):
        exact = (1 - alpha ** (gamma + 1)) / (1 - alpha)
        assert chain_estimate(m.chain, gamma).tokens == pytest.approx(exact, rel=0.06)
    # at T = 0 a greedy chain on a context-free toy is accepted all the way or not at all
    g, _, _ = run_acceptance(target, draft, [[0, 1]], GREEDY, QuickSettings(num_prompts=1, gen_tokens=20,
                                                                            width=2, chain_depth=3), ())
    matches = int(p.argmax()) == int(q.argmax())
    assert chain_estimate(g.chain, 3).tokens == (4.0 if matches else 1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_replay_equals_the_real_deterministic_drafters(arch):
    """At T = 0 a replay on the AR text takes exactly the steps the real pld and maxgram take."""
    target = tiny_lm(arch, 0)
    prompt = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6]
    out, _ = SpeculativeDecoder(target).generate(prompt, 30)
    texts = [(len(prompt), torch.tensor(prompt + out))]
    for drafter, propose in [(PromptLookupDrafter(2, 1, 3), lambda ids: lookup_continuation(ids, 3, 2)),
                             (MaxGramDrafter(None, 3), lambda ids: maxgram_continuation(ids, 3, None))]:
        dec = SpeculativeDecoder(target, drafter, GREEDY)
        real = []
        for chunk in dec.stream(prompt, 30):
            real.append(len(chunk) - 1)
        steps = replay(texts, propose)
        assert [s.accepted for s in steps][: len(real)] == real[: len(steps)]
        assert len(steps) >= len(real) - 1  # the real run's last step may be cut by the length cap


# ---- the whole quick tune ----------------------------------------------------------------------
def test_quick_tune_prices_every_method_and_auto_follows_the_winner(monkeypatch):
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 0)  # the draft is the target: all accepted
    pipe = Pipeline.from_models(target, None, draft)
    key = pipe.profile_key(GREEDY)
    profile = quick_tune(target, draft, PROMPTS, GREEDY, key, settings=SMALL, progress=False)
    methods = {r["method"] for r in profile["candidates"]}
    # every method that declares tuning candidates is priced (a new one needs no edit here)
    assert methods == {name for name, m in all_methods().items() if m.tuning is not None}
    assert {"ar", "sps", "sequoia", "specinfer", "specexec", "csd", "pld", "pld-tree", "maxgram"} <= methods
    assert profile["winner"]["expected_speedup"] == max(r["expected_speedup"] for r in profile["candidates"])
    assert profile["fingerprint"] == fingerprint("cpu") and profile["key"] == key
    sps3 = next(r for r in profile["candidates"] if r["label"] == "sps gamma=3")
    assert sps3["tokens_per_call"] == pytest.approx(4.0)  # a perfect draft: the whole chain, every step
    assert "auto (greedy)" in format_quick(profile)
    save_profile(profile)
    prompt = list(range(10, 22))
    ref = pipe.generate(prompt, "ar", 16).token_ids
    assert pipe.generate(prompt, max_new_tokens=16).token_ids == ref  # auto is the default method
    # every candidate auto could pick is lossless: force each method's best row as the winner
    from specdec.methods.auto import drafter_for

    for method in sorted(methods):
        row = max((r for r in profile["candidates"] if r["method"] == method), key=lambda r: r["expected_speedup"])
        drafter = drafter_for(pipe.context(GREEDY), row)
        out, _ = SpeculativeDecoder(target, drafter, GREEDY).generate(prompt, 16)
        assert out == ref, row["label"]


def test_plain_decoding_wins_when_the_draft_is_too_slow(monkeypatch):
    monkeypatch.setattr(quick, "measure_costs", lambda *a, **k: ({k: 10.0 for k in (1, 2, 4, 8)},
                                                                 {k: 500.0 for k in (1, 2, 4)}))
    monkeypatch.setattr(quick, "measure_ar", lambda *a, **k: 10.0)
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 1)
    pipe = Pipeline.from_models(target, None, draft)
    profile = quick_tune(target, draft, PROMPTS, GREEDY, pipe.profile_key(GREEDY), settings=SMALL, progress=False)
    model_drafted = [r for r in profile["candidates"] if r["method"] in ("sps", "sequoia", "specinfer", "csd")]
    assert all(r["expected_speedup"] < 0.1 for r in model_drafted)
    # Plain decoding or a drafter without a draft model (prompt lookup, Max-Gram, suffix, Token Recycling).
    from specdec.methods.registry import get_method

    winner = profile["winner"]["method"]
    assert winner == "ar" or not get_method(winner).loads_draft_model, winner


# ---- auto: tuned on first use, once ------------------------------------------------------------
def test_auto_tunes_on_first_use_then_reuses_the_profile(tuner_calls, capsys):
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    pipe.autotune = True
    prompt = list(range(10, 22))
    ref = pipe.generate(prompt, "ar", 12).token_ids
    assert pipe.generate(prompt, max_new_tokens=12).token_ids == ref
    assert len(tuner_calls) == 1 and "no tune profile" in tuner_calls[0]
    err = capsys.readouterr().err
    assert "tuning this machine" in err and "auto (greedy):" in err and "expected" in err
    assert pipe.generate(prompt, max_new_tokens=12).token_ids == ref
    assert len(tuner_calls) == 1  # cached
    sampled = pipe.generate(prompt, max_new_tokens=12, sampling=SamplingConfig(temperature=0.8), seed=3)
    assert len(tuner_calls) == 2 and len(sampled.token_ids) == 12  # sampling has its own profile
    assert find_profile(pipe.profile_key(SamplingConfig(temperature=0.5)))["key"]["mode"] == "sampling"


@pytest.mark.parametrize("imported", ["from specdec.engine.pipeline import Pipeline", "from specdec import Pipeline"])
def test_auto_can_tune_however_the_pipeline_is_imported(imported):
    """The tuning layer registers its tuner; the pipeline imports it by name when it first needs one."""
    code = (f"{imported}\n"
            "from specdec.engine.pipeline import registered_tuner\n"
            "tuner = registered_tuner()\n"
            "print(f'{tuner.__module__}.{tuner.__name__}')\n")
    src = str(Path(specdec.__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "specdec.tuning.autotune.tune_pipeline"


def test_generate_batch_follows_auto_and_tunes_on_first_use_as_generate_does(tuner_calls):
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    pipe.autotune = True
    prompts = [list(range(10, 22)), list(range(30, 37))]
    outs = [r.token_ids for r in pipe.generate_batch(prompts, max_new_tokens=8)]  # auto, the default
    assert len(tuner_calls) == 1 and "no tune profile" in tuner_calls[0]
    assert outs == [pipe.generate(p, "ar", 8).token_ids for p in prompts]


def test_without_a_tuner_auto_reports_what_to_run(monkeypatch):
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    # Models passed as objects have no name a command could load: the pipeline is told to tune itself.
    with pytest.raises(ProfileProblem, match=re.escape("set `pipe.autotune = True` (auto then tunes on first use)")):
        pipe.generate([1, 2, 3], max_new_tokens=4)
    pipe.autotune = True  # a tuner may be registered, but SPECDEC_AUTOTUNE=0 (the tests' setting) turns it off
    with pytest.raises(ProfileProblem, match="no tune profile"):
        pipe.generate([1, 2, 3], max_new_tokens=4)


def _bad_profiles(pipe, key):
    """(name, how to plant it, the phrase its message must hold)."""
    path = profile_path(key)

    def other_machine():
        profile = quick_tune(pipe.target_lm, pipe.draft_lm, PROMPTS, GREEDY, key, settings=SMALL, progress=False)
        profile["fingerprint"] = {**profile["fingerprint"], "cpu": "Some Other CPU", "flags": ["amx_bf16"]}
        save_profile(profile)

    def interrupted():
        begin_tune(key)
        marker = tune_marker(key)
        marker.write_text(json.dumps({"pid": 2 ** 22 + 12345, "started": "2020-01-01 00:00:00"}))  # no such process

    def edited(winner, **extra):  # a good profile, hand-edited
        profile = quick_tune(pipe.target_lm, pipe.draft_lm, PROMPTS, GREEDY, key, settings=SMALL, progress=False)
        profile.update({"winner": winner or profile["winner"], **extra})
        save_profile(profile)

    return [
        ("corrupt", lambda: path.write_text("{half a profile"), "not a readable tune profile"),
        ("old", lambda: path.write_text(json.dumps({"version": 1, "key": key, "winner": {"method": "sequoia"}})),
         "older specdec"),
        ("not a profile", lambda: path.write_text(json.dumps([1, 2])), "not a tune profile"),
        ("other hardware", other_machine, "was tuned on Some Other CPU"),
        ("interrupted", interrupted, "was interrupted"),
        ("a method this version lacks", lambda: edited({"method": "nosuch", "label": "nosuch"}),
         "its winner 'nosuch' is not one this specdec can run"),
        ("options it refuses", lambda: edited({"method": "sps", "label": "sps", "options": {"gamma": -1}}),
         "its winner 'sps' is not one this specdec can run"),
        ("candidates that are not rows", lambda: edited(None, candidates="x"), "its candidates are not a list of rows"),
    ]


def test_unusable_profiles_give_a_clear_message_and_a_retune(tuner_calls, monkeypatch):
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    pipe.autotune = True
    key = pipe.profile_key(GREEDY)
    prompt = list(range(10, 22))
    ref = pipe.generate(prompt, "ar", 10).token_ids
    path = profile_path(key)
    for name, plant, phrase in _bad_profiles(pipe, key):
        path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        plant()
        monkeypatch.setenv("SPECDEC_AUTOTUNE", "0")
        with pytest.raises(ProfileProblem, match=phrase):  # without a tuner: the message, no crash
            pipe.generate(prompt, max_new_tokens=10)
        monkeypatch.setenv("SPECDEC_AUTOTUNE", "1")
        before = len(tuner_calls)
        assert pipe.generate(prompt, max_new_tokens=10).token_ids == ref, name
        assert len(tuner_calls) == before + 1 and phrase in tuner_calls[-1], name
        assert find_profile(key)["version"] == quick.PROFILE_VERSION  # replaced by a good one
        assert interrupted_tune(key) is None  # the finished tune removed its marker


def test_an_interrupted_tune_leaves_its_marker(tuner_calls, monkeypatch):
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    pipe.autotune = True

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(autotune, "quick_tune", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pipe.generate([1, 2, 3, 4], max_new_tokens=4)
    key = pipe.profile_key(GREEDY)
    assert tune_marker(key).is_file() and not profile_path(key).is_file()
    # this process is still alive, yet its own marker counts as interrupted
    assert "was interrupted" in (interrupted_tune(key) or "")


# ---- the command line --------------------------------------------------------------------------
def test_cli_tune_quick(monkeypatch, capsys):
    import specdec.cli.tune as cli_tune

    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    pipe.target_name, pipe.draft_name = "tiny-t", "tiny-d"
    monkeypatch.setattr(cli_tune, "load_pipeline", lambda args, need_draft, optional_draft=False: pipe)
    monkeypatch.setattr(autotune, "DEFAULT_SETTINGS", SMALL)
    monkeypatch.setattr(autotune, "tune_prompts", lambda pipe, texts=None: PROMPTS)
    assert main(["tune", "--quick", "--target", "tiny-t", "--draft", "tiny-d", "--num-prompts", "2",
                 "--gen-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "| candidate |" in captured.out and "auto (greedy):" in captured.out
    assert "saved" in captured.err
    assert find_profile(pipe.profile_key(GREEDY))["kind"] == "quick"
    assert main(["tune", "--quick", "--project-offload"]) == 2
    assert "--quick tunes this machine" in capsys.readouterr().err


def test_the_tunes_prices_match_what_each_methods_best_candidate_delivers(one_thread):
    """The tune's tokens per call for each method's best candidate against a real decode of the same
    prompts with that candidate (SmolLM2-like self-drafting: the draft is the target, so the positional
    vectors are one-hot at T = 0 and a positional price is easy to get wrong)."""
    from specdec.methods.auto import drafter_for
    from specdec.tuning.decoded import decode_run

    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 0)
    pipe = Pipeline.from_models(target, None, draft)
    settings = QuickSettings(target_ks=(1, 2, 4, 8, 16), draft_ks=(1, 2, 4), context=16, num_prompts=2,
                             gen_tokens=24, ar_tokens=3, width=3, chain_depth=4)
    profile = quick_tune(target, draft, PROMPTS, GREEDY, pipe.profile_key(GREEDY), settings=settings,
                         progress=False)
    texts = [(len(p), torch.tensor(p + out)) for p, out in
             ((p, SpeculativeDecoder(target).generate(p, settings.gen_tokens)[0]) for p in PROMPTS)]
    off = {}
    for method in sorted({r["method"] for r in profile["candidates"]} - {"ar"}):
        row = max((r for r in profile["candidates"] if r["method"] == method), key=lambda r: r["expected_speedup"])
        steps = decode_run(target, drafter_for(pipe.context(GREEDY), row), texts, GREEDY)
        if abs(steps.tokens_per_call - row["tokens_per_call"]) > 0.2 * steps.tokens_per_call:
            off[row["label"]] = (round(row["tokens_per_call"], 2), round(steps.tokens_per_call, 2))
    assert not off, f"priced vs delivered tokens per call: {off}"


def test_a_cached_forward_table_is_scaled_to_the_speed_measured_now(monkeypatch):
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 1)
    key = Pipeline.from_models(target, None, draft).profile_key(GREEDY)
    table = {"target": {1: 10.0, 2: 11.0, 4: 12.0, 8: 20.0}, "draft": {1: 4.0, 2: 5.0, 4: 8.0}}
    now = {"target": 10.0, "draft": 4.0}

    def fake_forward(model, ks, context, repeats, path=""):
        role = "target" if model is target else "draft"
        ms = {k: table[role][k] for k in ks} if len(ks) > 1 else {1: now[role]}
        return type("P", (), {"ms": ms})()

    monkeypatch.setattr(quick, "measure_forward", fake_forward)
    first = quick.measure_costs(target, draft, key, SMALL)  # measured and cached
    assert first == (table["target"], table["draft"])
    now.update(target=8.0, draft=6.0)  # a faster minute for the target, a slower one for the draft
    t_ms, d_ms = quick.measure_costs(target, draft, key, SMALL)
    assert t_ms == pytest.approx({1: 8.0, 2: 8.8, 4: 9.6, 8: 16.0})
    assert d_ms == pytest.approx({1: 6.0, 2: 7.5, 4: 12.0})


def test_the_acceptance_runs_overhead_leaves_out_its_own_records(monkeypatch):
    # Recording every step's acceptance is the tune's work, not the decoding loop's: making it slow
    # must not raise the per-call time every drafting candidate is charged.
    import time as time_mod

    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 1)
    _, base, _ = run_acceptance(target, draft, PROMPTS, GREEDY, SMALL, ())
    original = quick.chain_nodes

    def slow_chain_nodes(tree):
        time_mod.sleep(0.02)
        return original(tree)

    monkeypatch.setattr(quick, "chain_nodes", slow_chain_nodes)  # a step of the records
    _, slowed, _ = run_acceptance(target, draft, PROMPTS, GREEDY, SMALL, ())
    assert slowed < base + 10.0, (base, slowed)  # 20 ms per step of records, left out


def test_chains_and_replays_are_charged_their_own_rules_overhead_not_the_combs(monkeypatch):
    # The comb's per-call work (a tree walk) is made to look huge; chain, cascade and replay
    # candidates must be charged what one of their own drafts measured when decoded.
    real = quick.run_acceptance

    def slow_comb(*a, **k):
        m, per_call, block = real(*a, **k)
        return m, per_call + 1000.0, block

    monkeypatch.setattr(quick, "run_acceptance", slow_comb)
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 1)
    pipe = Pipeline.from_models(target, None, draft)
    profile = quick_tune(target, draft, PROMPTS, GREEDY, pipe.profile_key(GREEDY), settings=SMALL, progress=False)
    by_basis = {}
    for r in profile["candidates"]:
        by_basis.setdefault(r["basis"], []).append(r["overhead_ms"])
    assert min(by_basis["positional"]) >= 1000.0  # trees priced on the comb keep its figure
    for basis in ("measured chain", "replay"):
        assert max(by_basis[basis]) < 100.0, (basis, by_basis[basis])


def test_cli_tune_quick_without_a_draft_tunes_the_draft_free_methods(monkeypatch, capsys):
    """What an untuned `auto` on a target without a known draft says to run: it tunes (the methods
    that need no draft), rather than asking for a draft."""
    import specdec.cli.tune as cli_tune
    from specdec.methods.registry import get_method

    pipe = Pipeline.from_models(tiny_lm("llama", 0), None)
    pipe.target_name = "tiny-t"
    asked = {}

    def load(args, need_draft, optional_draft=False):
        asked["optional"] = optional_draft
        return pipe

    monkeypatch.setattr(cli_tune, "load_pipeline", load)
    monkeypatch.setattr(autotune, "DEFAULT_SETTINGS", SMALL)
    monkeypatch.setattr(autotune, "tune_prompts", lambda pipe, texts=None: PROMPTS)
    assert main(["tune", "--quick", "--target", "tiny-t", "--num-prompts", "2", "--gen-tokens", "8"]) == 0
    assert asked["optional"] is True
    profile = find_profile(pipe.profile_key(GREEDY))
    methods = {c["method"] for c in profile["candidates"]}
    assert "ar" in methods and len(methods) > 2 and not any(get_method(m).needs_draft_model for m in methods)


def test_candidates_this_version_cannot_run_are_left_out(tuner_calls, monkeypatch):
    """A profile of another version may list methods this one lacks: auto decodes with the rest (here
    plain decoding won, so auto's bandit reads every candidate), without a re-tune."""
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    key = pipe.profile_key(GREEDY)
    profile = quick_tune(pipe.target_lm, pipe.draft_lm, PROMPTS, GREEDY, key, settings=SMALL, progress=False)
    ar = next(r for r in profile["candidates"] if r["method"] == "ar")
    best = next(r for r in profile["candidates"] if r["method"] != "ar")
    gone = {**best, "method": "gone-method", "label": "gone-method", "expected_speedup": 9.0}
    save_profile({**profile, "winner": ar, "candidates": [gone, *profile["candidates"]]})
    monkeypatch.setenv("SPECDEC_AUTOTUNE", "0")
    prompt = list(range(10, 22))
    assert pipe.generate(prompt, max_new_tokens=10).token_ids == pipe.generate(prompt, "ar", 10).token_ids
    assert not tuner_calls

