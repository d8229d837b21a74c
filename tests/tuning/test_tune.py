"""`specdec tune`: the whole pipeline on tiny models, the profile file and its use by --tree auto and
--method auto, the acceptance estimator against exact values, the cost model, the offload projection
and offloading itself (on the CPU, as a stand-in for the GPU)."""

import json
import re

import pytest
import torch

import specdec.cli.tune as cli_tune
import specdec.tuning.choice as choice_mod
from specdec.cli import main
from specdec.core.sampling import SamplingConfig
from specdec.core.store import PROFILE_VERSION, find_profile, profile_key, profile_path, read_profile, save_profile
from specdec.core.tree import paths_to_parents
from specdec.drafting.sequoia_dp import sequoia_dp, tree_value
from specdec.engine.pipeline import Pipeline
from specdec.models.dense.offload import offload_target
from specdec.models.toy import MarkovLM
from specdec.tuning.acceptance import measure_acceptance
from specdec.tuning.choice import candidate_table, draft_ms_of_tree, format_candidates, interpolate_ms, tune
from specdec.tuning.projection import project_offload
from specdec.verify.swor import swor_node
from tests.conftest import tiny_lm
from tests.methods.test_sequoia import swor_draws

GREEDY = SamplingConfig()
PROMPTS = [list(range(5, 20)), list(range(30, 41))]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path / "measurements"))


def _check_profile(profile, sizes, max_depth, width):
    assert profile["version"] == PROFILE_VERSION
    acc = profile["acceptance"]
    assert len(acc["topk"]) == width and 0 <= sum(acc["topk"]) <= 1 + 1e-9 and acc["iterations"] > 0
    rows = profile["candidates"]
    assert rows[0]["method"] == "ar" and rows[0]["expected_speedup"] == 1.0
    assert {r["size"] for r in rows[1:]} <= set(sizes)
    winner = profile["winner"]
    assert winner["expected_speedup"] == max(r["expected_speedup"] for r in rows)
    if winner["method"] == "sequoia":
        paths = [tuple(p) for p in winner["paths"]]
        paths_to_parents(paths)  # a valid, ancestor-closed tree
        assert len(set(paths)) == winner["size"] and max(map(len, paths)) <= winner["depth"] <= max_depth
        vector = acc["swor"] if winner["mode"] == "swor" else acc["topk"]
        assert tree_value(paths, vector) == pytest.approx(winner["tokens_per_call"])


def test_tune_on_tiny_models_writes_a_valid_profile():
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 1)
    key = profile_key("tiny-target", "tiny-draft", "cpu", "float32", 0.0)
    profile = tune(target, draft, PROMPTS, GREEDY, key, sizes=[1, 2, 4, 8], max_depth=4, width=4, gen_tokens=8,
                   measure_tokens=8, repeats=1, context=16)
    path = save_profile(profile)
    assert path == profile_path(key) and path.parent.name == "profiles"
    saved = read_profile(path)
    assert saved["key"] == key and set(saved["timing"]["target_ms"]) >= {"1", "2", "3", "5", "9"}
    _check_profile(saved, [1, 2, 4, 8], 4, 4)
    assert "winner" in format_candidates(saved)


@pytest.mark.parametrize("dtype,draft,draft_dtype,expect", [
    ("float32", None, "", {"dtype": "float32"}),
    ("float32-weights-native-dense", None, "", {"weights": "native"}),
    ("float32-weights-native-native", "d", "native-Q4_0+vocab32768",
     {"weights": "native", "draft_weights": "native", "draft_quant": "Q4_0", "draft_vocab": 32768}),
    ("bfloat16-weights-dense-native", "d", "native", {"dtype": "bfloat16", "draft_quant": "file", "draft_vocab": 0}),
    ("float32", "d", "int8+vocab4096", {"draft_dtype": "int8", "draft_vocab": 4096}),
])
def test_the_suggested_tune_command_is_one_the_cli_takes(dtype, draft, draft_dtype, expect):
    """A missing profile's message names a `specdec tune` whose flags parse and say what the key says."""
    import shlex

    from specdec.cli import build_parser
    from specdec.core.store import ProfileProblem, tune_command

    key = profile_key("t", draft, "cpu", dtype, 0.7, draft_dtype)
    command = tune_command(key)
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.target == "t" and args.temperature == 0.7 and args.quick
    assert (args.draft == [draft] if isinstance(args.draft, list) else args.draft == draft) if draft else not args.draft
    for name, value in expect.items():
        got = getattr(args, name)
        assert (int(got) if name == "draft_vocab" else got) == value, (name, command)
    with pytest.raises(ProfileProblem) as problem:
        find_profile(key)
    assert problem.value.command == command and command in str(problem.value)


