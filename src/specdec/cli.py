"""The `specdec` command line: models, generate, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from specdec.pipeline import DEFAULT_DRAFT, DEFAULT_TARGET, METHODS, Pipeline
from specdec.sampling import SamplingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _err(msg: str) -> None:
    print(f"specdec: error: {msg}", file=sys.stderr)


# ---- models --------------------------------------------------------------------------------
def cmd_models_list(args: argparse.Namespace) -> int:
    from specdec.hub import cache_dir, list_models

    rows = list_models()
    print(f"cache: {cache_dir()}")
    for row in rows:
        state = "converted" if row.get("converted") else ("fetched" if row.get("cached") else "not fetched")
        print(f"  {row['name']:<30} {row['size'] / 1e6:8.1f} MB  {state}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from specdec.hub import fetch

    for name in args.names:
        path = fetch(name, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


# ---- generate ------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"known model name, .gguf file, local dir or HF id (default {DEFAULT_TARGET})")
    p.add_argument(
        "--draft", action="append", default=None,
        help=f"draft model for methods that need one (default {DEFAULT_DRAFT}); repeat it to merge several "
        "drafters' trees (specinfer), or to build a cascade, largest first (csd)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="target dtype (default float32)")
    p.add_argument(
        "--draft-dtype", default=None, choices=sorted(DTYPES) + ["int8"],
        help="draft precision; int8 = dynamic int8 quantization of the draft's linears (CPU). It changes speed "
        "only, never the output: every drafted token is verified against the target",
    )
    p.add_argument(
        "--fast-linear", default="auto", choices=["auto", "on", "off"],
        help="prepacked oneDNN linears on the CPU (same model up to float32 round-off; auto = when verified faster)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, which honours OMP_NUM_THREADS)")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="sps", choices=sorted(METHODS), help="decoding method (default sps)")
    p.add_argument("--gamma", type=int, default=4, help="draft length per target call (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (T > 0)")
    p.add_argument("--max-ngram", type=int, default=3, help="pld: longest n-gram to look up")
    p.add_argument("--expansion", default=None, help="specinfer: children per tree level, e.g. 1,1,3,1,1,1,1,1 (default)")
    # ---- cascade options (issue 6) below this line; add each dest to METHOD_OPTION_ARGS ----
    p.add_argument(
        "--k-matrix", default=None,
        help="csd: per-level quotas, rows split by ';' (levels: the --draft models largest first, then Max-Gram), "
        "e.g. 4,2;0,6; row 0 sums to the tokens the target verifies (default derived from the number of drafters)",
    )
    p.add_argument("--lenience", type=float, default=None,
                   help="csd: lenience L >= 1 for reviews below the target only (the target's review is always exact; "
                   "default 1)")
    p.add_argument("--no-maxgram", action="store_true", default=None, help="csd: drop the Max-Gram bottom level")
    p.add_argument("--maxgram-fill", choices=["bigram", "none"], default=None,
                   help="csd, maxgram: fill Max-Gram's proposals from the tokenizer's bigram table (default; built "
                   "and cached on first use, see `specdec bigram build`) or not at all")
    # ---- SpecExec / Sequoia options (issue 7) below this line; add each dest to METHOD_OPTION_ARGS ----
    p.add_argument("--budget", type=int, default=None,
                   help="specexec, sequoia: tree tokens the target verifies per call (default 32 specexec, 16 sequoia)")
    p.add_argument("--max-depth", type=int, default=None, help="specexec, sequoia: deepest tree level (default 8 / 6)")
    p.add_argument("--max-beams", type=int, default=None, help="specexec: nodes expanded per draft forward (default 8)")
    p.add_argument("--branch-width", type=int, default=None,
                   help="specexec: children proposed per expanded node (default 8)")
    p.add_argument("--tree", default=None,
                   help="sequoia: dp (default: the DP tree for --budget/--max-depth/--accept), auto (the `specdec tune` "
                   "winner for this model pair, device, dtype and temperature) or a tune profile .json")
    p.add_argument("--accept", default=None,
                   help="sequoia --tree dp: acceptance vector, e.g. 0.7,0.1,0.05 (P(k-th child accepted)), or auto "
                   "(measured by `specdec tune`; default: a typical prior)")
    p.add_argument("--sequoia-mode", choices=["swor", "greedy"], default=None,
                   help="sequoia: swor (default; children drawn without replacement, SWOR verification) or greedy "
                   "(top-k children, sample-and-match); at T=0 both are top-k with the greedy walk")
    p.add_argument("--offload", action="store_true", default=None,
                   help="specexec, sequoia, auto: keep the target's weights in CPU RAM and stream them to the GPU layer "
                   "by layer (CUDA only; on a CPU see `specdec tune --project-offload`)")


# Decode flags that are per-method options: passed to Pipeline.generate(**opts) when given.
# A method's drafter factory reads the ones it knows (pipeline.METHODS).
METHOD_OPTION_ARGS: list[str] = ["max_ngram", "expansion", "k_matrix", "lenience", "no_maxgram", "maxgram_fill"]
METHOD_OPTION_ARGS += ["budget", "max_depth", "max_beams", "branch_width", "tree", "accept", "sequoia_mode", "offload"]


def _method_opts(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in METHOD_OPTION_ARGS if getattr(args, name, None) is not None}


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _prompt(args: argparse.Namespace) -> tuple[str, bool | None]:
    given = [(args.prompt, False), (args.chat, True), (args.text, None)]
    given = [(t, c) for t, c in given if t is not None]
    if len(given) != 1:
        raise ValueError("give exactly one prompt: TEXT, --prompt TEXT (raw) or --chat TEXT (chat message)")
    return given[0]


def _drafts(args: argparse.Namespace) -> list[str]:
    """The --draft values (repeatable), or the default draft model."""
    value = getattr(args, "draft", None)
    if value is None:
        return [DEFAULT_DRAFT]
    return [value] if isinstance(value, str) else list(value)


def _load(args: argparse.Namespace, need_draft: bool) -> Pipeline:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    drafts = _drafts(args) if need_draft else []
    print(f"loading {args.target}" + "".join(f" + {d}" for d in drafts) + " …", file=sys.stderr)
    pipe = Pipeline(
        args.target, drafts or None, device=args.device, dtype=DTYPES[args.dtype],
        draft_dtype=args.draft_dtype, fast_linear=args.fast_linear,
    )
    if getattr(args, "offload", None):
        # Offloading is a property of the loaded target, so apply it here: every method of this
        # run, the AR baseline included, then sees the same offloaded target.
        from specdec.tune import apply_offload_option

        apply_offload_option(pipe, {"offload": True})
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe


class _TextStreamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, pipe: Pipeline, out: Any) -> None:
        self.pipe, self.out = pipe, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, chunk: list[int]) -> None:
        self.ids.extend(chunk)
        text = self.pipe.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def _format_stats(stats: dict[str, Any]) -> str:
    apos = ", ".join(f"{a:.2f}" for a in stats["accepted_per_position"])
    return (
        f"{stats['new_tokens']} tokens in {stats['wall_s']:.2f} s = {stats['tokens_per_s']:.2f} tokens/s | "
        f"target calls {stats['target_calls']}, {stats['tokens_per_call']:.2f} tokens/call, "
        f"accepted {stats['accepted_tokens']}/{stats['draft_tokens']} drafts "
        f"({stats['mean_accepted_per_call']:.2f}/call) | draft {stats['draft_s']:.2f} s, target {stats['target_s']:.2f} s"
        + (f" | acceptance by position [{apos}]" if apos else "")
    )


def cmd_generate(args: argparse.Namespace) -> int:
    text, chat = _prompt(args)
    sampling = _sampling(args)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    pipe = _load(args, METHODS[args.method].needs_draft_model)
    dec, chunks = pipe.stream(
        text, args.method, args.max_new_tokens, sampling, gamma=args.gamma, seed=args.seed, chat=chat,
        **_method_opts(args),
    )
    if args.json:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk)
        assert dec.last_stats is not None
        print(json.dumps({"text": pipe.decode(ids), "token_ids": ids, "stats": dec.last_stats.to_dict()}))
        return 0
    streamer = _TextStreamer(pipe, sys.stdout)
    for chunk in chunks:
        streamer.push(chunk)
    sys.stdout.write("\n")
    assert dec.last_stats is not None
    print(f"[{args.method}] " + _format_stats(dec.last_stats.to_dict()), file=sys.stderr)
    return 0


# ---- demo ----------------------------------------------------------------------------------
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome, with a short docstring."


def cmd_demo(args: argparse.Namespace) -> int:
    """AR vs speculative decoding on the same prompt and models: equality, speed, acceptance."""
    pipe = _load(args, True)
    sampling = _sampling(args)
    ids = pipe.encode(args.chat or DEMO_PROMPT, chat=True if pipe.has_chat_template() else False)
    print(f"prompt: {args.chat or DEMO_PROMPT!r} ({len(ids)} tokens), {args.max_new_tokens} new tokens, "
          f"temperature {sampling.temperature}", file=sys.stderr)
    results = {}
    for method in ["ar"] + [m for m in args.methods.split(",") if m != "ar"]:
        res = pipe.generate(ids, method, args.max_new_tokens, sampling=sampling, gamma=args.gamma, seed=args.seed,
                            **_method_opts(args))
        results[method] = res
        print(f"[{method}] " + _format_stats(res.stats.to_dict()), file=sys.stderr)
    ar = results["ar"]
    print("\n--- AR output ---\n" + ar.text + "\n-----------------")
    for method, res in results.items():
        if method == "ar":
            continue
        same = res.token_ids == ar.token_ids
        speed = res.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else float("nan")
        verdict = "identical to AR" if same else ("differs from AR (expected when sampling)" if not sampling.greedy else "DIFFERS FROM AR")
        print(
            f"{method}: {res.stats.tokens_per_s:.2f} tokens/s vs AR {ar.stats.tokens_per_s:.2f} tokens/s -> "
            f"speedup {speed:.2f}x; {res.stats.tokens_per_call:.2f} tokens and "
            f"{res.stats.mean_accepted_per_call:.2f} accepted drafts per target call; output {verdict}"
        )
        if sampling.greedy and not same:
            return 1
    return 0


# ---- bench ---------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Every method (and the hf-* peers) on a prompt file: results.jsonl, summary.md, plots."""
    from specdec import bench

    prompts = bench.load_prompts(args.prompts)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    prompts = bench.select_prompts(prompts, tasks=tasks, per_task=args.per_task)
    opts: dict[str, Any] = {"max_ngram": args.max_ngram}
    for name in ("budget", "expansion"):
        if getattr(args, name) is not None:
            opts[name] = bench.parse_value(getattr(args, name))
    opts.update(bench.parse_opts(args.opt))
    variants = bench.parse_variants(args.variant)
    settings = bench.BenchSettings(
        methods=bench.parse_methods(args.methods, variants),
        variants=variants,
        temperatures=bench.parse_temperatures(args.temperatures),
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        gamma=args.gamma,
        top_k=args.top_k,
        top_p=args.top_p,
        opts=opts,
        # Timings are only comparable on the same device and model paths.
        run_info={"device": args.device, "fast_linear": args.fast_linear, "draft_dtype": args.draft_dtype,
                  "threads": args.threads},
    )
    # The command as it resolves, defaults included: re-running it resumes the same run.
    argv = ["specdec", "bench", "--prompts", args.prompts, "--out", args.out, "--methods", ",".join(settings.methods),
            "--temperatures", ",".join(f"{t:g}" for t in settings.temperatures),
            "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats), "--gamma", str(args.gamma),
            "--max-ngram", str(args.max_ngram), "--top-k", str(args.top_k), "--top-p", f"{args.top_p:g}",
            "--target", args.target, "--dtype", args.dtype, "--device", args.device, "--fast-linear", args.fast_linear]
    for name in _drafts(args):
        argv += ["--draft", name]
    argv += ["--draft-dtype", args.draft_dtype] if args.draft_dtype else []
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += ["--per-task", str(args.per_task)] if args.per_task is not None else []
    argv += ["--tasks", args.tasks] if args.tasks else []
    for name in ("budget", "expansion"):
        argv += [f"--{name}", getattr(args, name)] if getattr(args, name) is not None else []
    for item in args.opt:
        argv += ["--opt", item]
    for item in args.variant:
        argv += ["--variant", item]
    argv += ["--log", args.log] if args.log else []
    argv += ["--no-plots"] if args.no_plots else []
    command = bench.command_line(argv)

    draft = ",".join(_drafts(args)) if bench.needs_draft(settings.methods, variants) else None
    fp = bench.fingerprint(settings, args.target, str(DTYPES[args.dtype]))
    bench.check_out_dir(args.out, fp, draft)
    done = {bench.row_key(r) for r in bench.load_results(Path(args.out) / bench.RESULTS).rows}
    todo = sum(
        (p.id, m, t, r) not in done
        for p in prompts for t in settings.temperatures for r in range(settings.repeats) for m in settings.methods
    )
    total = len(prompts) * len(settings.temperatures) * settings.repeats * len(settings.methods)
    print(f"{len(prompts)} prompts x {len(settings.methods)} methods x {len(settings.temperatures)} temperatures x "
          f"{settings.repeats} repeats = {total} rows, {total - todo} already in {args.out}", file=sys.stderr)
    pipe = _load(args, draft is not None) if todo else None
    report = bench.run_bench(pipe, prompts, args.out, settings, log_path=args.log, plots=not args.no_plots,
                             command=command, draft_name=draft)
    print(bench.render_tables(report.summary))
    print(f"wrote {Path(args.out) / bench.RESULTS} ({len(report.rows)} rows, {report.ran} new), "
          f"{Path(args.out) / bench.SUMMARY}" + "".join(f", {p}" for p in report.plots), file=sys.stderr)
    bad = report.summary.greedy_mismatches()
    if bad:
        _err(f"{bad} greedy outputs differ from AR (see {Path(args.out) / bench.SUMMARY})")
        return 1
    return 0


