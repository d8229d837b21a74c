"""How far ahead the integer kernels prefetch weights, measured once per machine.

At one row (a decoding step) a native linear layer streams its weights from memory, and the
kernels keep requests in flight by prefetching the panel block a fixed number of bytes ahead
(csrc/qgemm.cpp, "prefetching"). The best distance belongs to the memory system: 12 KB was
chosen on an Intel Xeon, while on an AMD EPYC (Zen 4) the 1.5B's one-token forward ran 4.8 %
faster at 6 KB than at 12 KB (median of 30 passes each, alternated in one process). A prefetch only
moves bytes into the cache, so the distance changes no result, only the speed.

`use_measured_prefetch` times one-row products over seven decoder layers' worth of K-quant matrices
(larger than the caches) at each of `CANDIDATES`, in alternating rounds (a shared machine's speed
drifts between seconds), takes the fastest median and sets it in the kernel library. The choice is
cached per hardware fingerprint under `$SPECDEC_MEASUREMENTS/kernels/`, like the other per-machine
measurements (`specdec profile --remeasure` forgets it).
"""

from __future__ import annotations

import ctypes
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from specdec.core.hardware import fingerprint, fingerprint_digest
from specdec.core.store import measurement_dir, read_json, write_json
from specdec.models.native import kernels
from specdec.models.native.formats import FORMATS, random_blocks

__all__ = ["CANDIDATES", "measure_prefetch", "prefetch_cache_path", "use_measured_prefetch"]

log = logging.getLogger(__name__)

PREFETCH_VERSION = 1
CANDIDATES = (4096, 6144, 8192, 12288, 16384)
"""Distances in bytes (the kernels round each up to whole panel blocks of the format)."""
ROUNDS = 25
# A decoder layer of a 1.5B llama-family model at one row: q, k, v, o, gate, up, down as (format,
# outputs, inputs), the mix of a Q4_K_M file. Seven layers' worth (~210 MB) is larger than the
# last-level caches of the machines we meet, so a pass streams from memory, in short and long runs
# as a decoding step does.
_LAYER = (("Q4_K", 1536, 1536), ("Q4_K", 256, 1536), ("Q6_K", 256, 1536), ("Q4_K", 1536, 1536),
          ("Q4_K", 8960, 1536), ("Q4_K", 8960, 1536), ("Q6_K", 1536, 8960))
_LAYERS = 7

Timer = Callable[[int], float]  # distance -> seconds of one pass


def prefetch_cache_path(fp: dict) -> Path:
    return measurement_dir() / "kernels" / f"prefetch-{fingerprint_digest(fp)}.json"


def _one_row_pass(lib: ctypes.CDLL, isa: str) -> Timer:
    """A pass of one-row products over `_LAYERS` layers of timing matrices, at a given distance."""
    gen = torch.Generator().manual_seed(0)
    first = {}  # one random matrix per shape; the other layers get copies (their own memory)
    work = []
    for layer in range(_LAYERS):
        for name, rows, cols in _LAYER:
            fmt = FORMATS[name]
            if (name, rows, cols) not in first:
                x = kernels.quantize(torch.randn(1, cols, generator=gen), fmt, isa)
                first[name, rows, cols] = (x, kernels.repack(random_blocks(fmt, rows, cols, gen), fmt, cols, isa))
            x, packed = first[name, rows, cols]
            work.append((fmt, x, cols, packed if layer == 0 else packed.clone(), rows))
    out = torch.empty(1, max(rows for _, rows, _ in _LAYER))

    def run(distance: int) -> float:
        lib.specdec_set_prefetch_bytes(distance)
        start = time.perf_counter()
        for fmt, x, cols, packed, rows in work:
            kernels.qgemm(x, 1, cols, packed, fmt, rows, out=out[:, :rows], isa=isa)
        return time.perf_counter() - start

    return run


def measure_prefetch(timer: Timer, candidates: tuple[int, ...] = CANDIDATES, rounds: int = ROUNDS) -> dict[int, float]:
    """Median seconds per pass for each distance, the distances taking turns round by round."""
    timer(candidates[0])  # first touch of the matrices
    times: dict[int, list[float]] = {c: [] for c in candidates}
    for _ in range(rounds):
        for c in candidates:
            times[c].append(timer(c))
    return {c: statistics.median(v) for c, v in times.items()}


def use_measured_prefetch(isa: str | None = None, *, timer: Timer | None = None, use_cache: bool = True) -> int | None:
    """Set the kernels' prefetch distance to this machine's measured best (measured on first use and
    cached); returns it, or None where the kernels are not available."""
    lib = kernels.native_library(isa)
    if lib is None:
        return None
    build = lib.specdec_isa().decode()
    fp = fingerprint("cpu")
    path = prefetch_cache_path(fp)
    cache = read_json(path, PREFETCH_VERSION, fp) if use_cache else {}
    entry = cache.get(build)
    if isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] > 0:
        best = int(entry["bytes"])
    else:
        medians = measure_prefetch(timer or _one_row_pass(lib, build))
        best = min(medians, key=medians.__getitem__)
        log.info("kernel prefetch distance for %s: %d bytes (ms per pass: %s)", build, best,
                 ", ".join(f"{c}: {s * 1e3:.2f}" for c, s in medians.items()))
        if use_cache:
            cache[build] = {"bytes": best, "ms_per_pass": {str(c): s * 1e3 for c, s in medians.items()}}
            try:
                write_json(path, PREFETCH_VERSION, fp, cache)
            except OSError as exc:
                log.warning("could not save the kernel prefetch distance: %s", exc)
    lib.specdec_set_prefetch_bytes(best)
    return best
