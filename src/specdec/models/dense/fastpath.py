"""CPU speed helpers for the model layer: the prepacked oneDNN linears and a cheaper int8 draft.

On some CPUs `F.linear` on float32 takes a GEMM path for 2–16 rows that costs almost as much per
row as for one row, so verifying k tokens costs ~k forward passes; a weight reordered once into
oneDNN's blocked layout makes a pass over several tokens cost little more than over one. On
others the packed path is slower for a single row. Which path runs for which row count is
therefore measured per machine (`models.dense.kernel_choice`); `enable_packed_linears` keeps the old
switch (on: packed wherever it applies; auto: the measured per-bucket choice; off: plain).

The int8 draft is a different (quantized) model, but only the drafter uses it, and drafts are
always verified against the target, so it changes speed, never the output.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.models.dense.kernel_choice import apply_linear_paths
from specdec.models.dense.linear_paths import PackedLinear, packed_dtype_supported

__all__ = ["PackedLinear", "enable_packed_linears", "packed_linear_supported", "quantize_draft_int8"]


def packed_linear_supported(model: nn.Module) -> bool:
    """Whether oneDNN has prepacked linear kernels for this model's dtype on this CPU."""
    param = next(model.parameters())
    return param.device.type == "cpu" and packed_dtype_supported(param.dtype)


def enable_packed_linears(model: nn.Module, mode: str = "auto") -> int:
    """Apply the linear paths for `mode` (auto, on, off); returns how many layers were replaced."""
    return apply_linear_paths(model, mode).replaced


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
