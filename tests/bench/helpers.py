"""What the bench tests share: prompt files written on the fly, a stand-in tokenizer, a method
registered for one test."""

import dataclasses
import json
from typing import Any

from specdec.core.options import MethodOptions, option
from specdec.methods import registry
from specdec.methods.base import Method
from specdec.methods.registry import all_methods
from tests.conftest import TINY_VOCAB


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def prompt_line(pid, task, text="hello hello world", turns=None):
    return json.dumps({"id": pid, "task": task, "turns": turns if turns is not None else [text]})


def encode(text: str) -> list[int]:
    """A deterministic stand-in for a tokenizer: bytes folded into the tiny vocabulary."""
    return [3 + b % (TINY_VOCAB - 3) for b in text.encode()][:24]


def fancy_method(monkeypatch, seen: list, names: tuple[str, ...]) -> None:
    """Register a method "fancy", added after the bench was written, whose Options has `names`
    (values taken as given); building its drafter records the options it got and drafts nothing."""
    fields = [(n, Any, option(None, f"{n}, as given")) for n in names]
    options = dataclasses.make_dataclass("FancyOptions", fields, bases=(MethodOptions,), frozen=True)

    def build(ctx, opts):
        seen.append(opts.to_dict())
        return None

    all_methods()  # the registered methods first, so "fancy" comes after them
    monkeypatch.setitem(registry._METHODS, "fancy", Method("fancy", "a method added later", options, build))
