"""`specdec tune`: pick the Sequoia tree (or no speculation) that is fastest on this machine.

Sequoia's hardware-aware choice (algorithms.md §5), measured here:
1. costs: the target's forward time t_t(k) for blocks of k = n + 1 tokens (n tree tokens plus
   the root) and the draft's t_d(k) (`profile.measure_forward`);
2. acceptance: star trees of width W at the root on a few prompts. At every step the exact
   probability that the k-th child is accepted is added up (Rao-Blackwellised: for SWOR
   children from `swor_node`, for top-k children the target's probability of the k-th draft
   token), which estimates both acceptance vectors from the same target passes;
3. the DP (`sequoia.sequoia_dp`) for every size and depth, and for each candidate
   expected tokens/s = F(n, d) / (t_t(n + 1) + draft time of that tree), next to plain decoding
   at 1 / t_t(1). The winner is then run against plain decoding to report the measured speedup.

The result is saved as JSON under `cache_dir()/profiles`, keyed by (target, draft, device,
dtype, temperature); `--method sequoia --tree auto` and `--method auto` read it back.

`--project-offload` turns the measured acceptance into a projection for a target streamed from
CPU RAM (SpecExec's and Sequoia's offloading setting), with a transfer-time cost model. It is
labelled as a projection everywhere it is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from specdec.decoder import SpeculativeDecoder
from specdec.lm import HFLanguageModel, LanguageModel
from specdec.sampling import SamplingConfig
from specdec.sequoia import SequoiaDP, SequoiaDrafter, check_accept, sequoia_dp, star_paths
from specdec.specexec import positive_int
from specdec.tree import TokenTree, depths, paths_to_parents
from specdec.verify import VerifyResult, swor_node

if TYPE_CHECKING:
    from specdec.pipeline import Pipeline

PROFILE_VERSION = 1
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_WIDTH = 8
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
PUBLISHED = (
    "Published figures (other hardware, other models; for orientation only):\n"
    "  SpecExec (Svirschevski et al. 2024): Llama-2-70B offloaded to RAM on a consumer GPU, 4-6 tokens/s (4-bit) "
    "or 2-3 tokens/s (16-bit); up to 10.6x (4-bit) / 18.7x (16-bit) over offloaded autoregressive decoding "
    "(Together AI post), 'up to 15x' (Yandex post).\n"
    "  Sequoia (Chen et al. 2024): Llama2-70B offloaded on an L40, 0.56 s/token, 9.96x over their offloading "
    "baseline (5.6 s/token); RTX 4090 0.57 s/token (7.96x); Llama3-70B-Instruct on L40 0.60 s/token "
    "(9.5x over DeepSpeed-Zero-Inference). Earlier versions: up to 10.33x."
)


# ---- profile files -------------------------------------------------------------------------------
def profile_key(target: str, draft: str, device: str, dtype: str, temperature: float) -> dict[str, Any]:
    return {"target": str(target), "draft": str(draft), "device": str(device), "dtype": str(dtype),
            "temperature": float(temperature)}


def profile_path(key: dict[str, Any]) -> Path:
    """Where the profile for `key` lives: a readable name plus a hash of the exact key."""
    from specdec.hub import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    short = "__".join(Path(key[k]).name for k in ("target", "draft")) + f"__{key['device']}__T{key['temperature']:g}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in short)
    return cache_dir() / "profiles" / f"tune__{safe}__{digest}.json"


def pipeline_key(pipe: "Pipeline", sampling: SamplingConfig) -> dict[str, Any]:
    draft = pipe.draft_name
    if isinstance(draft, (list, tuple)):
        if len(draft) != 1:
            raise ValueError("tune profiles are for one draft model; give a single --draft")
        draft = draft[0]
    dtype = str(getattr(pipe.target_lm, "dtype", "float32")).replace("torch.", "")
    return profile_key(pipe.target_name, str(draft), torch.device(pipe.device).type, dtype, sampling.temperature)


def read_profile(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no tune profile at {path}; run `specdec tune` first")
    try:
        profile = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable tune profile ({exc})") from None
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION or "winner" not in profile:
        raise ValueError(f"{path} is not a version-{PROFILE_VERSION} tune profile; run `specdec tune` again")
    return profile


def load_profile_for(pipe: "Pipeline", sampling: SamplingConfig) -> dict[str, Any]:
    key = pipeline_key(pipe, sampling)
    path = profile_path(key)
    if not path.is_file():
        raise ValueError(
            f"no tune profile for target {key['target']}, draft {key['draft']}, device {key['device']}, dtype "
            f"{key['dtype']}, temperature {key['temperature']:g} (looked for {path}); run "
            f"`specdec tune --target {key['target']} --draft {key['draft']} --device {key['device']} "
            f"--dtype {key['dtype']} --temperature {key['temperature']:g}` first, or pass --tree PROFILE.json"
        )
    return read_profile(path)


def save_profile(profile: dict[str, Any], path: Path | None = None) -> Path:
    path = path or profile_path(profile["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    return path


# ---- measurements --------------------------------------------------------------------------------
@dataclass
class Acceptance:
    """Estimated positional acceptance vectors: entry k = P(the k-th child of a node is accepted)."""

    swor: list[float] | None  # children drawn without replacement, SWOR verification (T > 0 only)
    topk: list[float]  # the draft's top-k children, sample-and-match (greedy walk at T = 0)
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return {"swor": self.swor, "topk": self.topk, "iterations": self.iterations}


def measure_acceptance(
    target: LanguageModel,
    draft: LanguageModel,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    width: int = DEFAULT_WIDTH,
    gen_tokens: int = 24,
    seed: int = 0,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> Acceptance:
    """Decode each prompt with a star tree of `width` children and add up, at every step, the exact
    probability that child k is the accepted one (for SWOR children and for top-k children)."""
    width = positive_int("width", width)
    swor_sum = torch.zeros(width, dtype=torch.float64)
    topk_sum = torch.zeros(width, dtype=torch.float64)
    steps = 0
    mode = "greedy" if sampling.greedy else "swor"
    drafter = SequoiaDrafter(draft, sampling, star_paths(width), mode)
    dec = SpeculativeDecoder(target, drafter, sampling, eos_token_ids=eos_token_ids)
    verify = dec.tree_verifier

    def recording_verifier(tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None) -> VerifyResult:
        nonlocal steps
        root_probs = target_probs[0].double().cpu()  # [V] the target at the root
        k = tree.num_nodes  # the star's children, in rank (= sampling) order
        if tree.draft_probs is not None:
            draft_probs = tree.draft_probs[int(tree.cand_draft_row[0])].double().cpu()  # [V]
            accept, _ = swor_node(root_probs, tree.tokens, draft_probs)  # [k] conditional on earlier rejections
            reach = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - accept, 0)[:-1]])
            swor_sum[:k] += accept * reach
            top_tokens = torch.topk(draft_probs, width).indices
        else:
            top_tokens = tree.tokens
        topk_sum[: top_tokens.shape[0]] += root_probs[top_tokens]  # sample-and-match takes child k w.p. p(x_k)
        steps += 1
        return verify(tree, target_probs, generator)

    dec.tree_verifier = recording_verifier
    gen = None if sampling.greedy else torch.Generator(device=getattr(target, "device", "cpu")).manual_seed(seed)
    for ids in prompts:
        dec.generate(ids, gen_tokens, gen)
    if steps == 0:
        raise ValueError("no acceptance was measured (no prompt produced a draft step); use longer generations")
    return Acceptance(
        (swor_sum / steps).tolist() if mode == "swor" else None, (topk_sum / steps).tolist(), steps
    )


def measure_costs(
    target: HFLanguageModel, draft: HFLanguageModel, ks: list[int], repeats: int = 2, context: int = 200
) -> tuple[dict[int, float], dict[int, float]]:
    """Median ms per forward over k new tokens, for the target and the draft."""
    from specdec.profile import measure_forward

    ks_t = tuple(sorted(set(ks)))
    return (measure_forward(target, ks_t, context, repeats, path="target").ms,
            measure_forward(draft, ks_t, context, repeats, path="draft").ms)


def interpolate_ms(ms: dict[int, float], k: float) -> float:
    """t(k) from measured points: piecewise linear, extended by the last segment's slope."""
    pts = sorted((int(a), float(b)) for a, b in ms.items())
    if len(pts) == 1:
        return pts[0][1]
    for (k0, t0), (k1, t1) in zip(pts, pts[1:]):
        if k <= k1 or (k1, t1) == pts[-1]:
            return max(t0 + (t1 - t0) * (k - k0) / (k1 - k0), 0.0)
    raise AssertionError("unreachable")


