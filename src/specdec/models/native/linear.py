"""`GGUFLinear` and `GGUFEmbedding`: drop-in modules for `nn.Linear` and `nn.Embedding` whose weight
is a GGUF file's quantized rows, kept as they are in the file.

`GGUFLinear.forward(x [..., in]) -> [..., out]` multiplies the rows' dequantized values (exactly the
float32 values `gguf` dequantizes to) with float32 activations, accumulating in float32. It runs one
of several kernels, all of them exact in that sense (they differ only in summation order):

    "gguf"      our compiled CPU kernel (`kernels.gguf_linear`): every format; each output row is the
                same whatever the number of input rows (batch-invariant), so a k-token verification
                pass scores each token exactly as a 1-token decoding step does
    "int4pack"  PyTorch's `_weight_int4pack_mm_for_cpu` (Q4_0, Q4_1, Q4_K where the file's values fit
                its form exactly; repacked on first use); its own summation order
    "dequant"   dequantize the whole weight per call and `F.linear` (any device: CUDA, or a CPU
                without a compiler); exact values, but slow on the CPU and not batch-invariant

`kernels()` lists those that apply to a layer here; `kernel` is the one in use (default: "gguf"
when it is built, else "dequant"; inputs on another device than the CPU always take "dequant").
Only inference: nothing here is differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.models.native.formats import BlockFormat, dequantize, format_of
from specdec.models.native.kernels import (
    INT4_FORMATS,
    gguf_linear,
    int4_exact,
    int4pack_linear,
    int4pack_of,
    native_library,
    unavailable_reason,
)

__all__ = ["KERNELS", "GGUFEmbedding", "GGUFLinear"]

KERNELS = ("gguf", "int4pack", "dequant")


class GGUFLinear(nn.Module):
    """y = x · Wᵀ + b with W given as quantized GGUF rows; forward(x [..., in]) -> [..., out]."""

    def __init__(
        self,
        blocks: Tensor,  # [out_features, row_bytes] uint8: the file's rows of blocks
        fmt: BlockFormat | str,
        in_features: int,
        bias: Tensor | None = None,  # [out_features] (kept in float32)
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.fmt = fmt if isinstance(fmt, BlockFormat) else format_of(fmt)
        self.in_features, self.out_features = int(in_features), int(blocks.shape[0])
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.fmt.row_bytes(self.in_features):
            raise ValueError(
                f"GGUFLinear: expected uint8 blocks [{self.out_features}, {self.fmt.row_bytes(self.in_features)}] "
                f"for {self.fmt.name} rows of {self.in_features} values, got {tuple(blocks.shape)} {blocks.dtype}"
            )
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"GGUFLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        # Buffers (not parameters, not in state dicts): the blocks are the file's bytes, not trainable weights.
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)
        self._int4_ok: bool | None = None  # can the int4 kernel form these values? (checked on demand)
        self._int4: tuple[Tensor, Tensor] | None = None  # its repacked weight, made when first chosen
        self.kernel = "dequant"
        self.set_kernel(kernel or ("gguf" if native_library() is not None else "dequant"))

    # ---- kernel choice -------------------------------------------------------------------------
    def kernels(self) -> list[str]:
        """The kernels that compute this layer exactly on this machine (see the module docstring)."""
        out = []
        if self.blocks.device.type == "cpu":
            if native_library() is not None:
                out.append("gguf")
            if self._int4_exact():
                out.append("int4pack")
        out.append("dequant")
        return out

    def set_kernel(self, name: str) -> None:
        """Use kernel `name` from now on; ValueError when it does not apply to this layer here."""
        if name not in KERNELS:
            raise ValueError(f"unknown GGUF kernel {name!r}; known: {', '.join(KERNELS)}")
        if name == "gguf" and native_library() is None:
            raise ValueError(f"the compiled GGUF kernel is not available: {unavailable_reason()}")
        if name == "int4pack":
            if not self._int4_exact():
                raise ValueError(
                    f"PyTorch's int4 kernel cannot represent this {self.fmt.name} layer exactly "
                    f"({self.out_features}x{self.in_features}); use 'gguf' or 'dequant'"
                )
            if self._int4 is None:
                self._int4 = int4pack_of(self.blocks, self.fmt, self.in_features)
        self.kernel = name

    def _int4_exact(self) -> bool:
        if self._int4_ok is None:
            self._int4_ok = (self.blocks.device.type == "cpu" and self.fmt.name in INT4_FORMATS
                             and int4_exact(self.blocks, self.fmt, self.in_features))
        return self._int4_ok

    # ---- compute -------------------------------------------------------------------------------
    def dequantized_weight(self) -> Tensor:
        """The float32 weight [out, in] the file's blocks stand for (on the blocks' device)."""
        return dequantize(self.blocks, self.fmt, self.in_features)

    def forward(self, x: Tensor) -> Tensor:  # x: [..., in] -> [..., out]
        if x.shape[-1] != self.in_features:
            raise ValueError(f"GGUFLinear: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or self.kernel == "dequant":
            w = self.dequantized_weight().to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x2, w, bias).reshape(*lead, self.out_features)
        xf = x2.float().contiguous()
        if self.kernel == "gguf":
            y = gguf_linear(xf, self.blocks, self.fmt, self.bias)
        else:
            assert self._int4 is not None
            y = int4pack_linear(xf, *self._int4, self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):  # .to(device) and friends: the int4 repack belongs to the old place
        self._int4_ok, self._int4 = None, None
        out = super()._apply(fn, recurse)
        if self.kernel == "int4pack":
            self.kernel = "dequant"
            if self.blocks.device.type == "cpu":
                self.set_kernel("int4pack")
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class GGUFEmbedding(nn.Module):
    """Token embeddings kept as quantized GGUF rows: forward(ids [...]) -> [..., dim] float32.

    Only the looked-up rows are dequantized (exactly, `formats.dequantize`), so a 150k-token table
    costs its file size in memory, not four bytes per value.
    """

    def __init__(self, blocks: Tensor, fmt: BlockFormat | str, embedding_dim: int) -> None:  # blocks: [V, row_bytes]
        super().__init__()
        self.fmt = fmt if isinstance(fmt, BlockFormat) else format_of(fmt)
        self.num_embeddings, self.embedding_dim = int(blocks.shape[0]), int(embedding_dim)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.fmt.row_bytes(self.embedding_dim):
            raise ValueError(f"GGUFEmbedding: expected uint8 blocks [V, {self.fmt.row_bytes(self.embedding_dim)}], "
                             f"got {tuple(blocks.shape)} {blocks.dtype}")
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:  # ids: [...] int64 -> [..., dim]
        rows = self.blocks.index_select(0, ids.reshape(-1).to(self.blocks.device))
        return dequantize(rows, self.fmt, self.embedding_dim).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"
