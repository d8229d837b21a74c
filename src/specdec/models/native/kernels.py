"""The compute kernels for GGUF blocks on the CPU: our compiled one, and PyTorch's int4 kernel.

`csrc/gguf_linear.cpp` (the linear layers) and `csrc/attention.cpp` (a batch-invariant attention)
are compiled on first use for the instruction set this CPU has (read at run time: AVX2 + FMA + F16C,
else portable code), with torch's `cpp_extension` (g++/clang and ninja), into
`$SPECDEC_CACHE/kernels/`; later processes load the cached library in milliseconds. They include only
`ATen/Parallel.h` (torch's thread pool, so `torch.set_num_threads` applies) and are called through a C
ABI with ctypes, which keeps that first build near ten seconds on two cores. Without a compiler the
callers fall back to dequantizing per call (`formats.dequantize` + `F.linear`), which is exact but
slow; `unavailable_reason()` says why.

PyTorch's `_weight_int4pack_mm_for_cpu` computes w = (q − 8)·s + z per group of 32 from 4-bit q and
float32 (s, z). Q4_0, Q4_1 and each Q4_K sub-block fit that form with s = d (·sc) and
z = m + 8·d (Q4_1) or 8·d·sc − dmin·m (Q4_K); when z is exact in float32 the kernel forms the very
values the file dequantizes to (the product is exact, one rounding at the add), so `int4pack_of`
checks that and returns None otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from specdec.core.store import cache_dir
from specdec.models.native.formats import BlockFormat, k4_scales_mins

__all__ = [
    "INT4_FORMATS",
    "cpu_isa",
    "exact_attention",
    "gguf_linear",
    "int4_exact",
    "int4pack_linear",
    "int4pack_of",
    "native_library",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).with_name("csrc")
SOURCES = ("gguf_linear.cpp", "attention.cpp")  # plus the header vec8.h they share
ISA_FLAGS = {
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp"],
    "generic": ["-O3", "-ffp-contract=off", "-fopenmp"],
}
INT4_FORMATS = ("Q4_0", "Q4_1", "Q4_K")

_lock = threading.Lock()


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_isa() -> str:
    """'avx2' when this CPU runs AVX2, FMA and F16C (checked now, on this machine), else 'generic'."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "generic"
    flags = _cpu_flags()
    if flags is not None and not {"avx2", "fma", "f16c"} <= flags:
        return "generic"
    return "avx2"


def _ensure_ninja() -> None:
    """torch's extension builder calls `ninja` from PATH; the PyPI wheel's binary may not be on it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _build(isa: str) -> Path:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    _ensure_ninja()
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    text = b"".join((CSRC_DIR / f).read_bytes() for f in (*SOURCES, "vec8.h"))
    digest = hashlib.sha256(text + " ".join(ISA_FLAGS[isa]).encode()).hexdigest()[:10]
    tag = f"{isa}-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    build_dir = cache_dir() / "kernels" / f"native-{platform.machine()}-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"specdec_native_{isa}"
    lib = build_dir / f"{name}.so"
    if not lib.is_file():
        log.info("Compiling the GGUF kernels for %s into %s (once, ~10-60 s)", isa, build_dir)
    cpp_extension.load(
        name=name, sources=[str(CSRC_DIR / f) for f in SOURCES], extra_cflags=ISA_FLAGS[isa],
        extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC_DIR)],
        build_directory=str(build_dir), is_python_module=False, verbose=False,
    )
    return lib


_reasons: dict[str, str] = {}


@functools.cache
def _library(isa: str) -> ctypes.CDLL | None:
    if sys.platform.startswith("win"):
        _reasons[isa] = "the compiled kernels are built on Linux and macOS only"
        return None
    try:
        lib = ctypes.CDLL(str(_build(isa)))
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, and say why
        first = (str(exc).strip().splitlines() or [""])[0]
        _reasons[isa] = f"the GGUF kernels could not be built ({type(exc).__name__}: {first})"
        log.warning("%s; --weights native falls back to dequantizing per call (slow)", _reasons[isa])
        return None
    lib.specdec_gguf_linear.restype = ctypes.c_int
    lib.specdec_gguf_linear.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p,
    ]
    lib.specdec_exact_attention.restype = ctypes.c_int
    lib.specdec_exact_attention.argtypes = [
        ctypes.c_void_p, *[ctypes.c_int64] * 5, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 7,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
    ]
    lib.specdec_gguf_isa.restype = ctypes.c_int
    built = "avx2" if lib.specdec_gguf_isa() == 1 else "generic"
    if built != isa:
        _reasons[isa] = f"the kernel library built for {isa} reports {built} (compiler flags not honoured)"
        return None
    return lib


def native_library(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels (built on first call) for `isa` (default: this CPU's), or None.

    `unavailable_reason()` says why it is None. "generic" works on any CPU (tests use it to check the
    portable code on an AVX2 machine).
    """
    isa = isa or cpu_isa()
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown instruction set {isa!r}; known: {', '.join(ISA_FLAGS)}")
    with _lock:
        return _library(isa)


def unavailable_reason(isa: str | None = None) -> str | None:
    """Why `native_library(isa)` is None (None when it is available)."""
    isa = isa or cpu_isa()
    return None if native_library(isa) is not None else _reasons.get(isa, "unknown")


