"""specdec: lossless speculative decoding for Hugging Face causal language models."""

from specdec.decoder import DecodeStats, SpeculativeDecoder
from specdec.drafters import Drafter, ModelDrafter, PromptLookupDrafter, Proposal
from specdec.lm import HFLanguageModel, LanguageModel
from specdec.pipeline import METHODS, GenerationResult, Pipeline
from specdec.sampling import SamplingConfig, logits_to_probs, sample
from specdec.verify import (
    VerifyResult,
    verify_greedy,
    verify_sample_and_match,
    verify_speculative_sampling,
)

__all__ = [
    "METHODS",
    "DecodeStats",
    "Drafter",
    "GenerationResult",
    "HFLanguageModel",
    "LanguageModel",
    "ModelDrafter",
    "Pipeline",
    "PromptLookupDrafter",
    "Proposal",
    "SamplingConfig",
    "SpeculativeDecoder",
    "VerifyResult",
    "logits_to_probs",
    "sample",
    "verify_greedy",
    "verify_sample_and_match",
    "verify_speculative_sampling",
]

__version__ = "0.1.0"
