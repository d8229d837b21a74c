"""What every subcommand shares: model and sampling flags, method option flags derived from the
methods' `Options` dataclasses, loading a pipeline, and printing statistics.

torch, transformers and the methods are imported inside the functions that need them: building a
parser and reporting a mistake in its flags stays fast. The method option flags are the one part
of a parser that needs the methods (hence torch); `method_flags(False)` leaves them out, which
`cli.main` uses for a first, fast look at the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from specdec.core.hardware import check_device
from specdec.core.options import OptionSpec
from specdec.engine.limits import SEED_BOUND
from specdec.methods import DEFAULT_METHOD
from specdec.models.hub.registry import DEFAULT_TARGET, default_draft

if TYPE_CHECKING:
    from specdec.core.sampling import SamplingConfig
    from specdec.engine.pipeline import Pipeline
    from specdec.methods.base import Method

DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""The names of `engine.pipeline.DTYPES` (a test keeps them equal), without importing torch."""
WEIGHT_NAMES = ("auto", "dense", "native")
"""The names of `models.hub.load.WEIGHTS` (a test keeps them equal), without importing torch."""
DRAFT_QUANT_NAMES = ("auto", "file", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
AUTO_DRAFT_QUANT_NAME = "Q4_0"
"""`models.backends.DRAFT_QUANTS` and `AUTO_DRAFT_QUANT` (a test keeps them equal), without torch."""
DRAFT_FREE_METHOD = "pld"
"""The method of a run that names no --method and has no draft model (prompt lookup needs none)."""

_with_method_flags = True


@contextlib.contextmanager
def method_flags(enabled: bool) -> Iterator[None]:
    """Build parsers with (True) or without (False) the per-method option flags."""
    global _with_method_flags
    saved, _with_method_flags = _with_method_flags, enabled
    try:
        yield
    finally:
        _with_method_flags = saved


def err(msg: str) -> None:
    print(f"specdec: error: {msg}", file=sys.stderr)


# ---- model flags -------------------------------------------------------------------------------
def _draft_vocab(text: str) -> int | str:
    """--draft-vocab: "auto" or a number of tokens ≥ 0."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of tokens (0: the whole head) or auto, got {text!r}")
    return n


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"known model name, .gguf file, local dir or HF id (default {DEFAULT_TARGET})")
    p.add_argument(
        "--draft", action="append", default=None,
        help=f"draft model for methods that need one (default: the target's known draft, {default_draft(DEFAULT_TARGET)} "
        f"for {DEFAULT_TARGET}; none for other targets); repeat it to merge several drafters' trees (specinfer), "
        "or to build a cascade, largest first (csd)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="target dtype (default float32)")
    p.add_argument(
        "--draft-dtype", default="auto", choices=("auto",) + DTYPE_NAMES + ("int8",),
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
        "--draft-vocab", type=_draft_vocab, default="auto", metavar="N|auto",
        help="keep only the N most frequent tokens in the draft's output head (a cheaper draft step; the target "
        "still verifies over its whole vocabulary, so only acceptance and speed change); auto (default) = 32768 "
        "for heads of at least 65536 tokens; 0 = the whole head",
    )
    p.add_argument(
        "--draft-quant", default="auto", choices=list(DRAFT_QUANT_NAMES),
        help="how a native draft stores its linear layers and head: file = the GGUF file's blocks; Q4_0 ... Q8_0 = "
        "its wider layers requantized to that format at load (fewer bytes a draft pass reads; the target still "
        f"verifies every token, so only acceptance and speed change); auto (default) = {AUTO_DRAFT_QUANT_NAME}",
    )
    p.add_argument(
        "--weights", default="auto", choices=WEIGHT_NAMES,
        help="auto (default) = native for a GGUF model on the CPU where it measures faster here, else dense; "
        "dense = full-precision copies of the weights; native = a GGUF model computes on the file's quantized "
        "blocks with our integer kernels (exact: every token scored as in a one-token step)",
    )
    p.add_argument("--draft-weights", default=None, choices=WEIGHT_NAMES,
                   help="the draft's weights, auto, dense or native (default: as --weights)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, which honours OMP_NUM_THREADS)")
    p.add_argument("--offload", action="store_true",
                   help="keep the target's weights in CPU RAM and stream them to the GPU layer by layer (CUDA only; "
                   "the setting SpecExec and Sequoia were built for; on a CPU see `specdec tune --project-offload`)")
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="shard the target over N processes with transformers' tensor-parallel plan (gloo on CPU, NCCL "
                   "on CUDA with one GPU per rank); the command starts the other N-1 ranks itself, or runs under "
                   "torchrun (default 1; under torchrun it must equal WORLD_SIZE)")
    p.add_argument("--verbose", action="store_true",
                   help="show transformers' progress bars and warnings while loading (default: one line per load)")


def forget_measurements(device: str) -> None:
    """Delete this machine's cached measurements (linear paths, draft precision, weights choice, the
    kernels' prefetch distance, forward times), so the next load measures again; tune profiles stay
    (re-tune to replace them)."""
    from specdec.core.hardware import fingerprint
    from specdec.models.dense.draft_precision import precision_cache_path
    from specdec.models.dense.kernel_choice import kernel_cache_path
    from specdec.models.native.choice import choice_cache_path
    from specdec.models.native.prefetch import prefetch_cache_path
    from specdec.tuning.quick import timing_cache_path

    fp = fingerprint(device)
    for path in (kernel_cache_path(fp), precision_cache_path(fp), choice_cache_path(fp), prefetch_cache_path(fp),
                 timing_cache_path()):
        if path.is_file():
            path.unlink()
            print(f"forgot {path}", file=sys.stderr)


def device_of(args: argparse.Namespace) -> str:
    """--device, checked against this torch build (a one-line error, not a traceback, when this torch
    cannot compute on it: `core.hardware.check_device`), or cuda when available, else cpu."""
    import torch

    if args.device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(args.device, f"--device {args.device}")
    return args.device


def drafts_of(args: argparse.Namespace, need: bool = False) -> list[str]:
    """The --draft values (repeatable), or the target's known draft model (none for a target
    without one). need: a ValueError saying what to do when there is none."""
    value = getattr(args, "draft", None)
    if value is not None:
        return [value] if isinstance(value, str) else list(value)
    known = default_draft(args.target)
    if known is None and need:
        method = getattr(args, "method", None)
        who = f"method {method}" if method else "this command"
        # What this command can do without a draft, in its own flags.
        if hasattr(args, "method"):
            instead = f"use a draft-free method such as --method {DRAFT_FREE_METHOD}"
        elif hasattr(args, "methods"):
            instead = f"use draft-free methods only (such as --methods ar,{DRAFT_FREE_METHOD})"
        else:
            instead = "run `specdec tune --quick`, which tunes the draft-free methods"
        raise ValueError(f"{who} needs a draft model and {args.target} has no known one: give --draft NAME (a model "
                         f"with the same tokenizer), or {instead}")
    return [known] if known is not None else []


def resolve_method(args: argparse.Namespace, default: str = DEFAULT_METHOD) -> str:
    """--method, or `default` when a draft model is given or known for the target, else the
    draft-free method (saying so in one line on stderr; commands check first that the target
    exists, `check_target`, so that a missing one gets its error alone)."""
    if getattr(args, "method", None) is not None:
        return args.method
    if drafts_of(args):
        return default
    print(f"specdec: {args.target} has no known draft model: using --method {DRAFT_FREE_METHOD} (prompt lookup, no "
          f"draft); give --draft NAME for {default}", file=sys.stderr)
    return DRAFT_FREE_METHOD


@contextlib.contextmanager
def quiet_loading(verbose: bool) -> Iterator[None]:
    """Loading prints one line; transformers' progress bars and warnings only with --verbose."""
    if verbose:
        from specdec.models.hub.load import transformers_bars

        with transformers_bars():  # the library's loaders hide them otherwise
            yield
        return
    import warnings

    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="transformers")
            warnings.filterwarnings("ignore", module="accelerate")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def tensor_parallel_size_of(args: argparse.Namespace) -> int:
    """--tensor-parallel-size, checked against torchrun's WORLD_SIZE when torchrun started this process."""
    from specdec.models.parallel.group import launched_by_torchrun

    size = getattr(args, "tensor_parallel_size", None)
    if size is None and launched_by_torchrun():
        world = os.environ["WORLD_SIZE"]
        raise ValueError(f"this process is one of {world} ranks started by torchrun; pass --tensor-parallel-size "
                         f"{world} to shard the target over them")
    if size is not None and size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {size}")
    return size or 1


