"""`specdec profile`: t(k), ms per forward over k new tokens, and the prompt rate of the target (and
draft) on each weights path: native (a GGUF file's blocks on the integer kernels, what `--weights
auto` loads for GGUF models on a CPU), plain, prepacked oneDNN everywhere and the measured per-bucket
choice (dense), the per-bucket choice itself, and for a dense draft each precision this device can
run, from one process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from specdec.cli.common import AUTO_DRAFT_QUANT_NAME, DRAFT_QUANT_NAMES, device_of, forget_measurements
from specdec.core.hardware import describe, fingerprint
from specdec.core.options import check_positive_int, int_list
from specdec.core.store import cache_dir
from specdec.engine.pipeline import DEFAULT_TARGET, DTYPES
from specdec.models.timing import DEFAULT_KS, ForwardProfile, format_table, measure_forward, measure_prompt

LINEAR_MODES = (("off", "plain"), ("on", "packed oneDNN"), ("auto", "auto (per bucket)"))
PATH_OF_MODE = {"off": "plain", "on": "packed", "auto": "auto"}
PATHS = ("native", "plain", "packed", "auto", "precisions")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


def _paths_for(name: str, requested: str) -> list[str]:
    """The paths to time for a model: `requested`, or by default native for a GGUF model (what loads
    by default) and the dense paths for others."""
    if requested != "default":
        return [p.strip() for p in requested.split(",") if p.strip()]
    from specdec.models.hub.load import is_gguf

    return ["native"] if is_gguf(name) else ["plain", "packed", "auto", "precisions"]


def _timed(lm: Any, label: str, args: argparse.Namespace, ks: tuple[int, ...]) -> ForwardProfile:
    room = getattr(lm, "context_length", None)
    if room is not None and args.context + max(ks) + 1 > room:
        raise ValueError(f"--context {args.context} and the largest of --ks ({max(ks)}) do not fit the model's context "
                         f"of {room} tokens")
    if room is not None and args.prompt_lengths and max(args.prompt_lengths) + 1 > room:
        raise ValueError(f"--prompt {max(args.prompt_lengths)} does not fit the model's context of {room} tokens")
    profile = measure_forward(lm, ks, args.context, args.repeats, path=label)
    if args.prompt_lengths:
        measure_prompt(lm, profile, args.prompt_lengths)
    return profile


def _dense_profiles(name: str, args: argparse.Namespace, paths: list[str], ks: tuple[int, ...],
                    device: str) -> tuple[list[ForwardProfile], Any]:
    from specdec.models.dense.kernel_choice import apply_linear_paths
    from specdec.models.hf import HFLanguageModel
    from specdec.models.hub import load_model

    profiles, kernels = [], None
    for mode, label in LINEAR_MODES:
        if PATH_OF_MODE[mode] not in paths:
            continue
        model, _ = load_model(name, dtype=DTYPES[args.dtype], device=device)
        rep = apply_linear_paths(model, mode, progress=_say)
        if mode == "on" and not rep.replaced:
            continue  # no packed path for this dtype or device
        if mode == "auto":
            kernels = rep
        profiles.append(_timed(HFLanguageModel(model), label, args, ks))
        model = None  # free the weights before the next copy loads
    return profiles, kernels


def _native_profile(role: str, name: str, args: argparse.Namespace, ks: tuple[int, ...]) -> list[ForwardProfile]:
    """The file's blocks on the native kernels, and for a draft its requantized copy (`--draft-quant`)."""
    from specdec.models.hub import ModelError
    from specdec.models.hub.load import load_native_lm
    from specdec.models.native import kernels
    from specdec.models.native.formats import format_of
    from specdec.models.native.lm import NativeLM

    try:
        lm, _, _ = load_native_lm(name, progress=True)
    except ModelError as exc:
        _say(f"{role} {name}: no native path ({exc})")
        return []
    _say(f"{role} {name}: native on {type(lm).__name__}, kernels built for {kernels.cpu_isa()}")
    profiles = [_timed(lm, "native", args, ks)]
    lm = None  # free the blocks before the requantized copy loads
    if role == "draft" and args.draft_quant != "file":
        requantized, _, _ = load_native_lm(name, progress=True, requantize_to=format_of(args.draft_quant))
        if isinstance(requantized, NativeLM):  # the transformers fallback computes on the file's blocks
            profiles.append(_timed(requantized, f"native, {args.draft_quant} (--draft-quant)", args, ks))
    return profiles


def _invariant_profile(name: str, args: argparse.Namespace, ks: tuple[int, ...], device: str) -> ForwardProfile:
    """What exactness costs in reduced precision: one path for every block size and the attention that
    makes a block pass equal one-token passes (`models.dense.invariance`)."""
    from specdec.models.dense.draft_precision import probe_ids
    from specdec.models.dense.invariance import make_row_invariant
    from specdec.models.dense.kernel_choice import apply_linear_paths
    from specdec.models.hf import HFLanguageModel
    from specdec.models.hub import load_model

    model, tok = load_model(name, dtype=DTYPES[args.dtype], device=device)
    apply_linear_paths(model, "auto", single_path=True)
    ok = make_row_invariant(model, probe_ids(model.config.vocab_size, tok)[:24])
    return _timed(HFLanguageModel(model), "row-invariant" + ("" if ok else " (check failed)"), args, ks)


