"""`specdec bench` runs on tiny models: rows, resume, a half-written last line, failures mid-run,
methods registered later and variants."""

import json

import pytest

from specdec.bench.prompts import load_prompts, prompt_seed
from specdec.bench.run import run_bench
from specdec.bench.settings import BenchSettings, parse_methods, parse_variants
from specdec.bench.store import load_results
from specdec.engine.pipeline import Pipeline
from tests.bench.helpers import encode, fancy_method, prompt_line, write_lines
from tests.conftest import tiny_lm


@pytest.fixture(scope="module")
def tiny_pipe():
    return Pipeline.from_models(tiny_lm("llama", seed=0), None, tiny_lm("llama", seed=1), eos_token_ids=[])


def test_tiny_run_writes_results_resumes_and_tolerates_truncation(tmp_path, tiny_pipe, capsys):
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [
        prompt_line("qa-1", "qa", "the cat sat on the mat, the cat sat"),
        prompt_line("math-1", "math", "1 + 1 = 2, 2 + 2 = 4, 1 + 1 ="),
        prompt_line("qa-2", "qa", "abc abc abc"),
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
            assert r["output_equals_ar"] is None and r["seed"] == prompt_seed(r["id"], 0)
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

    # so is another text under a prompt id that has rows, even for a method that has none yet
    edited = load_prompts(write_lines(tmp_path / "p2.jsonl", [
        prompt_line("qa-1", "qa", "the cat sat on the mat, the cat sat"),
        prompt_line("math-1", "math", "2 + 2 = 4, 1 + 1 ="),
        prompt_line("qa-2", "qa", "abc abc abc"),
    ]))
    more = BenchSettings(methods=parse_methods("sps,pld,hf-assisted,hf-assisted-tuned,hf-pld,suffix"),
                         temperatures=[0.0, 0.7], max_new_tokens=8, gamma=3)
    with pytest.raises(ValueError, match="another text of prompt 'math-1' \\(line 2\\)"):
        run_bench(tiny_pipe, edited, out, more, encode=encode, progress=False)
    assert len(load_results(out / "results.jsonl").rows) == rep.ran
    assert all(r["prompt_digest"] == {p.id: p.digest for p in prompts}[r["id"]] for r in rows)


def test_failure_mid_run_keeps_rows_and_resume_finishes(tmp_path, tiny_pipe, monkeypatch):
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [prompt_line(f"t-{i}", "t", f"x{i} y z") for i in range(3)]))
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


def test_progress_off_a_terminal_is_one_line_per_row(tmp_path, tiny_pipe, capsys):
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [prompt_line("a", "qa"), prompt_line("b", "qa")]))
    settings = BenchSettings(methods=parse_methods("ar,pld"), max_new_tokens=3)
    capsys.readouterr()
    run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=True, plots=False)
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err and [ln.split(" ")[1] for ln in err.splitlines() if ln.startswith("bench [")] == \
        ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]


def test_new_methods_and_their_options_go_through(tmp_path, tiny_pipe, monkeypatch):
    seen = []
    fancy_method(monkeypatch, seen, ("budget", "max_ngram"))
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [prompt_line("a", "qa")]))
    settings = BenchSettings(methods=parse_methods("fancy"), max_new_tokens=3, opts={"budget": 16, "max_ngram": 2})
    rep = run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=False, plots=False)
    assert [r["method"] for r in rep.rows] == ["ar", "fancy"]
    assert seen and all(o == {"budget": 16, "max_ngram": 2} for o in seen)
    assert "| `fancy` |" in rep.summary_md


def test_variants_run_one_method_with_their_own_options(tmp_path, tiny_pipe, monkeypatch):
    seen = []
    fancy_method(monkeypatch, seen, ("budget", "expansion"))
    variants = parse_variants(["f-a=fancy expansion=2,2,1", "f-b=fancy expansion=1 budget=8"])
    assert variants == {"f-a": ("fancy", {"expansion": "2,2,1"}), "f-b": ("fancy", {"expansion": 1, "budget": 8})}
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [prompt_line("a", "qa")]))
    settings = BenchSettings(methods=parse_methods("f-a,f-b", variants), variants=variants, max_new_tokens=3,
                             opts={"budget": 16})
    rep = run_bench(tiny_pipe, prompts, tmp_path / "o", settings, encode=encode, progress=False, plots=False)
    assert [r["method"] for r in rep.rows] == ["ar", "f-a", "f-b"]
    # warm-up and timed run each build a drafter; the variant's options win over the global ones
    assert {"budget": 16, "expansion": "2,2,1"} in seen and {"budget": 8, "expansion": 1} in seen
    assert "| `f-b` |" in rep.summary_md
    for bad in ["nolabel", "x=nope", "x=ar", "sps=fancy", "x=fancy gamma=3", "x=fancy max_ngram=2"]:
        with pytest.raises(ValueError):
            parse_variants([bad])
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("f-c", variants)


def test_batched_bench_rows_equal_the_one_at_a_time_rows(tmp_path, tiny_pipe, one_thread):
    """--batch-size: each (method, temperature) runs as one continuous batch; greedy rows equal the
    unbatched run's, seeded sampled rows too (the batch stays below the speculation threshold)."""
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", [
        prompt_line("qa-1", "qa", "the cat sat on the mat, the cat sat"),
        prompt_line("math-1", "math", "1 + 1 = 2, 2 + 2 = 4, 1 + 1 ="),
        prompt_line("qa-2", "qa", "abc abc abc"),
    ]))

    def rows(batch: int) -> dict:
        settings = BenchSettings(methods=parse_methods("sps,pld"), temperatures=[0.0, 0.7], max_new_tokens=6, gamma=3,
                                 run_info={"batch_size": batch} if batch > 1 else {})
        out = tmp_path / f"out{batch}"
        run_bench(tiny_pipe, prompts, out, settings, encode=encode, progress=False, plots=False)
        return {(r["id"], r["method"], r["temperature"]): r for r in load_results(out / "results.jsonl").rows}

    one, batched = rows(1), rows(2)
    assert one.keys() == batched.keys() and len(one) == 3 * 3 * 2
    for key, row in one.items():
        assert batched[key]["token_ids"] == row["token_ids"], key
        assert batched[key]["stats"]["target_calls"] == row["stats"]["target_calls"]
