"""Shared fixtures: tiny randomly initialised transformers models and exact toy models."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specdec.models.hf import HFLanguageModel

TINY_VOCAB = 97


def tiny_hf_model(arch: str = "llama", seed: int = 0, vocab: int = TINY_VOCAB, layers: int = 2):
    """A tiny random causal LM in float32 (tie-free logits for practical purposes)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    # Larger weights than the default init give peaked, input-dependent distributions, so
    # greedy paths are not trivially constant.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.float().eval()


def tiny_lm(arch: str = "llama", seed: int = 0, vocab: int = TINY_VOCAB) -> HFLanguageModel:
    return HFLanguageModel(tiny_hf_model(arch, seed, vocab))


@pytest.fixture(autouse=True, scope="session")
def _measurements_in_a_temporary_folder(tmp_path_factory):
    """Timings taken on a busy test machine must never reach the user's cache (linear paths, draft
    precision, tune profiles): the whole session measures into a temporary folder, and `auto` never
    starts a real tune unless a test enables it."""
    saved = {k: os.environ.get(k) for k in ("SPECDEC_MEASUREMENTS", "SPECDEC_AUTOTUNE")}
    os.environ["SPECDEC_MEASUREMENTS"] = str(tmp_path_factory.mktemp("measurements"))
    # No test tunes by accident: `auto` without a profile reports it; tests that tune say so.
    os.environ["SPECDEC_AUTOTUNE"] = "0"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(params=["llama", "qwen2"])
def arch(request) -> str:
    return request.param



@pytest.fixture
def one_thread():
    """Toy-model tests move tiny tensors: intra-op threads only add synchronisation overhead."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (model, tokenizer), loaded once for every `real` test."""
    from specdec.models.hub import load_model

    return load_model("smollm2-135m-instruct", progress=False)



def _kernels_missing() -> str | None:
    from specdec.models.native import kernels

    return kernels.unavailable_reason()


def kernels_required() -> bool:
    """Whether this run must test the compiled kernels (SPECDEC_REQUIRE_KERNELS=1: `make test`, CI)."""
    return os.environ.get("SPECDEC_REQUIRE_KERNELS") == "1"


_missing = _kernels_missing()
needs_kernels = pytest.mark.skipif(
    _missing is not None and not kernels_required(),
    reason=f"no compiled native kernels here: {_missing}",
)
"""Marks tests of the compiled kernels: skipped (with the reason) where they cannot be built, except
with SPECDEC_REQUIRE_KERNELS=1 (`make test`, CI), where they run and fail."""