def gguf_linear(
    x: Tensor, blocks: Tensor, fmt: BlockFormat, bias: Tensor | None = None, isa: str | None = None
) -> Tensor:
    """y = x · Wᵀ (+ bias) on the compiled kernel.

    x [M, K] float32 contiguous (CPU); blocks [N, row_bytes] uint8 contiguous; bias [N] float32 or None
    -> [M, N] float32. Each row of the result is the same whatever M (batch-invariant).
    """
    lib = native_library(isa)
    if lib is None:
        raise RuntimeError(unavailable_reason(isa) or "the GGUF kernels are not available")
    m, k = x.shape
    n = blocks.shape[0]
    if (x.dtype != torch.float32 or not x.is_contiguous() or x.device.type != "cpu" or blocks.dtype != torch.uint8
            or not blocks.is_contiguous() or blocks.shape[1] != fmt.row_bytes(k)):
        raise ValueError(f"gguf_linear: bad arguments x {tuple(x.shape)} {x.dtype}, blocks {tuple(blocks.shape)} "
                         f"{blocks.dtype} for {fmt.name} rows of {k} values")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != n):
        raise ValueError(f"gguf_linear: bias must be contiguous float32 [{n}]")
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.specdec_gguf_linear(x.data_ptr(), m, k, blocks.data_ptr(), n, fmt.code,
                                 bias.data_ptr() if bias is not None else None, y.data_ptr())
    if rc != 0:
        raise ValueError(f"gguf_linear: the kernel refused {fmt.name} with K={k}")
    return y


def exact_attention(
    q: Tensor,  # [H, n, d] float32 (CPU), rows contiguous
    k: Tensor,  # [Hkv, L, d] float32, rows contiguous (a view of a larger cache is fine)
    v: Tensor,  # [Hkv, L, dv] float32, rows contiguous
    mask: Tensor | None,  # [H or 1, n, L] additive float32 (≤ -1e30 = masked), rows contiguous, or None
    scale: float,
    isa: str | None = None,
) -> Tensor:  # [n, H, dv] float32
    """softmax(scale·q·kᵀ + mask)·v per head and row, each (row, head) in one fixed order (batch-invariant)."""
    lib = native_library(isa)
    if lib is None:
        raise RuntimeError(unavailable_reason(isa) or "the compiled kernels are not available")
    h, n, d = q.shape
    hkv, length, dv = v.shape
    tensors = [q, k, v] + ([mask] if mask is not None else [])
    if (any(t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1 for t in tensors)
            or k.shape != (hkv, length, d) or (mask is not None and mask.shape[1:] != (n, length))):
        raise ValueError("exact_attention: float32 CPU tensors with contiguous rows and matching shapes expected")
    out = torch.empty(n, h, dv, dtype=torch.float32)
    m_sh = 0 if mask is None or mask.shape[0] == 1 else mask.stride(0)
    rc = lib.specdec_exact_attention(
        q.data_ptr(), h, n, d, q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), hkv, length, dv,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), mask.data_ptr() if mask is not None else None,
        m_sh, mask.stride(1) if mask is not None else 0, float(scale), out.data_ptr(),
    )
    if rc != 0:
        raise ValueError(f"exact_attention: the kernel refused heads {h}/{hkv}, head sizes {d}/{dv}")
    return out


# ---- PyTorch's int4 kernel ---------------------------------------------------------------------------
def _int4_fields(
    blocks: Tensor, fmt: BlockFormat, cols: int, quants: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(q [N, K] int32 in 0..15 or None, s [N, K/32] float64, z [N, K/32] float64): w = (q − 8)·s + z."""
    n = blocks.shape[0]
    b = blocks.reshape(n, cols // fmt.block_size, fmt.type_size)

    def half(off: int) -> Tensor:
        return b[..., off : off + 2].contiguous().view(torch.float16).double()

    if fmt.name in ("Q4_0", "Q4_1"):
        start = 2 if fmt.name == "Q4_0" else 4
        qs = b[..., start : start + 16]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1) if quants else None  # [N, nb, 32]
        s = half(0).squeeze(-1)
        z = torch.zeros_like(s) if fmt.name == "Q4_0" else half(2).squeeze(-1) + 8 * s
    elif fmt.name == "Q4_K":
        sc, mn = k4_scales_mins(b[..., 4:16])
        s = half(0) * sc.double()  # [N, nb, 8]
        z = 8 * s - half(2) * mn.double()
        qs = b[..., 16:144].unflatten(-1, (4, 32))
        q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2) if quants else None  # [N, nb, 8, 32]
    else:
        raise ValueError(f"{fmt.name} has no int4 form")
    q = q.reshape(n, cols).to(torch.int32) if q is not None else None
    return q, s.reshape(n, -1), z.reshape(n, -1)


def int4_exact(blocks: Tensor, fmt: BlockFormat, cols: int) -> bool:
    """Whether `_weight_int4pack_mm_for_cpu` can form exactly the values of these rows (see the module doc)."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if fmt.name not in INT4_FORMATS or op is None or blocks.device.type != "cpu" or blocks.shape[0] % 16:
        return False  # the op packs 16 output rows together
    _, s, z = _int4_fields(blocks, fmt, cols, quants=False)
    return bool(torch.equal(s.float().double(), s) and torch.equal(z.float().double(), z))


def int4pack_of(blocks: Tensor, fmt: BlockFormat, cols: int) -> tuple[Tensor, Tensor] | None:
    """(packed weight, scales_and_zeros [K/32, N, 2]) for `_weight_int4pack_mm_for_cpu`, or None when
    `int4_exact` is False."""
    if not int4_exact(blocks, fmt, cols):
        return None
    q, s, z = _int4_fields(blocks, fmt, cols)
    # One call for the whole matrix: the packed layout interleaves rows across more than 16 of them.
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return packed, torch.stack([s.float(), z.float()], dim=-1).transpose(0, 1).contiguous()


def int4pack_linear(x: Tensor, packed: Tensor, scales_zeros: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x · Wᵀ (+ bias) on PyTorch's int4 kernel: x [M, K] float32 -> [M, N] float32."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros)
    return y + bias if bias is not None else y
