"""`specdec bench`: prompt files, the run loop, resume, summary math, the CLI's errors (no real model)."""

import json
import math

import pytest

from specdec import bench
from specdec.bench import (
    BenchSettings,
    load_prompts,
    load_results,
    parse_methods,
    render_summary,
    run_bench,
    select_prompts,
    summarize,
)
from specdec.cli import main
from specdec.pipeline import METHODS, MethodInfo, Pipeline
from tests.conftest import TINY_VOCAB, tiny_lm


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _prompt_line(pid, task, text="hello hello world", turns=None):
    return json.dumps({"id": pid, "task": task, "turns": turns if turns is not None else [text]})


def encode(text: str) -> list[int]:
    """A deterministic stand-in for a tokenizer: bytes folded into the tiny vocabulary."""
    return [3 + b % (TINY_VOCAB - 3) for b in text.encode()][:24]


@pytest.fixture(scope="module")
def tiny_pipe():
    return Pipeline.from_models(tiny_lm("llama", seed=0), None, tiny_lm("llama", seed=1), eos_token_ids=[])


# ---- prompt files --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "line 2: invalid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        (json.dumps({"task": "qa", "turns": ["x"]}), "line 2: missing or empty 'id'"),
        (json.dumps({"id": "b", "turns": ["x"]}), "line 2: missing or empty 'task'"),
        (json.dumps({"id": "b", "task": "qa"}), "line 2: 'turns' must be a non-empty list"),
        (json.dumps({"id": "b", "task": "qa", "turns": []}), "line 2: 'turns' must be a non-empty list"),
        (json.dumps({"id": "b", "task": "qa", "turns": [""]}), "line 2: the first turn must be a non-empty"),
        (_prompt_line("a", "qa"), "line 2: duplicate id 'a' \\(first on line 1\\)"),
    ],
)
def test_prompt_file_errors_name_the_line(tmp_path, bad_line, message):
    path = _write(tmp_path / "p.jsonl", [_prompt_line("a", "qa"), bad_line, _prompt_line("c", "qa")])
    with pytest.raises(ValueError, match="p.jsonl " + message):
        load_prompts(path)


def test_missing_and_empty_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_prompt_fields_and_blank_lines(tmp_path):
    path = _write(tmp_path / "p.jsonl", [_prompt_line(7, "mt", turns=["first", "second"]), "", _prompt_line("b", "qa")])
    first, second = load_prompts(path)
    assert (first.id, first.task, first.text, first.line, first.turns) == ("7", "mt", "first", 1, 2)
    assert second.line == 3


def test_per_task_selection_is_deterministic_and_tasks_filter(tmp_path):
    lines = [_prompt_line(f"{t}-{i}", t) for i in range(4) for t in ("qa", "math", "rag")]
    prompts = load_prompts(_write(tmp_path / "p.jsonl", lines))
    chosen = select_prompts(prompts, per_task=2)
    assert [p.id for p in chosen] == ["qa-0", "math-0", "rag-0", "qa-1", "math-1", "rag-1"]
    assert chosen == select_prompts(list(prompts), per_task=2)
    assert [p.id for p in select_prompts(prompts, tasks=["rag"], per_task=1)] == ["rag-0"]
    with pytest.raises(ValueError, match="unknown task 'nope'; the prompt file has: qa, math, rag"):
        select_prompts(prompts, tasks=["nope"])
    with pytest.raises(ValueError, match="per-task"):
        select_prompts(prompts, per_task=0)


def test_methods_are_validated_and_ordered():
    assert parse_methods("pld,sps") == ["ar", "pld", "sps"]
    assert parse_methods("hf-pld,sps,ar") == ["ar", "sps", "hf-ar", "hf-pld"]
    assert parse_methods("hf") == ["ar"] + list(bench.HF_PEERS)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from: ar, sps, pld, .*hf-ar, hf-assisted"):
        parse_methods("ar,nope")
    with pytest.raises(ValueError, match="temperature"):
        BenchSettings(methods=["ar"], temperatures=[-1.0])
    with pytest.raises(ValueError, match="cannot be passed"):
        BenchSettings(methods=["ar"], opts={"seed": 3})
    assert bench.parse_opts(["budget=16", "mode=fast", "w-x=[1, 2]"]) == {"budget": 16, "mode": "fast", "w_x": [1, 2]}
    assert bench.prompt_seed("a", 0) == bench.prompt_seed("a", 0) != bench.prompt_seed("a", 1)


