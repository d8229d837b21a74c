"""`specdec serve`: the official `openai` client against a real uvicorn server on loopback.

Tiny random models with a real byte-level BPE tokenizer built in the test (no download); the
SmolLM2 versions of the main checks are in test_server_real.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the server extra: pip install 'specdec[server]'")
openai = pytest.importorskip("openai", reason="needs the test extra (the official openai client)")
httpx = pytest.importorskip("httpx", reason="needs the test extra")

from specdec.cli import main  # noqa: E402
from specdec.engine.pipeline import Pipeline  # noqa: E402
from specdec.engine.text import TextAssembler  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from tests.serving.server_helpers import metric_values, running_server  # noqa: E402

MODEL = "tiny"
PROMPT = "hello world, tell me a story"
SPEC_COUNTERS = (
    "vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
)


@pytest.fixture(scope="module")
def base_url(pipe):
    # Fixed drafting: the answers' step statistics are compared with `specdec generate`'s, which
    # adaptive speculation changes (its tokens it does not: tests/engine/test_batch_policies.py).
    app = create_app(pipe, "sps", {"max_ngram": 3, "gamma": 4}, MODEL, default_max_tokens=16, adaptive=False)
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _cli_generate(capsys, checkpoints, *args: str) -> dict:
    target, draft = checkpoints
    capsys.readouterr()
    argv = ["generate", *args, "--target", str(target), "--draft", str(draft), "--fast-linear", "off", "--json"]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _collect_stream(stream, chat: bool) -> tuple[str, str | None, object]:
    """(text, finish_reason, usage) of a streamed answer, checking the chunk format on the way."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
            continue
        (choice,) = chunk.choices
        assert finish is None, "no content after the finishing chunk"
        piece = choice.delta.content if chat else choice.text
        text.append(piece or "")
        finish = choice.finish_reason
    return "".join(text), finish, usage


def _speculative(usage) -> dict:
    return usage.model_extra["speculative"]


# ---- answers -------------------------------------------------------------------------------
def test_models_health_and_metrics_endpoints(base_url, client, pipe):
    (model,) = client.models.list().data
    assert model.id == MODEL
    assert {"ar", "sps", "pld", "specinfer"} <= set(model.model_extra["methods"])
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{base_url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in (*SPEC_COUNTERS, "vllm:e2e_request_latency_seconds", "specdec:request_tokens_per_second"):
        assert name in metrics.text


@pytest.mark.parametrize(
    "endpoint,method,temperature",
    [("completions", "sps", 0.0), ("completions", "specinfer", 0.0), ("chat", "pld", 0.0), ("chat", "sps", 0.8)],
)
def test_stream_equals_nonstream_equals_cli(client, checkpoints, capsys, endpoint, method, temperature):
    """The server answers what `specdec generate` prints for the same settings, streamed or not."""
    chat = endpoint == "chat"
    kw = dict(model=MODEL, max_tokens=24, temperature=temperature, seed=7, extra_body={"speculative": {"method": method}})
    if chat:
        kw["messages"] = [{"role": "user", "content": PROMPT}]
        create = client.chat.completions.create
    else:
        kw["prompt"] = PROMPT
        create = client.completions.create
    full = create(**kw)
    (choice,) = full.choices
    full_text = choice.message.content if chat else choice.text
    streamed, finish, usage = _collect_stream(create(**kw, stream=True, stream_options={"include_usage": True}), chat)

    ref = _cli_generate(capsys, checkpoints, "--chat" if chat else "--prompt", PROMPT, "--method", method,
                        "--max-new-tokens", "24", "--temperature", str(temperature), "--seed", "7")
    assert full_text == streamed == ref["text"]
    assert choice.finish_reason == finish == {"eos": "stop", "length": "length"}[ref["stats"]["stopped_by"]]
    stats = ref["stats"]
    for u in (full.usage, usage):
        assert u.prompt_tokens == stats["prompt_tokens"]
        assert u.completion_tokens == stats["new_tokens"] == len(ref["token_ids"])
        assert u.total_tokens == u.prompt_tokens + u.completion_tokens
        assert u.prompt_tokens_details.cached_tokens == 0  # dense rows keep no prefix cache
        spec = _speculative(u)
        assert spec["method"] == method
        assert spec["target_calls"] == stats["target_calls"]
        assert spec["num_draft_tokens"] == stats["draft_tokens"]
        assert spec["num_accepted_tokens"] == stats["accepted_tokens"] == sum(spec["num_accepted_tokens_per_pos"])
    if method != "ar":
        assert _speculative(full.usage)["num_drafts"] > 0


def test_default_method_and_default_max_tokens(client):
    res = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0)
    assert _speculative(res.usage)["method"] == "sps"
    assert res.usage.completion_tokens <= 16  # the server's default max tokens
    assert res.choices[0].finish_reason in ("stop", "length")


