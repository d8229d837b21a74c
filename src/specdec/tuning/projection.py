"""Project SpecExec's and Sequoia's speed for a target offloaded to CPU RAM, from measured acceptance.

Offloading is the setting both were built for (docs/algorithms.md §6, §7): a target pass costs
about the time to stream its weights, whatever the block size. `specdec tune --project-offload`
turns a profile's acceptance vectors into that projection with a transfer-time cost model; it is
labelled as a projection everywhere it is printed, next to the published figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from specdec.core.options import check_positive_int
from specdec.drafting.sequoia_dp import check_accept, sequoia_dp

DEFAULT_PROJECT_SIZES = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_PROJECT_MAX_DEPTH = 16
PUBLISHED = (
    "Published figures (other hardware, other models; for orientation only):\n"
    "  SpecExec (Svirschevski et al. 2024): Llama-2-70B offloaded to RAM on a consumer GPU, 4-6 tokens/s (4-bit) "
    "or 2-3 tokens/s (16-bit); up to 10.6x (4-bit) / 18.7x (16-bit) over offloaded autoregressive decoding "
    "(Together AI post), 'up to 15x' (Yandex post).\n"
    "  Sequoia (Chen et al. 2024): Llama2-70B offloaded on an L40, 0.56 s/token, 9.96x over their offloading "
    "baseline (5.6 s/token); RTX 4090 0.57 s/token (7.96x); Llama3-70B-Instruct on L40 0.60 s/token "
    "(9.5x over DeepSpeed-Zero-Inference). Earlier versions: up to 10.33x."
)


def project_offload(
    profile: dict[str, Any],
    bandwidth_gbs: float,
    target_params: float,
    bytes_per_param: float = 2.0,
    draft_ms_per_level: float = 15.0,
    gpu_tflops: float = 100.0,
    sizes: Sequence[int] = DEFAULT_PROJECT_SIZES,
    max_depth: int = DEFAULT_PROJECT_MAX_DEPTH,
) -> dict[str, Any]:
    """Projected speed of SpecExec/Sequoia trees for an offloaded target, from measured acceptance.

    Cost model: a target pass over k tokens = the time to stream every weight once over the
    host link (params x bytes / bandwidth) + 2 x params x k FLOPs on the GPU; one draft forward
    (per tree level) = `draft_ms_per_level`. Trees: Sequoia's DP with the measured SWOR vector
    (greedy vector at T = 0) and, for SpecExec, the same DP with the top-k vector — a static,
    positional stand-in for its best-first tree under sample-and-match.
    """
    for name, value in (("bandwidth", bandwidth_gbs), ("target params", target_params),
                        ("bytes per param", bytes_per_param), ("GPU TFLOP/s", gpu_tflops)):
        if not value or value <= 0:
            raise ValueError(f"{name} must be positive, got {value!r}")
    if draft_ms_per_level < 0:
        raise ValueError(f"draft ms per level must be >= 0, got {draft_ms_per_level}")
    transfer_s = target_params * bytes_per_param / (bandwidth_gbs * 1e9)

    def target_s(k: int) -> float:
        return transfer_s + 2 * target_params * k / (gpu_tflops * 1e12)

    acc = profile["acceptance"]
    if acc["swor"] is not None:
        vectors = {"Sequoia (children drawn without replacement, SWOR verification)": acc["swor"],
                   "SpecExec (top-k children, sample-and-match)": acc["topk"]}
    else:  # greedy: both are top-k children with the greedy walk
        vectors = {"Sequoia / SpecExec at T=0 (top-k children, greedy walk)": acc["topk"]}
    sizes = sorted({check_positive_int("size", s) for s in sizes})
    out: dict[str, Any] = {"assumptions": {"bandwidth_gbs": bandwidth_gbs, "target_params": target_params,
                                           "bytes_per_param": bytes_per_param, "draft_ms_per_level": draft_ms_per_level,
                                           "gpu_tflops": gpu_tflops, "transfer_s": transfer_s},
                           "ar_s_per_token": target_s(1), "methods": {}}
    for label, vec in vectors.items():
        dp = sequoia_dp(check_accept(vec), max(sizes), max_depth)
        rows = []
        for size in sizes:
            best = None
            for depth in range(1, min(max_depth, size) + 1):
                if not dp.feasible(size, depth):
                    continue
                tokens = dp.tokens_per_call(size, depth)
                step_s = target_s(size + 1) + depth * draft_ms_per_level / 1e3  # root pass + one per inner level
                if best is None or tokens / step_s > best["tokens_per_s"]:
                    best = {"size": size, "depth": depth, "tokens_per_call": tokens, "s_per_call": step_s,
                            "tokens_per_s": tokens / step_s, "speedup": tokens / step_s * target_s(1)}
            if best is not None:  # else no tree of this size fits max_depth levels with this width
                rows.append(best)
        out["methods"][label] = rows
    return out


def format_projection(proj: dict[str, Any], profile: dict[str, Any]) -> str:
    """The projection as text: its assumptions first, one table per method, then the published figures."""
    a = proj["assumptions"]
    key = profile["key"]
    lines = [
        "PROJECTION — not a measurement. Acceptance measured here for "
        f"{key['target']} / {key['draft']} at temperature "
        f"{profile.get('sampling', {}).get('temperature', 0.0 if key.get('mode') == 'greedy' else 0.7):g}; "
        "costs modelled for a "
        f"{a['target_params'] / 1e9:g}B-parameter target at {a['bytes_per_param']:g} bytes/param streamed over "
        f"{a['bandwidth_gbs']:g} GB/s ({a['transfer_s']:.2f} s per pass) plus {a['gpu_tflops']:g} TFLOP/s of GPU "
        f"compute, and {a['draft_ms_per_level']:g} ms per draft level. It assumes this pair's acceptance carries "
        "over to that target. SpecExec's rows use a static DP tree under its top-k acceptance as a stand-in for "
        "its best-first tree.",
        f"offloaded plain decoding: {proj['ar_s_per_token']:.2f} s/token ({1 / proj['ar_s_per_token']:.2f} tokens/s)",
    ]
    for label, rows in proj["methods"].items():
        lines.append(f"\n{label}:")
        lines.append("| tree tokens | depth | tokens/call | s/token | tokens/s | projected speedup |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            lines.append(f"| {r['size']} | {r['depth']} | {r['tokens_per_call']:.2f} | "
                         f"{r['s_per_call'] / r['tokens_per_call']:.3f} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x |")
    lines.append("\n" + PUBLISHED)
    return "\n".join(lines)
