"""auto's bandit over its best candidates: greedy output equals AR while it switches, it leaves an arm
that earns little and probes it again later, and its sampled output has the target's law (each
arm verified by its own rule; a planted residual bug in the model arm's rule is caught)."""

from collections import Counter

import pytest
import torch

import specdec.verify.chain as chain_rule
from specdec.core.sampling import SamplingConfig
from specdec.drafting.bandit import FREE_PRIOR, Arm, BanditDrafter
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
    # Prompt lookup is peeked every step and played while its copies look promising; once its share
    # of accepted drafts has fallen, the model arm plays every step.
    assert bandit.plays[0] >= stats.target_calls - 4 and stats.tokens_per_call > 3
    assert bandit.accept_share[1] < FREE_PRIOR and bandit.plays[2] == 0


def test_an_arm_the_tune_underrated_is_probed_and_kept():
    """Priced below plain decoding (1.2 tokens at 2 ms against 1 token at 1 ms), the arm is probed after
    `probe_every` plain steps, earns its gamma + 1 tokens and plays on."""
    target = tiny_lm("llama", 0)
    prompt = list(range(5, 20))
    good = ModelDrafter(tiny_lm("llama", 0), GREEDY, 3)
    bandit = BanditDrafter([Arm(good, 2.0, 1.2, "sps")], ar_ms=1.0, probe_every=4)
    out, stats = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 40)
    assert out == SpeculativeDecoder(target).generate(prompt, 40)[0]
    model, plain = bandit.plays
    assert plain == 4 and model == stats.target_calls - 4 and stats.tokens_per_call > 3


def test_probes_of_a_poor_arm_back_off():
    """An arm that earns about one token per call is probed after 4, then 8, then 16 plain steps."""
    target = tiny_lm("llama", 0)
    prompt = list(range(5, 20))
    poor = ModelDrafter(tiny_lm("llama", 4), GREEDY, 3)
    bandit = BanditDrafter([Arm(poor, 2.0, 1.2, "sps")], ar_ms=1.0, probe_every=4)
    out, _ = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 40)
    assert out == SpeculativeDecoder(target).generate(prompt, 40)[0]
    assert bandit.plays[0] == 3
    never = BanditDrafter([Arm(ModelDrafter(tiny_lm("llama", 4), GREEDY, 3), 2.0, 1.2)], ar_ms=1.0, probe_every=0)
    SpeculativeDecoder(target, never, GREEDY).generate(prompt, 40)
    assert never.plays[0] == 0


def test_auto_probes_candidates_near_plain_decoding_when_plain_decoding_won_the_tune():
    from specdec.methods.auto import PROBE_FLOOR, bandit_arms
    from specdec.methods.base import MethodContext

    ctx = MethodContext(tiny_lm("llama", 0), [tiny_lm("llama", 4)], GREEDY)
    ar = {"method": "ar", "label": "ar", "tokens_per_call": 1.0, "ms_per_call": 1.0, "expected_speedup": 1.0}

    def row(method, speedup, **options):
        return {"method": method, "label": method, "tokens_per_call": 2.0, "ms_per_call": 2.0 / speedup,
                "expected_speedup": speedup, "options": options}

    profile = {"winner": ar, "candidates": [ar, row("sps", 0.9, gamma=3), row("specinfer", PROBE_FLOOR - 0.01)]}
    arms = bandit_arms(ctx, profile, None, 3)
    assert [a.label for a in arms] == ["sps"] and isinstance(arms[0].drafter, ModelDrafter)
    profile["candidates"] = [ar, row("specinfer", PROBE_FLOOR - 0.01)]
    assert bandit_arms(ctx, profile, None, 3) == []
    # A model-free candidate is kept however it was priced: the bandit only peeks at it.
    profile["candidates"] = [ar, row("sps", 0.9, gamma=3), row("recycle", 0.7, budget=24), row("pld", 0.5, gamma=2),
                             row("pld", 0.45, gamma=5), row("suffix", 0.4)]
    arms = bandit_arms(ctx, profile, None, 3)
    assert [a.label for a in arms] == ["sps", "pld"] and isinstance(arms[1].drafter, PromptLookupDrafter)
    # The best text-copying method's widest candidate (the peek prices its size); Token Recycling, which
    # fills its tree every step, is not peeked at.
    assert arms[1].drafter.max_depth == 5


