"""auto's fallback to plain steps where drafting does not pay: exact (chi-square, greedy equality),
it pauses when the earned tokens per call fall below break-even and drafts again afterwards."""

from collections import Counter

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.drafting.fallback import FallbackDrafter
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.auto import break_even
from specdec.methods.sps import ModelDrafter
from tests.conftest import tiny_lm
from tests.engine.test_distribution import ALPHA, L, PROMPT, chi_square_pvalue, exact_continuations
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


def test_fallback_keeps_the_target_distribution(one_thread):
    sampling = SamplingConfig(temperature=1.0)
    target, draft = toys()
    fb = FallbackDrafter(ModelDrafter(draft, sampling, 2), break_even=2.2, window=1, pause=1)
    dec = SpeculativeDecoder(target, fb, sampling)
    gen = torch.Generator().manual_seed(5)
    n, counts, paused = 4000, Counter(), 0
    for _ in range(n):
        out, _ = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        paused += fb.paused_steps
    assert paused > 0.1 * n  # the switching is exercised
    assert chi_square_pvalue(counts, exact_continuations(target, sampling, None), n) > ALPHA


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
