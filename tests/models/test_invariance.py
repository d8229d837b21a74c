"""Reduced-precision targets are lossless: once row-invariant (`models.dense.invariance`), greedy output of
every method equals plain decoding in bfloat16, on tiny models and on SmolLM2."""

import copy

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.base import MethodContext
from specdec.methods.csd import CascadeDrafter
from specdec.methods.registry import get_method
from specdec.methods.sequoia import SequoiaDrafter
from specdec.methods.specexec import SpecExecDrafter
from specdec.methods.specinfer import TreeDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.hf import HFLanguageModel
from specdec.models.dense.invariance import SEQUENTIAL, make_row_invariant, register_sequential_attention, rows_agree
from tests.conftest import TINY_VOCAB, tiny_hf_model
from tests.helpers import every_method_example, noisy_copy

GREEDY = SamplingConfig()
PROBE = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(0))


def drafters(target, draft_model, other_model):
    """Every registered method's drafter with each option set it declares for these tests, over two
    draft models (SpecInfer merges both drafters' trees, the cascade stacks them), then the shapes
    that stress the exactness most (`stress_drafters`)."""
    d, o = HFLanguageModel(draft_model), HFLanguageModel(other_model)
    ctx = MethodContext(target, (d, o), GREEDY)
    out = {}
    for name, opts in every_method_example(include_profile_methods=False):
        method = get_method(name)
        drafter = method.build(ctx, method.make_options(opts))
        if drafter is not None:
            out[f"{name} {opts}"] = drafter
    return {**out, **stress_drafters(d, o)}


def stress_drafters(d: HFLanguageModel, o: HFLanguageModel) -> dict:
    """Shapes where a block pass that differs from one-token passes shows in the greedy output
    (wide, deep, several drafters, a lenient cascade): what the drift test below needs to see the
    difference at all, and what the equality tests must survive."""
    return {
        "sps-adaptive 4": ModelDrafter(d, GREEDY, 4, stop_below=0.3),
        "specinfer 2,2,1 over two drafters": TreeDrafter([d, o], GREEDY, expansion=[2, 2, 1]),
        "specexec 12 nodes": SpecExecDrafter(d, GREEDY, 12, 4, 4, 3),
        "sequoia 5 nodes": SequoiaDrafter(d, GREEDY, [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]),
        "csd 3 levels, lenience 2": CascadeDrafter([d, o], [[3, 1, 1], [0, 2, 2], [0, 0, 3]], 2.0),
    }


def test_sequential_attention_computes_attention(arch, monkeypatch):
    """It is attention: its logits match sdpa's to float32 round-off (with several key chunks too)."""
    import specdec.models.dense.invariance as inv

    monkeypatch.setattr(inv, "KEY_CHUNK", 3)
    register_sequential_attention()
    ref, model = tiny_hf_model(arch, seed=2), tiny_hf_model(arch, seed=2)
    model.set_attn_implementation(SEQUENTIAL)
    a, b = HFLanguageModel(ref), HFLanguageModel(model)
    ids, parents = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([-1, 0, 1, 1, 3, 0])
    for lm in (a, b):
        lm.reset(32)
        lm.forward(torch.tensor([1, 2, 3, 4]), last_only=True)
        lm.commit(4)
    torch.testing.assert_close(b.forward(ids, parents), a.forward(ids, parents), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_greedy_equals_ar_for_every_method(arch):
    target_model = tiny_hf_model(arch, seed=0).to(torch.bfloat16)
    assert make_row_invariant(target_model, PROBE), "the linear layers are not row-invariant here"
    target = HFLanguageModel(target_model)
    # a bfloat16 draft close to the target (it agrees on most tokens, not all), and a far one
    near = noisy_copy(tiny_hf_model(arch, seed=0)).to(torch.bfloat16)
    far = tiny_hf_model(arch, seed=5).to(torch.bfloat16)
    prompt = [3, 4, 5, 6, 3, 4, 5, 7, 3, 4]
    ref, _ = SpeculativeDecoder(target).generate(prompt, 32)
    for name, drafter in drafters(target, near, far).items():
        out, stats = SpeculativeDecoder(target, drafter, GREEDY).generate(prompt, 32)
        assert out == ref, f"{name} changed the bfloat16 greedy output"
        assert 0 < stats.accepted_tokens < stats.draft_tokens, (name, stats)  # drafts kept and refused


def test_the_check_fails_a_block_pass_that_differs_by_one_ulp():
    """A planted difference of one bfloat16 ulp between block and one-token passes must be caught."""
    model = tiny_hf_model("llama", seed=0).to(torch.bfloat16)
    assert make_row_invariant(model, PROBE)
    lm = HFLanguageModel(model)
    assert rows_agree(lm, PROBE)
    honest = lm.forward

    def off_by_one_ulp(ids, parents=None, last_only=False, append=False):
        logits = honest(ids, parents, last_only, append)
        return torch.nextafter(logits, torch.full_like(logits, float("inf"))) if ids.shape[0] > 1 else logits

    lm.forward = off_by_one_ulp
    assert not rows_agree(lm, PROBE)


@pytest.mark.slow
@pytest.mark.real
def test_bfloat16_smollm2_greedy_equals_ar(smol):
    from specdec.engine.pipeline import eos_ids
    from tests.engine.test_real import _shallow_copy

    model, tok = smol
    target_model = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.tensor(tok("The history of Rome begins with a small settlement on the Tiber river.")["input_ids"])
    assert make_row_invariant(target_model, ids), "SmolLM2's linear layers are not row-invariant in bfloat16 here"
    target = HFLanguageModel(target_model)
    eos = eos_ids(model, tok)
    shallow = _shallow_copy(target_model, 8)
    prompt = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    ref, _ = SpeculativeDecoder(target, None, GREEDY, eos_token_ids=eos).generate(prompt, 24)
    for name, drafter in drafters(target, target_model, shallow).items():
        out, _ = SpeculativeDecoder(target, drafter, GREEDY, eos_token_ids=eos).generate(prompt, 24)
        assert out == ref, f"{name} changed SmolLM2's bfloat16 greedy output"


def test_without_it_bfloat16_trees_drift_from_plain_decoding(one_thread):
    """Why it exists: with sdpa a bfloat16 block pass differs from one-token passes here, and
    speculative greedy output drifts from plain decoding on some prompts (skipped on a machine where
    sdpa happens to be row-invariant)."""
    model = tiny_hf_model("llama", seed=0).to(torch.bfloat16)
    if rows_agree(HFLanguageModel(model), PROBE):
        pytest.skip("sdpa is row-invariant in bfloat16 on this machine")
    target = HFLanguageModel(model)
    drifted = 0
    for seed in range(4):
        prompt = torch.randint(0, TINY_VOCAB, (10,), generator=torch.Generator().manual_seed(seed)).tolist()
        ref, _ = SpeculativeDecoder(target).generate(prompt, 32)
        outs = [SpeculativeDecoder(target, d, GREEDY).generate(prompt, 32)[0]
                for d in drafters(target, copy.deepcopy(model),
                                  tiny_hf_model("llama", seed=5).to(torch.bfloat16)).values()]
        drifted += sum(out != ref for out in outs)
    assert drifted > 0