def test_a_message_name_is_accepted_and_changes_nothing(client):
    """OpenAI's optional `name` of a message is not a 400, and the answer is the one without it."""
    def answer(**named) -> tuple[str, int]:
        messages = [{"role": "system", "content": "Be brief.", **named}, {"role": "user", "content": PROMPT, **named}]
        res = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=messages)
        return res.choices[0].message.content, res.usage.prompt_tokens

    assert answer(name="alice") == answer()


def test_stop_strings_cut_text_streamed_or_not(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0)
    text = base.choices[0].text
    # A 3-character stop string that first occurs a few characters in (and is plain text).
    k = next(i for i in range(4, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    stop = text[k:k + 3]
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop=[stop, "never-said-xyz"])
        if stream:
            got, finish, usage = _collect_stream(
                client.completions.create(**kw, stream=True, stream_options={"include_usage": True}), chat=False)
        else:
            res = client.completions.create(**kw)
            got, finish, usage = res.choices[0].text, res.choices[0].finish_reason, res.usage
        assert got == text[:k]
        assert finish == "stop"
        assert usage.completion_tokens <= base.usage.completion_tokens
    # A stop string that never occurs changes nothing.
    same = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=32, temperature=0, stop="never-said-xyz")
    assert same.choices[0].text == text and same.choices[0].finish_reason == base.choices[0].finish_reason


def test_text_assembler_holds_back_partial_characters_and_stop_prefixes():
    pieces = {1: "ab", 2: "c\ufffd", 3: "de", 4: "STO", 5: "P!"}

    def decode(ids):  # a toy detokenizer: token 2 ends in half a character that token 3 completes
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdde", "é")

    asm = TextAssembler(decode, ["STOP"])
    assert asm.push([1]) == ("ab", False)
    assert asm.push([2]) == ("c", False)  # the half character waits
    assert asm.push([3]) == ("é", False)
    assert asm.push([4]) == ("", False)  # could be the start of STOP
    assert asm.push([5, 1]) == ("", True)
    assert asm.released == "abcé" and asm.completion_tokens == 5  # cut at the token that completed STOP
    clean = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), [])
    assert [clean.push([i])[0] for i in (1, 4)] + [clean.flush()] == ["ab", "STO", ""]


