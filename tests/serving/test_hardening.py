"""`specdec serve` against hostile or careless clients, over loopback with the official `openai`
client and raw HTTP: no server-side file named by a request, bounded bodies and work, an API key,
and OpenAI's and vLLM's conventions (temperature 1.0 by default, `vllm:` metric names)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the server extra: pip install 'specdec[server]'")
openai = pytest.importorskip("openai", reason="needs the test extra (the official openai client)")
httpx = pytest.importorskip("httpx", reason="needs the test extra")

import specdec.core.store as store  # noqa: E402
from specdec.core.hardware import fingerprint  # noqa: E402
from specdec.core.sampling import SamplingConfig  # noqa: E402
from specdec.engine.pipeline import Pipeline, register_tuner, registered_tuner  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from specdec.serving import guards  # noqa: E402
from specdec.serving.guards import DEFAULT_MAX_DRAFT_TOKENS  # noqa: E402
from tests.serving.server_helpers import metric_values, running_server  # noqa: E402

MODEL = "tiny"
LIMIT = 64 * 1024  # the body limit of these tests' server


@pytest.fixture(scope="module")
def base_url(pipe):
    # Fixed drafting: the metrics test counts drafts, which adaptive speculation would rightly skip
    # with a draft as costly as its target.
    with running_server(create_app(pipe, "sps", {}, MODEL, default_max_tokens=8, max_body_bytes=LIMIT,
                                   adaptive=False)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _post(url: str, body: dict, timeout: float = 60, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body}, timeout=timeout, **kw)


def _profile(path) -> str:
    """A minimal tune profile whose winner is a 2-node Sequoia chain."""
    from specdec.core.hardware import fingerprint

    path.write_text(json.dumps({"version": store.PROFILE_VERSION, "key": {}, "fingerprint": fingerprint("cpu"),
                                "winner": {"method": "sequoia", "paths": [[0], [0, 0]], "mode": "swor"}}))
    return str(path)


# ---- 1: requests never name server-side files -------------------------------------------------
def test_requests_cannot_name_files_and_learn_nothing_about_them(base_url, tmp_path, monkeypatch):
    (tmp_path / "binary.json").write_bytes(os.urandom(64))
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "obj.json").write_text('{"a": 1}')
    paths = ["/etc/passwd", "/nonexistent/x.json", str(tmp_path / "binary.json"), str(tmp_path / "text.json"),
             str(tmp_path / "obj.json"), _profile(tmp_path / "good.json"), "../../etc/passwd.json", 7, ["dp"]]

    def no_reading(path):
        raise AssertionError(f"the server read {path} for a client")

    monkeypatch.setattr(store, "read_profile", no_reading)
    for method in ("sequoia", "auto"):
        answers = set()
        for value in paths:
            res = _post(base_url, {"prompt": "hi", "max_tokens": 2, "speculative": {"method": method, "tree": value}})
            assert res.status_code == 400, (method, value, res.text)
            err = res.json()["error"]
            assert err["param"] == "speculative.tree"
            answers.add(err["message"])
        # One answer whatever the path: it reveals nothing about the disk.
        (message,) = answers
        assert "operator" in message and "/etc" not in message
    # The symbolic value is served.
    ok = _post(base_url, {"prompt": "hi", "max_tokens": 2, "temperature": 0,
                          "speculative": {"method": "sequoia", "tree": "dp"}})
    assert ok.status_code == 200, ok.text


def test_the_operator_still_names_a_profile_file(pipe, tmp_path):
    profile = _profile(tmp_path / "operator.json")
    app = create_app(pipe, "sequoia", {"tree": profile}, MODEL, default_max_tokens=4)
    with running_server(app) as url:
        res = _post(url, {"prompt": "hi", "temperature": 0})
        assert res.status_code == 200, res.text
        assert res.json()["usage"]["speculative"]["method"] == "sequoia"
        # The same file named by a client is still refused.
        res = _post(url, {"prompt": "hi", "speculative": {"method": "sequoia", "tree": profile}})
        assert res.status_code == 400


# ---- 2: bounded bodies, tokenization off the event loop ------------------------------------------
def test_a_body_over_the_limit_gets_413_with_a_clear_message(base_url, client):
    res = _post(base_url, {"prompt": "x" * (2 * LIMIT)})
    assert res.status_code == 413, res.text
    err = res.json()["error"]
    assert err["code"] == "request_too_large" and str(LIMIT) in err["message"] and "--max-body-bytes" in err["message"]
    bad = _post(base_url, {"prompt": "hi", "n": 2})  # an error from the app itself: the same rendering
    assert bad.status_code == 400 and res.content.startswith(b'{"error":{"message":"') \
        and bad.content.startswith(b'{"error":{"message":"')

    def chunks():  # no content-length: the limit is counted as the body arrives
        for _ in range(40):
            yield b"x" * 4096

    res = httpx.post(f"{base_url}/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                     timeout=60)
    assert res.status_code == 413 and res.json()["error"]["code"] == "request_too_large"
    # The official client reads the 413 (the server reads the rest of the body before answering).
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="hello " * 40_000, max_tokens=2)
    assert info.value.status_code == 413 and str(LIMIT) in str(info.value)
    assert _post(base_url, {"prompt": "hi", "max_tokens": 2}).status_code == 200


def _raw(url: str, head: bytes, body: bytes, wait: float) -> bytes:
    """Send a request's head and part of its body over a raw socket; what the server answers within `wait` s."""
    host, port = url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        try:
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        except (TimeoutError, ConnectionResetError):  # a close with our unread bytes still queued resets
            pass
    return answer


