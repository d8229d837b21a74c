"""specdec: lossless speculative decoding for Hugging Face causal language models."""

from specdec.cascade import CascadeDrafter
from specdec.decoder import DecodeStats, SpeculativeDecoder
from specdec.drafters import Drafter, ModelDrafter, PromptLookupDrafter, Proposal, TreeDrafter
from specdec.lm import HFLanguageModel, LanguageModel
from specdec.pipeline import METHODS, GenerationResult, Pipeline
from specdec.maxgram import MaxGramDrafter
from specdec.sampling import SamplingConfig, logits_to_probs, sample
from specdec.sequoia import SequoiaDrafter
from specdec.specexec import SpecExecDrafter
from specdec.tree import TokenTree
from specdec.verify import (
    VerifyResult,
    verify_greedy,
    verify_sample_and_match,
    verify_speculative_sampling,
)

__all__ = [
    "METHODS",
    "CascadeDrafter",
    "DecodeStats",
    "Drafter",
    "GenerationResult",
    "HFLanguageModel",
    "LanguageModel",
    "MaxGramDrafter",
    "ModelDrafter",
    "Pipeline",
    "PromptLookupDrafter",
    "Proposal",
    "SamplingConfig",
    "SequoiaDrafter",
    "SpecExecDrafter",
    "SpeculativeDecoder",
    "TokenTree",
    "TreeDrafter",
    "VerifyResult",
    "logits_to_probs",
    "sample",
    "verify_greedy",
    "verify_sample_and_match",
    "verify_speculative_sampling",
]

__version__ = "0.1.0"