def _flat_costs(draft_ms_per_token):
    """Synthetic timings: a target pass costs 10 ms whatever the block, the draft a fixed ms per token."""
    def measure(target, draft, ks, repeats=2, context=200):
        return {k: 10.0 for k in ks}, {k: draft_ms_per_token * k for k in ks}
    return measure


def test_tuned_tree_is_used_by_tree_auto_and_method_auto(monkeypatch):
    monkeypatch.setattr(choice_mod, "measure_costs", _flat_costs(0.01))  # speculation is almost free here
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 0)  # the draft is the target: everything accepted
    pipe = Pipeline.from_models(target, None, draft)
    key = pipe.profile_key(GREEDY)
    assert key == profile_key("custom", "custom", "cpu", "float32", 0.0)
    profile = tune(target, draft, PROMPTS, GREEDY, key, sizes=[2, 4, 8], max_depth=4, width=3, gen_tokens=8,
                   measure_tokens=8)
    _check_profile(profile, [2, 4, 8], 4, 3)
    winner = profile["winner"]
    assert winner["method"] == "sequoia" and winner["size"] >= 4 and winner["depth"] == 4
    assert winner["tokens_per_call"] == pytest.approx(5.0)  # the full chain of 4 is always accepted
    assert winner["measured_tokens_per_call"] > 3 and winner["measured_speedup"] > 0
    save_profile(profile)
    assert find_profile(pipe.profile_key(GREEDY))["winner"] == winner
    prompt = list(range(10, 22))
    ref = pipe.generate(prompt, "ar", 20).token_ids
    for method, opts in [("sequoia", {"tree": "auto"}), ("auto", {}), ("sequoia", {"accept": "auto", "budget": 6}),
                         ("sequoia", {"tree": str(profile_path(key))})]:
        res = pipe.generate(prompt, method, 20, **opts)
        assert res.token_ids == ref and res.stats.draft_tokens > 0, (method, opts)
    with pytest.raises(ValueError, match="no tune profile"):  # tuned for T=0 only
        pipe.generate(prompt, "auto", 20, sampling=SamplingConfig(temperature=0.5))


def test_no_speculation_wins_when_drafting_is_too_slow(monkeypatch):
    monkeypatch.setattr(choice_mod, "measure_costs", _flat_costs(50.0))  # a draft token costs 5 target passes
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 0)
    pipe = Pipeline.from_models(target, None, draft)
    profile = tune(target, draft, PROMPTS, GREEDY, pipe.profile_key(GREEDY), sizes=[2, 4], max_depth=2,
                   width=2, gen_tokens=6)
    assert profile["winner"]["method"] == "ar" and profile["winner"]["measured_speedup"] is None
    save_profile(profile)
    prompt = list(range(10, 22))
    res = pipe.generate(prompt, "auto", 12)
    assert res.token_ids == pipe.generate(prompt, "ar", 12).token_ids and res.stats.draft_tokens == 0
    with pytest.raises(ValueError, match=r"'ar \(no speculation\)': no tree was faster than plain decoding"):
        pipe.generate(prompt, "sequoia", 12, tree="auto")
    profile["winner"] = {**profile["winner"], "method": "pld", "label": "pld gamma=3"}  # a winner that is no tree
    save_profile(profile)
    with pytest.raises(ValueError, match="'pld gamma=3': not a Sequoia tree; use --method auto"):
        pipe.generate(prompt, "sequoia", 12, tree="auto")


