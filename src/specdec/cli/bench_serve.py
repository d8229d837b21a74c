"""`specdec bench-serve`: concurrent `openai` clients against a running `specdec serve`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from specdec.bench.prompts import load_prompts, select_prompts
from specdec.bench.serve_load import RESULTS, SUMMARY, Endpoint, run_serve_bench
from specdec.bench.store import command_line
from specdec.cli.serve import API_KEY_ENV


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated positive integers, got {text!r}")
    return values


def cmd_bench_serve(args: argparse.Namespace) -> int:
    levels_c = _ints(args.concurrency, "--concurrency")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise ValueError("--methods needs at least one method")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.requests is not None and args.requests < 1:
        raise ValueError(f"--requests must be positive, got {args.requests}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    prompts = select_prompts(load_prompts(args.prompts), tasks=tasks, per_task=args.per_task)
    argv = ["specdec", "bench-serve", "--url", args.url, "--prompts", args.prompts, "--concurrency", args.concurrency,
            "--methods", args.methods, "--max-tokens", str(args.max_tokens), "--temperature", f"{args.temperature:g}",
            "--out", args.out]
    argv += ["--requests", str(args.requests)] if args.requests is not None else []
    argv += ["--per-task", str(args.per_task)] if args.per_task is not None else []
    argv += ["--tasks", args.tasks] if args.tasks else []
    argv += ["--completions"] if args.completions else []
    for flag, value in (("--stall-prompt-tokens", args.stall_prompt_tokens), ("--prefix-tokens", args.prefix_tokens)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
        argv += [flag, str(value)] if value else []
    if args.api_key == "":
        raise ValueError("--api-key must not be empty")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    levels, plots = run_serve_bench(
        Endpoint(args.url, api_key), prompts, args.out, concurrency=levels_c, methods=methods, requests=args.requests,
        max_tokens=args.max_tokens, temperature=args.temperature, chat=not args.completions,
        plots=not args.no_plots, command=command_line(argv), log=lambda msg: print(msg, file=sys.stderr),
        stall_tokens=args.stall_prompt_tokens, prefix_tokens=args.prefix_tokens,
    )
    print((Path(args.out) / SUMMARY).read_text(encoding="utf-8"))
    print(f"wrote {Path(args.out) / RESULTS}, {Path(args.out) / SUMMARY}" + "".join(f", {p}" for p in plots),
          file=sys.stderr)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Load-test a running `specdec serve` (start it with a draft model and --max-batch-size at least the "
        "largest --concurrency): for each number of concurrent clients and each method (sent as the requests' "
        "speculative.method), stream answers to the prompts with the official openai client and report the "
        "aggregate completion tokens/s, p50/p95 latency and time to first token, the prompt tokens the prefix "
        "cache supplied, with plots and the crossover where plain decoding catches up; optionally a long prompt "
        "beside a running stream and two requests sharing a prefix. Needs the openai package (pip install openai) and, for plots, matplotlib."
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None,
                   help=f"the key of a server started with --api-key (default: ${API_KEY_ENV}, as `specdec serve` "
                   "reads it)")
    p.add_argument("--prompts", required=True, help="JSONL prompt file (id, task, turns; the first turn is sent)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="client counts, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--methods", default="ar,sps", help="methods to compare, comma-separated (default ar,sps)")
    p.add_argument("--requests", type=int, default=None,
                   help="answers per level (default: the number of prompts, at least twice the clients)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of every request (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="temperature of every request (default 0)")
    p.add_argument("--per-task", type=int, default=None, metavar="N", help="the first N prompts of each task")
    p.add_argument("--tasks", default=None, help="comma-separated task categories to keep (default all)")
    p.add_argument("--completions", action="store_true",
                   help="send raw prompts to /v1/completions (default: chat messages to /v1/chat/completions)")
    p.add_argument("--out", required=True, help="output directory (serve-results.jsonl, serve-summary.md, plots)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--stall-prompt-tokens", type=int, default=0, metavar="N",
                   help="per method, also send a prompt of ~N tokens while one stream decodes and report the "
                   "stream's gaps between chunks until that prompt's first token (0 = skip)")
    p.add_argument("--prefix-tokens", type=int, default=0, metavar="N",
                   help="per method, also send two requests sharing a ~N-token prefix one after the other and report "
                   "both times to first token and the cached prompt tokens (0 = skip)")
    p.set_defaults(func=cmd_bench_serve)
