"""`specdec serve` with continuous batching: many streaming clients at once through the official
`openai` client, some leaving mid-answer; nothing is lost, duplicated or mixed up, and requests
really share steps (tiny random models, loopback only)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the server extra: pip install 'specdec[server]'")
openai = pytest.importorskip("openai", reason="needs the test extra (the official openai client)")
httpx = pytest.importorskip("httpx", reason="needs the test extra")

from specdec.cli import main  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from tests.serving.server_helpers import metric_values, running_server  # noqa: E402

MODEL = "tiny"
CLIENTS = 32


def _prompt(c: int) -> str:
    return f"client {c}: hello world, tell me a story about cat number {c * 13 % 97}"


def _kwargs(c: int) -> dict:
    methods = ["sps", "pld", "specinfer", "ar"]
    return dict(model=MODEL, prompt=_prompt(c), max_tokens=4 + c % 7, temperature=0,
                extra_body={"speculative": {"method": methods[c % len(methods)]}})


def test_32_streaming_clients_with_random_disconnects(pipe, one_thread):
    # What each client would get served alone (greedy): the decoded single-sequence output.
    expected = {}
    for c in range(CLIENTS):
        kw = _kwargs(c)
        ids = pipe.encode(kw["prompt"], chat=False)
        out = pipe.generate(ids, kw["extra_body"]["speculative"]["method"], kw["max_tokens"]).token_ids
        expected[c] = pipe.decode(out).rstrip("\ufffd")  # a last character cut in half is held back
    leaving = set(random.Random(0).sample(range(CLIENTS), 10))  # these close their stream after one chunk
    app = create_app(pipe, "sps", {}, MODEL, max_batch_size=12, max_queue=64, prefill_chunk=64)
    with running_server(app) as url:
        seen_running: list[int] = []
        stop_watch = False

        def watch() -> None:
            while not stop_watch:
                seen_running.append(httpx.get(f"{url}/health", timeout=10).json()["running"])
                time.sleep(0.05)

        def one_client(c: int) -> tuple[int, str, str | None]:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            stream = client.completions.create(**_kwargs(c), stream=True)
            text, finish = [], None
            for chunk in stream:
                (choice,) = chunk.choices
                text.append(choice.text or "")
                finish = choice.finish_reason
                if c in leaving:
                    stream.close()  # the client goes away mid-answer
                    break
            return c, "".join(text), finish

        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            watcher = pool.submit(watch)
            results = list(pool.map(one_client, range(CLIENTS)))
            stop_watch = True
            watcher.result()
        assert time.monotonic() - t0 < 240  # generous: the cores may be shared
        for c, text, finish in results:
            if c in leaving:
                assert expected[c].startswith(text)  # what it got before leaving was its own
            else:
                assert finish in ("stop", "length"), f"client {c} lost its answer"
                assert text == expected[c], f"client {c} got another answer"

        def settled() -> dict:
            return metric_values(httpx.get(f"{url}/metrics").text)

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            health = httpx.get(f"{url}/health").json()
            if health["running"] == 0 and health["waiting"] == 0:
                break
            time.sleep(0.05)
        assert (health["running"], health["waiting"]) == (0, 0)
        m = settled()
        finished = {labels[0][1]: v for (name, labels), v in m.items() if name == "vllm:request_success_total"}
        assert sum(finished.values()) == CLIENTS
        assert finished.get("abort", 0) <= len(leaving)
        assert finished.get("stop", 0) + finished.get("length", 0) >= CLIENTS - len(leaving)
        # Requests shared steps: the running gauge went above 1 and steps scored several sequences.
        assert max(seen_running) > 1
        steps = m[("vllm:iteration_batch_size_count", ())]
        single = m[("vllm:iteration_batch_size_bucket", (("le", "1.0"),))]
        assert steps > single
        assert m[("vllm:iteration_tokens_total_count", ())] >= steps
        assert ("vllm:kv_cache_usage_perc", ()) in m


def test_kv_budget_refuses_what_can_never_fit_and_queues_the_rest(pipe, one_thread):
    app = create_app(pipe, "ar", {}, MODEL, max_kv_tokens=120, max_batch_size=4, default_max_tokens=16)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="KV budget"):
            client.completions.create(model=MODEL, prompt="hello " * 20, max_tokens=100)
        # Each of these reserves ~45 slots: two fit the budget at once, the others wait their turn.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda c: client.completions.create(
                model=MODEL, prompt=_prompt(c), max_tokens=20, temperature=0), range(4)))
        assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        for c, a in enumerate(answers):
            ids = pipe.encode(_prompt(c), chat=False)
            assert a.choices[0].text == pipe.decode(pipe.generate(ids, "ar", 20).token_ids).rstrip("\ufffd")


def test_serve_batching_flags(checkpoints, monkeypatch, capsys):
    import uvicorn

    launched = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: launched.update(app=app, **kw))
    target, draft = checkpoints
    base = ["serve", "--target", str(target), "--draft", str(draft), "--fast-linear", "off", "--method", "sps"]
    assert main([*base, "--max-batch-size", "3", "--max-kv-tokens", "5000", "--prefill-chunk", "64",
                 "--spec-disable-batch-size", "never"]) == 0
    cfg = launched["app"].state.config.batch
    assert (cfg.max_batch_size, cfg.max_kv_tokens, cfg.prefill_chunk, cfg.spec_disable_batch_size) == (3, 5000, 64, None)
    assert launched["app"].state.engine.batch.max_batch_size == 3
    # A budget that no request of the default length fits is refused at start, not on every request.
    assert main([*base, "--max-kv-tokens", "10", "--max-new-tokens", "32"]) == 2
    assert "KV budget of 10 tokens (--max-kv-tokens) cannot hold a request of the default length" \
        in capsys.readouterr().err
    assert main([*base, "--max-kv-tokens", "37", "--max-new-tokens", "32", "--gamma", "4"]) == 2  # sps drafts 4 more
    assert main([*base, "--max-kv-tokens", "38", "--max-new-tokens", "32", "--gamma", "4"]) == 0
    # So is a default answer length above the per-request cap (it was cut to the cap without a word).
    capsys.readouterr()
    assert main([*base, "--max-new-tokens", "5000"]) == 2
    assert "--max-new-tokens 5000 is above --max-tokens-limit 4096" in capsys.readouterr().err
    assert main([*base, "--max-new-tokens", "5000", "--max-tokens-limit", "5000"]) == 0
    assert main(base) == 0  # defaults: a memory-sized budget, the default threshold (no tune profile here)
    cfg = launched["app"].state.config.batch
    assert cfg.max_kv_tokens is not None and cfg.max_kv_tokens > 1000 and cfg.spec_disable_batch_size == 8
    # The server's policies by default: adaptive speculation, a fill time bound, a prefix cache.
    assert (cfg.adaptive, cfg.max_fill_ms, cfg.prefix_cache_mb) == (True, 400.0, 1024)
    assert launched["app"].state.engine.batch.times["target"].known  # calibrated at start, not in a request
    assert main([*base, "--speculation", "fixed", "--max-fill-ms", "none", "--prefix-cache-mb", "0"]) == 0
    cfg = launched["app"].state.config.batch
    assert (cfg.adaptive, cfg.max_fill_ms, cfg.prefix_cache_mb) == (False, None, 0)
    assert launched["app"].state.engine.batch.prefix is None
    assert main([*base, "--max-fill-ms", "50", "--prefix-cache-mb", "8"]) == 0
    cfg = launched["app"].state.config.batch
    assert (cfg.max_fill_ms, cfg.prefix_cache_mb) == (50.0, 8.0)
    assert launched["app"].state.engine.batch.prefix.budget == 8 * 2**20
    for flag, value in (("--max-kv-tokens", "lots"), ("--spec-disable-batch-size", "-1"), ("--max-batch-size", "0"),
                        ("--max-fill-ms", "lots"), ("--max-fill-ms", "-5"), ("--prefix-cache-mb", "-1"),
                        ("--prefix-cache-mb", "nan")):
        assert main([*base, flag, value]) == 2
        assert flag in capsys.readouterr().err


def test_a_step_with_free_trees_counts_their_tokens_and_not_as_undrafted():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from specdec.engine.batch import StepInfo
    from specdec.serving.batch_metrics import BatchMetrics
    from specdec.serving.metrics import ServerMetrics

    metrics = ServerMetrics(MODEL)
    batch = BatchMetrics(metrics)
    engine = SimpleNamespace(max_kv_tokens=None)
    batch.step(StepInfo(batch_size=2, depths=[0, 0], free_nodes=5, target_tokens=7), engine)
    batch.step(StepInfo(batch_size=2, depths=[0, 0], target_tokens=2), engine)
    m = metric_values(generate_latest(metrics.registry).decode())
    assert m[("specdec:free_draft_tokens_total", ())] == 5
    assert m[("vllm:spec_decode_disabled_iterations_total", ())] == 1
