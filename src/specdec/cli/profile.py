"""`specdec profile`: t(k), ms per forward over k new tokens, of the target (and draft) on the plain
path and on the fast paths (packed oneDNN linears; int8 for a CPU draft; native = computing on the
GGUF file's quantized blocks), from one process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from specdec.cli.common import device_of
from specdec.core.store import cache_dir
from specdec.engine.pipeline import DEFAULT_TARGET, DTYPES
from specdec.tuning.timing import DEFAULT_KS, format_table, measure_forward


PATHS = ("plain", "packed", "int8", "native")


def cmd_profile(args: argparse.Namespace) -> int:
    from specdec.models.fastpath import enable_packed_linears, quantize_draft_int8
    from specdec.models.hf import HFLanguageModel
    from specdec.models.hub import ModelError, load_model
    from specdec.models.quant.load import native_summary

    ks = tuple(int(k) for k in args.ks.split(","))
    if not ks or min(ks) < 1:
        raise ValueError("--ks must be a comma-separated list of positive integers")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or not paths:
        raise ValueError(f"--paths takes a comma-separated subset of {','.join(PATHS)}, got {args.paths!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = device_of(args)
    report: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "models": {}}
    roles = [("target", args.target)] + ([("draft", args.draft)] if args.draft else [])

    def measure(model: Any, path: str) -> Any:
        return measure_forward(HFLanguageModel(model), ks, args.context, args.repeats, path=path)

    for role, name in roles:
        profiles = []
        if "plain" in paths or "packed" in paths:
            model, _ = load_model(name, dtype=DTYPES[args.dtype], device=device)
            if "plain" in paths:
                profiles.append(measure(model, "plain"))
            if "packed" in paths and enable_packed_linears(model, "on"):
                profiles.append(measure(model, "packed oneDNN"))
            model = None  # free the weights before the next copy loads
        if "int8" in paths and role == "draft" and device == "cpu":
            qmodel = quantize_draft_int8(load_model(name, dtype=torch.float32, device=device)[0])
            profiles.append(measure(qmodel, "int8 dynamic"))
            qmodel = None
        if "native" in paths:
            try:
                nmodel, _ = load_model(name, device=device, weights="native")
            except ModelError as exc:
                print(f"{role} {name}: no native path ({exc})", file=sys.stderr)
            else:
                print(f"{role} {name} native layers: {native_summary(nmodel)}", file=sys.stderr)
                profiles.append(measure(nmodel, "native"))
                nmodel = None
        if not profiles:
            continue
        print(format_table(f"{role} {name}", profiles) + "\n")
        report["models"][role] = {"name": name, "profiles": [p.to_dict() for p in profiles]}
    safe = "__".join(Path(str(n)).name for n in (args.target, args.draft or "none", device))
    out = Path(args.out) if args.out else cache_dir() / "profiles" / f"{safe}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}", file=sys.stderr)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=None, help="also profile this draft model (plain, packed, int8, native)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="paths to time, comma-separated: plain, packed (oneDNN), int8 (draft on the CPU only), "
                   "native (the GGUF file's blocks; GGUF models only) (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="block sizes k to time")
    p.add_argument("--context", type=int, default=200, help="committed tokens in the cache before each timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per k (median reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the measurements (default: in the cache)")
    p.set_defaults(func=cmd_profile)
