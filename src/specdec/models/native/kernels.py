"""The compiled CPU kernels of the native path, built for this CPU on first use, and their Python calls.

`csrc/qgemm.cpp` (the integer block kernels of the linear layers), `csrc/ops.cpp` (RMSNorm, rotary
embedding, the float16 KV cache, attention, SiLU), `csrc/decoder.cpp` (a model's decoder layers in
one call), `csrc/dense.cpp` (a row-invariant linear layer for bfloat16/float16 weights, the dense
path's) and `csrc/attention.cpp` (a float32 attention for transformers models) are compiled with
torch's `cpp_extension` (g++/clang and ninja) into `$SPECDEC_CACHE/kernels/`, once per instruction
set; later processes load the cached library in milliseconds. They run on their own work-claiming
thread pool (`csrc/pool.h`: as many threads as `torch.get_num_threads()`, and a late thread never
stalls a call) and are called through a C ABI with ctypes, which keeps a build near ten seconds.

Instruction sets, best first (`ISAS`): "avx512vnni" (AVX-512 F/BW/VL/DQ + VNNI), "avxvnni" (AVX2 +
AVX-VNNI), "avx2" (AVX2 + FMA + F16C) and "generic" (portable C++). The best one this CPU runs is
used (`cpu_isa`); `SPECDEC_NATIVE_ISA` forces a lower one, so one machine can run and test
every build below its own. Every build computes the same bits (csrc/simd.h), so the choice is a
matter of speed only. Without a compiler the callers fall back to dequantizing per call;
`unavailable_reason()` says why.
"""

from __future__ import annotations

import contextlib
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
from specdec.models.native.formats import BlockFormat

__all__ = [
    "ISAS",
    "ISA_ENV",
    "attention",
    "cpu_isa",
    "dense_linear",
    "dense_repack",
    "exact_attention",
    "kv_gather",
    "kv_store",
    "linear",
    "native_library",
    "qgemm",
    "quantize",
    "repack",
    "rmsnorm",
    "rope",
    "runnable_isas",
    "silu_mul",
    "unavailable_reason",
]

log = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).with_name("csrc")
SOURCES = ("qgemm.cpp", "ops.cpp", "decoder.cpp", "dense.cpp", "attention.cpp")
HEADERS = ("simd.h", "pool.h", "vec8.h", "qgemm.h")
ISA_ENV = "SPECDEC_NATIVE_ISA"
_COMMON = ["-O3", "-ffp-contract=off", "-std=c++17"]
ISA_FLAGS = {
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c",
                   "-DSPECDEC_ISA_AVX512VNNI"],
    "avxvnni": ["-mavx2", "-mfma", "-mf16c", "-mavxvnni", "-DSPECDEC_ISA_AVXVNNI"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DSPECDEC_ISA_AVX2"],
    "generic": [],
}
ISAS = tuple(ISA_FLAGS)
_NEEDS = {  # /proc/cpuinfo flags each build needs
    "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c"},
    "avxvnni": {"avx_vnni", "avx2", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "generic": set(),
}

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


def runnable_isas() -> list[str]:
    """The builds this CPU can run, best first (read now, on this machine)."""
    flags = _cpu_flags()
    if flags is None:  # no /proc/cpuinfo (macOS): what torch itself dispatches to
        cap = torch.backends.cpu.get_cpu_capability()
        return ["avx2", "generic"] if cap in ("AVX2", "AVX512") else ["generic"]
    return [isa for isa in ISAS if _NEEDS[isa] <= flags]


def cpu_isa() -> str:
    """The build to use: the best this CPU runs, or the lower one `SPECDEC_NATIVE_ISA` names."""
    runnable = runnable_isas()
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if not forced:
        return runnable[0]
    if forced not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV}={forced!r} is not an instruction set; known: {', '.join(ISAS)}")
    if forced not in runnable:
        raise ValueError(f"{ISA_ENV}={forced} cannot run on this CPU (it runs {', '.join(runnable)})")
    return forced


