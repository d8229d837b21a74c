"""Choosing the linear path per layer shape and row-count bucket, by measurement, cached per machine.

For every distinct linear shape of a model (type, dtype, device, out x in, bias) the candidate
paths (`models.dense.linear_paths`) are prepared on the first layer of that shape, checked against the
layer's own forward (they must agree to the dtype's round-off), and timed on that real layer for
the row count of every bucket (interleaved, best of a few calls). Each bucket gets its fastest
path; a path that is not the layer's own must win by a margin, so noise does not make a layer
hold two weight copies for nothing. If holding the chosen copies would take more than half of the
memory still available, each shape falls back to the single path that is best over all buckets.

The timings and choices are cached in `$SPECDEC_CACHE/linear-paths/<fingerprint digest>.json`
(`core.hardware`): another CPU, GPU, thread count or torch version measures again. The numerics
check runs at every load (it costs one call per path and shape); a cached choice that fails it
is dropped with a warning.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdec.core.hardware import available_memory_bytes, fingerprint, fingerprint_digest
from specdec.core.store import measurement_dir, read_json, write_json
from specdec.models.dense.linear_paths import (
    BUCKET_ROWS, PACKED, PLAIN, BlockSizeLinear, LinearPath, bucket_label, is_linear, linear_paths,
)

log = logging.getLogger(__name__)

KERNEL_CACHE_VERSION = 1
MODES = ("auto", "on", "off")
WIN_MARGIN = 0.03
"""A path other than the layer's own must be this much faster in a bucket to be chosen there."""
MEMORY_SHARE = 0.5
"""Extra weight copies may take at most this share of the memory still available."""
ROUND_OFF = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 5e-3}
"""Largest allowed max|path - reference| / max|reference| on a probe input, by the layer's dtype."""


