"""Loading a model spec as an eval-mode ``(model, tokenizer)`` pair.

A spec is resolved first (a known name, a ``.gguf`` path, a checkpoint directory or a Hugging Face
hub id) and then read from the checkpoint directory, the hub, or a GGUF: a known model is fetched
first, and a GGUF is dequantized once and read from its converted safetensors copy afterwards
(``weights="dense"``), or its linear layers compute on the file's quantized blocks
(``weights="native"``, `models.native`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from specdec.models.hub.cache import converted_root, native_root
from specdec.models.hub.checkpoint import check_checkpoint_dir, load_dir, tokenizer_from_dir
from specdec.models.hub.convert import (
    check_gguf,
    conversion_ok,
    gguf_key,
    load_gguf_with_transformers,
    save_conversion,
)
from specdec.models.hub.download import fetch
from specdec.models.hub.native import largest_linear, load_native, load_native_runner, native_cache, native_cache_ok
from specdec.models.hub.registry import ModelError
from specdec.models.hub.resolve import Source, not_found, resolve

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "WEIGHTS", "hub_call", "hub_reachable", "is_gguf", "load_config", "load_model", "load_native_lm", "load_tokenizer",
    "native_linear_shape", "prepare_model", "transformers_bars",
]

WEIGHTS = ("dense", "native")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- GGUF sources


def _conversion_for(src: Source) -> tuple[Path, str | None]:
    """Where the converted copy of a GGUF source lives, and the source sha256 it must record."""
    if src.kind == "registry":
        assert src.model is not None
        return converted_root() / src.model.name, src.model.sha256
    assert src.path is not None
    return converted_root() / gguf_key(src.path), None


def _gguf_source(src: Source, progress: bool) -> tuple[Path, dict[str, Any]]:
    """The GGUF file of a source (fetched if needed) and the metadata to store with its conversion."""
    if src.kind == "registry":
        assert src.model is not None
        path = fetch(src.model.name, progress=progress)
        return path, {"source": src.model.name, "source_sha256": src.model.sha256, "gguf": str(path)}
    assert src.path is not None
    st = src.path.stat()
    return src.path, {"source": str(src.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _native_source(src: Source, progress: bool) -> tuple[Path, Path, dict[str, Any], Path]:
    """(GGUF file, its native cache directory, what identifies it, its dense conversion directory)."""
    conversion, _ = _conversion_for(src)
    gguf_path, meta = _gguf_source(src, progress)
    return gguf_path, native_root() / (src.model.name if src.model is not None else conversion.name), meta, conversion


def is_gguf(spec: str | os.PathLike[str]) -> bool:
    """Whether `spec` names a GGUF file (a known model or a .gguf path), which `--weights native` takes."""
    return resolve(spec).kind in ("registry", "gguf")


def load_native_lm(spec: str | os.PathLike[str], *, progress: bool = True, say: Any = None,
                   requantize_to: Any = None) -> tuple[Any, Any, PreTrainedTokenizerBase]:
    """(language model computing on the GGUF file's blocks, its config, tokenizer).

    The lean runner (`models.native.runner`) where the architecture is llama-family and every linear
    layer is in a supported block format; else the transformers model built around the blocks (a
    tensor in another type gets its dequantized values), behind `HFLanguageModel`, with one line to
    `say` why. `requantize_to` (a `BlockFormat`, drafts only): the lean runner's layers in that
    smaller format where the file's are wider; the transformers fallback keeps the file's blocks.
    """
    from specdec.models.hf import HFLanguageModel
    from specdec.models.native.lm import NativeLM

    src = resolve(spec)
    if src.kind not in ("registry", "gguf"):
        raise ModelError(f"--weights native computes on a GGUF file's quantized blocks, and {src.spec!r} is a "
                         f"{'checkpoint directory' if src.kind == 'dir' else 'Hugging Face hub id'}; pass a known "
                         f"model name or a .gguf file, or use --weights dense")
    source = _native_source(src, progress)
    from specdec.core.openmp import spin_hint
    from specdec.models.native.prefetch import use_measured_prefetch

    use_measured_prefetch()  # this machine's prefetch distance for the kernels (measured once, ~1 s)
    if (hint := spin_hint()) is not None:
        log.warning(hint)
    runner, config, tokenizer, why = load_native_runner(*source, requantize_to=requantize_to, say=say)
    if runner is not None:
        return NativeLM(runner), config, tokenizer
    message = f"{spec}: {why}; computing on its blocks through transformers modules (slower)"
    if say is not None:
        say(message)
    else:
        log.info(message)
    model, tokenizer = load_native(*source, "cpu")
    return HFLanguageModel(model), model.config, tokenizer


def native_linear_shape(spec: str | os.PathLike[str], progress: bool = True) -> tuple[Any, int, int] | None:
    """(format, rows, cols) of a GGUF model's largest linear layer in a native format (None: none is)."""
    _, _, _, entries = native_cache(*_native_source(resolve(spec), progress))
    return largest_linear(entries)


# --------------------------------------------------------------------------- Hugging Face hub ids


def hub_reachable() -> bool:
    """Cheap check that the hub host resolves, so offline machines fail in milliseconds, not a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # DNS may legitimately fail locally when a proxy does the resolving
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def hub_call(spec: str, func: Any) -> Any:
    """Run ``func(local_files_only)`` for a hub id; online only when the hub is reachable."""
    online = hub_reachable()
    try:
        return func(not online)
    except Exception as exc:
        where = "" if online else " (the hub is not reachable and the id is not in the local hub cache)"
        detail = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        raise not_found(
            spec, f", and loading it as a Hugging Face hub id failed{where}: {type(exc).__name__}: {detail}"
        ) from exc


# --------------------------------------------------------------------------- public loaders


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tensor_parallel_size: int = 1,
    weights: str = "dense",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (known name, .gguf path, checkpoint dir or hub id) as an eval-mode (model, tokenizer).

    tensor_parallel_size > 1: load this process's shard of the model with transformers' tensor-parallel
    plan over the torch.distributed group every rank has joined (`models.parallel`); transformers puts it
    on the rank's device. A GGUF must have been converted already (`prepare_model`, which rank 0 runs).

    weights: "dense" (float32 copies of the weights, or the checkpoint's own) or "native" (a GGUF's
    linear layers compute on its quantized blocks, in float32; known models and .gguf files only).
    """
    if weights not in WEIGHTS:
        raise ModelError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    src = resolve(spec)
    if weights == "native":
        if tensor_parallel_size > 1:
            raise ModelError("--weights native and --tensor-parallel-size do not combine (the native blocks are not "
                             "sharded); use --weights dense to shard the target")
        if src.kind not in ("registry", "gguf"):
            raise ModelError(
                f"--weights native computes on a GGUF file's quantized blocks, and {src.spec!r} is a "
                f"{'checkpoint directory' if src.kind == 'dir' else 'Hugging Face hub id'}; pass a known model "
                f"name or a .gguf file, or use --weights dense"
            )
        if dtype != torch.float32:
            raise ModelError(
                f"--weights native computes in float32 (the file's values, float32 activations); got dtype "
                f"{str(dtype).replace('torch.', '')}"
            )
        return load_native(*_native_source(src, progress), device)
    sharded: dict[str, Any] = {}
    if tensor_parallel_size > 1:
        from transformers.distributed import DistributedConfig

        sharded["distributed_config"] = DistributedConfig(tp_size=tensor_parallel_size)
    with _no_loading_bar():
        model, tokenizer = _read_dense(src, dtype, sharded, progress)
    if not sharded:  # a sharded model already sits on its rank's device, in `dtype`
        model = model.to(device)
        if model.dtype != dtype:
            model = model.to(dtype)
    model.eval()
    return model, tokenizer


def _read_dense(src: Source, dtype: torch.dtype, sharded: dict[str, Any],
                progress: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The transformers model and tokenizer of a resolved source, as stored (`load_model` places them)."""
    if src.kind == "dir":
        assert src.path is not None
        return load_dir(src.path, dtype, **sharded)
    if src.kind == "hub":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = hub_call(src.spec, lambda local: AutoTokenizer.from_pretrained(src.spec, local_files_only=local))
        model = hub_call(
            src.spec,
            lambda local: AutoModelForCausalLM.from_pretrained(
                src.spec, dtype=dtype, use_safetensors=True, local_files_only=local, **sharded
            ),
        )
        return model, tokenizer
    target, source_sha = _conversion_for(src)
    if conversion_ok(target, source_sha):
        return load_dir(target, dtype, **sharded)
    if sharded:
        raise ModelError(f"{src.spec} has no converted safetensors copy yet; every tensor-parallel rank reads one "
                         "(rank 0 makes it first with prepare_model)")
    return _convert(src, progress)


_show_transformers_bars: contextvars.ContextVar[bool] = contextvars.ContextVar("show_transformers_bars", default=False)


@contextlib.contextmanager
def transformers_bars() -> Iterator[None]:
    """Let transformers show its own loading bars in this block (`--verbose`); `load_model` hides them otherwise."""
    token = _show_transformers_bars.set(True)
    try:
        yield
    finally:
        _show_transformers_bars.reset(token)


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") off while a model loads: callers show
    their own progress (the CLI's loading line). transformers' switch turns the hub's download bars
    off as well; those stay as they were, since a hub id's first load downloads for minutes. Both
    switches are global, so both are put back afterwards."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    if _show_transformers_bars.get() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hub_bars = not hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if hub_bars:
        hub_utils.enable_progress_bars()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
        if not hub_bars:
            hub_utils.disable_progress_bars()


def _convert(src: Source, progress: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF source and save its safetensors copy for later loads."""
    target, _ = _conversion_for(src)
    gguf_path, meta = _gguf_source(src, progress)
    check_gguf(gguf_path)
    log.info("Dequantizing %s (one time; later loads use the converted copy).", gguf_path)
    model, tokenizer = load_gguf_with_transformers(gguf_path)
    try:
        save_conversion(model, tokenizer, target, meta)
    except OSError as exc:
        # The model is loaded fine; a read-only or full cache only costs speed next time.
        log.warning("Could not save a converted copy of %s: %s", gguf_path, exc)
    return model, tokenizer


def prepare_model(spec: str | os.PathLike[str], progress: bool = True) -> None:
    """Make ``spec`` loadable by several processes at once: fetch and convert a GGUF source now (once).

    Checkpoint directories and hub ids need nothing (the hub's cache handles concurrent downloads).
    """
    src = resolve(spec)
    if src.kind in ("dir", "hub"):
        return
    target, source_sha = _conversion_for(src)
    if not conversion_ok(target, source_sha):
        _convert(src, progress)
        if not conversion_ok(target, source_sha):
            raise ModelError(f"could not save the converted copy of {spec} in {target}; tensor-parallel ranks "
                             "load from it (check that the cache directory is writable)")


def load_config(spec: str | os.PathLike[str]) -> Any:
    """The transformers config of ``spec`` without its weights (a GGUF source must be prepared first)."""
    from transformers import AutoConfig

    src = resolve(spec)
    if src.kind == "hub":
        return hub_call(src.spec, lambda local: AutoConfig.from_pretrained(src.spec, local_files_only=local))
    if src.kind == "dir":
        assert src.path is not None
        path = src.path
    else:
        path, source_sha = _conversion_for(src)
        if not conversion_ok(path, source_sha):
            raise ModelError(f"{spec} has not been converted yet (prepare_model converts it)")
    check_checkpoint_dir(path)
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise ModelError(f"transformers could not read the config in {path} ({type(exc).__name__}: {exc}).") from exc


def load_tokenizer(spec: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of ``spec`` (no weights); same resolution rules as :func:`load_model`."""
    src = resolve(spec)
    if src.kind == "dir":
        assert src.path is not None
        return tokenizer_from_dir(src.path)
    if src.kind == "hub":
        from transformers import AutoTokenizer

        return hub_call(src.spec, lambda local: AutoTokenizer.from_pretrained(src.spec, local_files_only=local))
    target, source_sha = _conversion_for(src)
    if conversion_ok(target, source_sha):
        return tokenizer_from_dir(target)
    gguf_path, directory, meta, conversion = _native_source(src, progress=True)
    if not native_cache_ok(directory, meta):
        check_gguf(gguf_path)  # a clear error for a broken file before transformers reads it
    return native_cache(gguf_path, directory, meta, conversion)[1]  # read once, kept with the file's table