def _ensure_ninja() -> None:
    """torch's extension builder calls `ninja` from PATH; the PyPI wheel's binary may not be on it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-not-found]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _flags(isa: str, defines: tuple[str, ...]) -> list[str]:
    return _COMMON + ISA_FLAGS[isa] + [f"-D{d}" for d in defines]


def build_folder(isa: str, defines: tuple[str, ...] = ()) -> Path:
    """Where the library for `isa` is built: one folder per source text, flags, torch and Python."""
    text = b"".join((CSRC_DIR / f).read_bytes() for f in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(text + " ".join(_flags(isa, defines)).encode()).hexdigest()[:10]
    tag = f"{isa}-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return cache_dir() / "kernels" / f"native-{platform.machine()}-{tag}"


def _build(isa: str, defines: tuple[str, ...] = ()) -> Path:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    _ensure_ninja()
    if shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    flags = _flags(isa, defines)
    build_dir = build_folder(isa, defines)
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"specdec_native_{isa}" + "".join(f"_{d.lower()}" for d in defines)
    lib = build_dir / f"{name}.so"
    if not lib.is_file():
        log.info("Compiling the native kernels for %s into %s (once, ~10-60 s)", isa, build_dir)
    with _build_lock(build_dir):
        cpp_extension.load(
            name=name, sources=[str(CSRC_DIR / f) for f in SOURCES], extra_cflags=flags,
            extra_include_paths=[str(CSRC_DIR)],
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
    return lib


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One builder per build folder, by a lock the kernel drops when its holder dies. torch's own
    lock is a file that a killed build leaves behind, and every later process would wait on it
    forever; under ours any such file is stale, so it goes."""
    import fcntl

    with open(build_dir / "specdec.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes)
    "specdec_isa": (ctypes.c_char_p, []),
    "specdec_set_prefetch_bytes": (_I64, [_I64]),
    "specdec_repacked_bytes": (_I64, [_I64, _I64, _I64]),
    "specdec_repack": (ctypes.c_int, [_I64, _PTR, _I64, _I64, _PTR]),
    "specdec_quantized_bytes": (_I64, [_I64, _I64, _I64]),
    "specdec_quantize": (ctypes.c_int, [_I64, _PTR, _I64, _I64, _I64, _PTR]),
    "specdec_qgemm": (ctypes.c_int, [_I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64]),
    "specdec_qgemm_many": (ctypes.c_int, [_I64, _PTR, _I64]),
    "specdec_rmsnorm": (ctypes.c_int, [_PTR, _PTR, _PTR, _F32, _I64, _I64, _PTR]),
    "specdec_rope": (ctypes.c_int, [_PTR, _I64, _I64, _I64, _PTR, _PTR]),
    "specdec_kv_store": (ctypes.c_int, [_PTR, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64]),
    "specdec_kv_gather": (ctypes.c_int, [_PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64]),
    "specdec_attention": (ctypes.c_int, [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR,
                                         _F32, _PTR]),
    "specdec_silu_mul": (ctypes.c_int, [_PTR, _PTR, _I64, _PTR]),
    "specdec_decoder_layers": (ctypes.c_int, [_PTR, _PTR, _PTR]),
    "specdec_dense_repack": (ctypes.c_int, [_PTR, _I64, _I64, _PTR]),
    "specdec_dense_gemm": (ctypes.c_int, [_I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64]),
    "specdec_exact_attention": (ctypes.c_int, [_PTR, *[_I64] * 5, _PTR, _PTR, *[_I64] * 7, _PTR, _I64, _I64, _F32, _PTR]),
}

_reasons: dict[str, str] = {}


