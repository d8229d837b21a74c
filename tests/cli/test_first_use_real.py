"""First use on the real SmolLM2-135M: a target without a known draft loads alone and decodes
with prompt lookup, and stderr holds one line for the load and one for the statistics."""

from __future__ import annotations

import pytest

import specdec.models.hub as hub
from specdec.cli import main

pytestmark = pytest.mark.real
NAME = "smollm2-135m-instruct"


def test_changing_only_the_target_loads_only_the_target(smol, capsys, monkeypatch):
    loaded = []
    real = hub.load_model
    monkeypatch.setattr(hub, "load_model", lambda spec, **kw: loaded.append(str(spec)) or real(spec, **kw))
    capsys.readouterr()
    # Dense weights: the spy sits on the dense loader (a native load never calls it).
    assert main(["generate", "--target", NAME, "--max-new-tokens", "4", "--fast-linear", "off", "--weights", "dense",
                 "hi"]) == 0
    out, err = capsys.readouterr()
    assert loaded == [NAME]  # before: smollm2 and then the 2 GB Qwen draft, refused after loading
    assert out.strip() and "[pld]" in err and "using --method pld" in err


def test_stderr_is_one_line_per_load_and_the_statistics(smol, capsys):
    argv = ["generate", "--target", NAME, "--method", "pld", "--max-new-tokens", "4", "--fast-linear", "off",
            "--weights", "dense", "--prompt", "def fib(n):"]  # dense: transformers' loader is the one that talks
    capsys.readouterr()
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"loading {NAME} …") and lines[0].endswith(" s")
    assert lines[1].startswith("[pld] 4 tokens")
    # --verbose brings transformers' own output back (its weight-loading progress bar).
    assert main([*argv, "--verbose"]) == 0
    assert "Loading weights" in capsys.readouterr().err
