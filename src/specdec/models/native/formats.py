"""The GGUF block formats computed on natively, and a pure-torch decoder for them.

Each weight row of K values is K / block_size blocks of `type_size` bytes (ggml's layouts):

    Q4_0  32 values, 18 B: d f16, 16 B of 4-bit q          w = d·(q − 8)
    Q4_1  32 values, 20 B: d f16, m f16, 16 B of 4-bit q   w = d·q + m
    Q5_0  32 values, 22 B: d f16, 4 B of high bits, 16 B   w = d·(q − 16), q 5-bit
    Q5_1  32 values, 24 B: d, m f16, 4 B of high bits, 16 B w = d·q + m, q 5-bit
    Q8_0  32 values, 34 B: d f16, 32 int8                  w = d·q
    Q4_K 256 values, 144 B: d, dmin f16, 12 B of eight 6-bit (scale, min) pairs, 128 B of 4-bit q
                            w = (d·sc)·q − (dmin·m) per 32 values
    Q5_K 256 values, 176 B: as Q4_K, plus 32 B of high bits (q 5-bit)
    Q6_K 256 values, 210 B: 128 B low 4 bits, 64 B high 2 bits, sixteen int8 scales, d f16
                            w = (d·sc)·(q − 32) per 16 values

`dequantize` reproduces `gguf.quants.dequantize` bit for bit, in the same float32 operations: every
product of a scale and a quant is exact in float32 (at most 24 significant bits), so each value is
rounded once, at the final add or subtract. It runs on any device (the fallback when no kernel is
available, and the path on CUDA), and decodes embedding rows. The compiled kernels multiply the
same quants and scales by integer arithmetic (kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FORMATS", "REQUANTIZABLE", "BlockFormat", "UnsupportedFormat", "dequantize", "format_of", "random_blocks",
           "requantize"]


class UnsupportedFormat(ValueError):
    """A tensor type that the native path does not compute on."""


@dataclass(frozen=True)
class BlockFormat:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType value
    block_size: int  # values per block
    type_size: int  # bytes per block
    code: int  # the format's number in the compiled kernels (csrc/qgemm.cpp)
    half_offsets: tuple[int, ...]  # byte offsets of the f16 scale fields in a block (d first)

    def row_bytes(self, cols: int) -> int:
        if cols % self.block_size:
            raise UnsupportedFormat(f"a {self.name} row needs a multiple of {self.block_size} values, got {cols}")
        return cols // self.block_size * self.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("Q4_0", 2, 32, 18, 0, (0,)),
        BlockFormat("Q4_1", 3, 32, 20, 1, (0, 2)),
        BlockFormat("Q5_0", 6, 32, 22, 2, (0,)),
        BlockFormat("Q8_0", 8, 32, 34, 3, (0,)),
        BlockFormat("Q4_K", 12, 256, 144, 4, (0, 2)),
        BlockFormat("Q6_K", 14, 256, 210, 5, (208,)),
        BlockFormat("Q5_1", 7, 32, 24, 6, (0, 2)),
        BlockFormat("Q5_K", 13, 256, 176, 7, (0, 2)),
    )
}


def format_of(kind: int | str) -> BlockFormat:
    """The format of a ggml type number or name; UnsupportedFormat names the supported ones."""
    for f in FORMATS.values():
        if kind in (f.name, f.ggml_type):
            return f
    raise UnsupportedFormat(
        f"tensor type {kind!r} is not computed on natively (supported: {', '.join(FORMATS)}); "
        f"use --weights dense for this model"
    )


# ---- decoding ------------------------------------------------------------------------------------
def _half(b: Tensor, offset: int) -> Tensor:  # b: [..., type_size] uint8 -> [..., 1] float32
    return b[..., offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:  # qs: [..., n] uint8 -> [..., 2n]: all low nibbles, then all high
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q4_0(b: Tensor) -> Tensor:
    q = _nibbles(b[..., 2:18]).to(torch.int8) - 8
    return _half(b, 0) * q.float()


def _q4_1(b: Tensor) -> Tensor:
    return _half(b, 0) * _nibbles(b[..., 4:20]).float() + _half(b, 2)


def _five_bit(qh: Tensor, qs: Tensor) -> Tensor:  # qh [..., 4], qs [..., 16] uint8 -> [..., 32] quants 0..31
    qh = qh.to(torch.int32)
    bits = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)  # [...] the 32 high bits
    shifts = torch.arange(32, device=qh.device, dtype=torch.int32)
    high = ((bits.unsqueeze(-1) >> shifts) & 1).to(torch.uint8) << 4
    return _nibbles(qs) | high


def _q5_0(b: Tensor) -> Tensor:
    q = _five_bit(b[..., 2:6], b[..., 6:22]).to(torch.int8) - 16
    return _half(b, 0) * q.float()


def _q5_1(b: Tensor) -> Tensor:
    return _half(b, 0) * _five_bit(b[..., 4:8], b[..., 8:24]).float() + _half(b, 2)


def _q8_0(b: Tensor) -> Tensor:
    return b[..., 2:34].contiguous().view(torch.int8).float() * _half(b, 0)


def k4_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit (scale, min) pairs of Q4_K blocks: s [..., 12] uint8 -> two [..., 8] uint8."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, mins


def _q4_k(b: Tensor) -> Tensor:
    sc, mn = k4_scales_mins(b[..., 4:16])
    d = (_half(b, 0) * sc.float()).unsqueeze(-1)  # [..., 8, 1] exact
    dm = (_half(b, 2) * mn.float()).unsqueeze(-1)
    qs = b[..., 16:144].unflatten(-1, (4, 32))  # 64 values per 32 bytes: low nibbles, then high
    q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2).float()  # [..., 8, 32]
    return (d * q - dm).flatten(-2)


def _q5_k(b: Tensor) -> Tensor:
    sc, mn = k4_scales_mins(b[..., 4:16])
    d = (_half(b, 0) * sc.float()).unsqueeze(-1)  # [..., 8, 1] exact
    dm = (_half(b, 2) * mn.float()).unsqueeze(-1)
    qs = b[..., 48:176].unflatten(-1, (4, 32))
    low = torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2)  # [..., 8, 32]
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(8, 1)
    high = ((b[..., 16:48].unsqueeze(-2) >> shifts) & 1) << 4  # [..., 8, 32]: sub-block s uses bit s
    return (d * (low | high).float() - dm).flatten(-2)


def _q6_k(b: Tensor) -> Tensor:
    lead = b.shape[:-1]
    ql = b[..., 0:128].unflatten(-1, (2, 1, 64))
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(*lead, 2, 4, 32)  # per half: 4 runs of 32
    qh = b[..., 128:192].unflatten(-1, (2, 1, 32))
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(4, 1)
    qh = (qh >> shifts) & 0x03  # [..., 2, 4, 32]
    q = (ql | (qh << 4)).to(torch.int8) - 32
    d = _half(b, 208) * b[..., 192:208].contiguous().view(torch.int8).float()  # [..., 16] exact
    return (d.unsqueeze(-1) * q.reshape(*lead, 16, 16).float()).flatten(-2)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
             "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(blocks: Tensor, fmt: BlockFormat, cols: int) -> Tensor:
    """Float32 values of quantized rows: blocks [rows, row_bytes] uint8 -> [rows, cols] (any device)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != fmt.row_bytes(cols):
        raise ValueError(
            f"expected uint8 rows of {fmt.row_bytes(cols)} bytes ({cols} {fmt.name} values), got "
            f"{tuple(blocks.shape)} {blocks.dtype}"
        )
    rows = blocks.shape[0]
    per_block = blocks.reshape(rows, cols // fmt.block_size, fmt.type_size)
    return _DECODERS[fmt.name](per_block).reshape(rows, cols)


# ---- requantizing -------------------------------------------------------------------------------

REQUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
"""The formats `requantize` writes (those the gguf package quantizes to)."""
REQUANTIZE_ROWS = 4096
"""Rows requantized at a time (bounds the float32 copy)."""


def requantize(blocks: Tensor, fmt: BlockFormat, cols: int, to: BlockFormat) -> tuple[Tensor, BlockFormat]:
    """Rows of `fmt` quantized again as `to` where that reads fewer bytes: (blocks [rows, row bytes]
    uint8, their format). Rows already as small as `to`, or whose length `to` cannot split into
    blocks, come back unchanged. The values change (each block rounded to `to`'s grid), so this is
    for a draft model only, whose values decide how often its drafts are accepted, never the output.
    """
    if to.name not in REQUANTIZABLE:
        raise UnsupportedFormat(f"cannot quantize to {to.name} (can: {', '.join(REQUANTIZABLE)})")
    if to.bits_per_weight >= fmt.bits_per_weight or cols % to.block_size:
        return blocks, fmt
    from gguf import GGMLQuantizationType, quants

    out = torch.empty(blocks.shape[0], to.row_bytes(cols), dtype=torch.uint8)
    for start in range(0, blocks.shape[0], REQUANTIZE_ROWS):  # a head's float32 copy would be ~0.5 GB at once
        values = dequantize(blocks[start : start + REQUANTIZE_ROWS], fmt, cols).numpy()
        part = quants.quantize(values, GGMLQuantizationType(to.ggml_type))
        out[start : start + part.shape[0]] = torch.from_numpy(part)
    return out, to


# ---- synthetic blocks ----------------------------------------------------------------------------
def random_blocks(fmt: BlockFormat, rows: int, cols: int, generator: torch.Generator, scale: float = 0.01) -> Tensor:
    """Valid random rows of `fmt`: random quants and sub-scales, f16 scales of size ~`scale`.

    For tests (every format, without a quantizer for the K-formats) and for timing a format's kernel.
    -> [rows, row_bytes] uint8.
    """
    nb = rows * (cols // fmt.block_size)
    blocks = torch.randint(0, 256, (nb, fmt.type_size), dtype=torch.uint8, generator=generator)
    for i, off in enumerate(fmt.half_offsets):
        value = torch.rand(nb, generator=generator) * scale + scale / 4
        if fmt.name in ("Q4_1", "Q5_1") and i == 1:
            value = (-8 if fmt.name == "Q4_1" else -16) * value  # the min sits below zero, as a real block's does
        elif fmt.name in ("Q4_K", "Q5_K") and i == 1:
            value = (7.5 if fmt.name == "Q4_K" else 15.5) * value  # dmin·min mid-range: values centred on zero
        blocks[:, off : off + 2] = value.to(torch.float16).view(torch.uint8).view(nb, 2)
    return blocks.reshape(rows, fmt.row_bytes(cols))
