"""`specdec bench-serve` end to end against an in-process server on loopback (tiny models, few tokens)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="needs the server extra")
pytest.importorskip("openai", reason="needs the test extra (the official openai client)")

from specdec.bench.serve_load import LevelSummary, crossover, percentile, render  # noqa: E402
from specdec.cli import main  # noqa: E402
from specdec.engine.pipeline import Pipeline  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from tests.serving.server_helpers import running_server, save_tiny_checkpoints, tiny_tokenizer  # noqa: E402


def test_bench_serve_runs_every_level_and_writes_its_report(tmp_path, capsys, one_thread):
    target, draft = save_tiny_checkpoints(tmp_path / "ckpt", tiny_tokenizer())
    pipe = Pipeline(str(target), str(draft), fast_linear="off", progress=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "task": "qa", "turns": [f"hello world, tell me story {i}"]})
                               + "\n" for i in range(3)))
    out = tmp_path / "out"
    with running_server(create_app(pipe, "ar", {}, "tiny", max_batch_size=4)) as url:
        argv = ["bench-serve", "--url", url, "--prompts", str(prompts), "--concurrency", "1,2", "--methods", "ar,sps",
                "--max-tokens", "4", "--out", str(out)]
        assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "serve-results.jsonl").read_text().splitlines()]
    # default requests per level: the prompts, at least twice the clients
    assert [(r["method"], r["concurrency"]) for r in rows].count(("sps", 2)) == 4
    assert len(rows) == 3 + 3 + 4 + 4
    assert all(1 <= r["completion_tokens"] <= 4 and r["latency_s"] >= r["ttft_s"] > 0 for r in rows)
    summary = (out / "serve-summary.md").read_text()
    assert "| sps | 2 |" in summary and "| ar | 1 |" in summary and "Crossover" in summary
    assert all((out / f"{name}.png").stat().st_size > 0 for name in ("throughput", "latency", "ttft"))
    assert "p95 TTFT s" in summary and "prefix hits" in summary
    assert "tokens/s" in capsys.readouterr().out


def test_percentiles_crossover_and_table():
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.5 and percentile([5.0], 0.95) == 5.0
    levels = [LevelSummary(m, c, 4, 40, 1.0, tps, 1.0, 2.0, 0.1) for m, c, tps in
              [("ar", 1, 10.0), ("sps", 1, 14.0), ("ar", 4, 30.0), ("sps", 4, 33.0), ("ar", 8, 50.0), ("sps", 8, 45.0)]]
    assert crossover(levels) == {"sps": 8}
    assert crossover(levels[:4]) == {"sps": None}
    table = render(levels)
    assert "| sps | 4 | 4 | 40 | 33.00 | 1.10× | 2.36× |" in table


def test_bench_serve_flag_errors(tmp_path, capsys):
    for flag, value in (("--concurrency", "0,2"), ("--max-tokens", "0")):
        assert main(["bench-serve", "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path), flag, value]) == 2
        assert flag in capsys.readouterr().err


def test_the_long_prompt_and_shared_prefix_scenarios(tmp_path, one_thread):
    from specdec.bench.serve_load import Endpoint, long_text, prefix_scenario, render_scenarios, stall_scenario

    target, draft = save_tiny_checkpoints(tmp_path / "ckpt", tiny_tokenizer())
    pipe = Pipeline(str(target), str(draft), fast_linear="off", progress=False)
    assert long_text(64, "a") != long_text(64, "b")  # a tag makes each scenario's text its own
    with running_server(create_app(pipe, "ar", {}, "tiny", max_batch_size=2)) as url:
        stall = stall_scenario(Endpoint(url), "tiny", "sps", 48, 0.0, chat=False, stream_tokens=64)
        prefix = prefix_scenario(Endpoint(url), "tiny", "ar", 48, 0.0, chat=False)
    assert stall.long_prompt_tokens > 50 and stall.long_ttft_s > 0 and all(g >= 0 for g in stall.gaps_s)
    assert prefix.prompt_tokens > 50 and prefix.first_ttft_s > 0 and prefix.second_ttft_s > 0
    assert prefix.second_cached_tokens == 0  # dense rows keep no prefix cache
    text = render_scenarios([stall], [prefix])
    assert "## A long prompt arrives beside a running stream" in text and "| sps |" in text
    assert "## Two requests sharing a prefix" in text and "| ar |" in text


def test_bench_serve_names_an_unreachable_server_or_a_refused_key_in_one_line(tmp_path, capsys, one_thread, monkeypatch):
    import socket

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p", "task": "qa", "turns": ["hello"]}) + "\n")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = ["bench-serve", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--concurrency", "1",
            "--methods", "ar", "--max-tokens", "2", "--no-plots"]
    assert main(base + ["--url", f"http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach a server at" in err and "Traceback" not in err
    target, draft = save_tiny_checkpoints(tmp_path / "ckpt", tiny_tokenizer())
    pipe = Pipeline(str(target), str(draft), fast_linear="off", progress=False)
    monkeypatch.delenv("SPECDEC_API_KEY", raising=False)
    with running_server(create_app(pipe, "ar", {}, "tiny", api_key="s3cret")) as url:
        assert main(base + ["--url", url]) == 2
        err = capsys.readouterr().err
        assert "refused the API key" in err and "--api-key" in err and "Traceback" not in err
        assert main(base + ["--url", url, "--api-key", "s3cret"]) == 0
        monkeypatch.setenv("SPECDEC_API_KEY", "s3cret")
        assert main(base + ["--url", url]) == 0
    assert "s3cret" not in (tmp_path / "out" / "serve-summary.md").read_text()  # the echoed command leaves it out
