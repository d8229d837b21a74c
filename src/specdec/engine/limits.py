"""The continuous-batching engine's limits and their defaults, apart from `engine.batch` so that the
command line can show and check them without importing torch."""

from __future__ import annotations

import operator
from dataclasses import dataclass

DEFAULT_MAX_BATCH_SIZE = 8
"""Sequences decoded together."""
DEFAULT_PREFILL_CHUNK = 512
"""Prompt tokens filled per engine step."""
DEFAULT_SPEC_DISABLE_BATCH_SIZE = 8
"""Steps draft nothing with more sequences running than this, unless told otherwise. A default, not
a measurement: where speculation stops paying depends on the hardware, the models and the method
(`specdec bench-serve` measures it; a tune profile may carry it as `PROFILE_FIELD`). Equal to the
default batch size, so that by default speculation is never turned off."""
DEFAULT_MAX_FILL_MS = 400.0
"""While other sequences decode, a step's prompt fill is cut to what the measured pass times say
takes about this long, so a long prompt delays each running stream's next token by about this much."""
DEFAULT_PREFIX_CACHE_MB = 1024
"""Memory the prefix cache may hold (K/V of shared prompt prefixes, every model together)."""
PROFILE_FIELD = "speculative_disable_by_batch_size"
"""The optional tune-profile field (an int) that `specdec serve` reads as its threshold."""


def _named(flag: str) -> str:
    """A limit as both front ends name it: the Python argument, then the command-line flag (a name
    that is not a flag as it is)."""
    return f"{flag[2:].replace('-', '_')} ({flag})" if flag.startswith("--") else flag


def _check_int(flag: str, value: object, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{_named(flag)} must be {what}, got {value!r}")


SEED_BOUND = 2**63
"""Seeds are integers in [0, SEED_BOUND) everywhere (CLI, server, Python): the non-negative int64s,
which every torch generator takes."""


def check_max_new_tokens(value: object) -> None:
    _check_int("max_new_tokens", value, 1)


def check_seed(seed: object) -> int | None:
    """A run's seed as an int (numpy integers too), or None; ValueError names anything else."""
    if seed is None:
        return None
    try:
        value = operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if isinstance(seed, bool) or value is None or not 0 <= value < SEED_BOUND:
        raise ValueError(f"seed must be an integer in [0, 2**{SEED_BOUND.bit_length() - 1}) or None, got {seed!r}")
    return value


@dataclass(frozen=True)
class BatchLimits:
    """What bounds the continuous-batching engine, checked once, here (named by their Python arguments
    and their command-line flags: `specdec serve` builds this before any model loads)."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """Sequences decoded together; more wait in the queue."""
    max_kv_tokens: int | None = None
    """The target's K/V slots (rows × longest reservation) the running sequences may reserve; None:
    bounded by max_batch_size and the context only."""
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    """Fill tokens (prompts, long catch-ups) per step, across sequences."""
    spec_disable_batch_size: int | None = DEFAULT_SPEC_DISABLE_BATCH_SIZE
    """Above this many running sequences, steps draft nothing (None: never)."""
    adaptive: bool = False
    """Choose each step's draft depth per sequence from the measured pass times and each sequence's
    recent acceptance, down to none (`engine.schedule`); False: every sequence drafts its method's depth."""
    max_fill_ms: float | None = DEFAULT_MAX_FILL_MS
    """While other sequences decode, fill about this many milliseconds of prompt per step (None: the
    whole `prefill_chunk`)."""
    prefix_cache_mb: float = 0
    """Memory for K/V of prompt prefixes reused across requests (0: off; native models only)."""

    def __post_init__(self) -> None:
        _check_int("--max-batch-size", self.max_batch_size, 1)
        _check_int("--max-kv-tokens", self.max_kv_tokens, 1, none_ok=True)
        _check_int("--prefill-chunk", self.prefill_chunk, 1)
        _check_int("--spec-disable-batch-size", self.spec_disable_batch_size, 0, none_ok=True)
        for flag, value in (("--max-fill-ms", self.max_fill_ms), ("--prefix-cache-mb", self.prefix_cache_mb)):
            if value is None and flag == "--max-fill-ms":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{_named(flag)} must be a finite number >= 0, got {value!r}")


def context_overflow(prompt_len: int, max_new_tokens: int, block: int, context: int) -> str:
    """Why a request does not fit the target's context: its prompt, its answer and one step's block
    (the pending token, and the drafts where the method drafts)."""
    step = "the step's pending token" if block == 1 else f"a step's pending token and {block - 1} drafts"
    return (f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens (+{block} for {step}) exceeds the "
            f"target's context of {context} tokens")