# ---- a whole run on tiny models ------------------------------------------------------------
def test_tiny_run_writes_results_resumes_and_tolerates_truncation(tmp_path, tiny_pipe, capsys):
    prompts = load_prompts(_write(tmp_path / "p.jsonl", [
        _prompt_line("qa-1", "qa", "the cat sat on the mat, the cat sat"),
        _prompt_line("math-1", "math", "1 + 1 = 2, 2 + 2 = 4, 1 + 1 ="),
        _prompt_line("qa-2", "qa", "abc abc abc"),
    ]))
    settings = BenchSettings(
        methods=parse_methods("sps,pld,hf-assisted,hf-assisted-tuned,hf-pld"),
        temperatures=[0.0, 0.7], max_new_tokens=8, gamma=3,
    )
    out = tmp_path / "out"
    rep = run_bench(tiny_pipe, prompts, out, settings, encode=encode, progress=False, plots=True, command="specdec bench X")
    n_methods = len(settings.methods)
    assert n_methods == 7 and rep.ran == 3 * 2 * n_methods and rep.skipped == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == rep.ran
    # AR first for every prompt and temperature, then the others
    assert [r["method"] for r in rows[:n_methods]] == settings.methods
    for r in rows:
        assert {"id", "task", "method", "temperature", "repeat", "seed", "text", "token_ids", "stats",
                "output_equals_ar"} <= set(r)
        assert r["stats"]["new_tokens"] == len(r["token_ids"]) == 8
        if r["temperature"] == 0:
            assert r["output_equals_ar"] is True, r["method"]  # lossless (and HF agrees on tiny models)
            assert r["seed"] is None
        else:
            assert r["output_equals_ar"] is None and r["seed"] == bench.prompt_seed(r["id"], 0)
        if r["method"].startswith("hf-"):
            assert r["stats"]["target_calls"] is None and r["stats"]["tokens_per_s"] > 0
    tuned = next(r for r in rows if r["method"] == "hf-assisted-tuned")
    assert tuned["hf_settings"] == {"num_assistant_tokens": 3, "num_assistant_tokens_schedule": "constant"}
    md = (out / "summary.md").read_text()
    assert "specdec bench X" in md and "## T = 0 (greedy)" in md and "## T = 0.7 (sampling)" in md
    assert "| `sps` | 3 |" in md and "against `hf-ar`" in md
    assert rep.summary.greedy_mismatches() == 0 and rep.summary.greedy_mismatches(hf=True) == 0
    if rep.plots:  # matplotlib installed (the bench extra)
        assert {p.name for p in rep.plots} == {"speedup_T0.png", "speedup_T0.7.png", "acceptance_by_position.png"}
    assert sum("[" in line and "tokens/s" in line for line in (out / "bench.log").read_text().splitlines()) == rep.ran

    # re-run: everything is already there
    before = (out / "results.jsonl").read_bytes()
    rep2 = run_bench(tiny_pipe, prompts, out, settings, encode=encode, progress=False, plots=False)
    assert rep2.ran == 0 and rep2.skipped == rep.ran and (out / "results.jsonl").read_bytes() == before

    # a run killed mid-write leaves a partial last line: it is set aside and that row measured again
    (out / "results.jsonl").write_bytes(before[: before.rindex(b"\n", 0, len(before) - 1) + 25])
    capsys.readouterr()
    rep3 = run_bench(tiny_pipe, prompts, out, settings, encode=encode, progress=False, plots=False)
    assert rep3.ran == 1
    assert f"results.jsonl line {rep.ran} was incomplete" in capsys.readouterr().err
    assert (out / "results.jsonl.truncated").exists()
    assert len(load_results(out / "results.jsonl").rows) == rep.ran
    assert load_results(out / "results.jsonl").truncated_at is None

    # other settings in the same directory are refused, nothing written
    with pytest.raises(ValueError, match="max_new_tokens=8 \\(now 9\\)"):
        run_bench(tiny_pipe, prompts, out, BenchSettings(methods=["ar"], max_new_tokens=9), encode=encode,
                  progress=False)
    assert len(load_results(out / "results.jsonl").rows) == rep.ran