def shape_key(layer: nn.Module) -> str:
    """What a measurement is valid for: layer type, dtype, device type, out x in, bias."""
    w = getattr(layer, "weight", None)
    dtype = str(w.dtype).replace("torch.", "") if isinstance(w, torch.Tensor) else getattr(layer, "dtype_name", "?")
    device = w.device.type if isinstance(w, torch.Tensor) else "cpu"
    bias = getattr(layer, "bias", None) is not None
    return f"{type(layer).__name__}|{dtype}|{device}|{layer.out_features}x{layer.in_features}|bias={int(bias)}"


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    w = getattr(layer, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def _layer_device(layer: nn.Module) -> torch.device:
    w = getattr(layer, "weight", None)
    return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")


def _weight_bytes(layer: nn.Module) -> int:
    w = getattr(layer, "weight", None)
    return int(w.numel() * w.element_size()) if isinstance(w, torch.Tensor) else 0


# ---- measuring ---------------------------------------------------------------------------------
Timer = Callable[[nn.Module, torch.Tensor], float]


def time_call_ms(kernel: nn.Module, x: torch.Tensor) -> float:
    """Wall milliseconds of one call (synchronised on a GPU)."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda *a: None)
    sync()
    t0 = time.perf_counter()
    kernel(x)
    sync()
    return (time.perf_counter() - t0) * 1e3


def probe_input(layer: nn.Module, rows: int, seed: int = 0) -> torch.Tensor:  # -> [1, rows, in]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, layer.in_features, generator=gen)
    return x.to(device=_layer_device(layer), dtype=_layer_dtype(layer))


def relative_difference(kernel: nn.Module, layer: nn.Module, rows: tuple[int, ...] = (1, 4)) -> float:
    """max |kernel(x) - layer(x)| / max |layer(x)| over probe inputs of the given row counts."""
    worst = 0.0
    with torch.inference_mode():
        for m in rows:
            x = probe_input(layer, m, seed=m)
            ref = layer(x).float()
            out = kernel(x).float()
            scale = float(ref.abs().max().clamp_min(1e-12))
            worst = max(worst, float((out - ref).abs().max()) / scale)
    return worst


def measure_kernels(
    layer: nn.Module, kernels: dict[str, nn.Module], timer: Timer = time_call_ms, seconds_per_bucket: float = 0.25,
    max_reps: int = 5,
) -> dict[str, list[float]]:
    """Best-of-a-few milliseconds per call of every kernel at each bucket's row count (interleaved, so
    drift hits all paths alike); calls that take long get fewer repeats."""
    ms: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for rows in BUCKET_ROWS:
            x = probe_input(layer, rows)
            first = {name: timer(k, x) for name, k in kernels.items()}  # warm-up (oneDNN builds its primitive)
            reps = max(1, min(max_reps, int(seconds_per_bucket / max(sum(first.values()) / 1e3, 1e-6))))
            best = {name: math.inf for name in kernels}
            for _ in range(reps):
                for name, k in kernels.items():
                    best[name] = min(best[name], timer(k, x))
            for name in kernels:
                ms[name].append(best[name])
    return ms


def choose_buckets(ms: dict[str, list[float]], own: str = PLAIN.name, margin: float = WIN_MARGIN) -> list[str]:
    """Per bucket, the fastest path; a path other than `own` must beat `own` by `margin`."""
    out = []
    for b in range(len(BUCKET_ROWS)):
        best = min(ms, key=lambda name: ms[name][b])
        if best != own and own in ms and ms[best][b] > ms[own][b] * (1 - margin):
            best = own
        out.append(best)
    return out


def best_single_path(ms: dict[str, list[float]], own: str = PLAIN.name) -> str:
    """The one path with the smallest summed slowdown over the fastest, bucket by bucket."""
    fastest = [min(t[b] for t in ms.values()) for b in range(len(BUCKET_ROWS))]
    cost = {name: sum(t[b] / max(fastest[b], 1e-9) for b in range(len(BUCKET_ROWS))) for name, t in ms.items()}
    return min(cost, key=lambda name: (cost[name], name != own))


# ---- the per-machine cache ---------------------------------------------------------------------
def kernel_cache_path(fp: dict[str, Any]) -> Any:
    return measurement_dir() / "linear-paths" / f"{fingerprint_digest(fp)}.json"


def read_kernel_cache(fp: dict[str, Any]) -> dict[str, Any]:
    """The cached measurements for this machine ({} when none or unreadable: measured again)."""
    return read_json(kernel_cache_path(fp), KERNEL_CACHE_VERSION, fp)


def write_kernel_cache(fp: dict[str, Any], shapes: dict[str, Any]) -> None:
    write_json(kernel_cache_path(fp), KERNEL_CACHE_VERSION, fp, shapes)


def _valid_entry(entry: Any, candidates: list[str]) -> bool:
    try:
        return (sorted(entry["candidates"]) == sorted(candidates) and len(entry["bucket_paths"]) == len(BUCKET_ROWS)
                and set(entry["bucket_paths"]) <= set(candidates)
                and all(len(entry["ms"][c]) == len(BUCKET_ROWS) for c in candidates))
    except (KeyError, TypeError):
        return False


# ---- applying ----------------------------------------------------------------------------------
@dataclass
class ShapeReport:
    """What was chosen for one layer shape and why."""

    key: str
    layers: int
    candidates: list[str]
    ms: dict[str, list[float]]
    rel_diff: dict[str, float]
    bucket_paths: list[str]
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "layers": self.layers, "candidates": self.candidates, "ms": self.ms,
                "rel_diff": self.rel_diff, "bucket_paths": self.bucket_paths, "cached": self.cached}


@dataclass
class KernelReport:
    """The choice for a whole model: one entry per shape."""

    mode: str
    shapes: list[ShapeReport] = field(default_factory=list)
    memory_fallback: bool = False
    replaced: int = 0

    def paths_used(self) -> set[str]:
        return {p for s in self.shapes for p in s.bucket_paths}


def _candidates(layer: nn.Module, paths: list[LinearPath]) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for path in paths:
        try:
            kernel = path.prepare(layer)
        except (RuntimeError, NotImplementedError) as exc:  # a kernel this build or CPU lacks
            log.info("linear path %s cannot run %s: %s", path.name, type(layer).__name__, exc)
            kernel = None
        if kernel is not None:
            out[path.name] = kernel
    return out


def _linears_by_shape(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, nn.Module]]]:
    """Every linear layer of `model` as (parent, attribute, layer), grouped by shape key."""
    by_shape: dict[str, list[tuple[nn.Module, str, nn.Module]]] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if is_linear(child):
                by_shape.setdefault(shape_key(child), []).append((parent, child_name, child))
    return by_shape


def _choose_for_shape(key: str, members: list, mode: str, paths: list[LinearPath], cache: dict, timer: Timer,
                      progress: Callable[[str], None] | None) -> tuple[ShapeReport, bool]:
    """The path per bucket for one shape (measured, or from `cache`), and whether it was measured now."""
    probe = members[0][2]
    kernels = _candidates(probe, paths)
    rel = {name: (0.0 if name == PLAIN.name else relative_difference(k, probe)) for name, k in kernels.items()}
    tol = ROUND_OFF.get(_layer_dtype(probe), 1e-4)
    for name in [n for n, d in rel.items() if d > tol or not math.isfinite(d)]:
        log.warning("linear path %s differs from %s by %.2e (> %.0e): not used", name, key, rel[name], tol)
        kernels.pop(name)
    names = sorted(kernels)
    if mode == "on":
        chosen = PACKED.name if PACKED.name in kernels else PLAIN.name
        return ShapeReport(key, len(members), names, {}, rel, [chosen] * len(BUCKET_ROWS), False), False
    entry = cache.get(key)
    if len(names) <= 1:
        only = names[0] if names else PLAIN.name
        return ShapeReport(key, len(members), names, {}, rel, [only] * len(BUCKET_ROWS), False), False
    if entry is not None and _valid_entry(entry, names):
        ms = {n: [float(v) for v in entry["ms"][n]] for n in names}
        return ShapeReport(key, len(members), names, ms, rel, list(entry["bucket_paths"]), True), False
    if progress is not None:
        progress(f"measuring linear paths {', '.join(names)} for {key} ({len(members)} layers; once per machine)")
    ms = measure_kernels(probe, kernels, timer)
    rep = ShapeReport(key, len(members), names, ms, rel, choose_buckets(ms), False)
    cache[key] = {"candidates": names, "ms": ms, "bucket_paths": rep.bucket_paths, "rel_diff": rel}
    return rep, True


def _one_path_if_needed(choices: dict[str, ShapeReport], by_shape: dict, paths: list[LinearPath], mode: str,
                        single_path: bool, memory_bytes: int | None | str, report: KernelReport) -> None:
    """One path per shape for every bucket: asked for (`single_path`), or forced when keeping a second
    copy of the weights for some buckets would take more than `MEMORY_SHARE` of the free memory."""
    if mode != "auto":
        return
    own_copy = {p.name for p in paths if not p.shares_weight}
    extra = sum(_weight_bytes(layer) * len((set(choices[key].bucket_paths) & own_copy))
                - (_weight_bytes(layer) if PLAIN.name not in choices[key].bucket_paths else 0)
                for key, members in by_shape.items() for _, _, layer in members)
    limit = available_memory_bytes() if memory_bytes == "query" else memory_bytes
    if not single_path:
        if extra <= 0 or limit is None or extra <= MEMORY_SHARE * limit:
            return
        log.warning("per-bucket linear paths would need %.1f GB more memory (%.1f GB available): one path per shape",
                    extra / 1e9, limit / 1e9)
        report.memory_fallback = True
    for rep in choices.values():
        if rep.ms:
            rep.bucket_paths = [best_single_path(rep.ms)] * len(BUCKET_ROWS)


def apply_linear_paths(
    model: nn.Module,
    mode: str = "auto",
    *,
    use_cache: bool = True,
    paths: list[LinearPath] | None = None,
    timer: Timer = time_call_ms,
    memory_bytes: int | None | str = "query",
    progress: Callable[[str], None] | None = None,
    single_path: bool = False,
) -> KernelReport:
    """Replace the model's linears by the paths chosen for their shape and row-count bucket.

    mode "auto": measured per bucket (cached per machine); "on": the prepacked oneDNN path
    wherever it applies (the old fast path); "off": leave the model as it is. `paths`: the
    candidates (default: every registered path). `timer` and `memory_bytes` are for tests (a fake
    clock, a memory limit; "query" asks the OS). single_path: one path per shape for every block
    size (the one best over all buckets), so a one-token pass and a k-token pass run the same
    kernels (`models.dense.invariance`).
    """
    if mode not in MODES:
        raise ValueError(f"fast linear mode must be one of {', '.join(MODES)}, got {mode!r}")
    report = KernelReport(mode)
    by_shape = _linears_by_shape(model) if mode != "off" else {}
    if not by_shape:
        return report
    fp = fingerprint(_layer_device(next(iter(by_shape.values()))[0][2]))
    cache = read_kernel_cache(fp) if (use_cache and mode == "auto") else {}
    if paths is None:
        paths = linear_paths() if mode == "auto" else [PLAIN, PACKED]
    choices, changed = {}, False
    for key, members in by_shape.items():
        choices[key], measured = _choose_for_shape(key, members, mode, paths, cache, timer, progress)
        changed = changed or measured
    if changed and use_cache:
        try:
            write_kernel_cache(fp, cache)
        except OSError as exc:  # a read-only cache only costs a measurement next time
            log.warning("could not save the kernel choice: %s", exc)
    _one_path_if_needed(choices, by_shape, paths, mode, single_path, memory_bytes, report)
    by_name = {p.name: p for p in paths}
    for key, members in by_shape.items():
        rep = choices[key]
        report.shapes.append(rep)
        used = list(dict.fromkeys(rep.bucket_paths))
        if used == [PLAIN.name]:
            continue
        for parent, child_name, layer in members:
            kernels = {name: by_name[name].prepare(layer) for name in used}
            setattr(parent, child_name, kernels[used[0]] if len(used) == 1 else
                    BlockSizeLinear(kernels, rep.bucket_paths, layer.in_features, layer.out_features))
            report.replaced += 1
    return report


def format_kernel_report(report: KernelReport) -> str:
    """A Markdown table: per shape, the path of each row-count bucket and the measured ms."""
    if not report.shapes:
        return f"linear paths ({report.mode}): no linear layer replaced"
    labels = [bucket_label(b) for b in range(len(BUCKET_ROWS))]
    lines = [f"linear paths ({report.mode}" + (", memory fallback: one path per shape" if report.memory_fallback else "")
             + "): path per row-count bucket, ms per call measured on a real layer (once per machine)",
             "| shape | layers | " + " | ".join(f"rows {lab}" for lab in labels) + " |",
             "|---|---:|" + "---|" * len(labels)]
    for s in report.shapes:
        cells = []
        for b, path in enumerate(s.bucket_paths):
            times = "/".join(f"{s.ms[n][b]:.2f}" for n in sorted(s.ms)) if s.ms else ""
            cells.append(f"{path}" + (f" ({times})" if times else ""))
        lines.append(f"| {s.key} | {s.layers} | " + " | ".join(cells) + " |")
    measured = sorted({n for s in report.shapes for n in s.ms})
    if measured:
        lines.append(f"(times: {' / '.join(measured)} ms)")
    return "\n".join(lines)
