"""The `specdec` command line: one module per subcommand, each imported only when it is used.

`specdec --help` therefore loads no model code (nor torch); a subcommand builds its own flags,
method option flags included, from `cli.common`. The method option flags need the methods, and
the methods need torch (seconds to import), so the command line is first read without them: a
mistake in any other flag is reported at once, and only then are the methods loaded.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# name -> (module with `configure(parser)`, one line of help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "models": ("specdec.cli.models", "list or fetch the known models"),
    "generate": ("specdec.cli.generate", "generate text with one method"),
    "demo": ("specdec.cli.demo", "AR vs speculative decoding on the default models"),
    "bench": ("specdec.cli.bench", "benchmark methods and Hugging Face peers on a prompt file (resumable)"),
    "profile": ("specdec.cli.profile", "t(k): ms per forward over k new tokens, plain vs fast path"),
    "tune": ("specdec.cli.tune", "measure this machine and save the fastest method and options (what --method auto follows)"),
    "serve": ("specdec.cli.serve", "OpenAI-compatible HTTP server (completions, chat, streaming, Prometheus metrics)"),
    "bench-serve": ("specdec.cli.bench_serve", "load-test a running specdec serve with concurrent openai clients"),
    "bigram": ("specdec.cli.bigram", "the Max-Gram bigram table (csd, maxgram)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose mistakes are one line (as the commands' own are) rather than the
    whole usage block; `--help` still shows it. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None, allow_abbrev: bool = True) -> argparse.ArgumentParser:
    """The parser; subcommands other than `only` get their name and help but no flags (None = all)."""
    from importlib.metadata import PackageNotFoundError, version

    parser = _Parser(prog="specdec", description="Lossless speculative decoding.", allow_abbrev=allow_abbrev)
    try:
        installed = version("specdec")
    except PackageNotFoundError:  # run from a source tree that was never installed
        installed = "unknown"
    parser.add_argument("--version", action="version", version=f"specdec {installed}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_line) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_line, description=help_line, allow_abbrev=allow_abbrev)
        if only is None or only == name:
            importlib.import_module(module).configure(p)
    return parser


def first_look(command: str, argv: list[str]) -> None:
    """Parse `argv` without the method option flags (no torch): argparse reports a mistake in the
    other flags and exits. Whatever it does not know is left for the full parser, and no
    abbreviation is expanded (one that is unique here may not be among all the flags)."""
    from specdec.cli.common import method_flags

    with method_flags(False):
        build_parser(command, allow_abbrev=False).parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in SUBCOMMANDS and not {"-h", "--help"} & set(argv):
        first_look(command, argv)
    args = build_parser(command if command in SUBCOMMANDS else "").parse_args(argv)
    from specdec.models.hub import ModelError
    from specdec.models.parallel.group import TensorParallelError, close_open_groups

    try:
        return int(args.func(args))
    except (ModelError, ValueError, TensorParallelError) as exc:
        print(f"specdec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdec: error: interrupted", file=sys.stderr)
        return 130
    finally:
        close_open_groups()  # the other ranks of a sharded target stop with the command