def test_acceptance_estimates_equal_exact_values_on_a_context_free_toy(one_thread):
    vocab, width = 5, 3
    gen = torch.Generator().manual_seed(4)
    target_row = torch.randn(vocab, generator=gen, dtype=torch.float64)
    draft_row = target_row + 0.8 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    target = MarkovLM(target_row.expand(vocab, vocab, vocab).clone())
    draft = MarkovLM(draft_row.expand(vocab, vocab, vocab).clone())
    p, q = torch.softmax(target_row, -1), torch.softmax(draft_row, -1)
    exact_swor = torch.zeros(width, dtype=torch.float64)
    for draws, prob in swor_draws(q, width):
        a, _ = swor_node(p, torch.tensor(draws), q)
        exact_swor += prob * a * torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - a, 0)[:-1]])
    acc = measure_acceptance(target, draft, [[0, 1], [2, 3]], SamplingConfig(temperature=1.0), width, gen_tokens=300)
    # Top-k children: the same p and q at every step, so the estimate is exact.
    assert acc.topk == pytest.approx(p[torch.topk(q, width).indices].tolist(), abs=1e-9)
    # SWOR: an average over the random draws of each step.
    assert acc.iterations > 250
    assert acc.swor == pytest.approx(exact_swor.tolist(), abs=0.05)
    greedy = measure_acceptance(target, draft, [[0, 1]], GREEDY, width, gen_tokens=10)
    assert greedy.swor is None and greedy.topk == [float(r == int(p.argmax())) for r in torch.topk(q, width).indices]


def test_cost_model():
    ms = {1: 10.0, 3: 14.0, 5: 30.0}
    assert [interpolate_ms(ms, k) for k in (1, 2, 3, 4, 5, 7)] == [10.0, 12.0, 14.0, 22.0, 30.0, 46.0]
    draft_ms = {1: 1.0, 2: 1.5, 4: 2.5}
    # A root with children (0,) and (1,), then (0, 0) and (0, 0, 0): levels expand 1 and 1 node.
    paths = [(0,), (1,), (0, 0), (0, 0, 0)]
    assert draft_ms_of_tree(paths, draft_ms, unseen_tokens=2.0) == 1.5 + 1.0 + 1.0
    dp = sequoia_dp([0.5, 0.2], 4, 3)
    rows = candidate_table({"greedy": dp}, {1: 10.0, 3: 12.0, 5: 16.0}, draft_ms, [2, 4], 3)
    for r in rows[1:]:
        assert r["expected_speedup"] == pytest.approx(r["tokens_per_call"] * 10.0 / (r["target_ms"] + r["draft_ms"]))
    assert {(r["size"], r["depth"]) for r in rows[1:]} == {(2, 1), (2, 2), (4, 2), (4, 3)}  # (4, 1) needs 4 children


def _synthetic_profile(topk, swor=None):
    return {"version": PROFILE_VERSION, "key": profile_key("big", "small", "cpu", "float32", 0.0 if swor is None else 0.7),
            "acceptance": {"topk": topk, "swor": swor, "iterations": 100}, "winner": {"method": "ar"}}


def test_offload_projection_arithmetic_and_labels(tmp_path, capsys):
    profile = _synthetic_profile([1.0, 0.0])  # a perfect draft: the best tree is a chain (plus useless leaves)
    proj = project_offload(profile, bandwidth_gbs=20, target_params=10e9, bytes_per_param=2, draft_ms_per_level=10,
                           gpu_tflops=100, sizes=[4, 16], max_depth=8)
    transfer = 10e9 * 2 / 20e9  # 1 s per pass
    assert proj["ar_s_per_token"] == pytest.approx(transfer + 2 * 10e9 / 100e12)
    (rows,) = proj["methods"].values()
    assert [(r["size"], r["depth"], r["tokens_per_call"]) for r in rows] == [(4, 4, 5.0), (16, 8, 9.0)]
    step = transfer + 2 * 10e9 * 17 / 100e12 + 8 * 0.010
    assert rows[1]["speedup"] == pytest.approx(9.0 / step * proj["ar_s_per_token"])
    with pytest.raises(ValueError, match="bandwidth"):
        project_offload(profile, 0, 1e9)
    sampled = _synthetic_profile([0.3, 0.1], swor=[0.5, 0.2])
    assert len(project_offload(sampled, 25, 70e9, sizes=[16])["methods"]) == 2  # Sequoia and SpecExec rows
    path = tmp_path / "p.json"
    path.write_text(json.dumps(sampled))
    assert main(["tune", "--project-offload", "--profile", str(path), "--project-sizes", "16,64"]) == 0
    out = capsys.readouterr().out
    assert "PROJECTION — not a measurement" in out and "Published figures" in out and "9.96x" in out
    assert main(["tune", "--profile", str(path)]) == 2
    assert "only read with --project-offload" in capsys.readouterr().err


