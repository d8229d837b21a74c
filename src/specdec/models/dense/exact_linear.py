"""`ExactLinear`: a bfloat16/float16 linear layer whose every output row is one fixed float32 sum.

A BLAS GEMM blocks its reduction by the matrix shape, so in reduced precision a k-token pass and k
one-token passes round differently and greedy verification can disagree with plain decoding at
near-ties. This layer computes y = x·Wᵀ (+ b) with the compiled kernel of
`models/native/csrc/dense.cpp`: each 16-bit value widened exactly, four float32 chains per output
in a fixed order, one rounding to the layer's dtype at the end; nothing depends on how many rows
the call has, on the thread count or on the CPU's instruction set. `use_exact_linears` puts it in
place of a model's `nn.Linear` layers (CPU, bfloat16 or float16), which `models.dense.invariance`
does for row-invariant targets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from specdec.models.native import kernels

__all__ = ["ExactLinear", "exact_linear_available", "use_exact_linears"]


class ExactLinear(nn.Module):
    """y = x·Wᵀ + b for a bfloat16/float16 weight, row-invariant: forward(x [..., in]) -> [..., out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = int(w.shape[1]), int(w.shape[0])
        self.dtype = w.dtype
        self.register_buffer("packed", kernels.dense_repack(w), persistent=False)  # [N/16 · K · 16] int16
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = kernels.dense_linear(x.reshape(-1, self.in_features).to(self.dtype), self.packed, self.out_features,
                                 self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


def exact_linear_available(model: nn.Module) -> bool:
    """Whether `use_exact_linears` applies: a CPU model in bfloat16 or float16, and the kernels built."""
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype in (torch.bfloat16, torch.float16)
            and kernels.native_library() is not None)


def use_exact_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by an `ExactLinear` (where available); how many were."""
    if not exact_linear_available(model):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.dtype in (torch.bfloat16, torch.float16):
                setattr(parent, name, ExactLinear(child))
                count += 1
    return count