# ---- bad input -----------------------------------------------------------------------------
BAD_BODIES = [
    ("malformed json", "/v1/completions", '{"model": "tiny", "prompt": "hi",', None),
    ("not an object", "/v1/completions", "[1, 2]", None),
    ("empty body", "/v1/completions", "", None),
    ("prompt wrong type", "/v1/completions", {"prompt": 5}, "prompt"),
    ("max_tokens wrong type", "/v1/completions", {"prompt": "hi", "max_tokens": "10"}, "max_tokens"),
    ("temperature wrong type", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ("zero max_tokens", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     "max_tokens"),
    ("top_p out of range", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("max_tokens over context", "/v1/completions", {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ("over-long prompt", "/v1/completions", {"prompt": "hello world " * 400, "max_tokens": 4}, "prompt"),
    ("over-long token prompt", "/v1/completions", {"prompt": [5] * 600, "max_tokens": 4}, "prompt"),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [1, 10**6]}, "prompt"),
    ("unknown method", "/v1/completions", {"prompt": "hi", "speculative": {"method": "lookahead"}},
     "speculative.method"),
    ("unknown method option", "/v1/completions", {"prompt": "hi", "speculative": {"method": "pld", "ngram": 2}},
     "speculative.ngram"),
    ("gamma of a tree method", "/v1/completions", {"prompt": "hi", "speculative": {"method": "specinfer", "gamma": 2}},
     "speculative.gamma"),
    ("option number as a string", "/v1/completions",
     {"prompt": "hi", "speculative": {"method": "pld", "max_ngram": "2"}}, "speculative.max_ngram"),
    ("option flag as a string", "/v1/completions",
     {"prompt": "hi", "speculative": {"method": "auto", "no_planner": "yes"}}, "speculative.no_planner"),
    ("bad method option value", "/v1/completions",
     {"prompt": "hi", "speculative": {"method": "specinfer", "expansion": "1,x"}}, "speculative"),
    ("n > 1", "/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("batch of prompts", "/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("unsupported parameter", "/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    ("unknown parameter", "/v1/completions", {"prompt": "hi", "mirostat": 2}, "mirostat"),
    ("logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True},
     "logprobs"),
    ("completions logprobs 0", "/v1/completions", {"prompt": "hi", "logprobs": 0}, "logprobs"),
    ("stream_options without stream", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("two different lengths", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "max_completion_tokens": 4},
     "max_completion_tokens"),
    ("user message without content", "/v1/chat/completions", {"messages": [{"role": "user"}]},
     "messages.0.content"),
    ("no messages", "/v1/chat/completions", {"messages": []}, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("message name not a string", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": 7}]},
     "messages.0.name"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ("too many stop strings", "/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize("what,path,body,param", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_requests_get_openai_style_400(base_url, client, what, path, body, param):
    content = body if isinstance(body, str) else json.dumps({"model": MODEL, **body})
    res = httpx.post(base_url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert res.status_code == 400, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    # The server still answers the next request.
    ok = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_a_json_body_sent_as_text_is_told_its_content_type(base_url):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2})
    for content_type in ("text/plain", "application/x-ndjson"):
        res = httpx.post(base_url + "/v1/completions", content=body, headers={"content-type": content_type}, timeout=30)
        assert res.status_code == 400 and "Content-Type: application/json" in res.json()["error"]["message"], res.text
    for content_type in ("application/json", "application/json; charset=utf-8"):
        ok = httpx.post(base_url + "/v1/completions", content=body, headers={"content-type": content_type}, timeout=30)
        assert ok.status_code == 200, ok.text


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.BadRequestError, match="unknown method"):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"speculative": {"method": "nope"}})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    # offload would change the target for every later request: never a per-request option
    with pytest.raises(openai.BadRequestError, match="offload"):
        client.completions.create(model=MODEL, prompt="hi", extra_body={"speculative": {"method": "sps", "offload": True}})
    with pytest.raises(openai.BadRequestError, match="not supported"):
        client.completions.create(model=MODEL, prompt="hi", frequency_penalty=1.0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-9", prompt="hi")
    # What a client sends when it fills in defaults is accepted, as is one length under both names.
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, frequency_penalty=0, presence_penalty=0.0,
                                     best_of=1, echo=False, logprobs=None, temperature=0).choices
    assert client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                               {"role": "user", "content": "go on"}], max_tokens=2, max_completion_tokens=2,
        logprobs=False, top_logprobs=0, tool_choice="none", response_format={"type": "text"}, temperature=0).choices
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="hi " * 600, max_tokens=2)


# ---- disconnects and queueing --------------------------------------------------------------
class _SlowTarget:
    """The target, 30 ms slower per forward pass: long enough to disconnect mid-generation."""

    def __init__(self, lm, delay: float = 0.03) -> None:
        self._lm, self._delay = lm, delay

    def forward(self, *args, **kwargs):
        time.sleep(self._delay)
        return self._lm.forward(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._lm, name)


@pytest.fixture(scope="module")
def slow_url(pipe):
    slow = Pipeline.from_models(_SlowTarget(pipe.target_lm), pipe.tokenizer, None, pipe.eos_token_ids)
    with running_server(create_app(slow, "ar", {}, MODEL)) as url:
        yield url


def _finished(url: str, reason: str) -> float:
    return metric_values(httpx.get(f"{url}/metrics").text).get(("vllm:request_success_total", (("finished_reason", reason),)), 0.0)


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_engine(slow_url, stream):
    aborted = _finished(slow_url, "abort")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "stream": stream}
    t0 = time.monotonic()
    if stream:
        with httpx.stream("POST", f"{slow_url}/v1/completions", json=body, timeout=30) as res:
            assert res.status_code == 200
            lines = res.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        # Leaving the block closes the connection after the first chunk.
    else:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{slow_url}/v1/completions", json=body, timeout=0.3)
    # 400 tokens at 30 ms would take 12 s; the engine stops within a step of the disconnect.
    assert _wait_for(lambda: _finished(slow_url, "abort") == aborted + 1, timeout=5.0)
    res = httpx.post(f"{slow_url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - t0 < 8.0
    generated = metric_values(httpx.get(f"{slow_url}/metrics").text)[("vllm:generation_tokens_total", ())]
    assert generated < 200


def test_requests_wait_their_turn_and_a_full_queue_answers_503(pipe):
    slow = Pipeline.from_models(_SlowTarget(pipe.target_lm, 0.02), pipe.tokenizer, None, pipe.eos_token_ids)
    with running_server(create_app(slow, "ar", {}, MODEL, max_queue=1)) as url:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 60, "temperature": 0}

        def health() -> dict:
            return httpx.get(f"{url}/health", timeout=5).json()

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            assert _wait_for(lambda: health()["running"] == 1)
            second = pool.submit(httpx.post, f"{url}/v1/completions", json=body, timeout=30)
            assert _wait_for(lambda: health()["waiting"] == 1)
            # One runs, one waits (the queue's limit): a third is turned away at once.
            third = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
            assert third.status_code == 503, third.text
            assert third.json()["error"]["code"] == "server_overloaded"
            answers = [first.result(), second.result()]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]
        assert health() == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0}


