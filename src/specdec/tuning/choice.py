"""Pick the Sequoia tree (or no speculation) that is fastest on this machine: Sequoia's
hardware-aware choice, measured here (docs/algorithms.md §7).

1. costs: the target's forward time t_t(k) for blocks of k = n + 1 tokens (n tree tokens plus
   the root) and the draft's t_d(k) (`models.timing.measure_forward`);
2. acceptance: the positional acceptance vectors of star trees (`acceptance.measure_acceptance`);
3. the DP (`drafting.sequoia_dp`) for every size and depth, and for each candidate
   expected tokens/s = F(n, d) / (t_t(n + 1) + draft time of that tree), next to plain decoding
   at 1 / t_t(1). The winner is then run against plain decoding to report the measured speedup.

The result is a profile (a JSON-ready dict) that `core.store.save_profile` writes under the key
of `core.store.profile_key`; `--method sequoia --tree auto` and `--method auto` read it back. The
quick tune over every method is `tuning.quick`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from specdec.core.hardware import fingerprint
from specdec.core.options import check_positive_int
from specdec.core.sampling import SamplingConfig
from specdec.core.store import PROFILE_VERSION
from specdec.drafting.sequoia_dp import SequoiaDP, sequoia_dp
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sequoia import SequoiaDrafter
from specdec.models.hf import HFLanguageModel
from specdec.models.timing import measure_forward
from specdec.tuning.acceptance import DEFAULT_WIDTH, measure_acceptance
from specdec.tuning.costmodel import dp_grid, draft_ms_of_tree, interpolate_ms

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_MAX_DEPTH = 8
# A handful of short prompts of the kinds the benchmark covers (code, explanation, prose).
TUNE_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Explain what a hash table is and when a binary search tree is a better choice.",
    "Write a short story opening about a lighthouse keeper who finds a message in a bottle.",
    "Implement binary search in JavaScript and explain its time complexity.",
    "List five practical tips for writing readable code, one sentence each.",
    "Write a SQL query that returns the ten customers with the highest total order value.",
)


def profile_header(kind: str, key: dict[str, Any], target: Any, sampling: SamplingConfig) -> dict[str, Any]:
    """What every tune profile starts with: its version and kind ("full", "quick"), its key, the
    hardware it was measured on, when, at which sampling, and with how many threads."""
    return {
        "version": PROFILE_VERSION,
        "kind": kind,
        "key": key,
        "fingerprint": fingerprint(target.device),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
        "threads": torch.get_num_threads(),
    }


# ---- costs -------------------------------------------------------------------------------------
def measure_costs(
    target: HFLanguageModel, draft: HFLanguageModel, ks: list[int], repeats: int = 2, context: int = 200
) -> tuple[dict[int, float], dict[int, float]]:
    """Median ms per forward over k new tokens, for the target and the draft."""
    ks_t = tuple(sorted(set(ks)))
    return (measure_forward(target, ks_t, context, repeats, path="target").ms,
            measure_forward(draft, ks_t, context, repeats, path="draft").ms)


# ---- candidates --------------------------------------------------------------------------------
def candidate_table(
    dps: dict[str, SequoiaDP],
    target_ms: dict[int, float],
    draft_ms: dict[int, float],
    sizes: list[int],
    max_depth: int,
) -> list[dict[str, Any]]:
    """Every (mode, size, depth) with its expected tokens per call, costs and speedup over plain decoding."""
    ar_ms = interpolate_ms(target_ms, 1)
    rows: list[dict[str, Any]] = [{"method": "ar", "mode": None, "size": 0, "depth": 0, "tokens_per_call": 1.0,
                                   "target_ms": ar_ms, "draft_ms": 0.0, "expected_speedup": 1.0}]
    for mode, dp in dps.items():
        for size, depth, tokens in dp_grid(dp, sizes, max_depth):
            t_ms = interpolate_ms(target_ms, size + 1)
            d_ms = draft_ms_of_tree(dp.tree(size, depth), draft_ms, tokens)
            rows.append({"method": "sequoia", "mode": mode, "size": size, "depth": depth, "tokens_per_call": tokens,
                         "target_ms": t_ms, "draft_ms": d_ms, "expected_speedup": tokens * ar_ms / (t_ms + d_ms)})
    return rows


def _timed_generate(dec: SpeculativeDecoder, prompts: list[list[int]], tokens: int, seed: int,
                    device: Any) -> tuple[int, int, float]:
    """(new tokens, target calls, decoding seconds) over the prompts."""
    new = calls = 0
    wall = 0.0
    for i, ids in enumerate(prompts):
        gen = None if dec.sampling.greedy else torch.Generator(device=device).manual_seed(seed + i)
        _, stats = dec.generate(ids, tokens, gen)
        new, calls, wall = new + stats.new_tokens, calls + stats.target_calls, wall + stats.wall_s
    return new, calls, wall


# ---- the whole tuning run ----------------------------------------------------------------------
def tune(
    target: HFLanguageModel,
    draft: HFLanguageModel,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    key: dict[str, Any],
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    max_depth: int = DEFAULT_MAX_DEPTH,
    width: int = DEFAULT_WIDTH,
    gen_tokens: int = 24,
    measure_prompts: int = 1,
    measure_tokens: int = 32,
    repeats: int = 2,
    context: int = 200,
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Measure, solve, choose and check; returns the profile (not saved)."""
    sizes = sorted({check_positive_int("size", s) for s in sizes})
    max_depth = check_positive_int("max_depth", max_depth)
    if not prompts:
        raise ValueError("tune needs at least one prompt")
    t0 = time.perf_counter()
    log(f"measuring target and draft forward times for {len(sizes) + 1} block sizes …")
    ks = sorted({1, *(s + 1 for s in sizes), *range(1, max_depth + 2)})
    target_ms, draft_ms = measure_costs(target, draft, ks, repeats, context)
    log(f"measuring acceptance: star trees of width {width}, {len(prompts)} prompts x {gen_tokens} tokens …")
    acc = measure_acceptance(target, draft, prompts, sampling, width, gen_tokens, seed, eos_token_ids)
    vectors = {"greedy": acc.topk} if acc.swor is None else {"swor": acc.swor, "greedy": acc.topk}
    dps = {mode: sequoia_dp(vec, max(sizes), max_depth) for mode, vec in vectors.items()}
    rows = candidate_table(dps, target_ms, draft_ms, sizes, max_depth)
    best = max(rows, key=lambda r: r["expected_speedup"])
    winner: dict[str, Any] = {k: best[k] for k in ("method", "mode", "size", "depth", "tokens_per_call",
                                                   "expected_speedup")}
    paths = dps[best["mode"]].tree(best["size"], best["depth"]) if best["method"] == "sequoia" else []
    winner["paths"] = [list(p) for p in paths]  # as JSON will hold them
    winner["options"] = {}
    winner["label"] = ("ar (no speculation)" if best["method"] == "ar" else
                       f"sequoia {best['mode']} size={best['size']} depth={best['depth']}")
    # Check the winner against plain decoding on real prompts.
    winner["measured_speedup"] = winner["measured_tokens_per_call"] = None
    if measure_prompts > 0 and measure_tokens > 0 and winner["method"] == "sequoia":
        log(f"checking the winner against plain decoding ({measure_prompts} prompts x {measure_tokens} tokens) …")
        check = prompts[:measure_prompts]
        device = target.device
        ar = SpeculativeDecoder(target, None, sampling, eos_token_ids=eos_token_ids)
        spec = SpeculativeDecoder(target, SequoiaDrafter(draft, sampling, winner["paths"], winner["mode"]), sampling,
                                  eos_token_ids=eos_token_ids)
        _timed_generate(spec, check[:1], min(8, measure_tokens), seed, device)  # warm-up
        ar_new, _, ar_s = _timed_generate(ar, check, measure_tokens, seed, device)
        sp_new, sp_calls, sp_s = _timed_generate(spec, check, measure_tokens, seed, device)
        winner["measured_speedup"] = (sp_new / sp_s) / (ar_new / ar_s)
        winner["measured_tokens_per_call"] = sp_new / sp_calls
    return {
        **profile_header("full", key, target, sampling),
        "settings": {"sizes": sizes, "max_depth": max_depth, "width": width, "prompts": len(prompts),
                     "gen_tokens": gen_tokens, "measure_prompts": measure_prompts, "measure_tokens": measure_tokens,
                     "repeats": repeats, "context": context, "seed": seed},
        "timing": {"target_ms": {str(k): v for k, v in target_ms.items()},
                   "draft_ms": {str(k): v for k, v in draft_ms.items()}},
        "acceptance": acc.to_dict(),
        "candidates": rows,
        "winner": winner,
        "tune_s": time.perf_counter() - t0,
    }


