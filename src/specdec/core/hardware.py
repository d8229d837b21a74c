"""What machine this is, as far as speed is concerned: the hardware fingerprint.

Every measured choice (the linear path per block size, the draft's precision, the tuned method)
is only valid on the machine it was measured on, so each is cached under a digest of this
fingerprint: the CPU (model name, the instruction-set flags that change which kernels exist, and
torch's own dispatch level) or the GPU (name and compute capability), the torch thread count and
the torch version. Another machine, another thread count or another torch gives another digest,
and the choice is measured again instead of being silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Instruction-set flags that decide which kernels a CPU has (AVX2/FMA GEMMs, AVX-512, VNNI int8,
# native bfloat16 and AMX tiles, Arm NEON/SVE); the rest of /proc/cpuinfo's flags do not matter.
SPEED_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",
)


@lru_cache(maxsize=1)
def _cpu_info() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the speed-relevant flags it has), from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    path = Path("/proc/cpuinfo")
    try:
        text = path.read_text() if path.is_file() else ""
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and value.strip():
            name = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return name, tuple(f for f in SPEED_FLAGS if f in flags)


def fingerprint(device: "str | torch.device" = "cpu") -> dict[str, Any]:
    """The hardware fingerprint of `device` as a JSON-ready dict (see the module docstring)."""
    import torch  # here, not at module level: the profile store (and the CLI's model listing) stays torch-free

    dev = torch.device(device)
    out: dict[str, Any] = {"device": dev.type, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        out.update(gpu=torch.cuda.get_device_name(index), capability=f"{major}.{minor}", cuda=torch.version.cuda)
    else:
        name, flags = _cpu_info()
        capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
        out.update(cpu=name, flags=list(flags), capability=capability, machine=platform.machine())
    return out


def fingerprint_digest(fp: dict[str, Any]) -> str:
    """A short stable name for a fingerprint (file names, profile keys)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def describe(fp: dict[str, Any]) -> str:
    """One line for messages: the chip, its kernel level, threads and torch."""
    chip = fp.get("gpu") or f"{fp.get('cpu', '?')} ({fp.get('capability') or fp.get('machine', '')})"
    return f"{chip}, {fp.get('threads')} threads, torch {fp.get('torch')}"


def available_memory_bytes() -> int | None:
    """Memory the OS can still give this process (Linux MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_device(device: "str | torch.device", name: str) -> None:
    """ValueError (one line, `name` first) unless this torch build can compute on `device`: a device
    string torch knows, cpu, or a backend that is available here (a CUDA build with a visible GPU of
    that index, MPS on a Mac that has it); never meta, which holds no data."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{name}: not a device torch knows ({exc})") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        # meta holds no data; other backends (xpu, …) count only when this torch has them working.
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if dev.type == "meta" or available is None or not available():
            raise ValueError(f"{name}: this torch ({torch.__version__}) cannot run models there; use cpu, or cuda / "
                             "mps where available")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise ValueError(f"{name}: this torch ({torch.__version__}) is {build}; use cpu, or install a CUDA build "
                             "of torch (make setup TORCH_SPEC=torch)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: MPS is not available in this torch build or on this machine")
