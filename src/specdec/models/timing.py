"""Measure the cost of one forward pass over k new tokens, t(k), for the plain and the fast path.

t(k) decides how many tokens a verification pass may hold and how much a draft may cost: the
`specdec profile` table is what the tuner and the benchmark notes are based on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from specdec.models.hf import HFLanguageModel

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ForwardProfile:
    """Median milliseconds per forward over k new tokens after a warm cache of `context` tokens."""

    path: str
    context: int
    ms: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"path": self.path, "context": self.context, "ms": {str(k): v for k, v in self.ms.items()}}


def measure_forward(
    lm: HFLanguageModel,
    ks: tuple[int, ...] = DEFAULT_KS,
    context: int = 200,
    repeats: int = 3,
    path: str = "",
    min_seconds: float = 0.0,
) -> ForwardProfile:
    """t(k) for each k: a chain of k tokens scored after a committed prefix (never committed)."""
    gen = torch.Generator().manual_seed(0)
    vocab = lm.vocab_size
    lm.reset(context + max(ks) + 1)
    lm.forward(torch.randint(0, vocab, (context,), generator=gen), last_only=True)
    lm.commit(context)
    lm.forward(torch.randint(0, vocab, (1,), generator=gen))  # warm-up
    prof = ForwardProfile(path, context)
    for k in ks:
        block = torch.randint(0, vocab, (k,), generator=gen)
        times = []
        start = time.perf_counter()
        while len(times) < repeats or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            lm.forward(block)
            if lm.device.type == "cuda":
                torch.cuda.synchronize(lm.device)
            times.append((time.perf_counter() - t0) * 1e3)
        prof.ms[k] = statistics.median(times)
    lm.crop(0)
    return prof


def format_table(name: str, profiles: list[ForwardProfile]) -> str:
    """One markdown row per path, one column per k, and t(16)/t(1): how flat the cost of a wider block is."""
    ks = sorted({k for p in profiles for k in p.ms})
    lines = [f"{name}: ms per forward over k new tokens (context {profiles[0].context})"]
    lines.append("| path | " + " | ".join(f"k={k}" for k in ks) + " | t(16)/t(1) |")
    lines.append("|---" * (len(ks) + 2) + "|")
    for p in profiles:
        ratio = p.ms[16] / p.ms[1] if 16 in p.ms and 1 in p.ms else float("nan")
        lines.append(f"| {p.path} | " + " | ".join(f"{p.ms.get(k, float('nan')):.0f}" for k in ks) + f" | {ratio:.2f} |")
    return "\n".join(lines)
