"""auto's fallback to plain steps where drafting does not pay: exact (chi-square, greedy equality),
it pauses when the earned tokens per call fall below break-even and drafts again afterwards."""

from collections import Counter

import pytest
import torch

import specdec.verify.chain as chain
from specdec.core.sampling import SamplingConfig
from specdec.drafting.fallback import FallbackDrafter
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.auto import break_even
from specdec.methods.sps import ModelDrafter
from tests.conftest import tiny_lm
from tests.engine.test_distribution import ALPHA, L, PROMPT, chi_square_pvalue, detectable_effect, exact_continuations
from tests.methods.test_adaptive import toys

GREEDY = SamplingConfig()


def test_fallback_pauses_where_drafting_does_not_pay_and_keeps_the_greedy_output(arch):
    target, draft = tiny_lm(arch, 0), tiny_lm(arch, 4)  # a poor drafter
    prompt = list(range(5, 20))
    ref, _ = SpeculativeDecoder(target).generate(prompt, 60)
    fb = FallbackDrafter(ModelDrafter(draft, GREEDY, 4), break_even=4.5, window=3, pause=5)
    out, st = SpeculativeDecoder(target, fb, GREEDY).generate(prompt, 60)
    assert out == ref and fb.paused_steps > 0 and st.draft_tokens > 0  # paused, and drafted again after
    never = FallbackDrafter(ModelDrafter(draft, GREEDY, 4), break_even=0.5, window=3, pause=5)
    assert SpeculativeDecoder(target, never, GREEDY).generate(prompt, 60)[0] == ref and never.paused_steps == 0


def _fallback_counts(n: int) -> tuple[Counter, dict, int]:
    sampling = SamplingConfig(temperature=1.0)
    target, draft = toys()
    fb = FallbackDrafter(ModelDrafter(draft, sampling, 2), break_even=2.2, window=1, pause=1)
    dec = SpeculativeDecoder(target, fb, sampling)
    gen = torch.Generator().manual_seed(5)
    counts, paused = Counter(), 0
    for _ in range(n):
        out, _ = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        paused += fb.paused_steps
    return counts, exact_continuations(target, sampling, None), paused


def test_fallback_keeps_the_target_distribution(one_thread):
    """n = 4000 over 47 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total variation ≥ 0.070
    from the target's (chi-square divergence ≥ 0.020)."""
    n = 4000
    counts, expected, paused = _fallback_counts(n)
    assert paused > 0.1 * n  # the switching is exercised
    assert detectable_effect(n, expected).tv < 0.075
    assert chi_square_pvalue(counts, expected, n) > ALPHA


def test_fallback_mutation_residual_equals_target_fails(monkeypatch, one_thread):
    """The subtle bug (recovered token drawn from the target, not norm(max(0, target − draft))) on the
    drafting steps: chi-square divergence 0.080 (exact, tests.exact_law over the whole mutated loop),
    caught with power ≥ 0.99 from n ≈ 900 on; n = 1500 here."""
    monkeypatch.setattr(chain, "recovery_distribution", lambda t, d: t)
    n = 1500
    counts, expected, _ = _fallback_counts(n)
    assert detectable_effect(n, expected).divergence < 0.080
    assert chi_square_pvalue(counts, expected, n) < ALPHA


def test_break_even_from_profiles():
    quick = {"winner": {"method": "sps", "ms_per_call": 300.0}, "timing": {"ar_ms_per_token": 100.0}}
    assert break_even(quick) == pytest.approx(3.0)
    full = {"winner": {"method": "sequoia", "mode": "swor", "size": 4, "depth": 2},
            "candidates": [{"method": "ar", "target_ms": 50.0, "draft_ms": 0.0},
                           {"method": "sequoia", "mode": "swor", "size": 4, "depth": 2, "target_ms": 60.0,
                            "draft_ms": 40.0}]}
    assert break_even(full) == pytest.approx(2.0)
    assert break_even({"winner": {"method": "ar"}}) is None
    with pytest.raises(ValueError):
        FallbackDrafter(ModelDrafter(tiny_lm("llama", 1), GREEDY), break_even=0)
