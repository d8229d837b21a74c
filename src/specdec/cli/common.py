"""What every subcommand shares: model and sampling flags, method option flags derived from the
methods' `Options` dataclasses, loading a pipeline, and printing statistics."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch

from specdec.core.options import OptionSpec
from specdec.core.sampling import SamplingConfig
from specdec.engine.pipeline import DEFAULT_DRAFT, DEFAULT_METHOD, DEFAULT_TARGET, DTYPES, Pipeline
from specdec.methods.base import Method
from specdec.methods.registry import all_methods, get_method
from specdec.tuning import autotune  # noqa: F401  (registers auto's tune-on-first-use)


def err(msg: str) -> None:
    print(f"specdec: error: {msg}", file=sys.stderr)


# ---- model flags -------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"known model name, .gguf file, local dir or HF id (default {DEFAULT_TARGET})")
    p.add_argument(
        "--draft", action="append", default=None,
        help=f"draft model for methods that need one (default {DEFAULT_DRAFT}); repeat it to merge several "
        "drafters' trees (specinfer), or to build a cascade, largest first (csd)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="target dtype (default float32)")
    p.add_argument(
        "--draft-dtype", default="auto", choices=["auto"] + sorted(DTYPES) + ["int8"],
        help="draft precision (default auto: the fastest measured on this machine, cached; int8 = dynamic int8 "
        "quantization of the draft's linears, CPU). It changes speed only, never the output: every drafted token is "
        "verified against the target",
    )
    p.add_argument(
        "--fast-linear", default="auto", choices=["auto", "on", "off"],
        help="linear kernels (default auto: per row-count bucket, the fastest path measured on this machine, cached; "
        "on: prepacked oneDNN everywhere; off: plain F.linear). Every path is the same function up to round-off",
    )
    p.add_argument(
        "--row-invariant", default="auto", choices=["auto", "on", "off"],
        help="make the target score k tokens in one pass bit for bit like k one-token passes (one linear path for "
        "every block size, eager or per-query attention, checked at load) so greedy speculative output equals plain "
        "decoding; auto (default) = on for bfloat16/float16 targets",
    )
    p.add_argument(
        "--draft-vocab", type=int, default=None, metavar="N",
        help="keep only the N most frequent tokens in the draft's output head (a cheaper draft step; the target "
        "still verifies over its whole vocabulary, so only acceptance and speed change)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, which honours OMP_NUM_THREADS)")
    p.add_argument("--offload", action="store_true",
                   help="keep the target's weights in CPU RAM and stream them to the GPU layer by layer (CUDA only; "
                   "the setting SpecExec and Sequoia were built for; on a CPU see `specdec tune --project-offload`)")


def forget_measurements(device: str) -> None:
    """Delete this machine's cached measurements (linear paths, draft precision, forward times), so the
    next load measures again; tune profiles stay (re-tune to replace them)."""
    from specdec.core.hardware import fingerprint
    from specdec.models.draft_precision import precision_cache_path
    from specdec.models.kernel_choice import kernel_cache_path
    from specdec.tuning.quick import timing_cache_path

    fp = fingerprint(device)
    for path in (kernel_cache_path(fp), precision_cache_path(fp), timing_cache_path()):
        if path.is_file():
            path.unlink()
            print(f"forgot {path}", file=sys.stderr)


def device_of(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def drafts_of(args: argparse.Namespace) -> list[str]:
    """The --draft values (repeatable), or the default draft model."""
    value = getattr(args, "draft", None)
    if value is None:
        return [DEFAULT_DRAFT]
    return [value] if isinstance(value, str) else list(value)


def load_pipeline(args: argparse.Namespace, need_draft: bool) -> Pipeline:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    drafts = drafts_of(args) if need_draft else []
    print(f"loading {args.target}" + "".join(f" + {d}" for d in drafts) + " …", file=sys.stderr)
    # Offloading is a property of the loaded target: every method of this run, the AR baseline
    # included, then sees the same offloaded target.
    pipe = Pipeline(
        args.target, drafts or None, device=device_of(args), dtype=DTYPES[args.dtype],
        draft_dtype=args.draft_dtype, fast_linear=args.fast_linear, offload=bool(getattr(args, "offload", False)),
        row_invariant=getattr(args, "row_invariant", "auto"), draft_vocab=getattr(args, "draft_vocab", None),
    )
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe


# ---- sampling flags ----------------------------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    if seed:
        p.add_argument("--seed", type=int, default=None, help="seed for sampling (T > 0)")


def sampling_of(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


# ---- method flags, derived from each method's Options ------------------------------------------
def option_specs(methods: Iterable[Method] | None = None) -> dict[str, list[tuple[str, OptionSpec]]]:
    """Every option name with the (method, spec) pairs that declare it."""
    out: dict[str, list[tuple[str, OptionSpec]]] = {}
    for m in methods if methods is not None else all_methods().values():
        for spec in m.options.specs():
            out.setdefault(spec.name, []).append((m.name, spec))
    return out


def _help(pairs: list[tuple[str, OptionSpec]]) -> str:
    # Methods that describe an option alike share one clause: "sps, pld: draft length (default 4)".
    clauses: dict[tuple[str, str], list[str]] = {}
    for method, spec in pairs:
        default = "" if spec.flag or spec.default is None else f" (default {_fmt_default(spec.default)})"
        clauses.setdefault((spec.help, default), []).append(method)
    return "; ".join(f"{', '.join(ms)}: {h}{d}" for (h, d), ms in clauses.items())


def _fmt_default(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


GAMMA_HELP = ("draft length per target call for sps, pld and maxgram (default 4); for the other methods a cap on "
              "the levels drafted per step")


def add_method_args(p: argparse.ArgumentParser, default_method: str = DEFAULT_METHOD) -> None:
    """--method, --gamma and one flag per method option (default None = the method's own default)."""
    names = list(all_methods())
    p.add_argument("--method", default=default_method, choices=names, help=f"decoding method (default {default_method})")
    p.add_argument("--gamma", type=int, default=None, help=GAMMA_HELP)
    for name, pairs in option_specs().items():
        if name == "gamma":
            continue
        spec = pairs[0][1]
        if spec.flag:
            p.add_argument(spec.cli_flag, action="store_true", default=None, help=_help(pairs))
        else:
            p.add_argument(spec.cli_flag, default=None, metavar=spec.metavar, help=_help(pairs),
                           choices=spec.choices)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method option flags the user gave (as strings; each method parses its own)."""
    return {name: getattr(args, name) for name in option_specs() if name != "gamma"
            and getattr(args, name, None) is not None}


def options_for(method: str, given: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The given options that `method` has. strict: a given option it lacks is an error."""
    known = get_method(method).options.names()
    if strict:
        extra = sorted(set(given) - known)
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise ValueError(f"{flag} is not an option of method {method!r} (its options: "
                             f"{', '.join(sorted(known - {'gamma'})) or 'none'})")
    return {k: v for k, v in given.items() if k in known}


def check_all_known(given: dict[str, Any], methods: Iterable[str]) -> None:
    """Every given option belongs to at least one of `methods` (demo, bench)."""
    known: set[str] = set()
    for m in methods:
        known |= get_method(m).options.names()
    extra = sorted(set(given) - known)
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')} is not an option of any of the methods {', '.join(methods)}")


# ---- output ------------------------------------------------------------------------------------
def format_stats(stats: dict[str, Any]) -> str:
    apos = ", ".join(f"{a:.2f}" for a in stats["accepted_per_position"])
    return (
        f"{stats['new_tokens']} tokens in {stats['wall_s']:.2f} s = {stats['tokens_per_s']:.2f} tokens/s | "
        f"target calls {stats['target_calls']}, {stats['tokens_per_call']:.2f} tokens/call, "
        f"accepted {stats['accepted_tokens']}/{stats['draft_tokens']} drafts "
        f"({stats['mean_accepted_per_call']:.2f}/call) | draft {stats['draft_s']:.2f} s, target {stats['target_s']:.2f} s"
        + (f" | acceptance by position [{apos}]" if apos else "")
    )
