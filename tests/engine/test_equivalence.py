"""Greedy speculative decoding reproduces greedy autoregressive decoding token for token."""

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.pld import PromptLookupDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.hf import HFLanguageModel
from tests.conftest import TINY_VOCAB, tiny_hf_model, tiny_lm

GREEDY = SamplingConfig()


def _prompt(seed: int, n: int = 12) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, TINY_VOCAB, (n // 2,), generator=g)
    return torch.cat([base, base]).tolist()  # a repeat gives prompt lookup something to find


def _ar(target, prompt, n, eos=()):
    return SpeculativeDecoder(target, None, GREEDY, eos_token_ids=eos).generate(prompt, n)


def _check_invariants(dec: SpeculativeDecoder, prompt, max_new) -> list[int]:
    """Stream, checking the per-iteration invariants of docs/algorithms.md §11."""
    out: list[int] = []
    for chunk in dec.stream(prompt, max_new):
        assert 1 <= len(chunk) <= dec.gamma + 1
        out.extend(chunk)
        stats = dec.last_stats
        if stats.stopped_by == "":
            # the target caches everything committed except the pending root
            assert dec.target.kv_len == len(prompt) + len(out) - 1
            for drafter_lm in dec.drafter.draft_models if dec.drafter is not None else ():
                # the drafter never holds uncommitted tokens
                assert drafter_lm.kv_len <= len(prompt) + len(out)
    assert dec.last_stats.target_calls <= dec.last_stats.new_tokens
    return out


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_same_model_drafter_accepts_everything(arch, gamma):
    target = tiny_lm(arch, seed=0)
    prompt = _prompt(1)
    ref, _ = _ar(target, prompt, 40)
    dec = SpeculativeDecoder(target, ModelDrafter(tiny_lm(arch, seed=0), GREEDY, gamma), GREEDY)
    out = _check_invariants(dec, prompt, 40)
    assert out == ref
    stats = dec.last_stats
    assert stats.accepted_tokens == stats.draft_tokens > 0
    assert stats.target_calls == -(-40 // (gamma + 1))  # ceil: every call emits gamma + 1 tokens


@pytest.mark.parametrize("gamma", [1, 4])
def test_random_drafter_still_gives_ar_output(arch, gamma):
    target = tiny_lm(arch, seed=0)
    prompt = _prompt(2)
    ref, _ = _ar(target, prompt, 40)
    dec = SpeculativeDecoder(target, ModelDrafter(tiny_lm(arch, seed=7), GREEDY, gamma), GREEDY)
    assert _check_invariants(dec, prompt, 40) == ref
    assert dec.last_stats.accepted_tokens < dec.last_stats.draft_tokens


def test_prompt_lookup_gives_ar_output(arch):
    target = tiny_lm(arch, seed=0)
    prompt = _prompt(3, 20)
    ref, _ = _ar(target, prompt, 48)
    dec = SpeculativeDecoder(target, PromptLookupDrafter(), GREEDY, gamma=4)
    assert _check_invariants(dec, prompt, 48) == ref
    # Equal output alone would pass with every lookup rejected: some drafts must have been kept.
    assert 0 < dec.last_stats.accepted_tokens < dec.last_stats.draft_tokens


def test_eos_and_length_are_respected():
    target = tiny_lm("llama", seed=0)
    prompt = _prompt(4)
    ref, _ = _ar(target, prompt, 30)
    eos = ref[10]
    cut = ref.index(eos) + 1
    for drafter in [None, ModelDrafter(tiny_lm("llama", seed=0), GREEDY), PromptLookupDrafter()]:
        dec = SpeculativeDecoder(target, drafter, GREEDY, gamma=4, eos_token_ids=[eos])
        out, stats = dec.generate(prompt, 30)
        assert out == ref[:cut] and stats.stopped_by == "eos"
        dec = SpeculativeDecoder(target, drafter, GREEDY, gamma=4)
        out, stats = dec.generate(prompt, 7)
        assert out == ref[:7] and stats.stopped_by == "length" and stats.new_tokens == 7


def test_sps_from_one_token_prompt():
    target = tiny_lm("qwen2", seed=0)
    ref, _ = _ar(target, [5], 20)
    dec = SpeculativeDecoder(target, ModelDrafter(tiny_lm("qwen2", seed=3), GREEDY), GREEDY, gamma=3)
    assert dec.generate([5], 20)[0] == ref


def test_generation_leaves_kv_equal_to_fresh_prefill():
    model = tiny_hf_model("llama", seed=0)
    target = HFLanguageModel(model)
    prompt = _prompt(5)
    dec = SpeculativeDecoder(target, ModelDrafter(tiny_lm("llama", seed=9), GREEDY), GREEDY, gamma=3)
    out, _ = dec.generate(prompt, 25)
    committed = torch.tensor(prompt + out)
    fresh = HFLanguageModel(model)
    fresh.reset(128)
    fresh.forward(committed[: target.kv_len])
    fresh.commit(target.kv_len)
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(target.cached_kv(layer)[0], fresh.cached_kv(layer)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(target.cached_kv(layer)[1], fresh.cached_kv(layer)[1], atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_reproducible():
    target = tiny_lm("llama", seed=0)
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    runs = []
    for _ in range(2):
        dec = SpeculativeDecoder(target, ModelDrafter(tiny_lm("llama", seed=1), sampling), sampling, gamma=3)
        runs.append(dec.generate(_prompt(6), 20, torch.Generator().manual_seed(42))[0])
    assert runs[0] == runs[1]


def test_greedy_verification_reads_the_logits_without_a_one_hot(monkeypatch):
    import specdec.engine.decoder as decoder_mod
    from specdec.verify.greedy import verify_greedy

    target, prompt = tiny_lm("llama", seed=0), _prompt(3)
    # A rule that is not `verify_greedy` itself gets the one-hot distributions, as every rule did before.
    def via_probs_rule(tree, probs, gen):
        return verify_greedy(tree, probs, gen)

    via_probs, _ = SpeculativeDecoder(target, ModelDrafter(tiny_lm("llama", seed=1), GREEDY, 3), GREEDY,
                                      verifier=via_probs_rule).generate(prompt, 30)

    def no_vocabulary_pass(*args, **kwargs):
        raise AssertionError("greedy verification built the target's distributions")

    monkeypatch.setattr(decoder_mod, "logits_to_probs", no_vocabulary_pass)
    drafter = ModelDrafter(tiny_lm("llama", seed=1), GREEDY, 3)
    direct, _ = SpeculativeDecoder(target, drafter, GREEDY).generate(prompt, 30)
    ar, _ = _ar(target, prompt, 30)
    assert direct == via_probs == ar