# ---- load ----------------------------------------------------------------------------------
def test_concurrent_streaming_clients(base_url, client):
    """16 streaming clients x 3 requests on loopback: every answer complete, each its own, and the
    /metrics counters move by exactly the sum of the answers' usage."""
    methods = ["sps", "pld", "specinfer", "ar"]
    jobs = [(c, r, methods[(c + r) % len(methods)]) for c in range(16) for r in range(3)]

    def prompt(c: int, r: int) -> str:
        return f"client {c} request {r}: hello world, tell me a story about a cat number {c * 7 + r}"

    def kwargs(c: int, r: int, method: str) -> dict:
        return dict(model=MODEL, prompt=prompt(c, r), max_tokens=6 + (c + r) % 5, temperature=0,
                    extra_body={"speculative": {"method": method}})

    # References, one at a time, before the counters are read.
    expected = {(c, r): client.completions.create(**kwargs(c, r, m)).choices[0].text for c, r, m in jobs}
    before = metric_values(httpx.get(f"{base_url}/metrics").text)

    def one_client(c: int) -> list[tuple[int, int, str, str | None, object]]:
        own = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        out = []
        for cc, r, m in jobs:
            if cc == c:
                stream = own.completions.create(**kwargs(c, r, m), stream=True, stream_options={"include_usage": True})
                text, finish, usage = _collect_stream(stream, chat=False)
                out.append((c, r, text, finish, usage))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = [row for rows in pool.map(one_client, range(16)) for row in rows]
    after = metric_values(httpx.get(f"{base_url}/metrics").text)

    assert len(results) == len(jobs)
    for c, r, text, finish, usage in results:
        assert finish in ("stop", "length") and usage is not None
        assert text == expected[(c, r)], f"client {c} request {r} got another answer"
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    usages = [_speculative(u) for *_, u in results]
    assert delta[("vllm:spec_decode_num_drafts_total", ())] == sum(u["num_drafts"] for u in usages)
    assert delta[("vllm:spec_decode_num_draft_tokens_total", ())] == sum(u["num_draft_tokens"] for u in usages)
    accepted = sum(u["num_accepted_tokens"] for u in usages)
    assert accepted > 0 and delta[("vllm:spec_decode_num_accepted_tokens_total", ())] == accepted
    for pos in range(max(len(u["num_accepted_tokens_per_pos"]) for u in usages)):
        per_pos = sum(u["num_accepted_tokens_per_pos"][pos] for u in usages if pos < len(u["num_accepted_tokens_per_pos"]))
        assert delta.get(("vllm:spec_decode_num_accepted_tokens_per_pos_total", (("position", str(pos)),)), 0.0) == per_pos
    assert delta[("vllm:generation_tokens_total", ())] == sum(u.completion_tokens for *_, u in results)
    assert delta[("vllm:prompt_tokens_total", ())] == sum(u.prompt_tokens for *_, u in results)
    finished = sum(v for (name, _), v in delta.items() if name == "vllm:request_success_total")
    assert finished == len(jobs)
    assert delta[("vllm:e2e_request_latency_seconds_count", ())] == len(jobs)