def draft_ms_of_tree(paths: list[tuple[int, ...]], draft_ms: dict[int, float], unseen_tokens: float) -> float:
    """The draft's time for one proposal: a pass over the committed tokens it has not seen (about the
    tokens the last call emitted), then one pass per level over that level's nodes that get children."""
    parents, _ = paths_to_parents(paths)
    node_depth = depths(parents)  # 0 = child of the root
    has_children = torch.zeros(parents.shape[0], dtype=torch.bool)
    has_children[parents[parents >= 0]] = True
    per_level = torch.bincount(node_depth[has_children], minlength=1).tolist()
    return interpolate_ms(draft_ms, max(unseen_tokens, 1.0)) + sum(interpolate_ms(draft_ms, c) for c in per_level if c)


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
        for size in sizes:
            for depth in range(1, min(max_depth, size) + 1):
                if not dp.feasible(size, depth):  # too many nodes for this depth and width
                    continue
                tokens = dp.tokens_per_call(size, depth)
                t_ms = interpolate_ms(target_ms, size + 1)
                d_ms = draft_ms_of_tree(dp.tree(size, depth), draft_ms, tokens)
                rows.append({"method": "sequoia", "mode": mode, "size": size, "depth": depth, "tokens_per_call": tokens,
                             "target_ms": t_ms, "draft_ms": d_ms,
                             "expected_speedup": tokens * ar_ms / (t_ms + d_ms)})
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


