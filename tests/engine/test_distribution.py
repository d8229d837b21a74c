"""End to end: sampled speculative decoding has exactly the target's distribution.

The full loop (drafting, one target pass per iteration, verification, commits, bonus token,
EOS, truncation) runs on an exact second-order Markov toy; the empirical distribution of the
whole length-L continuation is compared with its exact probabilities by a chi-square test
(seeded, alpha = 1e-3). A planted bug must make the same test fail.

Power. A chi-square test over k cells with n samples rejects a law whose chi-square divergence
from the target's, D = Σ (π − e)² / e over the cells, is large enough: the statistic is then
noncentral chi-square with k − 1 degrees of freedom and noncentrality n·D. `detectable_effect`
gives the D (and λ = n·D) rejected with probability ≥ 0.99 at alpha; since D ≥ 4·TV², any law at
total variation ≥ ½·sqrt(D) from the target's on the cells is rejected at least that often. Each
chi-square test of the suite states that TV and asserts it, and each planted bug states its own
D, computed exactly (`tests.exact_law` over the whole mutated loop) or from 10 000+ mutated runs.
"""

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import chi2, chisquare, ncx2

import specdec.verify.chain as verify
from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.pld import PromptLookupDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.toy import MarkovLM
from tests.exact_law import VERIFY_MODULES, exact_law, law_tv

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


def merged_cells(expected_probs: dict[tuple, float], n: int) -> list[list[tuple]]:
    """The test's cells: outcomes from the rarest up, merged until each cell expects >= 5 of n
    (what is left over at the end joins the last cell)."""
    cells: list[list[tuple]] = []
    pending: list[tuple] = []
    acc = 0.0
    for c in sorted(expected_probs, key=lambda c: expected_probs[c]):
        pending.append(c)
        acc += expected_probs[c] * n
        if acc >= 5:
            cells.append(pending)
            pending, acc = [], 0.0
    if pending:
        cells[-1] += pending
    return cells


def chi_square_pvalue(counts: Counter, expected_probs: dict[tuple, float], n: int) -> float:
    assert set(counts) <= set(expected_probs), "an impossible sequence was generated"
    cells = merged_cells(expected_probs, n)
    obs = [sum(counts.get(c, 0) for c in cell) for cell in cells]
    exp = [sum(expected_probs[c] for c in cell) * n for cell in cells]
    return float(chisquare(obs, exp).pvalue)


@dataclass(frozen=True)
class Power:
    cells: int
    noncentrality: float
    """λ at which the test rejects with probability `power` (noncentral chi-square)."""
    divergence: float
    """λ / n: the chi-square divergence from the target's law it detects."""
    tv: float
    """½·sqrt(divergence): a law at least this far in total variation (on the cells) is detected."""


def detectable_effect(n: int, expected_probs: dict[tuple, float], alpha: float = ALPHA, power: float = 0.99) -> Power:
    """What a chi-square test with n samples over these cells catches with probability >= `power`."""
    df = len(merged_cells(expected_probs, n)) - 1
    crit = chi2.ppf(1 - alpha, df)
    lam = brentq(lambda lam: ncx2.sf(crit, df, lam) - power, 1e-9, 1e5)
    return Power(df + 1, lam, lam / n, 0.5 * (lam / n) ** 0.5)


def toy_decoder(method: str, sampling: SamplingConfig, eos: int | None = None,
                gamma: int = 2) -> tuple[MarkovLM, SpeculativeDecoder]:
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    draft = MarkovLM.random(V, seed=12, sharpness=1.5)
    drafter = ModelDrafter(draft, sampling) if method == "sps" else PromptLookupDrafter(max_ngram=2)
    eos_ids = [eos] if eos is not None else []
    return target, SpeculativeDecoder(target, drafter, sampling, gamma=gamma, eos_token_ids=eos_ids)


def run(method: str, sampling: SamplingConfig, n: int, seed: int, eos: int | None = None, gamma: int = 2):
    target, dec = toy_decoder(method, sampling, eos, gamma)
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
    """n = 6000 over 5–51 cells (by configuration): power ≥ 0.99 at alpha = 1e-3 against any law at
    total variation ≥ 0.041–0.058 from the target's (chi-square divergence ≥ 0.007–0.013)."""
    n = 6000
    counts, expected = run(method, sampling, n, seed=1, eos=eos)
    assert detectable_effect(n, expected).tv < 0.06
    assert chi_square_pvalue(counts, expected, n) > ALPHA


# The residual mutation's chi-square divergence from the target's law on each sps configuration's
# cells at n = 2000, exact (tests.exact_law over the whole mutated loop).
RESIDUAL_MUTATION_DIVERGENCE = {0: 0.135, 1: 0.054, 2: 0.093}


@pytest.mark.parametrize("config", list(RESIDUAL_MUTATION_DIVERGENCE))
def test_mutation_residual_equals_target_fails_chi_square(monkeypatch, config):
    """The subtle bug: after a rejection the recovered token is drawn from the target itself instead of
    norm(max(0, target − draft)). Its divergence (0.054–0.135, by configuration) is caught with power
    ≥ 0.99 from n ≈ 560–840 on; at n = 2000 the noncentrality is 108–270 against the 45–75 needed,
    and the pass test above, at n = 6000, has three times that."""
    method, sampling, eos = CONFIGS[config]
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: t)
    n = 2000
    counts, expected = run(method, sampling, n, seed=1, eos=eos)
    assert detectable_effect(n, expected).divergence < RESIDUAL_MUTATION_DIVERGENCE[config]
    assert chi_square_pvalue(counts, expected, n) < ALPHA


# ---- the whole loop's exact law ------------------------------------------------------------------
def whole_loop_tv(method: str, sampling: SamplingConfig, eos: int | None) -> float:
    """TV between the decoder's exact output law and the target's: every random outcome of the
    drafter (`ModelDrafter` draws with `sample`) and of the verifier enumerated by `tests.exact_law`,
    through the real loop (drafting, target passes, verification, commits, bonus, EOS, truncation)."""
    target, dec = toy_decoder(method, sampling, eos)
    law = exact_law(lambda: tuple(dec.generate(PROMPT, L, None)[0]), VERIFY_MODULES + ("specdec.methods.sps",))
    return law_tv(law, exact_continuations(target, sampling, eos))


@pytest.mark.parametrize("config", [1, 2, 4])
def test_whole_loop_law_is_exact(config):
    """Beyond sampling: the exact law of the whole loop equals the target's (TV < 1e-12). The
    configurations at T = 1 take seconds to enumerate and are left to the chi-square tests."""
    assert whole_loop_tv(*CONFIGS[config]) < 1e-12


def test_whole_loop_law_with_the_residual_mutation_is_biased(monkeypatch):
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: t)
    assert whole_loop_tv(*CONFIGS[1]) > 0.05  # 0.063