def test_failure_mid_run_keeps_rows_and_resume_finishes(tmp_path, tiny_pipe, monkeypatch):
    prompts = load_prompts(_write(tmp_path / "p.jsonl", [_prompt_line(f"t-{i}", "t", f"x{i} y z") for i in range(3)]))
    settings = BenchSettings(methods=["ar", "pld"], max_new_tokens=4)
    calls = {"n": 0}
    real = Pipeline.generate

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 + 3:  # 2 warm-ups, then the third timed row
            raise RuntimeError("boom")
        return real(self, *a, **kw)

    monkeypatch.setattr(Pipeline, "generate", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=False, plots=False)
    assert len(load_results(tmp_path / "o" / "results.jsonl").rows) == 2
    assert not (tmp_path / "o" / ".lock").exists()
    monkeypatch.setattr(Pipeline, "generate", real)
    rep = run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=False, plots=False)
    assert rep.ran == 4 and len(rep.rows) == 6 and rep.summary.greedy_mismatches() == 0


def test_new_methods_and_unknown_options_go_through(tmp_path, tiny_pipe, monkeypatch):
    seen = []

    def make(pipe, sampling, opts):
        seen.append(dict(opts))
        return None

    monkeypatch.setitem(METHODS, "fancy", MethodInfo("fancy", False, "a method added later", make))
    prompts = load_prompts(_write(tmp_path / "p.jsonl", [_prompt_line("a", "qa")]))
    settings = BenchSettings(methods=parse_methods("fancy"), max_new_tokens=3, opts={"budget": 16, "max_ngram": 2})
    rep = run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=False, plots=False)
    assert [r["method"] for r in rep.rows] == ["ar", "fancy"]
    assert seen and all(o == {"budget": 16, "max_ngram": 2} for o in seen)
    assert "| `fancy` |" in rep.summary_md


def test_variants_run_one_method_with_their_own_options(tmp_path, tiny_pipe, monkeypatch):
    seen = []

    def make(pipe, sampling, opts):
        seen.append(dict(opts))
        return None

    monkeypatch.setitem(METHODS, "fancy", MethodInfo("fancy", False, "a method added later", make))
    variants = bench.parse_variants(["f-a=fancy expansion=2,2,1", "f-b=fancy expansion=1 budget=8"])
    assert variants == {"f-a": ("fancy", {"expansion": "2,2,1"}), "f-b": ("fancy", {"expansion": 1, "budget": 8})}
    prompts = load_prompts(_write(tmp_path / "p.jsonl", [_prompt_line("a", "qa")]))
    settings = BenchSettings(methods=parse_methods("f-a,f-b", variants), variants=variants, max_new_tokens=3,
                             opts={"budget": 16})
    rep = run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=False, plots=False)
    assert [r["method"] for r in rep.rows] == ["ar", "f-a", "f-b"]
    # warm-up and timed run each build a drafter; the variant's options win over the global ones
    assert {"budget": 16, "expansion": "2,2,1"} in seen and {"budget": 8, "expansion": 1} in seen
    assert "| `f-b` |" in rep.summary_md
    for bad in ["nolabel", "x=nope", "x=ar", "sps=fancy", "x=fancy gamma=3"]:
        with pytest.raises(ValueError):
            bench.parse_variants([bad])
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("f-c", variants)


# ---- summary math --------------------------------------------------------------------------
def _row(pid, task, method, tps, t=0.0, rep=0, equal=True, **stats):
    base = {"new_tokens": 10, "target_calls": 10, "draft_tokens": 0, "accepted_tokens": 0,
            "accepted_per_position": [], "tokens_per_s": tps}
    if method == "sps":
        base["draft_tokens"] = 12
    base.update(stats)
    return {"id": pid, "task": task, "method": method, "temperature": t, "repeat": rep,
            "output_equals_ar": equal if t == 0 else None, "token_ids": [], "stats": base}


