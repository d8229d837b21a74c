"""The native-weights cache of a GGUF file: its tensor table, its config and its tokenizer.

Reading a GGUF's metadata with `gguf.GGUFReader` takes seconds to tens of seconds for a 150k-token
vocabulary, and transformers reads it again for the config and again for the tokenizer. With
`--weights native` that happens once per file: the results are kept in `$SPECDEC_CACHE/native/<name>/`
(`specdec-native.json` names the source file and holds the tensor table), and later loads only map
the file. A directory is written under a temporary name and renamed into place, so one that exists
is complete; it is rebuilt when its source changes. A draft requantized to a smaller format
(`--draft-quant`) keeps its blocks there too, in `requantized-<format>.safetensors`, whose metadata
names the source file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specdec.models.hub.cache import remove_stale
from specdec.models.hub.checkpoint import tokenizer_from_dir
from specdec.models.hub.convert import conversion_ok, open_gguf
from specdec.models.hub.registry import ModelError
from specdec.models.native.formats import BlockFormat, UnsupportedFormat, format_of
from specdec.models.native.load import TensorEntry, build_native_model, build_native_runner, tensor_index
from specdec.models.native.runner import NativeModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["NATIVE_META", "largest_linear", "load_native", "load_native_runner", "native_cache", "native_cache_ok"]

log = logging.getLogger(__name__)

NATIVE_META = "specdec-native.json"
_SOURCE_KEYS = ("source", "source_sha256", "size", "mtime_ns")


def _read(directory: Path, meta: dict[str, Any]) -> tuple[str, list[TensorEntry]] | None:
    try:
        saved = json.loads((directory / NATIVE_META).read_text())
        if any(saved.get(k) != meta.get(k) for k in _SOURCE_KEYS):
            return None
        return saved["arch"], [TensorEntry(e[0], e[1], tuple(e[2]), e[3], e[4]) for e in saved["tensors"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _build(
    gguf_path: Path, directory: Path, meta: dict[str, Any], conversion: Path | None
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, str, list[TensorEntry]]:
    from transformers import AutoConfig, AutoTokenizer

    log.info("Reading the metadata of %s (once; later loads use %s)", gguf_path, directory)
    reader = open_gguf(gguf_path)
    arch, entries = tensor_index(reader)
    del reader  # release the memory map
    try:
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        if conversion is not None and conversion_ok(conversion, meta.get("source_sha256")):
            tokenizer = tokenizer_from_dir(conversion)  # the dense path's copy: same file, read already
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:  # an unsupported architecture or a broken file, deep inside transformers
        raise ModelError(
            f"transformers could not read the config or tokenizer of {gguf_path} ({type(exc).__name__}: {exc})."
        ) from exc
    root = directory.parent
    remove_stale(root, f".{directory.name}.tmp-")
    tmp = root / f".{directory.name}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {**meta, "arch": arch, "tensors": [list(e) for e in entries]}
        (tmp / NATIVE_META).write_text(json.dumps(record))
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
    except OSError as exc:  # a read-only or full cache only costs the next load some time
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("Could not save the native-weights cache of %s: %s", gguf_path, exc)
    return config, tokenizer, arch, entries


def native_cache_ok(directory: Path, meta: dict[str, Any]) -> bool:
    """Whether `directory` holds a complete native cache of the file `meta` describes."""
    return _read(directory, meta) is not None


_loaded: dict[str, tuple[Any, ...]] = {}  # directory -> what native_cache returned, for this process


def native_cache(
    gguf_path: Path, directory: Path, meta: dict[str, Any], conversion: Path | None
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, str, list[TensorEntry]]:
    """(config, tokenizer, architecture, tensor table) of a GGUF file, from its native cache (made on
    first use; the tokenizer loads without the weights, so drafts are checked before any load). A
    process reads each cache once."""
    key = json.dumps([str(directory), meta], sort_keys=True, default=str)
    if key in _loaded:
        return _loaded[key]  # type: ignore[return-value]
    cached = _read(directory, meta)
    if cached is None:
        out = _build(gguf_path, directory, meta, conversion)
    else:
        from transformers import AutoConfig

        arch, entries = cached
        out = AutoConfig.from_pretrained(str(directory)), tokenizer_from_dir(directory), arch, entries
    _loaded[key] = out
    return out


def load_native(
    gguf_path: Path, directory: Path, meta: dict[str, Any], conversion: Path | None, device: str | torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(transformers model computing on the file's blocks, tokenizer) for the GGUF file at `gguf_path`.

    directory: this file's native cache; meta: what identifies the file (compared with the cache's);
    conversion: the dense conversion directory, whose tokenizer is reused when it exists.
    """
    config, tokenizer, arch, entries = native_cache(gguf_path, directory, meta, conversion)
    try:
        model = build_native_model(gguf_path, config, arch, entries, device)
    except UnsupportedFormat as exc:
        raise ModelError(str(exc)) from exc
    return model, tokenizer


