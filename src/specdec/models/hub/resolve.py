"""Resolving a model spec: a known name, a ``.gguf`` file, a checkpoint directory or a Hugging Face hub id.

Resolution only looks at the registry and the file system; nothing is downloaded or loaded here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from specdec.models.hub.convert import has_gguf_magic
from specdec.models.hub.registry import KNOWN_MODELS, ModelError, ModelSpec, known_names

__all__ = ["Source", "not_found", "resolve"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class Source:
    """What a spec names: ``kind`` plus the path (gguf, dir) or registry entry (registry) behind it."""

    kind: str  # "registry" | "gguf" | "dir" | "hub"
    spec: str
    path: Path | None = None
    model: ModelSpec | None = None


def not_found(spec: str, extra: str = "") -> ModelError:
    return ModelError(
        f"{spec!r} is neither a known model name nor an existing path{extra}. Pass one of the known "
        f"models ({known_names()}), a path to a .gguf file, a directory holding a transformers "
        f"checkpoint (config.json and safetensors weights), or a Hugging Face hub id."
    )


def resolve(spec: str | os.PathLike[str]) -> Source:
    text = os.fspath(spec)
    if text in KNOWN_MODELS:
        return Source("registry", text, model=KNOWN_MODELS[text])
    path = Path(text).expanduser()
    if path.is_dir():
        return Source("dir", text, path=path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or has_gguf_magic(path):
            return Source("gguf", text, path=path)
        raise ModelError(
            f"{path} is a file but not a GGUF file. Pass a .gguf file, a transformers checkpoint "
            f"directory, or one of the known models ({known_names()})."
        )
    if path.exists():
        raise not_found(text, " (it exists but is neither a file nor a directory)")
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
    if not looks_like_path and _HUB_ID.match(text):
        return Source("hub", text)
    raise not_found(text)
