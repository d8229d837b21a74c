"""Whether a GGUF model computes on its blocks (native) or on float32 copies (dense), measured here.

`--weights auto`, the default, asks this once per machine and layer shape: the model's largest
linear layer (its format and size) is timed on the native integer kernel and as a dense float32
`F.linear`, for one row and for a block of 8, and native is taken where it is the faster. The
result is cached per hardware fingerprint under `$SPECDEC_MEASUREMENTS/weights/`, like the other
per-machine measurements. Other devices than the CPU (the kernels are CPU kernels) and machines
where the kernels cannot be built take dense without measuring.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.core.hardware import fingerprint, fingerprint_digest
from specdec.core.store import measurement_dir, read_json, write_json
from specdec.models.native import kernels
from specdec.models.native.formats import BlockFormat, dequantize, random_blocks
from specdec.models.native.prefetch import use_measured_prefetch

__all__ = ["WeightsChoice", "choice_cache_path", "choose_weights"]

log = logging.getLogger(__name__)

CHOICE_VERSION = 1
ROWS = (1, 8)  # one decoding step, a verification block

Timer = Callable[[Callable[[], object]], float]


def _median_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm up (first-touch, kernel build)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@dataclass
class WeightsChoice:
    weights: str  # "native" or "dense"
    reason: str
    native_ms: dict[str, float] = field(default_factory=dict)  # rows -> ms per call
    dense_ms: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("cached")
        return out


def choice_cache_path(fp: dict) -> Path:
    return measurement_dir() / "weights" / f"{fingerprint_digest(fp)}.json"


def choose_weights(fmt: BlockFormat, rows: int, cols: int, device: str | torch.device = "cpu", *,
                   timer: Timer = _median_ms, use_cache: bool = True) -> WeightsChoice:
    """Native or dense for a model whose largest linear is `rows` × `cols` values in `fmt`."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return WeightsChoice("dense", f"the native kernels run on the CPU, not on {dev.type}")
    if kernels.native_library() is None:
        return WeightsChoice("dense", kernels.unavailable_reason() or "the native kernels are not available")
    use_measured_prefetch()  # time the native kernel as a model load would run it
    fp = fingerprint(dev)
    key = f"{fmt.name}:{rows}x{cols}"
    path = choice_cache_path(fp)
    cache = read_json(path, CHOICE_VERSION, fp) if use_cache else {}
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("weights") in ("native", "dense"):
        return WeightsChoice(entry["weights"], entry.get("reason", ""), dict(entry.get("native_ms", {})),
                             dict(entry.get("dense_ms", {})), cached=True)
    blocks = random_blocks(fmt, rows, cols, torch.Generator().manual_seed(0))
    packed = kernels.repack(blocks, fmt, cols)
    dense = dequantize(blocks, fmt, cols)
    choice = WeightsChoice("dense", "")
    for m in ROWS:
        x = torch.randn(m, cols, generator=torch.Generator().manual_seed(m))
        choice.native_ms[str(m)] = timer(lambda: kernels.linear(x, packed, fmt, rows))
        choice.dense_ms[str(m)] = timer(lambda: F.linear(x, dense))
    native, plain = sum(choice.native_ms.values()), sum(choice.dense_ms.values())
    choice.weights = "native" if native < plain else "dense"
    choice.reason = (f"a {rows}x{cols} {fmt.name} layer takes {native:.2f} ms native and {plain:.2f} ms dense "
                     f"(float32) for {' + '.join(map(str, ROWS))} rows here")
    if use_cache:
        cache[key] = choice.to_dict()
        try:
            write_json(path, CHOICE_VERSION, fp, cache)
        except OSError as exc:
            log.warning("could not save the weights choice: %s", exc)
    return choice
