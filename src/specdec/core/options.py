"""Typed method options: one frozen dataclass per method is the single source of its option names,
types, defaults and help.

A method declares its options with `option(...)` fields on a `MethodOptions` subclass. The command
line derives its flags from them (`--max-depth` for `max_depth`), the server validates a request's
`speculative` object with `from_mapping`, and the benchmark's `--opt`/`--variant` keys go through
the same call, so a name, a type or a default is written once.

Two declarations protect a server from what its clients send: an option whose value may name a
file on this machine says so (`option(..., file_path=True, symbols=...)`: a server takes only the
symbols from a client), and each `Options` says how many tokens one step drafts at most
(`draft_tokens_per_step`), which a server checks against its cap before building anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

Parser = Callable[[Any], Any]
"""Turns a value as a user gives it (a string on the command line, JSON in a request) into the
option's type, or raises ValueError saying what is wrong."""


def option(
    default: Any,
    help: str,
    parse: Parser | None = None,
    *,
    choices: tuple[str, ...] | None = None,
    flag: bool = False,
    metavar: str | None = None,
    file_path: bool = False,
    symbols: tuple[str, ...] = (),
) -> Any:
    """A method option: its default, one line of help, and how to parse what a user gives.

    flag: a boolean switch (a bare `--name` on the command line).
    choices: the allowed string values (checked by `parse=choice(...)` too).
    file_path: besides its `symbols`, a value may be the path of a file on this machine (read when
        the drafter is built). The command line and the Python API take paths; a server refuses
        them from clients (only the operator names files), accepting only the symbols.
    """
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices, "flag": flag,
                                            "metavar": metavar, "file_path": file_path, "symbols": symbols})


@dataclass(frozen=True)
class OptionSpec:
    """One option as the command line, the server and the benchmark see it."""

    name: str
    default: Any
    help: str
    parse: Parser | None
    choices: tuple[str, ...] | None
    flag: bool
    metavar: str | None
    file_path: bool = False
    symbols: tuple[str, ...] = ()

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def may_name_a_file(self, value: Any) -> bool:
        """Whether `value`, as a user gives it, could be read as a path on this machine (anything
        but one of the symbols, for an option declared with `file_path`)."""
        return self.file_path and value not in self.symbols


O = TypeVar("O", bound="MethodOptions")


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options. Subclasses add `option(...)` fields and may check them
    together in `__post_init__` (raising ValueError)."""

    @classmethod
    def specs(cls) -> list[OptionSpec]:
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            out.append(OptionSpec(f.name, f.default, meta.get("help", ""), meta.get("parse"), meta.get("choices"),
                                  bool(meta.get("flag")), meta.get("metavar"), bool(meta.get("file_path")),
                                  tuple(meta.get("symbols") or ())))
        return out

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls: type[O], values: Mapping[str, Any] | None = None, method: str = "") -> O:
        """The options from user-given values (None = the default); unknown names are refused."""
        values = dict(values or {})
        specs = {s.name: s for s in cls.specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            who = f"method {method!r}" if method else "this method"
            known = ", ".join(sorted(specs)) or "none"
            raise ValueError(f"{who} has no option {unknown[0]!r} (its options: {known})")
        parsed = {}
        for name, value in values.items():
            if value is None:
                continue
            spec = specs[name]
            try:
                parsed[name] = spec.parse(value) if spec.parse is not None else value
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{name}: {exc}") from None
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int | None:
        """The most tokens one step drafts (and the target then scores) under these options, known
        from the options alone, before anything is built: a server refuses requests above its cap
        this way, and a pipeline refuses a tree larger than the context.

        num_drafts: the draft models loaded (trees merged from several drafters grow with them).
        None: only the built drafter knows (a tree read from a tune profile); the base class says
        None, so every method overrides it.
        """
        return None


def format_option_value(value: Any) -> str:
    """An option value as messages and labels show it: "4", "1,1,3", a k-matrix "4,2;0,6"."""
    if isinstance(value, (tuple, list)):
        return (";" if value and isinstance(value[0], (tuple, list)) else ",").join(format_option_value(v) for v in value)
    return str(value)


# ---- parsers -----------------------------------------------------------------------------------
def positive_int(value: Any) -> int:
    """An int >= 1 (from an int or a string of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(f"must be a positive integer, got {value!r}")
    if int(value) < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return int(value)


def int_up_to(high: int) -> Parser:
    """An int in [1, high] (`positive_int`, bounded)."""
    def parse(value: Any) -> int:
        number = positive_int(value)
        if number > high:
            raise ValueError(f"must be at most {high}, got {value!r}")
        return number

    return parse


def check_positive_int(name: str, value: Any) -> int:
    """`positive_int` with the option's name in the message."""
    try:
        return positive_int(value)
    except ValueError as exc:
        raise ValueError(f"{name} {exc}") from None


def number_at_least(low: float) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number >= {low:g}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number >= {low:g}, got {value!r}") from None
        if not math.isfinite(number) or number < low:
            raise ValueError(f"must be a finite number >= {low:g}, got {value!r}")
        return number

    return parse


def probability(value: Any) -> float:
    """A number in [0, 1]."""
    message = f"must be a probability in [0, 1], got {value!r}"  # one message for every bad value
    try:
        number = number_at_least(0.0)(value)
    except ValueError:
        raise ValueError(message) from None
    if number > 1.0:
        raise ValueError(message)
    return number


def flag(value: Any) -> bool:
    """A boolean from true/false (or 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off", ""):
            return False
    raise ValueError(f"expected true or false, got {value!r}")


def choice(*allowed: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return parse


def int_list(value: Any) -> tuple[int, ...]:
    """Positive integers from "1,1,3", "<1,1,3>", "[1,1,3]", one int, or a list."""
    if isinstance(value, bool):
        raise ValueError(f"must be a list of positive integers, got {value!r}")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [v for v in value.replace(" ", "").strip("<>[]()").split(",") if v]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"must be a list of positive integers like 1,1,3, got {value!r}")
    out = tuple(positive_int(v) for v in items)
    if not out:
        raise ValueError(f"must be a non-empty list of positive integers like 1,1,3, got {value!r}")
    return out


def json_or_text(value: Any) -> Any:
    """A value as the command line gives it: JSON when it parses as JSON, else the text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value
