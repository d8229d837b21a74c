"""GGUF files: the checks that refuse a broken file early, dequantizing with transformers, and the
cache of float32 safetensors conversions.

Dequantizing a GGUF is slow, so the first load saves a converted copy (model, tokenizer and a
``specdec-conversion.json`` naming the source) that later loads read instead. A conversion is
written into a temporary directory and renamed into place, so a directory that exists is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specdec.models.hub.cache import remove_stale
from specdec.models.hub.registry import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CONVERSION_META",
    "check_gguf",
    "conversion_ok",
    "gguf_key",
    "has_gguf_magic",
    "load_gguf_with_transformers",
    "open_gguf",
    "save_conversion",
]

log = logging.getLogger(__name__)

CONVERSION_META = "specdec-conversion.json"


def has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf(path: Path) -> None:
    """Refuse an empty, non-GGUF, corrupt or truncated file before transformers sees it."""
    open_gguf(path)  # the reader and its memory map are dropped at once


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` of `path`, after the checks of `check_gguf` (a clear ModelError otherwise)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"Cannot read the GGUF file {path}: {exc}.") from exc
    if size == 0:
        raise ModelError(f"The GGUF file {path} is empty; delete it and download or copy it again.")
    if not has_gguf_magic(path):
        raise ModelError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); it is corrupt or "
            f"a different format."
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        n_tensors = len(reader.tensors)
    except Exception as exc:  # any failure deep inside the reader means a broken file
        raise ModelError(
            f"The GGUF file {path} cannot be read ({type(exc).__name__}: {exc}); it is probably truncated "
            f"or corrupt. Delete it and download or copy it again."
        ) from exc
    if n_tensors == 0:
        raise ModelError(f"The GGUF file {path} contains no tensors; it is not a model file.")
    if data_end > size:
        raise ModelError(
            f"The GGUF file {path} is truncated: its tensors need {data_end} bytes but the file has "
            f"{size}. Delete it and download or copy it again."
        )
    return reader


def gguf_key(path: Path) -> str:
    """Conversion-cache key of a bare GGUF path: changes when the file is replaced or modified."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(ident).hexdigest()[:12]}"


def conversion_ok(directory: Path, source_sha256: str | None = None) -> bool:
    """A conversion directory is usable once it exists (it is renamed into place when complete)."""
    try:
        meta = json.loads((directory / CONVERSION_META).read_text())
    except (OSError, ValueError):
        return False
    return source_sha256 is None or meta.get("source_sha256") == source_sha256


def load_gguf_with_transformers(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch  # here, not at the top: listing and fetching models need no torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Without this, transformers keeps the weights packed when the `kernels` package is installed;
        # we want a plain dense float32 model (and one that save_pretrained accepts).
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers 5.x always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # The weights are dense already; the leftover marker would only make save_pretrained refuse.
            quantizer.remove_quantization_config(model)
    except Exception as exc:  # a broken or unsupported file fails anywhere inside transformers/gguf
        raise ModelError(
            f"transformers could not load the GGUF file {path} ({type(exc).__name__}: {exc}). The file may be "
            f"corrupt, or its architecture or quantization is not supported by this transformers version."
        ) from exc
    return model, tokenizer


def save_conversion(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, meta: dict[str, Any]
) -> None:
    """Write a float32 safetensors copy into a temp dir and rename it into place when complete."""
    root = target.parent
    remove_stale(root, f".{target.name}.tmp-")
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # transformers 5 always writes safetensors (there is no pickle option left to refuse).
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERSION_META).write_text(json.dumps(meta, indent=2))
        if target.exists():  # stale (source changed) or written meanwhile by another process
            if conversion_ok(target, meta.get("source_sha256")):
                shutil.rmtree(tmp)
                return
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not conversion_ok(target, meta.get("source_sha256")):
                raise
            shutil.rmtree(tmp)  # another process won the race with an equivalent copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Saved a converted copy of %s into %s", meta.get("source"), target)
