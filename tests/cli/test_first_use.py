"""What a new user meets first: a fast command line, one-line errors instead of tracebacks, the
draft model chosen by the target, and `specdec serve` refusing a taken port or an open host
before any model loads (tiny checkpoints; the SmolLM2 versions are in test_first_use_real.py)."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import specdec
import specdec.models.hub as hub
from specdec.cli import main
from specdec.cli.common import AUTO_DRAFT_QUANT_NAME, DEFAULT_METHOD, DRAFT_QUANT_NAMES, DTYPE_NAMES, WEIGHT_NAMES
from specdec.engine.pipeline import DTYPES, Pipeline
from specdec.models.hub.registry import DEFAULT_TARGET, KNOWN_MODELS, ModelError, check_known_pair, default_draft
from tests.serving.server_helpers import save_tiny_checkpoints, tiny_tokenizer

SRC = str(Path(specdec.__file__).resolve().parents[1])
MISSING = "/nonexistent/model-dir"  # loading it fails: an error about the model proves the load began


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("tiny-ckpt"), tiny_tokenizer())


def _err(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


# ---- 8: start-up without torch where none is needed --------------------------------------------
@pytest.mark.parametrize("argv,rc", [
    (["--help"], 0),
    (["models", "list"], 0),
    (["generate", "--max-new-tokens", "x", "hi"], 2),
    (["serve", "--port", "notanint"], 2),
    (["generate", "--dtype", "float64", "hi"], 2),
    (["demo", "--max-new-tokens", "x"], 2),
])
def test_help_listing_and_flag_mistakes_do_not_import_torch(argv, rc, tmp_path):
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'))\n"
            "from specdec.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": SRC, "SPECDEC_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == rc, res.stderr
    assert res.stdout.strip().endswith("NO-TORCH"), (res.stdout[-200:], res.stderr[-500:])
    if rc:
        assert "error:" in res.stderr and "Traceback" not in res.stderr


def test_method_flag_mistakes_are_still_found_by_the_full_parser(capsys):
    # Without torch the first look cannot know method flags: the full parser decides them.
    with pytest.raises(SystemExit) as info:
        main(["generate", "--no-such-flag", "hi"])
    assert info.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    rc, err = _err(capsys, ["generate", "--budget", "5", "--method", "sps", "hi"])
    assert rc == 2 and "--budget is not an option of method 'sps'" in err
    # A method option's value is parsed by its method, still before any model loads.
    rc, err = _err(capsys, ["generate", "--budget", "x", "--method", "sequoia", "--target", MISSING, "hi"])
    assert rc == 2 and "budget: must be a positive integer" in err and MISSING not in err


def test_abbreviations_are_judged_among_all_flags(capsys):
    # `--max-n` is unique among generate's own flags but not beside --max-ngram: the full parser says so.
    with pytest.raises(SystemExit):
        main(["generate", "--max-n", "5", "hi"])
    assert "ambiguous option: --max-n" in capsys.readouterr().err


def test_cli_dtype_names_are_the_pipelines():
    assert sorted(DTYPE_NAMES) == sorted(DTYPES)
    from specdec.models.backends import AUTO_DRAFT_QUANT, DRAFT_QUANTS, WEIGHTS

    assert sorted(WEIGHT_NAMES) == sorted(WEIGHTS)
    assert DRAFT_QUANT_NAMES == DRAFT_QUANTS and AUTO_DRAFT_QUANT_NAME == AUTO_DRAFT_QUANT
    from specdec.engine.batch import BatchRequest
    from specdec.engine.pipeline import DEFAULT_METHOD as PIPELINE_DEFAULT
    from specdec.serving.app import create_app

    # One default method, everywhere a method may be left out.
    assert DEFAULT_METHOD == PIPELINE_DEFAULT == "auto"
    for func in (Pipeline.generate, Pipeline.generate_batch, Pipeline.decoder, Pipeline.stream, create_app):
        assert inspect.signature(func).parameters[
            "default_method" if func is create_app else "method"].default == DEFAULT_METHOD, func
    assert BatchRequest([1], 1).method == DEFAULT_METHOD


# ---- 10: one clear line instead of a traceback ----------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_only_torch(capsys):
    rc, err = _err(capsys, ["generate", "--prompt", "hi", "--target", MISSING, "--method", "pld", "--device", "cuda"])
    assert rc == 2 and "Traceback" not in err
    assert "--device cuda" in err and ("CPU-only" in err or "no GPU" in err)
    assert MISSING not in err  # refused before the model was looked for


def test_an_unknown_device(capsys):
    rc, err = _err(capsys, ["generate", "--prompt", "hi", "--target", MISSING, "--method", "pld", "--device", "gpu0"])
    assert rc == 2 and "--device gpu0" in err and "Traceback" not in err


@pytest.mark.parametrize("device", ["meta", "xpu", "hpu"])
def test_a_device_torch_knows_but_cannot_run_on_here(capsys, device):
    import torch

    backend = getattr(torch, device, None)
    if backend is not None and getattr(backend, "is_available", lambda: False)():
        pytest.skip(f"this torch runs on {device}")
    rc, err = _err(capsys, ["generate", "--prompt", "hi", "--target", MISSING, "--method", "pld", "--device", device])
    assert rc == 2 and f"--device {device}" in err and "Traceback" not in err
    assert err.count("\n") == 1 and MISSING not in err  # one line, before the model was looked for


@pytest.mark.parametrize("args,needle", [
    (["profile", "--ks", "1,abc"], "--ks must be a positive integer, got 'abc'"),
    (["profile", "--context", "-5"], "--context must be a positive integer, got -5"),
    (["profile", "--prompt", "0"], "--prompt must be a positive integer, got '0'"),
    (["profile", "--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["profile", "--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_profile_sizes_are_checked_before_a_model_loads(capsys, args, needle):
    rc, err = _err(capsys, [*args, "--target", MISSING])
    assert rc == 2 and needle in err and err.count("\n") == 1 and MISSING not in err


@pytest.mark.parametrize("args,needle", [
    (["generate", "--seed", "abc", "hi"], "specdec generate: error: argument --seed: must be an integer, got 'abc'"),
    (["profile", "--draft-vocab", "x"], "specdec profile: error: argument --draft-vocab: invalid int value: 'x'"),
])
def test_a_flag_argparse_refuses_is_one_line_too(capsys, args, needle):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(needle) and err.count("\n") == 1


def test_an_unknown_target_says_only_that(capsys):
    rc, err = _err(capsys, ["generate", "--target", MISSING, "hi"])
    assert rc == 2 and MISSING in err and err.startswith("specdec: error:")
    assert "no known draft" not in err and err.count("\n") == 1


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "--prompt is empty"),
    (["--chat", ""], "--chat is empty"),
    ([""], "the prompt is empty"),  # the positional prompt too, as --prompt ""
    (["--method", "sps", "--gamma", "-3", "hi"], "gamma: must be a positive integer, got '-3'"),
    (["--method", "specinfer", "--gamma", "3", "hi"], "--gamma is not an option of method 'specinfer'"),
    (["--max-new-tokens", "0", "hi"], "--max-new-tokens must be a positive integer"),
    (["--max-new-tokens", "100000", "hi"], "--max-new-tokens 100000 does not fit"),  # the checkpoint's config
])
def test_mistakes_that_need_no_model_are_refused_before_one_loads(capsys, checkpoints, monkeypatch, args, needle):
    calls = _loads_nothing(monkeypatch)
    target, draft = checkpoints
    rc, err = _err(capsys, ["generate", "--target", str(target), "--draft", str(draft), "--fast-linear", "off", *args])
    assert rc == 2 and needle in err, err
    assert calls == [] and "loading" not in err and "Traceback" not in err


def test_a_prompt_of_dash_is_read_from_stdin(monkeypatch):
    import argparse
    import io

    from specdec.cli.generate import prompt_of

    def given(stdin: str, **flags) -> tuple[str, bool | None]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return prompt_of(argparse.Namespace(**{"text": None, "prompt": None, "chat": None, **flags}))

    assert given("def f():\n", text="-") == ("def f():\n", None)
    assert given("hi", chat="-") == ("hi", True) and given("hi", prompt="-") == ("hi", False)
    with pytest.raises(ValueError, match="--prompt from stdin is empty"):
        given("", prompt="-")


def test_flags_a_run_will_not_use_get_a_note_before_anything_loads(capsys, monkeypatch):
    calls = _loads_nothing(monkeypatch)
    _, err = _err(capsys, ["generate", "--method", "suffix", "--draft", "qwen2.5-coder-0.5b-instruct", "--top-p", "0.9",
                            "--seed", "3", "--target", "smollm2-135m-instruct", "hi"])
    assert "note: --top-p, --seed have no effect at --temperature 0" in err
    assert "note: --method suffix uses no draft model: --draft is not loaded" in err
    assert ("load_model", "qwen2.5-coder-0.5b-instruct") not in calls
    _, err = _err(capsys, ["generate", "--method", "suffix", "--temperature", "0.7", "--top-p", "0.9",
                            "--target", "smollm2-135m-instruct", "hi"])
    assert "note:" not in err


def test_version_answers_without_torch(tmp_path):
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'))\n"
            "from specdec.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": SRC, "SPECDEC_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    version, marker = res.stdout.split()[-2:]
    assert res.stdout.startswith("specdec ") and version[0].isdigit() and marker == "NO-TORCH"


def test_a_prompt_that_is_not_utf8(capsys):
    # Bytes that are not UTF-8 in argv reach Python as lone surrogates (PEP 383).
    raw = b"\xff\xfe caf\xe9".decode(sys.getfilesystemencoding(), "surrogateescape")
    for flag in ("--prompt", "--chat"):
        rc, err = _err(capsys, ["generate", flag, raw, "--target", MISSING, "--method", "pld"])
        assert rc == 2 and "Traceback" not in err
        assert f"{flag} is not valid UTF-8 text: byte 0xff at character 0" in err


@pytest.mark.parametrize("args,needle", [
    (["--method", "pld", "--gamma", "100000"], "gamma=100000: pld would draft up to 100000 tokens per step"),
    (["--method", "sequoia", "--budget", "100000"], "budget=100000: sequoia would draft up to 100000"),
])
def test_a_draft_bigger_than_the_context(capsys, checkpoints, args, needle):
    target, draft = checkpoints
    rc, err = _err(capsys, ["generate", "--prompt", "hi", "--target", str(target), "--draft", str(draft),
                            "--fast-linear", "off", "--max-new-tokens", "4", *args])
    assert rc == 2 and needle in err and "context of 512 tokens" in err and "Traceback" not in err


# ---- 6: the draft model follows the target --------------------------------------------------
def test_known_pairs_live_in_the_registry():
    assert default_draft(DEFAULT_TARGET) == "qwen2.5-coder-0.5b-instruct"
    assert default_draft("smollm2-135m-instruct") is None
    assert default_draft("/some/dir") is None
    for name, spec in KNOWN_MODELS.items():  # a known draft is known, smaller and of the same tokenizer
        if spec.draft is not None:
            draft = KNOWN_MODELS[spec.draft]
            assert draft.tokenizer == spec.tokenizer and draft.size < spec.size, name
    with pytest.raises(ModelError, match="cannot draft for smollm2-135m-instruct"):
        check_known_pair("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")


def _loads_nothing(monkeypatch):
    calls = []

    def record(kind):
        def load(spec, **kw):
            calls.append((kind, str(spec)))
            raise ModelError(f"(test) {kind} {spec} stopped here")
        return load

    monkeypatch.setattr(hub, "load_model", record("load_model"))
    monkeypatch.setattr(hub, "load_tokenizer", record("load_tokenizer"))
    return calls


def test_a_known_mismatched_pair_is_refused_before_anything_loads(monkeypatch):
    calls = _loads_nothing(monkeypatch)
    with pytest.raises(ModelError, match="needs the same vocabulary"):
        Pipeline("smollm2-135m-instruct", draft="qwen2.5-coder-0.5b-instruct")
    assert calls == []


def test_a_draft_given_twice_is_refused_before_anything_loads(monkeypatch, capsys):
    calls = _loads_nothing(monkeypatch)
    with pytest.raises(ValueError, match="'qwen2.5-coder-0.5b-instruct' is given twice"):
        Pipeline(DEFAULT_TARGET, draft=["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct"])
    rc, err = _err(capsys, ["generate", "--prompt", "hi", "--method", "sps", "--draft", "qwen2.5-coder-0.5b-instruct",
                            "--draft", "qwen2.5-coder-0.5b-instruct"])
    assert rc == 2 and "given twice" in err and "Traceback" not in err
    assert calls == []


def test_any_mismatched_pair_is_refused_on_its_tokenizers_before_weights_load(monkeypatch, tmp_path, checkpoints):
    from transformers import AutoTokenizer

    from tests.conftest import tiny_hf_model

    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(str(checkpoints[0]))
    tok.add_tokens(["<an-extra-token>"])  # one more entry: a different vocabulary
    tiny_hf_model("llama", vocab=len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    weights = []
    real = hub.load_model
    monkeypatch.setattr(hub, "load_model", lambda spec, **kw: weights.append(str(spec)) or real(spec, **kw))
    with pytest.raises(ValueError, match=f"the draft model {other}'s tokenizer differs"):
        Pipeline(str(checkpoints[0]), str(other), fast_linear="off", progress=False)
    assert weights == []


def test_a_target_without_a_known_draft_gets_a_draft_free_method(capsys, monkeypatch, tmp_path):
    calls = _loads_nothing(monkeypatch)
    rc, err = _err(capsys, ["generate", "--target", "smollm2-135m-instruct", "--method", "sps", "hi"])
    assert rc == 2 and "method sps needs a draft model and smollm2-135m-instruct has no known one" in err
    assert "--method pld" in err and calls == []
    # Commands without --method are told what they can do instead, in their own flags.
    rc, err = _err(capsys, ["tune", "--target", "smollm2-135m-instruct"])
    assert rc == 2 and "run `specdec tune --quick`" in err and calls == []
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "task": "qa", "turns": ["hi"]}\n')
    rc, err = _err(capsys, ["bench", "--target", "smollm2-135m-instruct", "--methods", "ar,sps",
                            "--prompts", str(prompts), "--out", str(tmp_path / "out")])
    assert rc == 2 and "--methods ar,pld" in err and calls == []
    # Without --method: pld, said in one line, and only the target is loaded (here: refused at once;
    # dense weights, since where the file is cached and native measures faster nothing is patched).
    rc, err = _err(capsys, ["generate", "--target", "smollm2-135m-instruct", "--weights", "dense", "hi"])
    assert "using --method pld" in err
    assert calls == [("load_model", "smollm2-135m-instruct")]
    # `auto` uses a draft model where there is one: asked for, it loads the target alone, as the API does.
    calls.clear()
    rc, err = _err(capsys, ["generate", "--target", "smollm2-135m-instruct", "--weights", "dense", "--method", "auto",
                            "hi"])
    assert "needs a draft model" not in err and calls == [("load_model", "smollm2-135m-instruct")]


def test_serve_refuses_a_default_that_drafts_past_its_cap_before_loading(capsys, monkeypatch, checkpoints):
    calls = _loads_nothing(monkeypatch)
    target, draft = checkpoints
    rc, err = _err(capsys, ["serve", "--target", str(target), "--draft", str(draft), "--method", "sps", "--gamma", "100",
                            "--port", "0"])
    assert rc == 2 and "more than --max-draft-tokens (64)" in err, err
    assert calls == [] and "loading" not in err


# ---- 4 and 5: `specdec serve` checks where it listens before loading models ----------------------
def test_serve_refuses_a_taken_port_before_loading(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc, err = _err(capsys, ["serve", "--target", MISSING, "--method", "ar", "--port", str(port)])
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
    assert "loading" not in err and MISSING not in err


def test_serve_beyond_loopback_needs_a_key(capsys, monkeypatch):
    monkeypatch.delenv("SPECDEC_API_KEY", raising=False)
    rc, err = _err(capsys, ["serve", "--target", MISSING, "--method", "ar", "--host", "0.0.0.0", "--port", "0"])
    assert rc == 2 and "--api-key" in err and "--allow-unauthenticated" in err and "loading" not in err
    # Either way through: the models load next (and this one does not exist).
    for extra, env in ((["--allow-unauthenticated"], None), (["--api-key", "k"], None), ([], "k")):
        if env:
            monkeypatch.setenv("SPECDEC_API_KEY", env)
        rc, err = _err(capsys, ["serve", "--target", MISSING, "--method", "ar", "--host", "0.0.0.0", "--port", "0",
                                *extra])
        assert rc == 2 and MISSING in err, err


def test_serve_passes_the_key_and_caps_to_the_app(checkpoints, monkeypatch):
    import uvicorn

    httpx = pytest.importorskip("httpx")
    from tests.serving.server_helpers import running_server

    launched = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: launched.update(app=app, **kw))
    monkeypatch.setenv("SPECDEC_API_KEY", "from-env")
    target, draft = checkpoints
    assert main(["serve", "--target", str(target), "--draft", str(draft), "--fast-linear", "off", "--method", "sps", "--port", "0",
                 "--max-draft-tokens", "5", "--max-body-bytes", "1000", "--body-timeout", "0.5",
                 "--log-level", "warning"]) == 0
    with running_server(launched["app"]) as url:
        post = lambda body, key="from-env": httpx.post(  # noqa: E731
            f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)
        assert post({"prompt": "hi", "max_tokens": 2}, key="other").status_code == 401
        assert post({"prompt": "hi", "max_tokens": 2}).status_code == 200
        res = post({"prompt": "hi", "speculative": {"method": "sps", "gamma": 6}})
        assert res.status_code == 400 and "limit of 5 (--max-draft-tokens)" in res.json()["error"]["message"]
        assert post({"prompt": "x" * 2000}).status_code == 413

        def trickled():  # less than the whole body within --body-timeout
            yield b'{"prompt": '
            time.sleep(1.0)
            yield b'"hi"}'

        res = httpx.post(f"{url}/v1/completions", content=trickled(), timeout=60,
                         headers={"authorization": "Bearer from-env", "content-type": "application/json"})
        assert res.status_code == 408 and "within 0.5 s" in res.json()["error"]["message"]
    assert main(["serve", "--target", str(target), "--body-timeout", "0", "--port", "0"]) == 2


def test_demo_compares_the_method_given_by_method(capsys, checkpoints):
    target, draft = checkpoints
    rc, err = _err(capsys, ["demo", "--target", str(target), "--draft", str(draft), "--method", "pld",
                            "--methods", "sps"])
    assert rc == 2 and "give --methods (a list to compare with AR) or --method, not both" in err
    rc = main(["demo", "--target", str(target), "--fast-linear", "off", "--method", "pld", "--max-new-tokens", "4"])
    shown = "".join(capsys.readouterr())
    assert rc == 0 and "pld" in shown and "sps" not in shown, shown
