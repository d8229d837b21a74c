"""The hf-* peers: Hugging Face transformers' own `generate` (plain, assisted, prompt lookup), run on
the pipeline's models so they are measured on the same weights as our methods."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.stats import DecodeStats

if TYPE_CHECKING:
    from specdec.engine.pipeline import Pipeline

# Hugging Face `generate` as peers: name -> what it runs.
HF_PEERS: dict[str, str] = {
    "hf-ar": "transformers `generate`, plain greedy/sampling",
    "hf-assisted": "transformers assisted generation with the draft model, HF's default assistant settings",
    "hf-assisted-tuned": "transformers assisted generation, num_assistant_tokens = gamma, schedule constant",
    "hf-pld": "transformers prompt lookup: prompt_lookup_num_tokens = gamma, max_matching_ngram_size = max_ngram",
}
HF_NEEDS_DRAFT = frozenset({"hf-assisted", "hf-assisted-tuned"})
HF_BASELINE = "hf-ar"


def is_hf(method: str) -> bool:
    return method in HF_PEERS


def _sync(device: Any) -> None:
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def _null_stats() -> dict[str, Any]:
    # The peers report what transformers lets us see; the rest of a row's stats stay None.
    return {f.name: None for f in dataclasses.fields(DecodeStats)}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' advisory warnings would break the progress bar on every row."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


class HFPeers:
    """Runs the hf-* peers on the pipeline's own transformers models.

    gamma: hf-assisted-tuned's num_assistant_tokens and hf-pld's prompt_lookup_num_tokens.
    max_ngram: hf-pld's max_matching_ngram_size.
    """

    def __init__(self, pipe: "Pipeline", gamma: int, max_ngram: int = 3) -> None:
        self.target = getattr(pipe.target_lm, "model", None)
        self.draft = getattr(pipe.draft_lm, "model", None) if pipe.draft_lm is not None else None
        if self.target is None or not hasattr(self.target, "generate"):
            raise ValueError("the hf-* peers need a Hugging Face transformers target model")
        self.device = pipe.target_lm.device
        self.eos = list(pipe.eos_token_ids)
        gen_cfg = getattr(self.target, "generation_config", None)
        pad = getattr(gen_cfg, "pad_token_id", None)
        tok = getattr(pipe, "tokenizer", None)
        if pad is None and tok is not None:
            pad = getattr(tok, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.gamma = gamma
        self.max_ngram = int(max_ngram)

    def settings_for(self, method: str) -> dict[str, Any]:
        """The transformers settings a peer runs with (recorded in its rows as `hf_settings`)."""
        if method == "hf-assisted-tuned":
            return {"num_assistant_tokens": self.gamma, "num_assistant_tokens_schedule": "constant"}
        if method == "hf-assisted":
            cfg = self.draft.generation_config
            defaults = cfg._get_default_generation_params() if hasattr(cfg, "_get_default_generation_params") else {}
            return {
                k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else defaults.get(k)
                for k in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
            }
        if method == "hf-pld":
            return {"prompt_lookup_num_tokens": self.gamma, "max_matching_ngram_size": self.max_ngram}
        return {}

    def generate(
        self, method: str, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int | None
    ) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
        """(new token ids, stats as a row records them, the peer's settings)."""
        kwargs: dict[str, Any] = {}
        if method in HF_NEEDS_DRAFT:
            if self.draft is None:
                raise ValueError(f"{method} needs a draft model (--draft)")
            kwargs["assistant_model"] = self.draft
        hf_settings = self.settings_for(method)
        if method == "hf-pld":
            kwargs.update(hf_settings)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, prompt]
        # Assistant settings live on the assistant's generation config (transformers reads them
        # there); restore it afterwards, the "heuristic" schedule also writes to it.
        saved = copy.deepcopy(self.draft.generation_config) if self.draft is not None else None
        try:
            if method == "hf-assisted-tuned":
                for k, v in hf_settings.items():
                    setattr(self.draft.generation_config, k, v)
            if seed is not None:
                torch.manual_seed(seed)
            with _quiet_transformers(), torch.inference_mode():
                _sync(self.device)
                t0 = time.perf_counter()
                out = self.target.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos,
                    pad_token_id=self.pad,
                    repetition_penalty=None,
                    **kwargs,
                )
                _sync(self.device)
                wall = time.perf_counter() - t0
        finally:
            if saved is not None:
                self.draft.generation_config = saved
        new = out[0, len(ids) :].tolist()
        stats = _null_stats()
        stats.update(
            new_tokens=len(new),
            wall_s=wall,
            tokens_per_s=len(new) / wall if wall > 0 else 0.0,
            prompt_tokens=len(ids),
            stopped_by="eos" if new and new[-1] in self.eos else "length",
        )
        return new, stats, hf_settings