def _precision_profiles(name: str, args: argparse.Namespace, ks: tuple[int, ...], device: str) -> list[ForwardProfile]:
    """A dense draft in each precision this device runs, and with its head pruned (`--draft-vocab`)."""
    from specdec.drafting.vocab import tokens_to_keep
    from specdec.models.dense.draft_precision import make_variant, precision_candidates
    from specdec.models.dense.pruned_head import prune_output_head
    from specdec.models.hf import HFLanguageModel
    from specdec.models.hub import load_model

    profiles = []
    heads = [None] + ([args.draft_vocab] if args.draft_vocab else [])
    for vocab in heads:
        for precision in precision_candidates(device):
            if precision == args.dtype and vocab is None:
                continue  # the dense rows already
            fp32, tok = load_model(name, dtype=torch.float32, device=device)
            if vocab is not None:
                prune_output_head(fp32, tokens_to_keep(tok, fp32.get_output_embeddings().weight.shape[0], vocab))
            try:
                variant = make_variant(fp32, precision)
            except (RuntimeError, ValueError) as exc:
                _say(f"{precision}: not usable here ({exc})")
                continue
            label = f"{precision} (auto paths)" if vocab is None else f"{precision}, head of {vocab} tokens"
            profiles.append(measure_forward(HFLanguageModel(variant), ks, args.context, args.repeats, path=label))
            fp32 = variant = None
    return profiles


def _profile_model(role: str, name: str, args: argparse.Namespace, ks: tuple[int, ...], device: str) -> dict[str, Any]:
    paths = _paths_for(name, args.paths)
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or not paths:
        raise ValueError(f"--paths takes 'default' or a comma-separated subset of {','.join(PATHS)}, got {args.paths!r}")
    profiles: list[ForwardProfile] = []
    if "native" in paths:
        profiles += _native_profile(role, name, args, ks)
    dense, kernels = _dense_profiles(name, args, paths, ks, device)
    profiles += dense
    if role == "target" and args.dtype != "float32" and dense:
        profiles.append(_invariant_profile(name, args, ks, device))
    levels: dict[str, Any] = {}
    if role == "draft" and "precisions" in paths:
        profiles += _precision_profiles(name, args, ks, device)
    if role == "draft":
        levels = {p.path: p.ms.get(1) for p in profiles}
    if profiles:
        print(format_table(f"{role} {name}", profiles) + "\n")
    if kernels is not None:
        from specdec.models.dense.kernel_choice import format_kernel_report

        print(format_kernel_report(kernels) + "\n")
    if levels:
        print(f"draft {name}: ms per draft level (a 1-token forward after {args.context} tokens): "
              + ", ".join(f"{k} {v:.1f}" for k, v in levels.items() if v is not None) + "\n")
    return {"name": name, "profiles": [p.to_dict() for p in profiles],
            "linear_paths": [s.to_dict() for s in kernels.shapes] if kernels else [], "ms_per_draft_level": levels}


def _check_sizes(args: argparse.Namespace) -> tuple[int, ...]:
    """The block sizes to time; every size flag checked (one line each) before any model is loaded."""
    def parsed(flag: str, value: str) -> tuple[int, ...]:
        try:
            return int_list(value)
        except ValueError as exc:
            raise ValueError(f"{flag} {exc}") from None

    ks = parsed("--ks", args.ks)
    args.prompt_lengths = parsed("--prompt", args.prompt) if args.prompt else ()
    check_positive_int("--context", args.context)
    check_positive_int("--repeats", args.repeats)
    if args.threads is not None:
        check_positive_int("--threads", args.threads)
    return ks


def cmd_profile(args: argparse.Namespace) -> int:
    ks = _check_sizes(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_of(args)
    if args.remeasure:
        forget_measurements(device)
    fp = fingerprint(device)
    _say(f"machine: {describe(fp)}")
    report: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "fingerprint": fp, "models": {}}
    for role, name in [("target", args.target)] + ([("draft", args.draft)] if args.draft else []):
        report["models"][role] = _profile_model(role, name, args, ks, device)
    safe = "__".join(Path(str(n)).name for n in (args.target, args.draft or "none", device))
    out = Path(args.out) if args.out else cache_dir() / "profiles" / f"{safe}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    _say(f"saved {out}")
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=None, help="also profile this draft model (each path and precision)")
    p.add_argument("--paths", default="default",
                   help="what to time, comma-separated: native (the GGUF file's blocks on the integer kernels; GGUF "
                   "models only), plain, packed (oneDNN), auto (the per-bucket dense choice), precisions (a dense "
                   "draft in each precision this device runs); default: native for GGUF models, the dense paths "
                   "for others")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="block sizes k to time")
    p.add_argument("--context", type=int, default=200, help="committed tokens in the cache before each timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per k (median reported)")
    p.add_argument("--prompt", default="512", help="prompt lengths whose prefill rate to time, comma-separated "
                   "(empty: none)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the measurements (default: in the cache)")
    p.add_argument("--draft-vocab", type=int, default=32768, metavar="N",
                   help="also time a dense draft with its output head pruned to the N most frequent tokens (default "
                   "32768; 0 = skip)")
    p.add_argument("--draft-quant", default=AUTO_DRAFT_QUANT_NAME, choices=[q for q in DRAFT_QUANT_NAMES if q != "auto"],
                   help="also time a native draft requantized to this format, as `--draft-quant` loads it (default "
                   f"{AUTO_DRAFT_QUANT_NAME}; file = skip)")
    p.add_argument("--remeasure", action="store_true",
                   help="forget this machine's cached measurements (linear paths, draft precision, weights choice) "
                   "first and measure them again (do it on a quiet machine: later loads reuse what is measured)")
    p.set_defaults(func=cmd_profile)