def format_candidates(profile: dict[str, Any]) -> str:
    """The expected-speedup grid (size x depth, per mode), the best depth per size, and the winner."""
    rows = profile["candidates"]
    ar = next(r for r in rows if r["method"] == "ar")
    lines = [f"plain decoding (no speculation): {ar['target_ms']:.1f} ms per token -> expected speedup 1.00x"]
    for mode in sorted({r["mode"] for r in rows if r["method"] == "sequoia"}):
        mine = [r for r in rows if r["mode"] == mode]
        depth_max = max(r["depth"] for r in mine)
        label = "children drawn without replacement, SWOR-verified" if mode == "swor" else \
            "top-k children, sample-and-match; the greedy walk at T=0"
        lines.append(f"\nsequoia mode {mode} ({label}): expected speedup by tree size (rows) and depth (columns)")
        lines.append("| size | " + " | ".join(f"d={d}" for d in range(1, depth_max + 1)) +
                     " | best d | tokens/call | target ms | draft ms |")
        lines.append("|---" * (depth_max + 5) + "|")
        for size in sorted({r["size"] for r in mine}):
            by_d = {r["depth"]: r for r in mine if r["size"] == size}
            top = max(by_d.values(), key=lambda r: r["expected_speedup"])
            cells = [f"{by_d[d]['expected_speedup']:.2f}" if d in by_d else "" for d in range(1, depth_max + 1)]
            lines.append(f"| {size} | " + " | ".join(cells) + f" | {top['depth']} | {top['tokens_per_call']:.2f} | "
                         f"{top['target_ms']:.1f} | {top['draft_ms']:.1f} |")
    w = profile["winner"]
    if w["method"] == "ar":
        lines.append("\nwinner: no speculation (every tree is expected to be slower than plain decoding here)")
    else:
        lines.append(f"\nwinner: sequoia mode {w['mode']}, {w['size']} tree tokens, depth {w['depth']}: expected "
                     f"{w['tokens_per_call']:.2f} tokens/call, speedup {w['expected_speedup']:.2f}x")
        if w.get("measured_speedup") is not None:
            lines.append(f"measured on {profile['settings']['measure_prompts']} prompt(s): "
                         f"{w['measured_tokens_per_call']:.2f} tokens/call, speedup {w['measured_speedup']:.2f}x "
                         f"(expected {w['expected_speedup']:.2f}x)")
    return "\n".join(lines)