# ---- profile -------------------------------------------------------------------------------
def cmd_profile(args: argparse.Namespace) -> int:
    """t(k) of the target (and draft) on the plain path and on the fast path, from one process."""
    from specdec.fastpath import enable_packed_linears, quantize_draft_int8
    from specdec.hub import cache_dir, load_model
    from specdec.lm import HFLanguageModel
    from specdec.profile import format_table, measure_forward

    ks = tuple(int(k) for k in args.ks.split(","))
    if not ks or min(ks) < 1:
        raise ValueError("--ks must be a comma-separated list of positive integers")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"device": args.device, "threads": torch.get_num_threads(), "models": {}}
    roles = [("target", args.target)] + ([("draft", args.draft)] if args.draft else [])
    for role, name in roles:
        model, _ = load_model(name, dtype=DTYPES[args.dtype], device=args.device)
        profiles = [measure_forward(HFLanguageModel(model), ks, args.context, args.repeats, path="plain")]
        if enable_packed_linears(model, "on"):
            profiles.append(measure_forward(HFLanguageModel(model), ks, args.context, args.repeats, path="packed oneDNN"))
        if role == "draft" and args.device == "cpu":
            del model
            qmodel = quantize_draft_int8(load_model(name, dtype=torch.float32, device=args.device)[0])
            profiles.append(measure_forward(HFLanguageModel(qmodel), ks, args.context, args.repeats, path="int8 dynamic"))
            del qmodel
        print(format_table(f"{role} {name}", profiles) + "\n")
        report["models"][role] = {"name": name, "profiles": [p.to_dict() for p in profiles]}
        model = None
    safe = "__".join(Path(str(n)).name for n in (args.target, args.draft or "none", args.device))
    out = Path(args.out) if args.out else cache_dir() / "profiles" / f"{safe}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}", file=sys.stderr)
    return 0