def check_target(args: argparse.Namespace) -> None:
    """ModelError, before anything else is said or loaded, when --target names nothing: not a
    known model, not a file or directory, not a hub id (nothing is downloaded here)."""
    from specdec.models.hub.resolve import resolve

    resolve(args.target)


def context_length_of(spec: str) -> int | None:
    """The model's context in tokens, from its config alone (no weights): for a checkpoint
    directory, or a known model or GGUF file already converted once. None where only loading it
    would tell (a hub id, a first use, a config without it)."""
    from specdec.models.hub.load import load_config
    from specdec.models.hub.resolve import resolve

    try:
        if resolve(spec).kind == "hub":
            return None  # its config may be behind the network: the load tells
        config = load_config(spec)
    except (ValueError, OSError):
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length > 0 else None


def check_max_new_tokens(args: argparse.Namespace) -> None:
    """--max-new-tokens, before any model loads: positive, and (where the target's config tells
    without loading it) within its context, beside at least one prompt token."""
    from specdec.core.options import check_positive_int

    check_positive_int("--max-new-tokens", args.max_new_tokens)
    context = context_length_of(args.target)
    if context is not None and args.max_new_tokens + 1 > context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit {args.target}'s context of {context} "
                         "tokens (with the prompt); ask for fewer")


def load_pipeline(args: argparse.Namespace, need_draft: bool, optional_draft: bool = False) -> Pipeline:
    """The models (one line on stderr): the target and, with `need_draft`, the --draft models or the
    target's known one — an error when there is none, unless `optional_draft` (a method such as
    `auto` that uses a draft model where there is one)."""
    import torch

    from specdec.engine.pipeline import DTYPES, Pipeline

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    tp_size = tensor_parallel_size_of(args)
    rank0 = int(os.environ.get("RANK", "0") or 0) == 0  # under torchrun only rank 0 talks
    device = device_of(args)
    t0 = time.perf_counter()
    drafts = drafts_of(args, need=not optional_draft) if need_draft else []
    # One line per load: the names now, the time when done.
    if rank0:
        print(f"loading {args.target}" + "".join(f" + {d}" for d in drafts)
              + (f", target sharded over {tp_size} ranks" if tp_size > 1 else "") + " …",
              end="", file=sys.stderr, flush=True)
    try:
        with quiet_loading(bool(getattr(args, "verbose", False))):
            # Offloading is a property of the loaded target: every method of this run, the AR baseline
            # included, then sees the same offloaded target.
            pipe = Pipeline(
                args.target, drafts or None, device=device, dtype=DTYPES[args.dtype],
                draft_dtype=args.draft_dtype, fast_linear=args.fast_linear,
                offload=bool(getattr(args, "offload", False)), tensor_parallel_size=tp_size,
                weights=args.weights, draft_weights=args.draft_weights,
                row_invariant=getattr(args, "row_invariant", "auto"), draft_vocab=getattr(args, "draft_vocab", None),
                draft_quant=getattr(args, "draft_quant", "auto"),
            )
    except BaseException:
        if rank0:
            print(file=sys.stderr)  # end the line before the error
        raise
    group = getattr(pipe.target_lm, "group", None)
    if group is not None:
        group.exit_on_failure = True  # a command (a server too) ends when a rank dies, idle or not
    if rank0:
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe


