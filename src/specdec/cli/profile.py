"""`specdec profile`: t(k), ms per forward over k new tokens, of the target (and draft) on each linear
path (plain, prepacked oneDNN everywhere, the measured per-bucket choice, and native = computing on
the GGUF file's quantized blocks), the per-bucket choice itself, and for the draft each precision
this device can run, from one process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from specdec.cli.common import device_of, forget_measurements
from specdec.core.hardware import describe, fingerprint
from specdec.core.store import cache_dir
from specdec.engine.pipeline import DEFAULT_TARGET, DTYPES
from specdec.models.timing import DEFAULT_KS, format_table, measure_forward

LINEAR_MODES = (("off", "plain"), ("on", "packed oneDNN"), ("auto", "auto (per bucket)"))


PATH_OF_MODE = {"off": "plain", "on": "packed", "auto": "auto"}
PATHS = ("plain", "packed", "auto", "native", "precisions")


class _Profiler:
    """Times one model per role on each path asked for (`--paths`), reloading it for each path."""

    def __init__(self, args: argparse.Namespace, ks: tuple[int, ...], paths: list[str], device: str) -> None:
        self.args, self.ks, self.paths, self.device = args, ks, paths, device
        self.kernels: Any = None
        """The per-bucket choice of the last model profiled on the auto path."""

    def measure(self, model: Any, path: str) -> Any:
        from specdec.models.hf import HFLanguageModel

        return measure_forward(HFLanguageModel(model), self.ks, self.args.context, self.args.repeats, path=path)

    def linear_paths(self, name: str) -> list[Any]:
        from specdec.models.dense.kernel_choice import apply_linear_paths
        from specdec.models.hub import load_model

        profiles, self.kernels = [], None
        for mode, label in LINEAR_MODES:
            if PATH_OF_MODE[mode] not in self.paths:
                continue
            model, _ = load_model(name, dtype=DTYPES[self.args.dtype], device=self.device)
            rep = apply_linear_paths(model, mode, progress=lambda msg: print(msg, file=sys.stderr))
            if mode == "on" and not rep.replaced:
                continue  # no packed path for this dtype or device
            if mode == "auto":
                self.kernels = rep
            profiles.append(self.measure(model, label))
            model = None  # free the weights before the next copy loads
        return profiles

    def native(self, role: str, name: str) -> list[Any]:
        from specdec.models.hub import ModelError, load_model
        from specdec.models.native.load import native_summary

        try:
            model, _ = load_model(name, device=self.device, weights="native")
        except ModelError as exc:
            print(f"{role} {name}: no native path ({exc})", file=sys.stderr)
            return []
        print(f"{role} {name} native layers: {native_summary(model)}", file=sys.stderr)
        return [self.measure(model, "native")]

    def row_invariant(self, name: str) -> list[Any]:
        """What exactness costs in reduced precision: one path for every block size and the attention
        that makes a block pass equal one-token passes (`models.dense.invariance`)."""
        from specdec.models.dense.draft_precision import probe_ids
        from specdec.models.dense.invariance import make_row_invariant
        from specdec.models.dense.kernel_choice import apply_linear_paths
        from specdec.models.hub import load_model

        model, tok = load_model(name, dtype=DTYPES[self.args.dtype], device=self.device)
        apply_linear_paths(model, "auto", single_path=True)
        ok = make_row_invariant(model, probe_ids(model.config.vocab_size, tok)[:24])
        return [self.measure(model, "row-invariant" + ("" if ok else " (check failed)"))]

    def draft_precisions(self, name: str) -> list[Any]:
        """The draft in each precision this device runs, then with its output head pruned (`--draft-vocab`)."""
        from specdec.models.dense.draft_precision import make_variant, precision_candidates
        from specdec.models.hub import load_model

        profiles = []
        for precision in precision_candidates(self.device):
            if precision == self.args.dtype:
                continue  # the linear-path rows
            try:
                fp32, _ = load_model(name, dtype=torch.float32, device=self.device)
                variant = make_variant(fp32, precision)
            except (RuntimeError, ValueError) as exc:
                print(f"{precision}: not usable here ({exc})", file=sys.stderr)
                continue
            profiles.append(self.measure(variant, f"{precision} (auto paths)"))
            fp32 = variant = None
        if self.args.draft_vocab:
            from specdec.drafting.vocab import tokens_to_keep
            from specdec.models.dense.pruned_head import prune_output_head

            for precision in precision_candidates(self.device):
                fp32, tok = load_model(name, dtype=torch.float32, device=self.device)
                vocab = fp32.get_output_embeddings().weight.shape[0]
                prune_output_head(fp32, tokens_to_keep(tok, vocab, self.args.draft_vocab))
                try:
                    variant = make_variant(fp32, precision)
                except (RuntimeError, ValueError):
                    continue
                profiles.append(self.measure(variant, f"{precision}, head of {self.args.draft_vocab} tokens"))
                fp32 = variant = None
        return profiles

    def role(self, role: str, name: str) -> dict[str, Any]:
        """Every path for one model, printed; its part of the report."""
        from specdec.models.dense.kernel_choice import format_kernel_report

        profiles = self.linear_paths(name)
        if "native" in self.paths:
            profiles += self.native(role, name)
        if role == "target" and self.args.dtype != "float32":
            profiles += self.row_invariant(name)
        levels: dict[str, Any] = {}
        if role == "draft" and "precisions" in self.paths:
            profiles += self.draft_precisions(name)
            levels = {p.path: p.ms.get(1) for p in profiles}
        print(format_table(f"{role} {name}", profiles) + "\n")
        if self.kernels is not None:
            print(format_kernel_report(self.kernels) + "\n")
        if levels:
            print(f"draft {name}: ms per draft level (a 1-token forward after {self.args.context} tokens): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in levels.items() if v is not None) + "\n")
        return {"name": name, "profiles": [p.to_dict() for p in profiles],
                "linear_paths": [s.to_dict() for s in self.kernels.shapes] if self.kernels else [],
                "ms_per_draft_level": levels}


def cmd_profile(args: argparse.Namespace) -> int:
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
    if args.remeasure:
        forget_measurements(device)
    fp = fingerprint(device)
    print(f"machine: {describe(fp)}", file=sys.stderr)
    report: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "fingerprint": fp, "models": {}}
    profiler = _Profiler(args, ks, paths, device)
    for role, name in [("target", args.target)] + ([("draft", args.draft)] if args.draft else []):
        report["models"][role] = profiler.role(role, name)
    safe = "__".join(Path(str(n)).name for n in (args.target, args.draft or "none", device))
    out = Path(args.out) if args.out else cache_dir() / "profiles" / f"{safe}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"saved {out}", file=sys.stderr)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--draft", default=None, help="also profile this draft model (each linear path and precision)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="what to time, comma-separated: plain, packed (oneDNN), auto (the per-bucket choice), "
                   "native (the GGUF file's blocks; GGUF models only), precisions (the draft in each precision this "
                   "device runs) (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda when available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="block sizes k to time")
    p.add_argument("--context", type=int, default=200, help="committed tokens in the cache before each timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per k (median reported)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON file for the measurements (default: in the cache)")
    p.add_argument("--draft-vocab", type=int, default=32768, metavar="N",
                   help="also time the draft with its output head pruned to the N most frequent tokens (default "
                   "32768; 0 = skip)")
    p.add_argument("--remeasure", action="store_true",
                   help="forget this machine's cached linear-path and draft-precision choices first and measure them "
                   "again (do it on a quiet machine: later loads reuse what is measured)")
    p.set_defaults(func=cmd_profile)
