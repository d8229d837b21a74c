"""The hub's corner of the on-disk cache: where GGUFs and conversions live, and cleanup of killed writers.

Writers put their pid into temporary names (``{prefix}<pid>``) so a later run can tell a leftover of a
killed process from the work of a live one.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from pathlib import Path

from specdec.core.store import cache_dir

__all__ = ["converted_root", "models_dir", "native_root", "pid_alive", "remove_stale"]

log = logging.getLogger(__name__)


def models_dir() -> Path:
    """Where the assembled, verified GGUF files of the known models live."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def converted_root() -> Path:
    """Where the float32 safetensors copies of dequantized GGUFs live."""
    path = cache_dir() / "converted"
    path.mkdir(parents=True, exist_ok=True)
    return path


def native_root() -> Path:
    """Where the tensor tables, configs and tokenizers of GGUF files loaded with native weights live."""
    path = cache_dir() / "native"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(directory: Path, prefix: str) -> None:
    """Delete leftovers named ``{prefix}<pid>`` whose writer process is gone (killed mid-write)."""
    for leftover in directory.glob(f"{glob.escape(prefix)}*"):
        pid = re.match(r"\d+", leftover.name[len(prefix) :])
        if pid and not pid_alive(int(pid.group())):
            log.info("Removing stale leftover %s", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