def test_profile_errors(tmp_path):
    with pytest.raises(ValueError, match="no tune profile"):
        read_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tune profile"):
        read_profile(bad)
    bad.write_text(json.dumps({"version": 1, "winner": {"method": "ar"}}))
    with pytest.raises(ValueError, match="older specdec"):
        read_profile(bad)
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    with pytest.raises(ValueError, match=re.escape("`pipe.autotune = True`")):
        find_profile(pipe.profile_key(GREEDY))


def test_offloaded_target_gives_the_same_logits():
    """accelerate's hooks around our tree-attention forward; the CPU stands in for the GPU here."""
    plain, offloaded = tiny_lm("llama", 2), tiny_lm("llama", 2)
    offload_target(offloaded, "cpu", allow_cpu=True)
    assert offloaded.offloaded and next(offloaded.model.parameters()).device.type == "meta"  # weights live in the map
    for lm in (plain, offloaded):
        lm.reset(64)
    ids, parents = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, 0, 0, 1, 2])
    torch.testing.assert_close(offloaded.forward(ids, parents), plain.forward(ids, parents))
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 0))
    with pytest.raises(ValueError, match="nothing to offload.*--project-offload"):
        offload_target(pipe.target_lm, pipe.device)
    assert not getattr(pipe.target_lm, "offloaded", False)  # a refused offload leaves the model as it was
    # A pipeline refuses it before it looks for the model, whatever weights `auto` would have chosen.
    with pytest.raises(ValueError, match="nothing to offload"):
        Pipeline("no-such-model-xyz", device="cpu", offload=True)
    # Offloading is a property of the loaded target (`Pipeline(offload=True)`), no longer a method option.
    with pytest.raises(ValueError, match="no option 'offload'"):
        pipe.generate([1, 2, 3], "specexec", 4, offload=True)


# ---- the command line ----------------------------------------------------------------------------
def test_cli_tune_runs_end_to_end(monkeypatch, capsys):
    """`specdec tune` as typed, with the model loading swapped for tiny models (no download)."""
    pipe = Pipeline.from_models(tiny_lm("llama", 0), None, tiny_lm("llama", 1))
    pipe.target_name, pipe.draft_name = "tiny-t", ["tiny-d"]
    monkeypatch.setattr(cli_tune, "load_pipeline", lambda args, need_draft: pipe)
    monkeypatch.setattr(cli_tune, "load_tune_prompts", lambda args, pipe: PROMPTS[: args.num_prompts])
    argv = ["tune", "--target", "tiny-t", "--draft", "tiny-d", "--sizes", "1,2,4", "--max-depth", "3", "--width", "2",
            "--num-prompts", "1", "--gen-tokens", "6", "--measure-tokens", "6", "--repeats", "1", "--temperature", "0.8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plain decoding (no speculation)" in out and "mode swor" in out and "winner:" in out and "swor [" in out
    profile = read_profile(profile_path(profile_key("tiny-t", "tiny-d", "cpu", "float32", 0.8)))
    _check_profile(profile, [1, 2, 4], 3, 2)
    assert profile["sampling"]["temperature"] == 0.8 and len(profile["acceptance"]["swor"]) == 2
    # The projection reuses the saved acceptance instead of measuring again.
    assert main([*argv, "--project-offload", "--target-params", "7e9", "--project-sizes", "8,32"]) == 0
    captured = capsys.readouterr()
    assert "using the acceptance measured in" in captured.err and "PROJECTION" in captured.out
    assert main(["tune", "--target", "tiny-t", "--draft", "a", "--draft", "b"]) == 2
    assert "one draft model" in capsys.readouterr().err


def test_cli_tune_prompts_come_from_the_file_or_the_built_in_list(tmp_path):
    """--prompts reads a bench prompt file (first turns, file order); --num-prompts keeps the first N."""
    import argparse

    from specdec.tuning.choice import TUNE_PROMPTS

    class Encoder:
        def encode(self, text):
            return [len(text)]

    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "task": "t", "turns": [t, "later"]})
                              for i, t in enumerate(["a", "bb", "ccc"])))
    args = argparse.Namespace(prompts=str(path), num_prompts=2)
    assert cli_tune.load_tune_prompts(args, Encoder()) == [[1], [2]]
    args = argparse.Namespace(prompts=None, num_prompts=100)
    assert cli_tune.load_tune_prompts(args, Encoder()) == [[len(t)] for t in TUNE_PROMPTS]
    with pytest.raises(ValueError, match="--num-prompts must be a positive integer"):
        cli_tune.load_tune_prompts(argparse.Namespace(prompts=None, num_prompts=0), Encoder())