# ---- entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list or fetch the known models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known models and whether they are cached").set_defaults(func=cmd_models_list)
    fetch = msub.add_parser("fetch", help="download, assemble and verify a known model")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(func=cmd_models_fetch)

    gen = sub.add_parser("generate", help="generate text with one method")
    gen.add_argument("text", nargs="?", help="prompt; rendered as a chat message when the model has a chat template")
    gen.add_argument("--prompt", help="raw prompt text (no chat template)")
    gen.add_argument("--chat", help="user message rendered with the target's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_model_args(gen)
    _add_decode_args(gen)
    gen.set_defaults(func=cmd_generate)

    prof = sub.add_parser("profile", help="t(k): ms per forward over k new tokens, plain vs fast path")
    prof.add_argument("--target", default=DEFAULT_TARGET)
    prof.add_argument("--draft", default=None, help="also profile this draft model (plain, packed, int8)")
    prof.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    prof.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    prof.add_argument("--ks", default="1,2,4,8,16,32,64,128,256", help="block sizes k to time")
    prof.add_argument("--context", type=int, default=200, help="committed tokens in the cache before each timed pass")
    prof.add_argument("--repeats", type=int, default=3, help="timed passes per k (median reported)")
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--out", default=None, help="JSON file for the measurements (default: in the cache)")
    prof.set_defaults(func=cmd_profile)

    demo = sub.add_parser("demo", help="AR vs speculative decoding on the default models")
    demo.add_argument("--chat", help=f"the user message (default: {DEMO_PROMPT!r})")
    demo.add_argument("--methods", default="sps,pld", help="methods to compare with AR (default sps,pld)")
    _add_model_args(demo)
    _add_decode_args(demo)
    demo.set_defaults(func=cmd_demo)

    bench_p = sub.add_parser(
        "bench",
        help="benchmark methods and Hugging Face peers on a prompt file (resumable)",
        description="Run every method on every prompt (AR first, then the others, per prompt), append one row "
        "per (prompt, method, temperature, repeat) to OUT/results.jsonl, and write OUT/summary.md and plots. "
        "Re-running with the same --out resumes: rows already there are skipped. Progress goes to stderr and, "
        "one line per row, to the log file, so a long run can be left in the background: "
        "nohup specdec bench ... > /dev/null 2>&1 &",
    )
    bench_p.add_argument("--prompts", required=True, help="JSONL prompt file: one object a line with id, task, turns "
                         "(the first turn is sent, as a chat message when the target has a chat template)")
    bench_p.add_argument("--out", required=True, help="output directory (created; re-use it to resume)")
    bench_p.add_argument("--methods", default="ar,sps,pld",
                         help=f"comma-separated; ours: {', '.join(METHODS)}; peers: hf-ar, hf-assisted, "
                         "hf-assisted-tuned, hf-pld ('hf' = all peers). ar always runs (the baseline), and hf-ar "
                         "when a peer is asked for (default ar,sps,pld)")
    bench_p.add_argument("--temperatures", default="0", help="comma-separated, 0 = greedy (default 0)")
    bench_p.add_argument("--max-new-tokens", type=int, default=128)
    bench_p.add_argument("--repeats", type=int, default=1, help="runs per prompt, method and temperature (default 1)")
    bench_p.add_argument("--per-task", type=int, default=None, metavar="N",
                         help="the first N prompts of each task category, in file order (deterministic)")
    bench_p.add_argument("--tasks", default=None, help="comma-separated task categories to keep (default all)")
    bench_p.add_argument("--gamma", type=int, default=4,
                         help="draft length per target call; also hf-assisted-tuned's num_assistant_tokens and "
                         "hf-pld's prompt_lookup_num_tokens (default 4)")
    bench_p.add_argument("--max-ngram", type=int, default=3, help="pld (and hf-pld): longest n-gram to look up")
    bench_p.add_argument("--top-k", type=int, default=0, help="0 = off")
    bench_p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    bench_p.add_argument("--budget", default=None, help="passed to the methods as the option budget")
    bench_p.add_argument("--expansion", default=None, help="passed to the methods as the option expansion")
    bench_p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                         help="any other per-method option, passed to the methods (repeatable; VALUE parsed as JSON "
                         "when it can be)")
    bench_p.add_argument("--variant", action="append", default=[], metavar="'LABEL=METHOD KEY=VALUE ...'",
                         help="a labelled run of one of our methods with its own options, usable in --methods "
                         "like a method name, e.g. --variant 'si-221=specinfer expansion=2,2,1' (repeatable)")
    bench_p.add_argument("--log", default=None, help="progress log, one line per row (default OUT/bench.log)")
    bench_p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_model_args(bench_p)
    bench_p.set_defaults(func=cmd_bench)

    # ---- issue 6 subcommands (bigram) register below this line ----
    from specdec.maxgram import add_bigram_parser

    add_bigram_parser(sub)
    # ---- issue 7 subcommands (tune) register below this line ----
    from specdec.tune import register as register_tune

    register_tune(sub, _add_model_args)
    # ---- issue 8 subcommand (serve) registers below this line ----
    from specdec import server  # importable without the server extra; `serve` says what to install

    server.add_serve_parser(sub, _add_model_args, _add_decode_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specdec.hub import ModelError

    try:
        return int(args.func(args))
    except (ModelError, ValueError) as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
