"""The CPU fast path computes the same model: logits within float32 round-off, same greedy output."""

import pytest
import torch

from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sps import ModelDrafter
from specdec.models.dense.fastpath import PackedLinear, enable_packed_linears, packed_linear_supported, quantize_draft_int8
from specdec.models.hf import HFLanguageModel
from specdec.core.sampling import SamplingConfig
from tests.conftest import TINY_VOCAB, tiny_hf_model
from tests.helpers import noisy_copy

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="oneDNN (mkldnn) is not available in this torch build"
)


def test_packed_model_logits_match_plain(arch):
    plain = tiny_hf_model(arch, seed=0)
    fast = tiny_hf_model(arch, seed=0)
    assert packed_linear_supported(fast)
    n = enable_packed_linears(fast, "on")
    assert n == sum(isinstance(m, PackedLinear) for m in fast.modules()) > 0
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    ids = torch.randint(0, TINY_VOCAB, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = plain(ids).logits
        out = fast(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_packed_model_gives_identical_greedy_output(arch):
    plain = HFLanguageModel(tiny_hf_model(arch, seed=0))
    fast_model = tiny_hf_model(arch, seed=0)
    enable_packed_linears(fast_model, "on")
    fast = HFLanguageModel(fast_model)
    prompt = list(range(3, 15))
    ref, _ = SpeculativeDecoder(plain).generate(prompt, 40)
    out, _ = SpeculativeDecoder(fast).generate(prompt, 40)
    assert out == ref
    greedy = SamplingConfig()
    draft = HFLanguageModel(noisy_copy(tiny_hf_model(arch, seed=0)))
    spec, stats = SpeculativeDecoder(fast, ModelDrafter(draft, greedy), greedy, gamma=4).generate(prompt, 40)
    assert spec == ref
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # drafts kept and drafts refused


def test_mode_off_and_unsupported_dtype_leave_model_alone():
    model = tiny_hf_model("llama")
    assert enable_packed_linears(model, "off") == 0
    for dtype in (torch.float64, torch.bfloat16):  # oneDNN may pack bfloat16 on CPUs that have it
        copy = tiny_hf_model("llama").to(dtype)
        expected = packed_linear_supported(copy)
        assert (enable_packed_linears(copy, "on") > 0) == expected
    assert not packed_linear_supported(tiny_hf_model("llama").double())
    with pytest.raises(ValueError):
        enable_packed_linears(model, "fast")


def test_int8_draft_changes_speed_not_output():
    target = HFLanguageModel(tiny_hf_model("qwen2", seed=0))
    draft_model = quantize_draft_int8(tiny_hf_model("qwen2", seed=0))
    greedy = SamplingConfig()
    prompt = list(range(5, 20))
    ref, _ = SpeculativeDecoder(target).generate(prompt, 30)
    dec = SpeculativeDecoder(target, ModelDrafter(HFLanguageModel(draft_model), greedy), greedy, gamma=3)
    out, stats = dec.generate(prompt, 30)
    assert out == ref
    assert stats.accepted_tokens > 0  # the quantized copy of the target still drafts well
