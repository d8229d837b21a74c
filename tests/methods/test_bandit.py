"""auto's bandit over its best candidates: greedy output equals AR while it switches, it leaves an arm
that earns little and probes it again later, and its sampled output has the target's law (each
arm verified by its own rule; a planted residual bug in the model arm's rule is caught)."""

from collections import Counter

import pytest
import torch

import specdec.verify.chain as chain_rule
from specdec.core.sampling import SamplingConfig
from specdec.drafting.bandit import Arm, BanditDrafter
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.pld import PromptLookupDrafter
from specdec.methods.sps import ModelDrafter
from specdec.methods.suffix import SuffixDrafter
from specdec.models.toy import MarkovLM
from tests.conftest import tiny_lm
from tests.engine.test_distribution import ALPHA, L, PROMPT, chi_square_pvalue, exact_continuations

GREEDY = SamplingConfig()


def test_greedy_equals_ar_while_switching_away_from_a_poor_arm_and_back(arch):
    target = tiny_lm(arch, 0)
    prompt = list(range(5, 20)) * 2
    ref, _ = SpeculativeDecoder(target).generate(prompt, 80)
    # The model arm is promised 4 tokens per call but drafts with a random model (about 1).
    poor = ModelDrafter(tiny_lm(arch, 4), GREEDY, 4)
    bandit = BanditDrafter([Arm(poor, 2.0, 4.0, "sps"), Arm(PromptLookupDrafter(4), 1.2, 1.5, "pld")], ar_ms=1.0,
                           drift=0.2)
    out, stats = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 80)
    assert out == ref and stats.accepted_tokens > 0
    model, lookup, plain = bandit.plays
    assert model >= 2 and lookup > 0  # left the model arm, and probed it again later
    assert model < stats.target_calls / 2
    assert bandit.forward_calls()[0] > 0


def test_a_good_arm_keeps_playing():
    target = tiny_lm("llama", 0)
    prompt = list(range(5, 20))
    good = ModelDrafter(tiny_lm("llama", 0), GREEDY, 3)  # a copy of the target: every draft accepted
    bandit = BanditDrafter([Arm(good, 2.0, 3.0), Arm(PromptLookupDrafter(3), 1.1, 1.2)], ar_ms=1.0)
    out, stats = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 40)
    assert out == SpeculativeDecoder(target).generate(prompt, 40)[0]
    assert bandit.plays[0] == stats.target_calls and stats.tokens_per_call > 3


def _sampled_counts(n: int, seed: int):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    draft = MarkovLM.random(4, seed=12, sharpness=1.5)
    # Priors close together: the arms trade places as each earns more or less than promised.
    bandit = BanditDrafter([Arm(ModelDrafter(draft, sampling, 2), 1.0, 1.9, "sps"),
                            Arm(SuffixDrafter(budget=4, max_depth=2, max_ngram=2), 1.0, 1.8, "suffix")],
                           ar_ms=0.6, drift=0.3)
    dec = SpeculativeDecoder(target, bandit, sampling)
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    plays = [0, 0, 0]
    for _ in range(n):
        out, _ = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        plays = [a + b for a, b in zip(plays, bandit.plays)]
    assert min(plays[:2]) > 0.1 * n, "both drafting arms must be played for the test to mean anything"
    return counts, exact_continuations(target, sampling, None)


def test_sampled_output_has_the_target_distribution(one_thread):
    counts, expected = _sampled_counts(4000, seed=7)
    assert chi_square_pvalue(counts, expected, 4000) > ALPHA


@pytest.mark.usefixtures("one_thread")
def test_mutation_in_the_model_arms_rule_is_caught(monkeypatch):
    # The model arm's chain goes through speculative sampling (dispatched by the bandit); a residual
    # replaced by the target's distribution there must show.
    monkeypatch.setattr(chain_rule, "recovery_distribution", lambda target, draft: target)
    counts, expected = _sampled_counts(4000, seed=7)
    assert chi_square_pvalue(counts, expected, 4000) < ALPHA