def test_summary_is_geometric_mean_of_per_prompt_ratios():
    rows = [
        _row("a", "qa", "ar", 10.0), _row("a", "qa", "sps", 20.0, target_calls=4, accepted_tokens=6,
                                          accepted_per_position=[1.0, 0.5]),
        _row("b", "qa", "ar", 40.0), _row("b", "qa", "sps", 20.0, target_calls=6, accepted_tokens=4,
                                          accepted_per_position=[0.5], swi=0.25, equal=False),
        _row("c", "math", "ar", 10.0), _row("c", "math", "sps", 30.0, target_calls=5, accepted_tokens=5,
                                            accepted_per_position=[0.0, 0.0], swi=0.75),
        _row("a", "qa", "hf-ar", 5.0), _row("a", "qa", "hf-pld", 20.0, target_calls=None, accepted_tokens=None),
        _row("a", "qa", "ar", 10.0, t=0.7), _row("a", "qa", "sps", 15.0, t=0.7),
    ]
    s = summarize(rows)
    sps = s.table[("sps", 0.0)]
    assert sps.speedup["qa"] == pytest.approx(1.0)  # sqrt(2 * 0.5)
    assert sps.speedup["math"] == pytest.approx(3.0)
    assert sps.speedup["all"] == pytest.approx((2 * 0.5 * 3) ** (1 / 3))
    assert sps.tokens_per_call == pytest.approx(30 / 15) and sps.accepted_per_call == pytest.approx(15 / 15)
    assert sps.acceptance_by_position == pytest.approx([0.5, 0.25])
    assert sps.swi == pytest.approx(0.5)
    assert (sps.mismatches, sps.compared) == (1, 3)
    ar = s.table[("ar", 0.0)]
    assert ar.speedup["all"] == pytest.approx(1.0) and ar.accepted_per_call is None and ar.mismatches is None
    hf = s.table[("hf-pld", 0.0)]
    assert hf.speedup["all"] == pytest.approx(2.0) and hf.speedup_vs_hf["all"] == pytest.approx(4.0)
    assert hf.tokens_per_call is None and hf.mismatches == 0
    assert s.table[("sps", 0.7)].speedup["all"] == pytest.approx(1.5) and s.table[("sps", 0.7)].mismatches is None
    assert s.greedy_mismatches() == 1 and s.prompts_per_task == {"math": 1, "qa": 2}
    md = render_summary(s, command="specdec bench --x")
    assert md.splitlines()[3] == "specdec bench --x"
    assert "| `sps` | 3 | 23.33 | 3.00× | 1.00× | 1.44× | 2.00 | 1.00 | 0.50 0.25 | 0.50 | **1/3** |" in md
    assert "| `hf-pld` | 2.00× |" not in md and "| `hf-pld` | — | 4.00× | 4.00× |" in md
    assert "1 greedy outputs differ from AR" in md
    assert math.isnan(bench.geomean([]))


# ---- command line --------------------------------------------------------------------------
def test_cli_reports_bad_input_before_loading_models(tmp_path, capsys):
    good = _write(tmp_path / "ok.jsonl", [_prompt_line("a", "qa")])
    bad = _write(tmp_path / "bad.jsonl", [_prompt_line("a", "qa"), "{oops"])
    out = str(tmp_path / "o")
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--prompts", str(bad)], "bad.jsonl line 2: invalid JSON"),
        (["--prompts", str(good), "--methods", "ar,warp"], "unknown method 'warp'; choose from: ar, sps, pld"),
        (["--prompts", str(good), "--tasks", "qa,poetry"], "unknown task 'poetry'; the prompt file has: qa"),
        (["--prompts", str(good), "--temperatures", "0,hot"], "temperature 'hot' is not a number"),
        (["--prompts", str(good), "--opt", "novalue"], "expected KEY=VALUE"),
        (["--prompts", str(good), "--max-new-tokens", "0"], "max-new-tokens must be a positive integer"),
    ]
    for extra, message in cases:
        assert main(["bench", "--out", out, "--target", "no-such-model", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_dir_refuses_rows_made_with_other_run_settings(tmp_path):
    settings = BenchSettings(methods=["ar"], run_info={"device": "cpu", "fast_linear": "auto"})
    fp = bench.fingerprint(settings, "t", "torch.float32")
    bench._write_config(tmp_path, fp, None, "cmd", "s1")
    bench.check_out_dir(tmp_path, fp)  # same settings: resumes
    other = bench.fingerprint(
        BenchSettings(methods=["ar"], run_info={"device": "cpu", "fast_linear": "off"}), "t", "torch.float32"
    )
    with pytest.raises(ValueError, match="fast_linear"):
        bench.check_out_dir(tmp_path, other)
    # A directory written before `run` was recorded can still be resumed.
    legacy = dict(fp)
    del legacy["run"]
    bench._write_config(tmp_path, legacy, None, "cmd", "s0")
    bench.check_out_dir(tmp_path, other)
