"""The draft model's precision, chosen by measurement: float32, bfloat16, float16 or int8.

A draft only proposes; every drafted token is verified against the target, so its precision
changes speed (and how often drafts are accepted), never the output. What is fastest depends on
the machine: dynamic int8 halves the draft's cost on an AVX2 or AVX-512 CPU, bfloat16 pays on CPUs
with native bfloat16 or AMX and on GPUs, and is emulated (slow) elsewhere. So each candidate the
device can run is built from the float32 weights, given its own linear paths
(`models.dense.kernel_choice`), and timed per draft level (one forward of 1 and of 4 new tokens after a
short context). A candidate whose top-1 prediction agrees with the float32 draft on fewer than
`MIN_AGREEMENT` of the probe positions is refused (it would cost acceptance), and the fastest of
the rest is kept. The choice is cached per machine (`core.hardware` fingerprint) and draft
architecture in `$SPECDEC_CACHE/draft-precision/`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from specdec.core.hardware import fingerprint, fingerprint_digest
from specdec.core.store import measurement_dir, read_json, write_json
from specdec.models.hf import HFLanguageModel
from specdec.models.dense.kernel_choice import apply_linear_paths

log = logging.getLogger(__name__)

DRAFT_PRECISIONS = ("float32", "bfloat16", "float16", "int8")
MIN_AGREEMENT = 0.9
"""Least share of probe positions where a candidate's top-1 token equals the float32 draft's."""
PRECISION_CACHE_VERSION = 1
PROBE_CONTEXT = 48
DTYPE_OF = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def precision_candidates(device: str | torch.device) -> list[str]:
    """The precisions this device can run a draft in."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
    out = ["float32", "bfloat16"]
    if dev.type == "cpu" and set(torch.backends.quantized.supported_engines) & {"fbgemm", "x86", "qnnpack", "onednn"}:
        out.append("int8")
    return out


def make_variant(model: nn.Module, precision: str, fast_linear: str = "auto", keep: bool = False) -> nn.Module:
    """`model` (float32) in `precision`, with its linear paths applied. keep: leave `model` as it is
    (the variant is a copy); otherwise it may be converted in place."""
    if precision not in DRAFT_PRECISIONS:
        raise ValueError(f"draft precision must be one of {', '.join(DRAFT_PRECISIONS)}, got {precision!r}")
    base = copy.deepcopy(model) if keep else model
    if precision == "int8":
        from specdec.models.dense.fastpath import quantize_draft_int8

        return quantize_draft_int8(base.float())
    variant = base.to(DTYPE_OF[precision])
    apply_linear_paths(variant, fast_linear)
    return variant


def architecture_key(model: nn.Module) -> str:
    """What a timing is valid for: the architecture (type and config) of the draft."""
    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if config is not None and hasattr(config, "to_json_string") else ""
    text = type(model).__name__ + "|" + "".join(ln for ln in text.splitlines() if '"_name_or_path"' not in ln)
    kept = getattr(model.get_output_embeddings(), "kept", None) if hasattr(model, "get_output_embeddings") else None
    if kept is not None:  # a pruned head is another draft as far as speed goes
        text += f"|head {kept.numel()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class PrecisionChoice:
    """The chosen precision and the measurements behind it."""

    chosen: str
    ms_per_level: dict[str, float] = field(default_factory=dict)
    """Milliseconds of one 1-token draft forward, per candidate."""
    ms_block4: dict[str, float] = field(default_factory=dict)
    """Milliseconds of one 4-token draft forward (a tree level), per candidate."""
    agreement: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "ms_per_level": self.ms_per_level, "ms_block4": self.ms_block4,
                "agreement": self.agreement}


def probe_ids(vocab: int, tokenizer: Any = None) -> torch.Tensor:  # -> [PROBE_CONTEXT + 8] int64
    """Tokens the candidates are timed and compared on: natural text when a tokenizer is at hand."""
    text = ("def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n    if len(items) <= 1:\n        return items\n"
            "The quick brown fox jumps over the lazy dog. Binary search halves the interval each step, so it "
            "takes logarithmic time in the length of the sorted list it searches through.")
    if tokenizer is not None:
        ids = [i for i in tokenizer(text)["input_ids"] if 0 <= i < vocab]
        if len(ids) >= PROBE_CONTEXT + 8:
            return torch.tensor(ids[: PROBE_CONTEXT + 8])
    return torch.randint(0, vocab, (PROBE_CONTEXT + 8,), generator=torch.Generator().manual_seed(0))


