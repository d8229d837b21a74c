"""CPU fast path for the model layer: prepacked oneDNN linears and a cheaper int8 draft.

On AVX2 CPUs with few threads, `F.linear` on float32 takes a GEMM path for 2–16 rows that
costs almost as much per row as for one row, so verifying k tokens costs ~k forward passes and
speculation barely pays. Reordering each weight once into oneDNN's blocked layout
(`mkldnn._reorder_linear_weight`) and calling `mkldnn._linear_pointwise` makes a pass over
several tokens cost little more than over one (measured in `specdec profile`).

The packed path computes the same function up to float32 round-off (summation order), so it is
checked at load against `F.linear` and is only used when it also measures faster. The int8 draft
is a different (quantized) model, but only the drafter uses it, and drafts are always verified
against the target, so it changes speed, never the output.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight kept only in oneDNN's prepacked layout (float32, CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous())
        # Buffers, not parameters: the packed tensor is opaque to autograd and state dicts.
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def packed_linear_supported(model: nn.Module) -> bool:
    """oneDNN prepacking applies to float32 weights on the CPU."""
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def _time_ms(fn, x: Tensor, reps: int = 5) -> float:
    fn(x)
    start = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - start) / reps * 1e3


def _largest_linear(model: nn.Module) -> nn.Linear | None:
    # Skip the output head when picking a probe: its size is unrepresentative of the blocks.
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not name.endswith("lm_head"):
            if best is None or mod.weight.numel() > best.weight.numel():
                best = mod
    return best


def probe_packed_linear(linear: nn.Linear, rows: tuple[int, ...] = (1, 4)) -> tuple[bool, float, dict[int, tuple[float, float]]]:
    """(is it faster, max abs difference, {rows: (plain ms, packed ms)}) on one real layer."""
    packed = PackedLinear(linear)
    timings: dict[int, tuple[float, float]] = {}
    max_diff = 0.0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(1, m, linear.in_features, generator=gen)
            ref = F.linear(x, linear.weight, linear.bias)
            max_diff = max(max_diff, float((packed(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
            timings[m] = (_time_ms(lambda t: F.linear(t, linear.weight, linear.bias), x), _time_ms(packed, x))
    faster = sum(p for _, p in timings.values()) < sum(p for p, _ in timings.values())
    return faster, max_diff, timings


def enable_packed_linears(model: nn.Module, mode: str = "auto") -> int:
    """Replace every `nn.Linear` of `model` by a `PackedLinear`; returns how many were replaced.

    mode "auto": only when supported, numerically equal (relative difference < 1e-4 on a probe
    layer) and faster on that layer; "on": whenever supported; "off": never.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fast linear mode must be auto, on or off, got {mode!r}")
    if mode == "off" or not packed_linear_supported(model):
        return 0
    if mode == "auto":
        probe = _largest_linear(model)
        if probe is None:
            return 0
        faster, diff, timings = probe_packed_linear(probe)
        log.info("packed linear probe: faster=%s rel-diff=%.2e timings(ms)=%s", faster, diff, timings)
        if diff > 1e-4 or not faster:
            return 0
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, PackedLinear):
                setattr(parent, child_name, PackedLinear(child))
                replaced += 1
    return replaced


def quantize_draft_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization of the linears (fbgemm/x86), for a drafter only."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise ValueError("int8 dynamic quantization runs on the CPU only; use --draft-dtype float32 on other devices")
    import warnings

    with warnings.catch_warnings():
        # PyTorch deprecates its quantized tensors (in favour of torchao); they still work.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