def tune(
    target: HFLanguageModel,
    draft: HFLanguageModel,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    key: dict[str, Any],
    *,
    sizes: list[int] = list(DEFAULT_SIZES),
    max_depth: int = DEFAULT_MAX_DEPTH,
    width: int = DEFAULT_WIDTH,
    gen_tokens: int = 24,
    measure_prompts: int = 1,
    measure_tokens: int = 32,
    repeats: int = 2,
    context: int = 200,
    seed: int = 0,
    eos_token_ids: list[int] | tuple[int, ...] = (),
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Measure, solve, choose and check; returns the profile (not saved)."""
    sizes = sorted({positive_int("size", s) for s in sizes})
    max_depth = positive_int("max_depth", max_depth)
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
    # Check the winner against plain decoding on real prompts.
    winner["measured_speedup"] = winner["measured_tokens_per_call"] = None
    if measure_prompts > 0 and measure_tokens > 0 and winner["method"] == "sequoia":
        log(f"checking the winner against plain decoding ({measure_prompts} prompts x {measure_tokens} tokens) …")
        check = prompts[:measure_prompts]
        device = getattr(target, "device", "cpu")
        ar = SpeculativeDecoder(target, None, sampling, eos_token_ids=eos_token_ids)
        spec = SpeculativeDecoder(target, SequoiaDrafter(draft, sampling, winner["paths"], winner["mode"]), sampling,
                                  eos_token_ids=eos_token_ids)
        _timed_generate(spec, check[:1], min(8, measure_tokens), seed, device)  # warm-up
        ar_new, _, ar_s = _timed_generate(ar, check, measure_tokens, seed, device)
        sp_new, sp_calls, sp_s = _timed_generate(spec, check, measure_tokens, seed, device)
        winner["measured_speedup"] = (sp_new / sp_s) / (ar_new / ar_s)
        winner["measured_tokens_per_call"] = sp_new / sp_calls
    return {
        "version": PROFILE_VERSION,
        "key": key,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
        "threads": torch.get_num_threads(),
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


# ---- offloading ----------------------------------------------------------------------------------
def offload_target(lm: HFLanguageModel, execution_device: str | torch.device) -> None:
    """Keep `lm`'s weights in CPU RAM and stream them to `execution_device` one decoder layer at a
    time during each forward (accelerate's CPU offload hooks). Idempotent."""
    from accelerate import cpu_offload

    if getattr(lm, "offloaded", False):
        return
    device = torch.device(execution_device)
    model = lm.model
    state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
    if device.type == "cuda":  # page-locked memory: faster, asynchronous host-to-device copies
        state = {name: t.pin_memory() for name, t in state.items()}
    layers = getattr(getattr(model, "model", None), "layers", None)
    # A whole decoder layer is fetched at once (one transfer per layer, not one per Linear).
    preload = [type(layers[0]).__name__] if layers is not None and len(layers) else None
    cpu_offload(model, execution_device=device, state_dict=state, preload_module_classes=preload)
    lm.device = device
    lm.offloaded = True


def apply_offload_option(pipe: "Pipeline", opts: dict[str, Any]) -> None:
    """The `--offload` option of the specexec, sequoia and auto methods."""
    if not opts.get("offload"):
        return
    device = torch.device(pipe.device)
    if device.type != "cuda":
        raise ValueError(
            f"--offload keeps the target's weights in CPU RAM and streams them to a GPU layer by layer; this run is on "
            f"{device}, where there is nothing to offload to. For what offloading would give, run "
            "`specdec tune --project-offload --bandwidth GB/s --target-params N` (a projection from measured acceptance)"
        )
    if not isinstance(pipe.target_lm, HFLanguageModel):
        raise ValueError("--offload needs a transformers target model")
    offload_target(pipe.target_lm, device)


def project_offload(
    profile: dict[str, Any],
    bandwidth_gbs: float,
    target_params: float,
    bytes_per_param: float = 2.0,
    draft_ms_per_level: float = 15.0,
    gpu_tflops: float = 100.0,
    sizes: list[int] = (16, 32, 64, 128, 256, 512, 1024),
    max_depth: int = 16,
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
    sizes = sorted({positive_int("size", s) for s in sizes})
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
    a = proj["assumptions"]
    key = profile["key"]
    lines = [
        "PROJECTION — not a measurement. Acceptance measured here for "
        f"{key['target']} / {key['draft']} at temperature {key['temperature']:g}; costs modelled for a "
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


# ---- command line --------------------------------------------------------------------------------
def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be a comma-separated list of positive integers, got {text!r}")
    return values


def _load_prompts(args: argparse.Namespace, pipe: "Pipeline") -> list[list[int]]:
    if args.prompts:
        from specdec.bench import load_prompts

        texts = [p.turns[0] for p in load_prompts(args.prompts)]
    else:
        texts = list(TUNE_PROMPTS)
    texts = texts[: positive_int("--num-prompts", args.num_prompts)]
    return [pipe.encode(t) for t in texts]


def cmd_tune(args: argparse.Namespace) -> int:
    from specdec.cli import _load, _sampling

    sampling = _sampling(args)
    drafts = args.draft or []
    if len(drafts) > 1:
        raise ValueError("specdec tune measures one draft model; give a single --draft")
    if args.profile and not args.project_offload:
        raise ValueError("--profile is only read with --project-offload (a plain tune measures this machine)")
    if args.profile:
        profile = read_profile(args.profile)
    else:
        sizes = _int_list(args.sizes, "--sizes")
        pipe = _load(args, True)
        if args.offload:
            apply_offload_option(pipe, {"offload": True})
        if not isinstance(pipe.target_lm, HFLanguageModel) or not isinstance(pipe.draft_lm, HFLanguageModel):
            raise ValueError("specdec tune needs transformers target and draft models")
        key = pipeline_key(pipe, sampling)
        existing = Path(args.out) if args.out else profile_path(key)
        if args.project_offload and existing.is_file() and not args.force:
            profile = read_profile(existing)
            print(f"using the acceptance measured in {existing} (--force to measure again)", file=sys.stderr)
        else:
            prompts = _load_prompts(args, pipe)
            profile = tune(pipe.target_lm, pipe.draft_lm, prompts, sampling, key, sizes=sizes,
                           max_depth=args.max_depth, width=args.width, gen_tokens=args.gen_tokens,
                           measure_prompts=args.measure_prompts, measure_tokens=args.measure_tokens,
                           repeats=args.repeats, seed=args.seed, eos_token_ids=pipe.eos_token_ids,
                           log=lambda msg: print(msg, file=sys.stderr))
            profile["offloaded_target"] = bool(args.offload)
            out = save_profile(profile, existing)
            print(format_candidates(profile))
            acc = profile["acceptance"]
            print(f"\nacceptance vectors ({acc['iterations']} steps): "
                  + (f"swor {_fmt_vec(acc['swor'])}; " if acc["swor"] else "") + f"top-k {_fmt_vec(acc['topk'])}")
            print(f"saved {out} ({profile['tune_s']:.0f} s)", file=sys.stderr)
    if args.project_offload:
        proj = project_offload(profile, args.bandwidth, args.target_params, args.bytes_per_param,
                               args.draft_ms_per_level, args.gpu_tflops,
                               _int_list(args.project_sizes, "--project-sizes"), args.project_max_depth)
        print("\n" + format_projection(proj, profile))
    return 0


def _fmt_vec(vec: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in vec) + "]"


def register(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `specdec tune` to the CLI's subcommands."""
    p = sub.add_parser(
        "tune",
        help="measure this machine and pick the fastest Sequoia tree (saved for --method sequoia --tree auto / auto)",
        description="Measure the target's and draft's forward times and the draft's acceptance vector here, run "
        "Sequoia's DP for every tree size and depth, and save the fastest choice (possibly no speculation) as a "
        "profile keyed by model pair, device, dtype and temperature. With --project-offload, also (or only, "
        "with --profile) project the speedup of SpecExec/Sequoia trees for a target offloaded to CPU RAM.",
    )
    add_model_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature to tune for (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="tree sizes (drafted tokens) to consider; the target is timed at size + 1 tokens "
                   f"(default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH, help=f"deepest tree (default {DEFAULT_MAX_DEPTH})")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help=f"star-tree width for the acceptance vector = most children per node (default {DEFAULT_WIDTH})")
    p.add_argument("--prompts", default=None, help="JSONL prompt file as for bench (default: built-in prompts)")
    p.add_argument("--num-prompts", type=int, default=4, help="prompts used to measure acceptance (default 4)")
    p.add_argument("--gen-tokens", type=int, default=24, help="tokens generated per prompt for acceptance (default 24)")
    p.add_argument("--measure-prompts", type=int, default=1,
                   help="prompts on which the winner is run against plain decoding (0 = skip; default 1)")
    p.add_argument("--measure-tokens", type=int, default=32, help="tokens per such run (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per block size (median; default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="profile file (default: the cache's profiles/ folder, found by key)")
    p.add_argument("--offload", action="store_true", help="tune for a target offloaded to CPU RAM (GPU only)")
    p.add_argument("--project-offload", action="store_true",
                   help="print a projection (not a measurement) of SpecExec/Sequoia speedups for an offloaded target "
                   "of --target-params parameters streamed at --bandwidth, from the measured acceptance")
    p.add_argument("--profile", default=None, help="with --project-offload: use this saved profile, load no model")
    p.add_argument("--force", action="store_true", help="with --project-offload: measure again even if a profile exists")
    p.add_argument("--bandwidth", type=float, default=25.0, help="host-to-GPU GB/s for the projection (default 25, "
                   "about PCIe 4.0 x16)")
    p.add_argument("--target-params", type=float, default=70e9, help="parameters of the projected target (default 70e9)")
    p.add_argument("--bytes-per-param", type=float, default=2.0, help="2 = 16-bit, 0.5 = 4-bit (default 2)")
    p.add_argument("--draft-ms-per-level", type=float, default=15.0,
                   help="ms per draft forward in the projection (default 15, about a 7B 16-bit draft on a 1 TB/s GPU)")
    p.add_argument("--gpu-tflops", type=float, default=100.0, help="GPU TFLOP/s for the target's compute (default 100)")
    p.add_argument("--project-sizes", default="16,32,64,128,256,512,1024", help="tree sizes for the projection")
    p.add_argument("--project-max-depth", type=int, default=16, help="deepest tree in the projection (default 16)")
    p.set_defaults(func=cmd_tune)