@functools.cache
def _library(isa: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    if sys.platform.startswith("win"):
        _reasons[isa] = "the compiled kernels are built on Linux and macOS only"
        return None
    try:
        lib = ctypes.CDLL(str(_build(isa, defines)))
    except Exception as exc:  # no compiler, no ninja, a failed build: fall back, and say why
        first = (str(exc).strip().splitlines() or [""])[0]
        _reasons[isa] = f"the native kernels could not be built ({type(exc).__name__}: {first})"
        log.warning("%s; --weights native falls back to dequantizing per call (slow)", _reasons[isa])
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    built = lib.specdec_isa().decode()
    if built != isa:
        _reasons[isa] = f"the kernel library built for {isa} reports {built} (compiler flags not honoured)"
        return None
    return lib


def native_library(isa: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernels (built on first call) for `isa`, or None; `unavailable_reason()` says why.

    Default: `cpu_isa()`, or the next build down when that one cannot be built here.
    """
    if isa is None:
        best = cpu_isa()
        for candidate in ISAS[ISAS.index(best):]:
            if candidate in runnable_isas() and native_library(candidate) is not None:
                return native_library(candidate)
        return None
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown instruction set {isa!r}; known: {', '.join(ISAS)}")
    with _lock:
        return _library(isa)


def planted_library(isa: str = "generic") -> ctypes.CDLL | None:
    """For tests only: a build with SPECDEC_PLANT_ORDER, which sums blocks of several rows in another
    float order than a single row's (a planted invariance bug the tests must catch)."""
    with _lock:
        return _library(isa, ("SPECDEC_PLANT_ORDER",))


def unavailable_reason(isa: str | None = None) -> str | None:
    """Why `native_library(isa)` is None (None when it is available)."""
    isa = isa or cpu_isa()
    return None if native_library(isa) is not None else _reasons.get(isa, "unknown")


def _lib(isa: str | None) -> ctypes.CDLL:
    lib = native_library(isa)
    if lib is None:
        raise RuntimeError(unavailable_reason(isa) or "the native kernels are not available")
    return lib


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"{what}: the kernel refused its arguments")


def _f32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


# ---- linear layers ---------------------------------------------------------------------------------
def repack(blocks: Tensor, fmt: BlockFormat, cols: int, isa: str | None = None) -> Tensor:
    """The kernel's layout of a weight: blocks [N, row_bytes] uint8 (the file's rows) -> uint8 [bytes].

    Panels of 16 rows, block by block (N padded to 16 with zero rows); the same bytes for every build.
    """
    lib = _lib(isa)
    n = blocks.shape[0]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != fmt.row_bytes(cols):
        raise ValueError(f"repack: expected uint8 [{n}, {fmt.row_bytes(cols)}] {fmt.name} rows of {cols} values")
    blocks = blocks.contiguous()
    out = torch.empty(lib.specdec_repacked_bytes(fmt.code, n, cols), dtype=torch.uint8)
    _check(lib.specdec_repack(fmt.code, blocks.data_ptr(), n, cols, out.data_ptr()), "repack")
    return out


def quantize(x: Tensor, fmt: BlockFormat, isa: str | None = None) -> Tensor:
    """x [M, K] float32 -> its rows quantized to int8 blocks for weights of `fmt` (uint8 bytes)."""
    lib = _lib(isa)
    m, k = x.shape
    if not _f32(x) or k % fmt.block_size:
        raise ValueError(f"quantize: x must be contiguous float32 [M, K] with K a multiple of {fmt.block_size}")
    out = torch.empty(lib.specdec_quantized_bytes(fmt.code, m, k), dtype=torch.uint8)
    _check(lib.specdec_quantize(fmt.code, x.data_ptr(), m, k, k, out.data_ptr()), "quantize")
    return out


def qgemm(xq: Tensor, rows: int, cols: int, packed: Tensor, fmt: BlockFormat, out_features: int,
          bias: Tensor | None = None, out: Tensor | None = None, isa: str | None = None) -> Tensor:
    """y = x·Wᵀ (+ bias): xq from `quantize` ([rows, cols] of x), packed from `repack` -> [rows, N] float32.

    bias: float32 [N rounded up to 16] or None. Each output row depends on its input row only.
    """
    lib = _lib(isa)
    if out is None:
        out = torch.empty(rows, out_features, dtype=torch.float32)
    if bias is not None and (not _f32(bias) or bias.numel() < -(-out_features // 16) * 16):
        raise ValueError("qgemm: bias must be contiguous float32, padded to a multiple of 16")
    _check(lib.specdec_qgemm(fmt.code, xq.data_ptr(), rows, cols, packed.data_ptr(), out_features,
                             bias.data_ptr() if bias is not None else None, out.data_ptr(), out.stride(0)), "qgemm")
    return out


class _QJob(ctypes.Structure):  # mirrors csrc/qgemm.h
    _fields_ = [("fmt", _I64), ("xq", _PTR), ("K", _I64), ("w", _PTR), ("N", _I64), ("bias", _PTR), ("y", _PTR),
                ("ldy", _I64)]


def qgemm_many(jobs: list[tuple[Tensor, int, Tensor, BlockFormat, int, Tensor | None]], rows: int,
               isa: str | None = None) -> list[Tensor]:
    """Several `qgemm`s of `rows` rows in one parallel call, as the decoder runs q, k and v: each job
    (xq, cols, packed, fmt, out_features, bias) -> [rows, out_features] float32, the same bits as
    its own `qgemm`."""
    lib = _lib(isa)
    outs = [torch.empty(rows, n, dtype=torch.float32) for _, _, _, _, n, _ in jobs]
    array = (_QJob * len(jobs))(*[
        _QJob(fmt.code, xq.data_ptr(), cols, packed.data_ptr(), n, bias.data_ptr() if bias is not None else None,
              out.data_ptr(), n)
        for (xq, cols, packed, fmt, n, bias), out in zip(jobs, outs)])
    _check(lib.specdec_qgemm_many(len(jobs), ctypes.addressof(array), rows), "qgemm_many")
    return outs


def linear(x: Tensor, packed: Tensor, fmt: BlockFormat, out_features: int, bias: Tensor | None = None,
           isa: str | None = None) -> Tensor:
    """x [M, K] float32 -> [M, N]: quantize the rows, then `qgemm`."""
    m, k = x.shape
    return qgemm(quantize(x, fmt, isa), m, k, packed, fmt, out_features, bias, isa=isa)


# ---- the rest of a layer ---------------------------------------------------------------------------
def rmsnorm(x: Tensor, weight: Tensor, eps: float, out: Tensor, residual: Tensor | None = None,
            isa: str | None = None) -> Tensor:
    """out = rmsnorm(x (+= residual, in place)) · weight; x, residual, out [M, D] float32."""
    m, d = x.shape
    if not _f32(x, weight, out) or (residual is not None and not _f32(residual)):
        raise ValueError("rmsnorm: contiguous float32 CPU tensors expected")
    _check(_lib(isa).specdec_rmsnorm(x.data_ptr(), residual.data_ptr() if residual is not None else None,
                                     weight.data_ptr(), float(eps), m, d, out.data_ptr()), "rmsnorm")
    return out


def rope(x: Tensor, table: Tensor, positions: Tensor, isa: str | None = None) -> None:
    """Rotate x [T, heads, d] in place; table [P, d] = cos | sin halves per position; positions [T] int64."""
    t, heads, d = x.shape
    if not _f32(x, table) or positions.dtype != torch.int64 or int(positions.max(initial=0)) >= table.shape[0]:
        raise ValueError("rope: float32 x and table, int64 positions within the table expected")
    _check(_lib(isa).specdec_rope(x.data_ptr(), t, heads, d, table.data_ptr(), positions.data_ptr()), "rope")


def kv_store(k: Tensor, v: Tensor, rows: Tensor | None, slots: Tensor, kt: Tensor, vc: Tensor,
             isa: str | None = None) -> None:
    """Write k, v [T, Hkv, d] float32 to float16 caches kt [R, Hkv, d, cap], vc [R, Hkv, cap, d]:
    token t to row rows[t] (None: row 0), slot slots[t] (int64 [T])."""
    t, hkv, d = k.shape
    r, _, cap, _ = vc.shape
    _check(_lib(isa).specdec_kv_store(k.data_ptr(), v.data_ptr(), t, hkv, d, rows.data_ptr() if rows is not None else None,
                                      slots.data_ptr(), kt.data_ptr(), vc.data_ptr(), r, cap), "kv_store")


def kv_gather(kt: Tensor, vc: Tensor, dst: int, src: Tensor, isa: str | None = None) -> None:
    """One row's cache (kt [Hkv, d, cap], vc [Hkv, cap, d]): slots dst + i take slot src[i] (src [n] int64)."""
    hkv, cap, d = vc.shape
    _check(_lib(isa).specdec_kv_gather(kt.data_ptr(), vc.data_ptr(), hkv, d, cap, dst, src.data_ptr(), src.numel()),
           "kv_gather")


def attention(q: Tensor, kt: Tensor, vc: Tensor, rows: Tensor | None, prefix: Tensor, vis: Tensor, vis_off: Tensor,
              scale: float, out: Tensor, isa: str | None = None) -> Tensor:
    """Attention of q [T, H, d] over float16 caches (kt [R, Hkv, d, cap], vc [R, Hkv, cap, d]) -> out [T, H, d].

    Query t reads row rows[t] (None: row 0) and sees its slots [0, prefix[t]) and then the slots
    vis[vis_off[t]:vis_off[t+1]] (int64, increasing).
    """
    t, h, d = q.shape
    r, hkv, cap, _ = vc.shape
    _check(_lib(isa).specdec_attention(q.data_ptr(), t, h, hkv, d, kt.data_ptr(), vc.data_ptr(), r, cap,
                                       rows.data_ptr() if rows is not None else None, prefix.data_ptr(), vis.data_ptr(),
                                       vis_off.data_ptr(), float(scale), out.data_ptr()), "attention")
    return out


def silu_mul(gate: Tensor, up: Tensor, out: Tensor, isa: str | None = None) -> Tensor:
    """out = silu(gate)·up, element-wise (float32, same shape; out may be gate)."""
    _check(_lib(isa).specdec_silu_mul(gate.data_ptr(), up.data_ptr(), gate.numel(), out.data_ptr()), "silu_mul")
    return out


_DENSE_KINDS = {torch.bfloat16: 0, torch.float16: 1}


def dense_repack(weight: Tensor, isa: str | None = None) -> Tensor:
    """A bfloat16/float16 weight [N, K] as the dense kernel's panels (a uint16 tensor)."""
    if weight.dtype not in _DENSE_KINDS or weight.dim() != 2 or weight.device.type != "cpu":
        raise ValueError("dense_repack: a 2-D bfloat16 or float16 CPU weight expected")
    n, k = weight.shape
    w = weight.contiguous().view(torch.int16)
    out = torch.empty(-(-n // 16) * 16 * k, dtype=torch.int16)
    _check(_lib(isa).specdec_dense_repack(w.data_ptr(), n, k, out.data_ptr()), "dense_repack")
    return out


def dense_linear(x: Tensor, packed: Tensor, out_features: int, bias: Tensor | None = None,
                 isa: str | None = None) -> Tensor:
    """y = x·Wᵀ (+ bias) in x's dtype (bfloat16 or float16) with one fixed float32 order per output:
    x [M, K] -> [M, N]; each row depends on its own input row only."""
    m, k = x.shape
    kind = _DENSE_KINDS.get(x.dtype)
    if kind is None or x.device.type != "cpu":
        raise ValueError("dense_linear: bfloat16 or float16 CPU activations expected")
    x = x.contiguous()
    y = torch.empty(m, out_features, dtype=x.dtype)
    b = bias.to(x.dtype).contiguous().view(torch.int16) if bias is not None else None
    _check(_lib(isa).specdec_dense_gemm(kind, x.view(torch.int16).data_ptr(), m, k, packed.data_ptr(), out_features,
                                        b.data_ptr() if b is not None else None, y.view(torch.int16).data_ptr(),
                                        out_features), "dense_linear")
    return y


def exact_attention(
    q: Tensor,  # [H, n, d] float32 (CPU), rows contiguous
    k: Tensor,  # [Hkv, L, d] float32, rows contiguous (a view of a larger cache is fine)
    v: Tensor,  # [Hkv, L, dv] float32, rows contiguous
    mask: Tensor | None,  # [H or 1, n, L] additive float32 (≤ -1e30 = masked), rows contiguous, or None
    scale: float,
    isa: str | None = None,
) -> Tensor:  # [n, H, dv] float32
    """softmax(scale·q·kᵀ + mask)·v per head and row, each (row, head) in one fixed order (batch-invariant);
    for transformers models (`attention.py`)."""
    lib = _lib(isa)
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