# ---- command line --------------------------------------------------------------------------
def test_server_module_imports_without_fastapi():
    code = (
        "import sys; import specdec, specdec.serving.app, specdec.cli; specdec.cli.build_parser(); "
        "assert not any(m in sys.modules for m in ('fastapi', 'uvicorn', 'prometheus_client')), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serve_without_the_extra_says_what_to_install(monkeypatch, capsys):
    from specdec.serving import app as server

    monkeypatch.setattr(server, "missing_server_dependencies", lambda: ["fastapi", "uvicorn"])
    assert main(["serve", "--target", "unused", "--method", "ar"]) == 2
    assert "pip install 'specdec[server]'" in capsys.readouterr().err


def test_specdec_serve_command(checkpoints, monkeypatch):
    """`specdec serve` parses its flags, loads the checkpoints and hands uvicorn an app that answers
    the openai client (uvicorn.run is replaced by a recorder: a subprocess would cost seconds)."""
    import uvicorn

    launched = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: launched.update(app=app, **kw))
    target, draft = checkpoints
    argv = ["serve", "--target", str(target), "--draft", str(draft), "--method", "pld", "--fast-linear", "off",
            "--port", "8123", "--model-name", "tiny-cli", "--max-tokens-limit", "8", "--max-new-tokens", "8",
            "--log-level", "warning"]
    assert main(argv) == 0
    assert (launched["host"], launched["port"], launched["log_level"]) == ("127.0.0.1", 8123, "warning")
    with running_server(launched["app"]) as url:
        cli_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in cli_client.models.list().data] == ["tiny-cli"]
        res = cli_client.chat.completions.create(
            model="tiny-cli", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0,
            extra_body={"speculative": {"method": "sps", "gamma": 2}},  # --draft was loaded for such requests
        )
        assert _speculative(res.usage)["method"] == "sps" and res.usage.completion_tokens >= 1
        assert _speculative(cli_client.completions.create(model="tiny-cli", prompt="hi").usage)["method"] == "pld"
        with pytest.raises(openai.BadRequestError, match="limit of 8"):
            cli_client.completions.create(model="tiny-cli", prompt="hi", max_tokens=9)


def test_serve_rejects_bad_flags(capsys):
    assert main(["serve", "--method", "ar", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
