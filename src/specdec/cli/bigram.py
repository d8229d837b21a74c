"""`specdec bigram build`: (re)build Max-Gram's bigram table for a tokenizer."""

from __future__ import annotations

import argparse
import sys

from specdec.drafting.bigram import DEFAULT_MAX_BYTES, TEXT_SUFFIXES, build_for_tokenizer
from specdec.engine.pipeline import DEFAULT_TARGET


def configure(p: argparse.ArgumentParser) -> None:
    bsub = p.add_subparsers(dest="bigram_command", required=True)
    build = bsub.add_parser(
        "build", help="(re)build the bigram table of a tokenizer",
        description="Count the most frequent next token of every token over a corpus (default: the Python "
        "standard library's source, a bounded amount) tokenized with the tokenizer, and save it where csd and "
        "maxgram look for it (the cache, keyed by the tokenizer's fingerprint).",
    )
    build.add_argument("--tokenizer", default=DEFAULT_TARGET,
                       help=f"known model name, .gguf file, local dir or HF id whose tokenizer to use (default {DEFAULT_TARGET})")
    build.add_argument("--corpus", nargs="+", default=None, metavar="PATH",
                       help=f"files or directories ({', '.join(TEXT_SUFFIXES)} files) instead of the standard library")
    build.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                       help=f"read at most this much of the corpus (default {DEFAULT_MAX_BYTES})")
    build.add_argument("--out", default=None, help="write the table here instead of the cache")
    build.set_defaults(func=cmd_bigram_build)


def cmd_bigram_build(args: argparse.Namespace) -> int:
    from specdec.models.hub import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    table, path = build_for_tokenizer(tokenizer, args.corpus, args.max_bytes, args.out)
    m = table.meta
    print(f"{path}: {m['covered_tokens']}/{table.vocab_size} tokens have a successor; "
          f"{m['files']} files, {int(m['bytes']) / 1e6:.1f} MB, {m['tokens']} tokens, {m['build_s']} s", file=sys.stderr)
    print(path)
    return 0
