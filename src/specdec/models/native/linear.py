"""`GGUFLinear` and `GGUFEmbedding`: drop-in modules for `nn.Linear` and `nn.Embedding` whose weight
is a GGUF file's quantized rows, kept as they are in the file.

`GGUFLinear.forward(x [..., in]) -> [..., out]` runs one of two kernels:

    "gguf"      our compiled CPU kernel (`kernels.linear`): each input row quantized to int8 per
                block on its own, integer dot products against the file's quants, one fixed float
                order across blocks; each output row is the same bits whatever the number of input
                rows (batch-invariant), so a k-token verification pass scores each token exactly
                as a 1-token decoding step does (docs/algorithms.md §15)
    "dequant"   dequantize the whole weight per call and `F.linear` (any device: CUDA, or a CPU
                without a compiler): the file's exact values against float activations, but slow
                on the CPU and not batch-invariant

`kernels()` lists those that apply to a layer here; `kernel` is the one in use (default: "gguf"
when it is built, else "dequant"; inputs on another device than the CPU always take "dequant").
Only inference: nothing here is differentiable.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.models.native import kernels as native_kernels
from specdec.models.native.formats import BlockFormat, dequantize, format_of

__all__ = ["KERNELS", "GGUFEmbedding", "GGUFLinear"]

KERNELS = ("gguf", "dequant")


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
        self._packed: Tensor | None = None  # the compiled kernel's layout of the blocks, made when first used
        self._bias16: Tensor | None = None  # the bias padded to whole 16-output panels
        self.kernel = "dequant"
        self.set_kernel(kernel or ("gguf" if native_kernels.native_library() is not None else "dequant"))

    # ---- kernel choice -------------------------------------------------------------------------
    def kernels(self) -> list[str]:
        """The kernels that compute this layer on this machine (see the module docstring)."""
        usable = self.blocks.device.type == "cpu" and native_kernels.native_library() is not None
        return ["gguf", "dequant"] if usable else ["dequant"]

    def set_kernel(self, name: str) -> None:
        """Use kernel `name` from now on; ValueError when it does not apply to this layer here."""
        if name not in KERNELS:
            raise ValueError(f"unknown GGUF kernel {name!r}; known: {', '.join(KERNELS)}")
        if name == "gguf" and native_kernels.native_library() is None:
            raise ValueError(f"the compiled GGUF kernel is not available: {native_kernels.unavailable_reason()}")
        self.kernel = name

    def packed(self) -> Tensor:
        """The blocks in the compiled kernel's layout (made on first use, CPU)."""
        if self._packed is None:
            self._packed = native_kernels.repack(self.blocks, self.fmt, self.in_features)
            if self.bias is not None:
                self._bias16 = torch.zeros(-(-self.out_features // 16) * 16)
                self._bias16[: self.out_features] = self.bias
        return self._packed

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
        packed = self.packed()
        y = native_kernels.linear(x2.float().contiguous(), packed, self.fmt, self.out_features, self._bias16)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):  # .to(device) and friends: the packed copy belongs to the old place
        self._packed, self._bias16 = None, None
        out = super()._apply(fn, recurse)
        if self.blocks.device.type != "cpu":
            self.kernel = "dequant"
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt.name}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class GGUFEmbedding(nn.Module):
    """Token embeddings kept as quantized GGUF rows: forward(ids [...]) -> [..., dim] float32.

    Only the looked-up rows are dequantized (exactly, `formats.dequantize`), so a 150k-token table
    costs its file size in memory, not four bytes per value. The rows of the last `CACHED_ROWS`
    tokens of small lookups are kept dequantized: a decoding pass looks up one to a few tokens, mostly
    ones it has seen, and dequantizing a K-format row costs ~0.15 ms of torch calls, ~2 % of a draft
    model's one-token pass. A kept row is the same values a fresh one would be.
    """

    CACHED_ROWS = 4096
    """Rows kept (least recently used dropped first): ~25 MB for a 1,536-wide model."""
    CACHED_LOOKUP = 16
    """Lookups of at most this many tokens go through the kept rows; a prompt's are dequantized at once."""

    def __init__(self, blocks: Tensor, fmt: BlockFormat | str, embedding_dim: int) -> None:  # blocks: [V, row_bytes]
        super().__init__()
        self.fmt = fmt if isinstance(fmt, BlockFormat) else format_of(fmt)
        self.num_embeddings, self.embedding_dim = int(blocks.shape[0]), int(embedding_dim)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != self.fmt.row_bytes(self.embedding_dim):
            raise ValueError(f"GGUFEmbedding: expected uint8 blocks [V, {self.fmt.row_bytes(self.embedding_dim)}], "
                             f"got {tuple(blocks.shape)} {blocks.dtype}")
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self._kept: OrderedDict[int, Tensor] = OrderedDict()  # token -> [dim] float32, oldest use first
        self._keeping = threading.Lock()  # one model may serve a pipeline and an engine from two threads

    def forward(self, ids: Tensor) -> Tensor:  # ids: [...] int64 -> [..., dim]
        flat = ids.reshape(-1)
        if flat.numel() > self.CACHED_LOOKUP or self.blocks.device.type != "cpu":
            rows = self._dequantized(flat)
        else:
            with self._keeping:
                rows = self._kept_rows(flat.tolist())
        return rows.reshape(*ids.shape, self.embedding_dim)

    def _dequantized(self, ids: Tensor) -> Tensor:  # [n] -> [n, dim]
        return dequantize(self.blocks.index_select(0, ids.to(self.blocks.device)), self.fmt, self.embedding_dim)

    def _kept_rows(self, ids: list[int]) -> Tensor:  # -> [n, dim]
        kept = self._kept
        missing = [t for t in dict.fromkeys(ids) if t not in kept]
        for t in ids:
            if t in kept:
                kept.move_to_end(t)
        if missing:
            for t, row in zip(missing, self._dequantized(torch.tensor(missing, dtype=torch.long))):
                kept[t] = row.clone()  # its own storage: a dropped row frees its memory
        rows = torch.stack([kept[t] for t in ids])
        while len(kept) > self.CACHED_ROWS:
            kept.popitem(last=False)
        return rows

    def __getstate__(self) -> dict:  # copies and pickles: a lock cannot be copied, and kept rows need not be
        return {**super().__getstate__(), "_kept": OrderedDict(), "_keeping": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._keeping = threading.Lock()

    def _apply(self, fn, recurse=True):  # .to(device) and friends: kept rows belong to the old place
        with self._keeping:
            self._kept.clear()
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt.name}"
