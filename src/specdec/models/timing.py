"""Measure the cost of one forward pass over k new tokens, t(k), and the prompt rate of a model.

t(k) decides how many tokens a verification pass may hold and how much a draft may cost: the
`specdec profile` table is what the tuner and the benchmark notes are based on. The prompt rate
(tokens per second of a prefill of n tokens) is the other half of end-to-end speed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from specdec.models.base import LanguageModel, kept_token_ids

DEFAULT_KS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ForwardProfile:
    """Median milliseconds per forward over k new tokens after a warm cache of `context` tokens."""

    path: str
    context: int
    ms: dict[int, float] = field(default_factory=dict)
    prompt_tokens_per_s: dict[int, float] = field(default_factory=dict)  # prompt length -> tokens/s

    def to_dict(self) -> dict:
        return {"path": self.path, "context": self.context, "ms": {str(k): v for k, v in self.ms.items()},
                "prompt_tokens_per_s": {str(n): v for n, v in self.prompt_tokens_per_s.items()}}


def measure_prompt(lm: LanguageModel, profile: ForwardProfile, lengths: tuple[int, ...] = (512,),
                   repeats: int = 2) -> ForwardProfile:
    """Add the prompt rate to `profile`: tokens per second of a fresh prefill of n tokens (best of
    `repeats`), for each n in `lengths`."""
    gen = torch.Generator().manual_seed(1)
    for n in lengths:
        ids = torch.randint(0, lm.vocab_size, (n,), generator=gen)
        best = float("inf")
        for _ in range(repeats):
            lm.reset(n + 1)
            t0 = time.perf_counter()
            lm.forward(ids, last_only=True)
            if lm.device.type == "cuda":
                torch.cuda.synchronize(lm.device)
            best = min(best, time.perf_counter() - t0)
        profile.prompt_tokens_per_s[n] = n / best
    lm.crop(0)
    return profile


def measure_forward(
    lm: LanguageModel,
    ks: tuple[int, ...] = DEFAULT_KS,
    context: int = 200,
    repeats: int = 3,
    path: str = "",
    min_seconds: float = 0.0,
) -> ForwardProfile:
    """t(k) for each k: a chain of k tokens scored after a committed prefix (never committed), the
    median of `repeats` rounds (more until `min_seconds` have passed). Each round times every k once:
    a slow spell of a shared machine then slows one round of every size, which the median drops,
    rather than several repeats of one size (seen: t(1), timed first right after the prefix, read
    36.4 ms against 34.4 for t(2) and 33.2 for t(4), so t(8)/t(1) looked flatter than it was)."""
    gen = torch.Generator().manual_seed(0)
    vocab = lm.vocab_size
    lm.reset(context + max(ks) + 1)
    lm.forward(torch.randint(0, vocab, (context,), generator=gen), last_only=True)
    lm.commit(context)
    lm.forward(torch.randint(0, vocab, (1,), generator=gen))  # warm-up
    blocks = {k: torch.randint(0, vocab, (k,), generator=gen) for k in ks}
    # A pruned head's kept logits alone, as the chain drafter reads them (`models.base.kept_token_ids`).
    compact = {"compact": True} if kept_token_ids(lm) is not None else {}
    times: dict[int, list[float]] = {k: [] for k in ks}
    start = time.perf_counter()
    while len(times[ks[0]]) < repeats or time.perf_counter() - start < min_seconds:
        for k in ks:
            t0 = time.perf_counter()
            lm.forward(blocks[k], **compact)
            if lm.device.type == "cuda":
                torch.cuda.synchronize(lm.device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    prof = ForwardProfile(path, context)
    prof.ms = {k: statistics.median(v) for k, v in times.items()}
    lm.crop(0)
    return prof


def format_table(name: str, profiles: list[ForwardProfile]) -> str:
    """One markdown row per path, one column per k, t(8)/t(1) and t(16)/t(1) (how flat the cost of a
    wider block is) and the prompt rate where measured."""
    ks = sorted({k for p in profiles for k in p.ms})
    prompts = sorted({n for p in profiles for n in p.prompt_tokens_per_s})
    lines = [f"{name}: ms per forward over k new tokens (context {profiles[0].context})"]
    lines.append("| path | " + " | ".join(f"k={k}" for k in ks) + " | t(8)/t(1) | t(16)/t(1) |"
                 + "".join(f" prompt {n} tok/s |" for n in prompts))
    lines.append("|---" * (len(ks) + 3 + len(prompts)) + "|")
    for p in profiles:
        ratios = [f"{p.ms[k] / p.ms[1]:.2f}" if k in p.ms and 1 in p.ms else "–" for k in (8, 16)]  # – : not timed
        lines.append(f"| {p.path} | " + " | ".join(f"{p.ms[k]:.1f}" if k in p.ms else "–" for k in ks)
                     + "".join(f" | {r}" for r in ratios) + " |"
                     + "".join(f" {p.prompt_tokens_per_s[n]:.0f} |" if n in p.prompt_tokens_per_s else " – |"
                               for n in prompts))
    return "\n".join(lines)