def test_a_declared_length_past_the_drain_is_refused_at_once_and_a_stalled_body_in_time(base_url):
    head = (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n")
    t0 = time.perf_counter()
    answer = _raw(base_url, head % (guards.DRAIN_BYTES + 1), b"{}", wait=10)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-body-bytes" in answer
    assert time.perf_counter() - t0 < 5

    async def stalled():  # a client that sends its head, then nothing
        await asyncio.sleep(3600)

    async def never_called(scope, receive, send):
        raise AssertionError("the app saw a body that never arrived")

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    limit = guards.BodyLimit(never_called, max_bytes=LIMIT, timeout_s=0.2)
    asyncio.run(limit({"type": "http", "headers": [(b"content-length", b"100")]}, stalled, send))
    assert sent[0]["status"] == 408 and b"did not arrive within 0.2 s" in sent[1]["body"]
    sent.clear()
    asyncio.run(limit({"type": "http", "headers": [(b"content-length", str(LIMIT + 1).encode())]}, stalled, send))
    assert sent[0]["status"] == 413  # known to be too large: its answer, not a timeout's
    chunks = iter([{"type": "http.request", "body": b"x" * (LIMIT + 1), "more_body": True}])

    async def past_the_limit_then_stalled():  # no declared length: counted as it came
        return next(chunks, None) or await stalled()

    sent.clear()
    asyncio.run(limit({"type": "http", "headers": []}, past_the_limit_then_stalled, send))
    assert sent[0]["status"] == 413 and b"is larger than" in sent[1]["body"]
    assert _post(base_url, {"prompt": "hi", "max_tokens": 2}).status_code == 200


class _SlowTokenizer:
    """The real tokenizer, but encoding a long text takes 3 s (holding no lock, as a real one)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    def __call__(self, text, *args, **kwargs):
        if len(text) > 10_000:
            time.sleep(3.0)
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_health_and_small_requests_answer_while_large_ones_are_tokenized_or_refused(pipe):
    slow = Pipeline.from_models(pipe.target_lm, _SlowTokenizer(pipe.tokenizer), pipe.draft_lm, pipe.eos_token_ids)
    with running_server(create_app(slow, "ar", {}, MODEL, max_body_bytes=LIMIT, default_max_tokens=2)) as url:
        answers: dict[str, httpx.Response] = {}
        big = {
            "tokenized": {"prompt": "hello world " * (LIMIT // 13)},  # just under the limit: tokenized, then 400
            "refused": {"prompt": "x" * (20 * 1024 * 1024)},  # 20 MB: read and thrown away, then 413
        }
        threads = [threading.Thread(target=lambda k=k: answers.__setitem__(k, _post(url, big[k], timeout=120)))
                   for k in big]
        for t in threads:
            t.start()
        time.sleep(0.5)  # both are in flight: one in the slow tokenizer, one still sending
        t0 = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=30)
        health_s = time.monotonic() - t0
        t0 = time.monotonic()
        small = _post(url, {"prompt": "hi", "max_tokens": 2, "temperature": 0}, timeout=30)
        small_s = time.monotonic() - t0
        for t in threads:
            t.join(120)
        assert health.status_code == 200 and small.status_code == 200, (health.text, small.text)
        assert health_s < 1.0 and small_s < 1.0, (health_s, small_s)
        assert answers["tokenized"].status_code == 400
        assert answers["tokenized"].json()["error"]["code"] == "context_length_exceeded"
        assert answers["refused"].status_code == 413


def test_text_the_tokenizer_cannot_take_is_a_400(base_url):
    for path, body, param, message in (
        ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt",
         "the prompt is not valid UTF-8 text: it holds an unpaired surrogate U+D800 at character 1"),
        ("/v1/chat/completions", '{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "\\udcff"}]}',
         "messages[1].content", "messages[1].content is not valid UTF-8 text: byte 0xff at character 0"),
        ("/v1/completions", '{"prompt": ""}', "prompt", "the prompt is empty: give the text to continue"),
    ):
        res = httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert res.status_code == 400, res.text
        assert res.json()["error"]["message"] == message and res.json()["error"]["param"] == param, res.text


# ---- 3: client-chosen work is bounded before anything is built -----------------------------------
@pytest.mark.parametrize("spec,drafted", [
    ({"method": "sequoia", "budget": 100000}, 100000),
    ({"method": "specexec", "budget": DEFAULT_MAX_DRAFT_TOKENS + 1}, DEFAULT_MAX_DRAFT_TOKENS + 1),
    ({"method": "specinfer", "expansion": [64, 64, 64]}, 64 + 64**2 + 64**3),
    ({"method": "csd", "k_matrix": "2000,2000;0,6"}, None),
    ({"method": "sps", "gamma": DEFAULT_MAX_DRAFT_TOKENS + 1}, DEFAULT_MAX_DRAFT_TOKENS + 1),
    ({"method": "pld", "gamma": 10**9}, 10**9),
])
def test_drafting_more_than_the_cap_is_refused_at_once(base_url, spec, drafted):
    t0 = time.monotonic()
    res = _post(base_url, {"prompt": "hi", "max_tokens": 2, "speculative": spec})
    assert time.monotonic() - t0 < 5.0  # before the fix: a Sequoia DP of 100000 nodes, minutes
    assert res.status_code == 400, res.text
    message = res.json()["error"]["message"]
    assert "--max-draft-tokens" in message and str(DEFAULT_MAX_DRAFT_TOKENS) in message
    if drafted is not None:
        assert f"up to {drafted} tokens" in message


def test_work_at_the_cap_and_other_knobs_stay_cheap(base_url):
    for spec in ({"method": "specexec", "budget": DEFAULT_MAX_DRAFT_TOKENS},
                 {"method": "sequoia", "budget": 16, "max_depth": 10**6},  # depth beyond the budget: clamped
                 {"method": "pld", "max_ngram": 10**9}):  # the search stops at the longest match
        t0 = time.monotonic()
        res = _post(base_url, {"prompt": "hello world, hello there", "max_tokens": 2, "temperature": 0,
                               "speculative": spec})
        assert res.status_code == 200, (spec, res.text)
        assert time.monotonic() - t0 < 30.0


def test_max_tokens_and_stop_strings_are_capped(pipe):
    with running_server(create_app(pipe, "ar", {}, MODEL, max_tokens_limit=8, default_max_tokens=4)) as url:
        res = _post(url, {"prompt": "hi", "max_tokens": 9})
        assert res.status_code == 400 and "--max-tokens-limit" in res.json()["error"]["message"]
        assert "limit of 8" in res.json()["error"]["message"]
        assert _post(url, {"prompt": "hi", "max_tokens": 8}).status_code == 200
        res = _post(url, {"prompt": "hi", "stop": ["x" * 257]})
        assert res.status_code == 400 and "256 characters" in res.json()["error"]["message"]


def test_the_servers_own_defaults_must_fit_its_caps(pipe):
    with pytest.raises(ValueError, match="--max-draft-tokens"):
        create_app(pipe, "specexec", {"budget": 128}, MODEL)
    create_app(pipe, "specexec", {"budget": 128}, MODEL, max_draft_tokens=128)  # raised: fine


# ---- 4: an API key ----------------------------------------------------------------------------
def test_an_api_key_guards_the_api_but_not_health_and_metrics(pipe):
    with running_server(create_app(pipe, "ar", {}, MODEL, api_key="s3cret", default_max_tokens=2)) as url:
        for key in ("wrong", "s3cre", "s3crets"):
            bad = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)
            with pytest.raises(openai.AuthenticationError):
                bad.completions.create(model=MODEL, prompt="hi")
        res = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
        assert res.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=30)
        assert good.completions.create(model=MODEL, prompt="hi").usage.completion_tokens >= 1
        assert [m.id for m in good.models.list().data] == [MODEL]
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


def test_the_key_scheme_is_case_insensitive_and_only_health_and_metrics_stay_open(pipe):
    with running_server(create_app(pipe, "ar", {}, MODEL, api_key="s3cret", default_max_tokens=2)) as url:
        def post(authorization: str) -> int:
            return httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30,
                              headers={"authorization": authorization}).status_code

        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):  # RFC 7235: the scheme is case-insensitive
            assert post(f"{scheme} s3cret") == 200, scheme
        for wrong in ("Basic s3cret", "Bearer S3CRET", "s3cret", "Bearers3cret"):  # the key itself is not
            assert post(wrong) == 401, wrong
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models", "/no-such-route"):
            res = httpx.get(url + path, timeout=30)
            assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key", path
        good = {"authorization": "bearer s3cret"}
        assert httpx.get(f"{url}/openapi.json", headers=good, timeout=30).json()["info"]["title"] == "specdec"
        assert httpx.get(f"{url}/docs", headers=good, timeout=30).status_code == 200
        for path in ("/health", "/metrics"):
            assert httpx.get(url + path, timeout=30).status_code == 200


# ---- 5: a request never makes the server tune ----------------------------------------------------
def test_auto_without_a_profile_is_refused_and_never_tunes(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path))
    monkeypatch.setenv("SPECDEC_AUTOTUNE", "1")  # the pipeline would tune on first use outside the server
    tunes = []
    old = registered_tuner()
    register_tuner(lambda pipe, sampling, reason: tunes.append(reason))
    try:
        with running_server(create_app(pipe, "ar", {}, MODEL, default_max_tokens=2)) as url:
            def auto(temperature: float) -> httpx.Response:
                return _post(url, {"prompt": "hi", "temperature": temperature, "speculative": {"method": "auto"}})

            res = auto(0)
            assert res.status_code == 400, res.text
            err = res.json()["error"]
            assert err["param"] == "speculative.method" and "never starts a tune" in err["message"]
            assert "greedy decoding" in err["message"] and "specdec tune --quick" in err["message"]
            # Nothing of the server's files or flags a client cannot pass.
            assert str(tmp_path) not in err["message"] and "--tree" not in err["message"]
            # A profile for greedy decoding only: greedy requests follow it, sampled ones are refused.
            store.save_profile({"version": store.PROFILE_VERSION, "key": pipe.profile_key(SamplingConfig()),
                                "fingerprint": fingerprint("cpu"), "winner": {"method": "ar", "label": "ar"}})
            assert auto(0).status_code == 200
            res = auto(0.7)
            assert res.status_code == 400 and "sampling decoding" in res.json()["error"]["message"]
    finally:
        register_tuner(old)
    assert tunes == []


def test_a_temperature_that_is_not_a_finite_number_is_a_400(base_url):
    for value in ("NaN", "Infinity", "-Infinity"):
        res = httpx.post(f"{base_url}/v1/completions", content='{"prompt": "hi", "temperature": %s}' % value,
                         headers={"content-type": "application/json"}, timeout=30)
        assert res.status_code == 400, (value, res.text)
        err = res.json()["error"]
        assert err["param"] == "temperature" and "finite number" in err["message"], err


def test_a_short_answer_never_ends_in_half_a_character(pipe, base_url, client):
    """A length cut inside a multi-byte character holds the half character back, streamed or not."""
    found = None
    for i in range(12):
        prompt = f"tell me a story number {i}"
        out = pipe.generate(pipe.encode(prompt, chat=False), "ar", 24).token_ids
        cuts = [k for k in range(2, len(out)) if pipe.decode(out[:k]).endswith("\ufffd")
                and pipe.decode(out[:k]).rstrip("\ufffd")]
        if cuts:
            found = prompt, cuts[0], pipe.decode(out[: cuts[0]])
            break
    assert found is not None, "no greedy output here ends in half a character at any length"
    prompt, k, cut = found
    kw = dict(model=MODEL, prompt=prompt, max_tokens=k, temperature=0, extra_body={"speculative": {"method": "ar"}})
    full = client.completions.create(**kw)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**kw, stream=True)
                       if chunk.choices)
    assert full.choices[0].text == streamed == cut.rstrip("\ufffd")
    assert full.usage.completion_tokens == k and full.choices[0].finish_reason == "length"


def test_one_parse_and_one_decoder_build_per_request_and_one_dp_solve(pipe, monkeypatch):
    """Options are parsed once a request, the decoder built once (plus once for the setting, to
    learn its drafter's block), and Sequoia's DP solved once for every request of one setting."""
    import dataclasses

    import specdec.methods.sequoia as sequoia
    from specdec.methods import registry

    app = create_app(pipe, "sequoia", {"budget": 5, "max_depth": 3}, MODEL, default_max_tokens=3)
    builds, parses, solves = [], [], []
    method = registry.get_method("sequoia")
    monkeypatch.setitem(registry._METHODS, "sequoia", dataclasses.replace(
        method, build=lambda ctx, opts: builds.append(opts) or method.build(ctx, opts)))
    real_parse, real_dp = sequoia.Options.from_mapping.__func__, sequoia.sequoia_dp
    monkeypatch.setattr(sequoia.Options, "from_mapping",
                        classmethod(lambda cls, *a, **k: parses.append(a) or real_parse(cls, *a, **k)))
    monkeypatch.setattr(sequoia, "sequoia_dp", lambda *a, **k: solves.append(a[1:]) or real_dp(*a, **k))
    sequoia.dp_tree.cache_clear()
    with running_server(app) as url:
        for i in range(3):
            res = _post(url, {"prompt": f"hello {i}", "temperature": 0})
            assert res.status_code == 200, res.text
    assert len(parses) == 3 and len(builds) == 3 + 1 and len(solves) == 1


# ---- 11: OpenAI's and vLLM's conventions -----------------------------------------------------
def test_a_request_without_temperature_samples_at_one(client):
    def complete(seed: int, **kw) -> str:
        return client.completions.create(model=MODEL, prompt="hello", max_tokens=8, seed=seed,
                                         extra_body={"speculative": {"method": "ar"}}, **kw).choices[0].text

    texts = [complete(s) for s in range(3)]
    assert len(set(texts)) > 1  # T = 1.0: the seeds give different completions (greedy would give one)
    assert complete(0) == texts[0]
    assert complete(1, temperature=0) == complete(2, temperature=0)


def test_the_operators_temperature_is_the_default_and_requests_override_it(pipe):
    app = create_app(pipe, "ar", {}, MODEL, default_sampling=SamplingConfig(), default_max_tokens=12)
    with running_server(app) as url:
        texts = {_post(url, {"prompt": "hello", "seed": s}).json()["choices"][0]["text"] for s in range(2)}
        assert len(texts) == 1  # the server's default: greedy
        sampled = {_post(url, {"prompt": "hello", "seed": s, "temperature": 1.0}).json()["choices"][0]["text"]
                   for s in range(3)}
        assert len(sampled) > 1


def test_metrics_carry_vllm_names(base_url, client):
    client.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    values = metric_values(httpx.get(f"{base_url}/metrics", timeout=30).text)
    names = {name for name, _ in values}
    for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:request_success_total", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:time_to_first_token_seconds_count",
                 "vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert name in names, name
    assert values[("vllm:spec_decode_num_drafts_total", ())] >= 1
    assert not any(n.startswith("spec_decode") for n in names)


def test_models_lists_auto_only_when_a_profile_exists(pipe, client, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path))
    (model,) = client.models.list().data
    assert "auto" not in model.model_extra["methods"] and "sequoia" in model.model_extra["methods"]
    assert model.model_extra["auto_modes"] == []
    key = pipe.profile_key(SamplingConfig(temperature=0.7))
    store.save_profile({"version": store.PROFILE_VERSION, "key": key,
                        "winner": {"method": "sequoia", "paths": [[0]], "mode": "swor"}})
    (model,) = client.models.list().data
    assert "auto" in model.model_extra["methods"] and model.model_extra["auto_modes"] == ["sampling"]
