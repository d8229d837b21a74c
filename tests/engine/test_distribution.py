"""End to end: sampled speculative decoding has exactly the target's distribution.

The full loop (drafting, one target pass per iteration, verification, commits, bonus token,
EOS, truncation) runs on an exact second-order Markov toy; the empirical distribution of the
whole length-L continuation is compared with its exact probabilities by a chi-square test
(seeded, alpha = 1e-3). A planted bug must make the same test fail.
"""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

import specdec.verify.chain as verify
from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.pld import PromptLookupDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.toy import MarkovLM

V = 4
L = 3
PROMPT = [1, 2, 0, 1, 2, 3, 1, 2]  # repeats, so prompt lookup finds n-gram matches
ALPHA = 1e-3


@pytest.fixture(autouse=True)
def _toy_threads(one_thread):
    yield


def exact_continuations(target: MarkovLM, sampling: SamplingConfig, eos: int | None) -> dict[tuple, float]:
    """Probability of every possible output (length L, or shorter when it ends with EOS)."""
    out: dict[tuple, float] = {}

    def walk(seq: tuple, ctx: tuple, prob: float) -> None:
        if len(seq) == L or (seq and seq[-1] == eos):
            out[seq] = out.get(seq, 0.0) + prob
            return
        probs = target.next_probs(ctx[-2], ctx[-1], sampling)
        for tok in range(V):
            if probs[tok] > 0:
                walk(seq + (tok,), ctx + (tok,), prob * float(probs[tok]))

    walk((), tuple(PROMPT), 1.0)
    return out


def chi_square_pvalue(counts: Counter, expected_probs: dict[tuple, float], n: int) -> float:
    assert set(counts) <= set(expected_probs), "an impossible sequence was generated"
    cells = sorted(expected_probs, key=lambda c: expected_probs[c])
    obs, exp = [], []
    acc_o = acc_e = 0.0
    for c in cells:  # merge the rarest cells until each bin expects >= 5
        acc_o += counts.get(c, 0)
        acc_e += expected_probs[c] * n
        if acc_e >= 5:
            obs.append(acc_o)
            exp.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        obs[-1] += acc_o
        exp[-1] += acc_e
    return float(chisquare(obs, exp).pvalue)


def run(method: str, sampling: SamplingConfig, n: int, seed: int, eos: int | None = None, gamma: int = 2):
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    draft = MarkovLM.random(V, seed=12, sharpness=1.5)
    drafter = ModelDrafter(draft, sampling) if method == "sps" else PromptLookupDrafter(max_ngram=2)
    eos_ids = [eos] if eos is not None else []
    dec = SpeculativeDecoder(target, drafter, sampling, gamma=gamma, eos_token_ids=eos_ids)
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    calls = tokens = accepted = 0
    for _ in range(n):
        out, stats = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        calls += stats.target_calls
        tokens += stats.new_tokens
        accepted += stats.accepted_tokens
        assert 1 <= stats.target_calls <= stats.new_tokens
    assert accepted > 0.05 * n, "the drafter was never accepted: the test would not exercise verification"
    return counts, exact_continuations(target, sampling, eos)


CONFIGS = [
    ("sps", SamplingConfig(temperature=1.0), None),
    ("sps", SamplingConfig(temperature=0.5, top_p=0.9), None),
    ("sps", SamplingConfig(temperature=1.0, top_k=3), 3),
    ("pld", SamplingConfig(temperature=1.0), None),
    ("pld", SamplingConfig(temperature=0.5, top_p=0.9), 3),
]


@pytest.mark.parametrize("method,sampling,eos", CONFIGS)
def test_output_distribution_matches_target(method, sampling, eos):
    n = 6000
    counts, expected = run(method, sampling, n, seed=1, eos=eos)
    assert chi_square_pvalue(counts, expected, n) > ALPHA


def test_mutation_residual_equals_target_fails_chi_square(monkeypatch):
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: t)
    n = 6000
    counts, expected = run("sps", SamplingConfig(temperature=1.0), n, seed=1)
    assert chi_square_pvalue(counts, expected, n) < ALPHA
