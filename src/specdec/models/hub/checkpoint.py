"""Local transformers checkpoint directories: the checks that explain what is missing, and loading.

Weights are read only from safetensors (never from pickle files), and the tokenizer must sit next
to the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specdec.models.hub.registry import ModelError, known_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["TOKENIZER_FILES", "check_checkpoint_dir", "check_tokenizer_dir", "load_dir", "tokenizer_from_dir"]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(
            f"The directory {path} has no config.json, so it is not a transformers checkpoint. Pass a "
            f"directory written by save_pretrained, a .gguf file, or one of the known models ({known_names()})."
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"The directory {path} has no .safetensors weights. specdec loads weights only from safetensors or "
            f"GGUF files, never from pickle files; re-save the model with save_pretrained to get safetensors."
        )
    check_tokenizer_dir(path)


def check_tokenizer_dir(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"The directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}). Save the tokenizer "
            f"next to the model with tokenizer.save_pretrained({str(path)!r})."
        )


def load_dir(path: Path, dtype: torch.dtype, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of a checkpoint directory; `kwargs` go to `from_pretrained` (a tensor-parallel plan)."""
    from transformers import AutoModelForCausalLM

    check_checkpoint_dir(path)
    tokenizer = tokenizer_from_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True, **kwargs)
    except Exception as exc:
        raise ModelError(
            f"transformers could not load the checkpoint in {path} ({type(exc).__name__}: {exc})."
        ) from exc
    return model, tokenizer


def tokenizer_from_dir(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    check_tokenizer_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelError(
            f"transformers could not load the tokenizer in {path} ({type(exc).__name__}: {exc})."
        ) from exc
