"""`specdec bench`: every method (and the hf-* peers) on a prompt file: results.jsonl, summary.md, plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from specdec.bench.peers import is_hf
from specdec.bench.prompts import load_prompts, select_prompts
from specdec.bench.run import run_bench
from specdec.bench.settings import (
    BenchSettings, fingerprint, needs_draft, parse_methods, parse_opts, parse_temperatures, parse_value, parse_variants,
)
from specdec.bench.store import RESULTS, SUMMARY, check_out_dir, command_line, load_results, row_key
from specdec.bench.summary import render_tables
from specdec.cli.common import (
    AUTO_DRAFT_QUANT_NAME, add_model_args, add_option_flags, device_of, drafts_of, err, given_options, load_pipeline,
    tensor_parallel_size_of,
)
from specdec.core.options import check_positive_int
from specdec.engine.pipeline import DTYPES
from specdec.methods.registry import all_methods

SKIPPED_OPTION_FLAGS = ("gamma", "max_ngram")
"""Method options the bench declares itself, with defaults of its own: they also set the hf-* peers'
draft length (--gamma) and n-gram size (--max-ngram)."""


def bench_options(args: argparse.Namespace) -> dict[str, Any]:
    """The global method options: --max-ngram, every other method option flag given (each method's
    own, `--budget`, `--expansion`, …), then --opt KEY=VALUE (values parsed as JSON when they can be)."""
    opts: dict[str, Any] = {"max_ngram": args.max_ngram}
    for name, value in given_options(args).items():
        if name not in SKIPPED_OPTION_FLAGS:
            opts[name] = value if isinstance(value, bool) else parse_value(value)
    opts.update(parse_opts(args.opt))
    return opts


def run_info_of(args: argparse.Namespace, device: str, tp_size: int) -> dict[str, Any]:
    """What changes timings but not outputs. Settings added over time are recorded only when not at
    their default, so directories written before they existed still resume."""
    run_info: dict[str, Any] = {"device": device, "fast_linear": args.fast_linear, "draft_dtype": args.draft_dtype,
                                "threads": args.threads}
    if args.offload:
        run_info["offload"] = True
    if tp_size > 1:
        run_info["tensor_parallel_size"] = tp_size
    if args.weights != "dense" or args.draft_weights not in (None, "dense"):
        run_info["weights"] = [args.weights, args.draft_weights or args.weights]
    if args.row_invariant != "auto":
        run_info["row_invariant"] = args.row_invariant
    if args.draft_vocab is not None:
        run_info["draft_vocab"] = args.draft_vocab
    quant = getattr(args, "draft_quant", "auto")  # recorded resolved: "auto" meant the file's blocks once
    run_info["draft_quant"] = AUTO_DRAFT_QUANT_NAME if quant == "auto" else quant
    if args.batch_size != 1:
        run_info["batch_size"] = check_positive_int("--batch-size", args.batch_size)
    return run_info


def resolved_command(args: argparse.Namespace, settings: BenchSettings, device: str, tp_size: int) -> str:
    """The command as it resolves, defaults included: re-running it resumes the same run."""
    argv = ["specdec", "bench", "--prompts", args.prompts, "--out", args.out, "--methods", ",".join(settings.methods),
            "--temperatures", ",".join(f"{t:g}" for t in settings.temperatures),
            "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats), "--gamma", str(args.gamma),
            "--max-ngram", str(args.max_ngram), "--top-k", str(args.top_k), "--top-p", f"{args.top_p:g}",
            "--target", args.target, "--dtype", args.dtype, "--device", device, "--fast-linear", args.fast_linear]
    for name in drafts_of(args):
        argv += ["--draft", name]
    argv += ["--draft-dtype", args.draft_dtype] if args.draft_dtype else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--offload"] if args.offload else []
    argv += ["--tensor-parallel-size", str(tp_size)] if tp_size > 1 else []
    argv += ["--weights", args.weights] if args.weights != "dense" else []
    argv += ["--draft-weights", args.draft_weights] if args.draft_weights else []
    argv += ["--row-invariant", args.row_invariant] if args.row_invariant != "auto" else []
    argv += ["--draft-vocab", str(args.draft_vocab)] if args.draft_vocab is not None else []
    argv += ["--draft-quant", args.draft_quant] if getattr(args, "draft_quant", "auto") != "auto" else []
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size != 1 else []
    argv += ["--per-task", str(args.per_task)] if args.per_task is not None else []
    argv += ["--tasks", args.tasks] if args.tasks else []
    for name, value in given_options(args).items():
        if name not in SKIPPED_OPTION_FLAGS:
            flag = "--" + name.replace("_", "-")
            argv += [flag] if value is True else [flag, str(value)]
    for item in args.opt:
        argv += ["--opt", item]
    for item in args.variant:
        argv += ["--variant", item]
    argv += ["--log", args.log] if args.log else []
    argv += ["--no-plots"] if args.no_plots else []
    return command_line(argv)


def cmd_bench(args: argparse.Namespace) -> int:
    prompts = load_prompts(args.prompts)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    prompts = select_prompts(prompts, tasks=tasks, per_task=args.per_task)
    variants = parse_variants(args.variant)
    device = device_of(args)
    tp_size = tensor_parallel_size_of(args)
    settings = BenchSettings(
        methods=parse_methods(args.methods, variants), variants=variants,
        temperatures=parse_temperatures(args.temperatures), max_new_tokens=args.max_new_tokens,
        repeats=args.repeats, gamma=args.gamma, top_k=args.top_k, top_p=args.top_p, opts=bench_options(args),
        run_info=run_info_of(args, device, tp_size),
    )
    command = resolved_command(args, settings, device, tp_size)
    peers = [m for m in settings.methods if is_hf(m)]
    if tp_size > 1 and peers:
        raise ValueError(f"the Hugging Face peers ({', '.join(peers)}) run transformers' generate in one process "
                         "and cannot drive a target sharded over several; leave them out with --tensor-parallel-size")
    draft = ",".join(drafts_of(args, need=True)) if needs_draft(settings.methods, variants) else None
    fp = fingerprint(settings, args.target, str(DTYPES[args.dtype]))
    check_out_dir(args.out, fp, draft)
    done = {row_key(r) for r in load_results(Path(args.out) / RESULTS).rows}
    todo = sum(
        (p.id, m, t, r) not in done
        for p in prompts for t in settings.temperatures for r in range(settings.repeats) for m in settings.methods
    )
    total = len(prompts) * len(settings.temperatures) * settings.repeats * len(settings.methods)
    print(f"{len(prompts)} prompts x {len(settings.methods)} methods x {len(settings.temperatures)} temperatures x "
          f"{settings.repeats} repeats = {total} rows, {total - todo} already in {args.out}", file=sys.stderr)
    pipe = load_pipeline(args, draft is not None) if todo else None
    report = run_bench(pipe, prompts, args.out, settings, log_path=args.log, plots=not args.no_plots,
                       command=command, draft_name=draft)
    print(render_tables(report.summary))
    print(f"wrote {Path(args.out) / RESULTS} ({len(report.rows)} rows, {report.ran} new), "
          f"{Path(args.out) / SUMMARY}" + "".join(f", {p}" for p in report.plots), file=sys.stderr)
    bad = report.summary.greedy_mismatches()
    if bad:
        err(f"{bad} greedy outputs differ from AR (see {Path(args.out) / SUMMARY})")
        return 1
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run every method on every prompt (AR first, then the others, per prompt), append one row "
        "per (prompt, method, temperature, repeat) to OUT/results.jsonl, and write OUT/summary.md and plots. "
        "Re-running with the same --out resumes: rows already there are skipped. Progress goes to stderr and, "
        "one line per row, to the log file, so a long run can be left in the background: "
        "nohup specdec bench ... > /dev/null 2>&1 &"
    )
    p.add_argument("--prompts", required=True, help="JSONL prompt file: one object a line with id, task, turns "
                   "(the first turn is sent, as a chat message when the target has a chat template)")
    p.add_argument("--out", required=True, help="output directory (created; re-use it to resume)")
    p.add_argument("--methods", default="ar,sps,pld",
                   help=f"comma-separated; ours: {', '.join(all_methods())}; peers: hf-ar, hf-assisted, "
                   "hf-assisted-tuned, hf-pld ('hf' = all peers). ar always runs (the baseline), and hf-ar "
                   "when a peer is asked for (default ar,sps,pld)")
    p.add_argument("--temperatures", default="0", help="comma-separated, 0 = greedy (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens each run generates at most (default 128)")
    p.add_argument("--repeats", type=int, default=1, help="runs per prompt, method and temperature (default 1)")
    p.add_argument("--per-task", type=int, default=None, metavar="N",
                   help="the first N prompts of each task category, in file order (deterministic)")
    p.add_argument("--tasks", default=None, help="comma-separated task categories to keep (default all)")
    p.add_argument("--gamma", type=int, default=4,
                   help="the gamma option (draft length per target call) of the methods that have it (sps, pld, "
                   "maxgram); also hf-assisted-tuned's num_assistant_tokens and hf-pld's prompt_lookup_num_tokens "
                   "(default 4)")
    p.add_argument("--max-ngram", type=int, default=3, help="pld (and hf-pld): longest n-gram to look up")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option by name, passed to the selected methods that have it (an error if none "
                   "has it; repeatable; VALUE parsed as JSON when it can be); every option also has its own flag "
                   "below (--budget, --expansion, …)")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL=METHOD KEY=VALUE ...'",
                   help="a labelled run of one of our methods with its own options, usable in --methods "
                   "like a method name, e.g. --variant 'si-221=specinfer expansion=2,2,1' (repeatable)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="generate the prompts of each (method, temperature, repeat) this many at a time with "
                   "continuous batching (Pipeline.generate_batch); 1 (default) = one prompt at a time")
    p.add_argument("--log", default=None, help="progress log, one line per row (default OUT/bench.log)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    add_model_args(p)
    add_option_flags(p, skip=SKIPPED_OPTION_FLAGS)  # each passed to the selected methods that have it
    p.set_defaults(func=cmd_bench)