def load_native_runner(
    gguf_path: Path, directory: Path, meta: dict[str, Any], conversion: Path | None,
    requantize_to: BlockFormat | None = None, say: Callable[[str], None] | None = None,
) -> tuple[NativeModel | None, PretrainedConfig, PreTrainedTokenizerBase, str]:
    """(the lean runner of the file, or None; config; tokenizer; why there is no runner, or "");
    `requantize_to`: a draft's smaller block format (`native.load.build_native_runner`), whose blocks
    are kept in the native cache after the first load (`say` is told when they are computed)."""
    config, tokenizer, arch, entries = native_cache(gguf_path, directory, meta, conversion)
    stored = _read_requantized(directory, requantize_to, meta)
    before = {name: id(blocks) for name, blocks in stored.items()}
    if requantize_to is not None and not stored and say is not None:
        say(f"{gguf_path.name}: requantizing its wider layers to {requantize_to.name} (once; kept in {directory})")
    try:
        runner = build_native_runner(gguf_path, config, arch, entries, requantize_to, stored)
    except UnsupportedFormat as exc:
        return None, config, tokenizer, str(exc)
    if requantize_to is not None and {name: id(blocks) for name, blocks in stored.items()} != before:
        _write_requantized(directory, requantize_to, stored, meta)
    return runner, config, tokenizer, ""


def _requantized_path(directory: Path, fmt: BlockFormat) -> Path:
    # Inside the file's native cache directory, which is replaced whole when the source file changes.
    return directory / f"requantized-{fmt.name}.safetensors"


def _read_requantized(directory: Path, fmt: BlockFormat | None, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The blocks requantized to `fmt` by an earlier load of the file `meta` describes, by module path
    ({} if none, unreadable or from another file)."""
    path = None if fmt is None else _requantized_path(directory, fmt)
    if path is None or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            source = f.metadata() or {}
            if any(source.get(k) != str(meta.get(k)) for k in _SOURCE_KEYS):
                log.warning("requantizing again (%s does not name this file as its source)", path)
                return {}
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a truncated file raises safetensors' own error type
        log.warning("requantizing again (%s unreadable: %s)", path, exc)
        return {}


def _write_requantized(directory: Path, fmt: BlockFormat, blocks: dict[str, torch.Tensor],
                       meta: dict[str, Any]) -> None:
    """Keep requantized blocks for later loads, with what identifies their source file (written under
    a temporary name, then renamed). A cache that cannot be written only costs later loads time."""
    from safetensors.torch import save_file

    path = _requantized_path(directory, fmt)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if not directory.is_dir():  # the native cache could not be written either
        return
    try:
        save_file({k: v.contiguous() for k, v in blocks.items()}, str(tmp),
                  metadata={k: str(meta.get(k)) for k in _SOURCE_KEYS})
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - safetensors reports a full or read-only disk as its own error
        tmp.unlink(missing_ok=True)
        log.warning("Could not keep the requantized blocks in %s: %s", path, exc)


def largest_linear(entries: list[TensorEntry]) -> tuple[BlockFormat, int, int] | None:
    """(format, rows, cols) of the largest matrix in a supported block format other than the
    embedding and output head (the kind of layer that dominates a decoding step), or None."""
    best = None
    for e in entries:
        if len(e.shape) != 2 or e.name.startswith(("token_embd", "output")):
            continue
        try:
            fmt = format_of(e.ggml_type)
        except UnsupportedFormat:
            continue
        if best is None or e.nbytes > best[0]:
            best = (e.nbytes, fmt, e.shape[0], e.shape[1])
    return None if best is None else best[1:]
