"""specdec: lossless speculative decoding for Hugging Face causal language models.

The public names below are loaded on first use, so `import specdec` (and `specdec --help`) does
not import torch or transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from specdec.core.openmp import bound_openmp_spin

__version__ = "0.1.0"

bound_openmp_spin()  # before anything imports torch (specdec/core/openmp.py says why)

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Pipeline": "specdec.engine.pipeline",
    "GenerationResult": "specdec.engine.pipeline",
    "SpeculativeDecoder": "specdec.engine.decoder",
    "BatchEngine": "specdec.engine.batch",
    "BatchRequest": "specdec.engine.batch",
    "DecodeStats": "specdec.engine.stats",
    "SamplingConfig": "specdec.core.sampling",
    "logits_to_probs": "specdec.core.sampling",
    "sample": "specdec.core.sampling",
    "TokenTree": "specdec.core.tree",
    "VerifyResult": "specdec.core.results",
    "MethodOptions": "specdec.core.options",
    "LanguageModel": "specdec.models.base",
    "HFLanguageModel": "specdec.models.hf",
    "Drafter": "specdec.drafting.base",
    "DraftModel": "specdec.drafting.draft_model",
    "Method": "specdec.methods.base",
    "MethodContext": "specdec.methods.base",
    "ModelDrafter": "specdec.methods.sps",
    "PromptLookupDrafter": "specdec.methods.pld",
    "TreeDrafter": "specdec.methods.specinfer",
    "MaxGramDrafter": "specdec.methods.maxgram",
    "CascadeDrafter": "specdec.methods.csd",
    "SpecExecDrafter": "specdec.methods.specexec",
    "SequoiaDrafter": "specdec.methods.sequoia",
    "verify_greedy": "specdec.verify.greedy",
    "verify_sample_and_match": "specdec.verify.match",
    "verify_speculative_sampling": "specdec.verify.chain",
    "verify_mss": "specdec.verify.mss",
    "verify_swor": "specdec.verify.swor",
}

__all__ = sorted([*_EXPORTS, "METHODS", "get_method"])


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # every registered method, by name
        return importlib.import_module("specdec.methods.registry").all_methods()
    if name == "get_method":
        return importlib.import_module("specdec.methods.registry").get_method
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # for type checkers and IDEs only
    from specdec.core.options import MethodOptions
    from specdec.core.results import VerifyResult
    from specdec.core.sampling import SamplingConfig, logits_to_probs, sample
    from specdec.core.tree import TokenTree
    from specdec.drafting.base import Drafter
    from specdec.drafting.draft_model import DraftModel
    from specdec.engine.decoder import SpeculativeDecoder
    from specdec.engine.pipeline import GenerationResult, Pipeline
    from specdec.engine.stats import DecodeStats
    from specdec.methods.base import Method, MethodContext
    from specdec.methods.csd import CascadeDrafter
    from specdec.methods.maxgram import MaxGramDrafter
    from specdec.methods.pld import PromptLookupDrafter
    from specdec.methods.sequoia import SequoiaDrafter
    from specdec.methods.specexec import SpecExecDrafter
    from specdec.methods.specinfer import TreeDrafter
    from specdec.methods.sps import ModelDrafter
    from specdec.models.base import LanguageModel
    from specdec.models.hf import HFLanguageModel
    from specdec.verify.chain import verify_speculative_sampling
    from specdec.verify.greedy import verify_greedy
    from specdec.verify.match import verify_sample_and_match
    from specdec.verify.mss import verify_mss
    from specdec.verify.swor import verify_swor
