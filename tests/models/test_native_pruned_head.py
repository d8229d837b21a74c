"""A native draft with its output head pruned to some tokens: the kept logits are the full head's bit
for bit, the rest are -inf, and speculative output with it as the draft equals plain decoding."""

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.hybrid import HybridDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.native import kernels
from specdec.models.native.linear import GGUFLinear
from specdec.models.native.lm import NativeLM
from specdec.models.native.runner import NativeModel
from tests.conftest import TINY_VOCAB
from tests.models.test_native import _tiny_native

pytestmark = pytest.mark.skipif(kernels.native_library() is None, reason="the native kernels do not build here")
KEPT = torch.cat([torch.arange(0, TINY_VOCAB, 3), torch.tensor([TINY_VOCAB - 1])])  # not a multiple of 16 rows


def _tied_native(seed: int) -> NativeModel:
    model = _tiny_native("Q4_K", "qwen2", seed)
    emb = model.model.embed_tokens
    model.lm_head = GGUFLinear(emb.blocks, emb.fmt.name, emb.embedding_dim)
    model.config.tie_word_embeddings = True
    return NativeModel.from_hf(model)


def test_kept_logits_are_the_full_heads_bit_for_bit_and_the_rest_minus_inf(one_thread):
    full = _tied_native(0)
    pruned = full.with_pruned_head(KEPT)
    ids = torch.randint(0, TINY_VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    a, b = NativeLM(full), NativeLM(pruned)
    for lm in (a, b):
        lm.reset(32)
    la, lb = a.forward(ids), b.forward(ids)
    assert torch.equal(lb[:, KEPT], la[:, KEPT])
    rest = torch.ones(TINY_VOCAB, dtype=torch.bool)
    rest[KEPT] = False
    assert bool(torch.isneginf(lb[:, rest]).all()) and b.vocab_size == TINY_VOCAB
    assert pruned.head.nbytes() < full.head.nbytes()
    # A head of its own: its rows come from `head_source` (what the loader reads again from the file).
    model = _tiny_native("Q4_K", "qwen2", 0)
    untied = NativeModel.from_hf(model)
    with pytest.raises(ValueError, match="head's blocks"):
        untied.with_pruned_head(KEPT)
    untied.head_source = lambda kept: (model.lm_head.blocks[kept], model.lm_head.fmt, model.lm_head.in_features)
    c, d = NativeLM(untied), NativeLM(untied.with_pruned_head(KEPT))
    for lm in (c, d):
        lm.reset(32)
    assert torch.equal(d.forward(ids)[:, KEPT], c.forward(ids)[:, KEPT])


def test_a_pruned_native_draft_keeps_the_greedy_output(one_thread):
    target = NativeLM(_tied_native(0))
    prompt = torch.randint(0, TINY_VOCAB, (8,), generator=torch.Generator().manual_seed(5)).tolist() * 2
    ref, _ = SpeculativeDecoder(target).generate(prompt, 24)
    greedy = SamplingConfig()
    for drafter in (ModelDrafter(NativeLM(_tied_native(0).with_pruned_head(KEPT)), greedy, 3),
                    HybridDrafter(NativeLM(_tied_native(0).with_pruned_head(KEPT)), greedy, 8, 4, 3, 0.0, 100.0)):
        out, stats = SpeculativeDecoder(target, drafter, greedy).generate(prompt, 24)
        assert out == ref and stats.accepted_tokens > 0