def test_auto_prices_a_free_proposal_by_the_target_pass_it_widens():
    from specdec.methods.auto import block_cost

    cost = block_cost({"target_ms": {"1": 30.0, "2": 32.0, "4": 34.0, "8": 42.0}, "ar_ms_per_token": 33.0})
    assert cost(0) == 33.0 and cost(1) == 35.0 and cost(5) == 33.0 + 8.0 and cost(3) == 33.0 + 4.0
    assert block_cost({"ar_ms_per_token": 33.0}) is None


def test_free_arm_copies_repeated_text_and_the_model_arm_drafts_the_rest():
    """On a prompt that repeats itself, prompt lookup's peeked copies are played where they exist and
    the model arm everywhere else; greedy output equals AR."""
    target = tiny_lm("llama", 0)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 64, (8,), generator=g).tolist()
    prompt = base + [7] + base + [9] + base
    ref, _ = SpeculativeDecoder(target).generate(prompt, 40)
    good = ModelDrafter(tiny_lm("llama", 0), GREEDY, 2)  # every draft accepted, 3 tokens per 2 ms
    bandit = BanditDrafter([Arm(good, 2.0, 3.0, "sps"), Arm(PromptLookupDrafter(4), 1.0, 1.0, "pld")], ar_ms=1.0,
                           block_ms=lambda drafted: 1.0 + 0.1 * drafted)
    out, stats = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 40)
    assert out == ref
    model, lookup, plain = bandit.plays
    assert model > 0 and lookup > 0 and plain == 0


def test_a_free_arm_with_nothing_to_copy_is_never_played():
    """Peeked every step, an empty proposal is never played: the model arm keeps its turn."""
    target = tiny_lm("llama", 0)
    prompt = list(range(5, 20))  # no token repeats: prompt lookup finds nothing at first
    bandit = BanditDrafter([Arm(ModelDrafter(tiny_lm("llama", 0), GREEDY, 3), 2.0, 3.0),
                            Arm(PromptLookupDrafter(3, min_ngram=3), 1.0, 5.0)], ar_ms=1.0)
    out, stats = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 8)
    assert out == SpeculativeDecoder(target).generate(prompt, 8)[0]
    assert bandit.plays[1] == 0 and bandit.plays[0] == stats.target_calls


@pytest.mark.parametrize("per_token_ms,model_plays", [(10.0, False), (0.01, True)])
def test_a_cold_draft_pays_its_prefill(per_token_ms, model_plays):
    """On a 40-token prompt with 8 tokens to go, a draft whose prefill costs 400 ms never plays (nor is
    probed): plain decoding is cheaper; at 0.4 ms it plays every step. Greedy output equals AR."""
    target = tiny_lm("llama", 0)
    prompt = list(range(5, 45))
    good = ModelDrafter(tiny_lm("llama", 0), GREEDY, 2)
    bandit = BanditDrafter([Arm(good, 2.0, 3.0, "sps")], ar_ms=1.0, probe_every=1,
                           prefill_ms=lambda unseen: per_token_ms * unseen)
    out, stats = SpeculativeDecoder(target, bandit, GREEDY).generate(prompt, 8)
    assert out == SpeculativeDecoder(target).generate(prompt, 8)[0]
    assert (bandit.plays[0] == stats.target_calls) if model_plays else (bandit.plays[0] == 0)


def _sampled_counts(n: int, seed: int):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    draft = MarkovLM.random(4, seed=12, sharpness=1.5)
    # Priors close together: the arms trade places as each earns more or less than promised.
    bandit = BanditDrafter([Arm(ModelDrafter(draft, sampling, 2), 1.0, 1.9, "sps"),
                            Arm(SuffixDrafter(budget=4, max_depth=2, max_ngram=2), 1.0, 1.8, "suffix")],
                           ar_ms=0.6, drift=0.3, block_ms=lambda drafted: 0.6 + 0.2 * drafted)
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