def time_levels(lm: HFLanguageModel, ids: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """(ms of a 1-token forward, ms of a 4-token forward) after PROBE_CONTEXT tokens, median of `repeats`."""
    sync = (lambda: torch.cuda.synchronize(lm.device)) if lm.device.type == "cuda" else (lambda: None)
    lm.reset(ids.shape[0] + 8)
    lm.forward(ids[:PROBE_CONTEXT], last_only=True)
    lm.commit(PROBE_CONTEXT)
    out = []
    for k in (1, 4):
        block = ids[PROBE_CONTEXT : PROBE_CONTEXT + k]
        lm.forward(block)  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            lm.forward(block)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        out.append(statistics.median(times))
    lm.crop(0)
    return out[0], out[1]


def top1(lm: HFLanguageModel, ids: torch.Tensor) -> torch.Tensor:  # -> [L] argmax after each token
    lm.reset(ids.shape[0] + 1)
    pred = lm.forward(ids).float().argmax(-1).cpu()
    lm.crop(0)
    return pred


def precision_cache_path(fp: dict[str, Any]) -> Any:
    return measurement_dir() / "draft-precision" / f"{fingerprint_digest(fp)}.json"


Measure = Callable[[HFLanguageModel, torch.Tensor], tuple[float, float]]


def choose_draft_precision(
    model: nn.Module,
    *,
    fast_linear: str = "auto",
    tokenizer: Any = None,
    candidates: list[str] | None = None,
    measure: Measure = time_levels,
    use_cache: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Module, PrecisionChoice]:
    """The draft in its fastest precision (see the module docstring); `model` is the float32 draft and
    may be converted in place. `measure` is for tests (a fake clock)."""
    device = next(model.parameters()).device
    fp = fingerprint(device)
    arch = architecture_key(model)
    names = candidates if candidates is not None else precision_candidates(device)
    path = precision_cache_path(fp)
    cache = read_json(path, PRECISION_CACHE_VERSION, fp) if use_cache else {}
    entry = cache.get(arch)
    if isinstance(entry, dict) and entry.get("candidates") == names and entry.get("chosen") in names:
        choice = PrecisionChoice(entry["chosen"], dict(entry.get("ms_per_level", {})), dict(entry.get("ms_block4", {})),
                                 dict(entry.get("agreement", {})), cached=True)
        return make_variant(model, choice.chosen, fast_linear), choice
    if progress is not None:
        progress(f"measuring the draft in {', '.join(names)} (once per machine)")
    ids = probe_ids(HFLanguageModel(model).vocab_size, tokenizer)
    reference = top1(HFLanguageModel(model), ids)
    choice = PrecisionChoice("float32")
    for name in names:
        try:
            variant = make_variant(model, name, fast_linear, keep=True)
            lm = HFLanguageModel(variant)
            choice.agreement[name] = float((top1(lm, ids) == reference).float().mean())
            choice.ms_per_level[name], choice.ms_block4[name] = measure(lm, ids)
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # no kernels for it here
            log.info("draft precision %s is not usable here: %s", name, exc)
        finally:
            variant = lm = None
    usable = [n for n in choice.ms_per_level if choice.agreement[n] >= MIN_AGREEMENT]
    if usable:
        choice.chosen = min(usable, key=lambda n: (choice.ms_per_level[n], choice.ms_block4[n]))
    if use_cache:
        cache[arch] = {"candidates": names, **choice.to_dict()}
        try:
            write_json(path, PRECISION_CACHE_VERSION, fp, cache)
        except OSError as exc:
            log.warning("could not save the draft precision choice: %s", exc)
    return make_variant(model, choice.chosen, fast_linear), choice


def format_precision_choice(choice: PrecisionChoice) -> str:
    rows = [f"| {n} | {choice.ms_per_level[n]:.1f} | {choice.ms_block4.get(n, float('nan')):.1f} | "
            f"{choice.agreement.get(n, float('nan')):.2f} |" + (" chosen |" if n == choice.chosen else " |")
            for n in choice.ms_per_level]
    head = ("draft precision (measured once per machine; top-1 agreement with float32 on a probe text)\n"
            "| precision | ms per level (1 token) | ms per 4-token level | agreement | |\n|---|---:|---:|---:|---|")
    return head + ("\n" + "\n".join(rows) if rows else "\n(cached choice: " + choice.chosen + ")")
