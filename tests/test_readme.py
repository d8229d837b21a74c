"""Every code block of README.md is run or parsed, so the README cannot drift from the code.

Python blocks run on SmolLM2-135M (the Qwen names swapped for it, token counts cut to a few; the
server block against a real `specdec` server on loopback). Shell blocks: every `specdec` line is
parsed by the real command-line parser, with the method options checked against the method (a
wrong flag or option fails), and every `make` target exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from specdec.cli import build_parser
from specdec.cli.common import given_options, options_for, resolve_method

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SMOL = "smollm2-135m-instruct"


def fenced_blocks(text: str, language: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```language block."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start, body = i + 2, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start, "\n".join(body) + "\n"))
        i += 1
    return out


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    commands, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            commands.append(words)
    return commands


PYTHON = fenced_blocks(README, "python")
SCRIPTS = fenced_blocks(README, "sh")  # shell programs (loops, pipes): checked for syntax only
SHELL = [(line, words) for line, code in fenced_blocks(README, "bash") for words in shell_commands(code)]


def test_the_readme_has_the_blocks_this_file_checks():
    assert len(PYTHON) >= 3 and len(SHELL) >= 20 and len(SCRIPTS) >= 1


@pytest.mark.parametrize("line,code", SCRIPTS, ids=[f"README.md:{line}" for line, _ in SCRIPTS])
def test_shell_scripts_are_valid_sh(line, code):
    import subprocess

    done = subprocess.run(["bash", "-n"], input=code, text=True, capture_output=True)
    assert done.returncode == 0, f"README.md:{line}: {done.stderr}"


@pytest.mark.parametrize("line,words", SHELL, ids=[f"README.md:{line}:{' '.join(w[:3])}" for line, w in SHELL])
def test_shell_lines_parse(line, words):
    if words[0] == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(words[1:]) <= set(targets), f"README.md:{line}: no make target {words[1:]}"
        return
    if words[-1] == "&":  # started in the background
        words = words[:-1]
    if "|" in words:  # a pipeline into specdec: its last command
        words = words[len(words) - words[::-1].index("|"):]
    while re.fullmatch(r"[A-Z_]+=.*", words[0]):  # an environment assignment before the command
        words = words[1:]
    if words[0] == "torchrun":  # torchrun's own flags, then the specdec command every rank runs
        words = words[words.index("specdec"):]
    if words[0] == "python" and words[1].startswith("scripts/"):  # a script of this repository, run by hand
        assert (ROOT / words[1]).is_file(), f"README.md:{line}: no {words[1]}"
        return
    assert words[0] == "specdec", f"README.md:{line}: a shell line that is not specdec or make: {words}"
    argv = words[1:]
    try:
        args = build_parser(argv[0]).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README.md:{line}: `{shlex.join(words)}` does not parse (exit {exc.code})")
    if hasattr(args, "method") and hasattr(args, "gamma") and argv[0] in ("generate", "serve"):
        # The flags of a method the line names must be that method's (what cmd_generate checks).
        options_for(resolve_method(args), given_options(args))


def _adapted(code: str, base_url: str | None = None) -> str:
    """The snippet on SmolLM2 with a few tokens (and the test server's address)."""
    code = code.replace("qwen2.5-coder-1.5b-instruct", SMOL).replace("qwen2.5-coder-0.5b-instruct", SMOL)
    code = re.sub(r"\b(max_new_tokens|max_tokens)=\d+", r"\1=6", code)
    code = re.sub(r"dec\.stream\(prompt_ids, \d+\)", "dec.stream(prompt_ids, 6)", code)
    if base_url is not None:
        code = code.replace("http://127.0.0.1:8000/v1", f"{base_url}/v1")
    return code


def _run(line: int, code: str, capsys) -> str:
    capsys.readouterr()
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme_snippet"})  # noqa: S102
    return capsys.readouterr().out


@pytest.mark.real
@pytest.mark.parametrize("line,code", PYTHON, ids=[f"README.md:{line}" for line, _ in PYTHON])
def test_python_blocks_run(line, code, capsys, smol, monkeypatch, tmp_path):
    # `auto` (the default method) tunes on first use: allowed here, with the tests' small settings,
    # measured into a temporary folder.
    from specdec.tuning import autotune
    from tests.tuning.test_quick import SMALL

    monkeypatch.setenv("SPECDEC_AUTOTUNE", "1")
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path))
    monkeypatch.setattr(autotune, "DEFAULT_SETTINGS", SMALL)
    if "OpenAI(" in code:
        pytest.importorskip("fastapi", reason="needs the server extra")
        pytest.importorskip("openai", reason="needs the test extra")
        from specdec.engine.pipeline import Pipeline, eos_ids
        from specdec.models.hf import HFLanguageModel
        from specdec.serving.app import create_app
        from tests.serving.server_helpers import running_server

        model, tokenizer = smol
        # The target drafting for itself: two adapters (each its own KV cache) over one model.
        pipe = Pipeline.from_models(HFLanguageModel(model), tokenizer, HFLanguageModel(model), eos_ids(model, tokenizer))
        with running_server(create_app(pipe, "sps", {}, SMOL)) as url:
            out = _run(line, _adapted(code, url), capsys)
    else:
        out = _run(line, _adapted(code), capsys)
    assert out.strip(), f"README.md:{line} printed nothing"