# ---- sampling flags ----------------------------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser, seed: bool = True, temperature_help: str | None = None,
                      temperature: float = 0.0) -> None:
    p.add_argument("--temperature", type=float, default=temperature,
                   help=temperature_help or "0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    if seed:
        p.add_argument("--seed", type=seed_value, default=None, help="seed for sampling (T > 0)")


def seed_value(text: str) -> int:
    """--seed: an integer in [0, 2^63), what torch's generators and the server take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value < SEED_BOUND:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^63), got {value}")
    return value


def sampling_of(args: argparse.Namespace) -> SamplingConfig:
    from specdec.core.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


# ---- method flags, derived from each method's Options ------------------------------------------
def option_specs(methods: Iterable[Method] | None = None) -> dict[str, list[tuple[str, OptionSpec]]]:
    """Every option name with the (method, spec) pairs that declare it."""
    from specdec.methods.registry import all_methods

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


def add_method_args(p: argparse.ArgumentParser, default_method: str | None = None, method_help: str | None = None) -> None:
    """--method and one flag per method option (`--gamma`, `--budget`, …; default None = the
    method's own default), each declared once, by the methods' `Options`.

    default_method None: the command resolves it (`resolve_method`: auto with a draft model, else pld).
    method_help: what --method means to a command that reads it otherwise.
    """
    default_help = method_help or (
        f"default {default_method}" if default_method else
        f"default {DEFAULT_METHOD} (the tuned fastest method; tuned on first use) when a draft model is given or "
        f"known for the target, else {DRAFT_FREE_METHOD}")
    if not _with_method_flags:  # a first look at the command line: no methods imported
        p.add_argument("--method", default=default_method, help=f"decoding method ({default_help})")
        return
    from specdec.methods.registry import all_methods

    names = list(all_methods())
    p.add_argument("--method", default=default_method, choices=names, help=f"decoding method ({default_help})")
    add_option_flags(p)


def add_generation_args(p: argparse.ArgumentParser, method_help: str | None = None) -> None:
    """What a command that generates on the command line takes: --max-new-tokens, the model flags,
    the sampling flags and the method flags (`generate`, `demo`)."""
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="tokens to generate at most (default 128; the prompt and they must fit the context)")
    add_model_args(p)
    add_sampling_args(p)
    add_method_args(p, method_help=method_help)


def add_option_flags(p: argparse.ArgumentParser, skip: Iterable[str] = ()) -> None:
    """One flag per method option of every method (`--gamma`, `--budget`, …), default None (each
    method's own), help from each method's declaration; `skip`: options the command declares itself."""
    if not _with_method_flags:  # a first look at the command line: no methods imported
        return
    for name, pairs in option_specs().items():
        if name in skip:
            continue
        spec = pairs[0][1]
        if spec.flag:
            p.add_argument(spec.cli_flag, action="store_true", default=None, help=_help(pairs))
        else:
            p.add_argument(spec.cli_flag, default=None, metavar=spec.metavar, help=_help(pairs),
                           choices=spec.choices)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method option flags the user gave (as strings; each method parses its own)."""
    return {name: getattr(args, name) for name in option_specs() if getattr(args, name, None) is not None}


def options_for(method: str, given: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """The given options that `method` has. strict: a given option it lacks is an error."""
    from specdec.methods.registry import get_method

    known = get_method(method).options.names()
    if strict:
        extra = sorted(set(given) - known)
        if extra:
            flag = "--" + extra[0].replace("_", "-")
            raise ValueError(f"{flag} is not an option of method {method!r} (its options: "
                             f"{', '.join(sorted(known)) or 'none'})")
    return {k: v for k, v in given.items() if k in known}


def check_all_known(given: dict[str, Any], methods: Iterable[str]) -> None:
    """Every given option belongs to at least one of `methods` (demo, bench)."""
    from specdec.methods.registry import get_method

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
