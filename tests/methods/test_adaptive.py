"""Adaptive drafting stays exact: chains that stop where the draft is unsure (sps `stop_below`) and
SpecExec trees pruned by cumulative draft probability (`min_prob`) keep the target's distribution
(chi-square end to end) and AR's greedy output; stopping on the *drawn* token's probability while
reporting the untruncated q is biased and must fail the same test (docs/algorithms.md §2.8, §6.7)."""

from collections import Counter

import pytest
import torch

import specdec.verify.chain as chain
from specdec.core.sampling import SamplingConfig, logits_to_probs, sample
from specdec.core.tree import TokenTree
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.specexec import SpecExecDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.toy import MarkovLM
from tests.conftest import tiny_lm
from tests.engine.test_distribution import ALPHA, L, PROMPT, V, chi_square_pvalue, detectable_effect, exact_continuations
from tests.exact_law import VERIFY_MODULES, exact_law, law_tv

GREEDY = SamplingConfig()


@pytest.fixture(autouse=True)
def _toy_threads(one_thread):
    yield


def toys():
    return MarkovLM.random(V, seed=11, sharpness=1.5), MarkovLM.random(V, seed=12, sharpness=1.5)


class DrawnTokenStop(ModelDrafter):
    """The planted bug: draw x from q, drop it (and stop) when q(x) < stop_below, yet report q itself
    for the kept ones. A kept draft's law is q truncated to {q >= stop_below}, not q."""

    def propose(self, committed_ids, max_depth, generator):
        gamma = min(self.max_depth, max_depth)
        root = int(committed_ids[-1])
        logits = yield from self.draft.catch_up(committed_ids)
        tokens, probs = [], []
        for i in range(gamma):
            dist = logits_to_probs(logits, self.sampling)
            token = sample(dist, generator).view(1)
            if float(dist[token]) < self.stop_below:
                break
            tokens.append(token)
            probs.append(dist)
            if i < gamma - 1:
                logits = (yield from self.draft.extend(token))[-1]
        if not tokens:
            return TokenTree.chain(root, committed_ids.new_empty(0))
        return TokenTree.chain(root, torch.cat(tokens), torch.stack(probs))


def run(drafter_cls, sampling, n, seed, eos=None, stop_below=0.45, gamma=3):
    target, draft = toys()
    drafter = drafter_cls(draft, sampling, gamma, stop_below)
    dec = SpeculativeDecoder(target, drafter, sampling, eos_token_ids=[eos] if eos is not None else [])
    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    drafted = calls = accepted = 0
    for _ in range(n):
        out, st = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        drafted, calls, accepted = drafted + st.draft_tokens, calls + st.target_calls, accepted + st.accepted_tokens
    return counts, exact_continuations(target, sampling, eos), drafted / calls, accepted


ADAPTIVE_CONFIGS = [
    (SamplingConfig(temperature=1.0), None),
    (SamplingConfig(temperature=0.7, top_p=0.9, top_k=3), 3),
]


@pytest.mark.parametrize("config,n,detects_tv", [(0, 4000, 0.07), (1, 5000, 0.045)])
def test_adaptive_chain_keeps_the_target_distribution(config, n, detects_tv):
    """n = 4000 over 47 cells and n = 5000 over 5 cells: power ≥ 0.99 at alpha = 1e-3 against any law
    at total variation ≥ 0.070 and 0.045 from the target's (chi-square divergence ≥ 0.020 and 0.008).
    The second n is sized for the residual mutation below, whose divergence there is only 0.0093."""
    sampling, eos = ADAPTIVE_CONFIGS[config]
    counts, expected, per_call, accepted = run(ModelDrafter, sampling, n, seed=1, eos=eos)
    assert 0.2 < per_call < 2.5, "the chain should stop early on some steps and not on others"
    assert accepted > 0.1 * n
    assert detectable_effect(n, expected).tv <= detects_tv
    assert chi_square_pvalue(counts, expected, n) > ALPHA


def test_mutation_stop_on_the_drawn_token_fails_chi_square():
    """Stopping on the drawn token's probability while reporting the untruncated q: chi-square
    divergence 0.049 (exact: tests.exact_law over the whole mutated loop), caught with power ≥ 0.99
    from n ≈ 1570 on; n = 2500 here."""
    n = 2500
    counts, expected, per_call, _ = run(DrawnTokenStop, SamplingConfig(temperature=1.0), n, seed=1)
    assert detectable_effect(n, expected).divergence < 0.049
    assert chi_square_pvalue(counts, expected, n) < ALPHA


@pytest.mark.parametrize("config,n,divergence", [(0, 1000, 0.083), (1, 5000, 0.0093)])
def test_mutation_residual_equals_target_fails_chi_square(config, n, divergence, monkeypatch):
    """The subtle bug: the recovered token drawn from the target, not norm(max(0, target − draft)).
    Its chi-square divergence (exact, tests.exact_law over the whole mutated loop) is 0.083 at T = 1
    (caught with power ≥ 0.99 from n ≈ 850 on) but only 0.0093 at T = 0.7 with top-p, top-k and EOS,
    where the draft is rarely rejected (from n ≈ 4300 on): the pass test above uses n = 5000 there."""
    sampling, eos = ADAPTIVE_CONFIGS[config]
    monkeypatch.setattr(chain, "recovery_distribution", lambda t, d: t)
    counts, expected, _, _ = run(ModelDrafter, sampling, n, seed=1, eos=eos)
    assert detectable_effect(n, expected).divergence < divergence
    assert chi_square_pvalue(counts, expected, n) < ALPHA


def _whole_loop_tv(drafter_cls, sampling, eos) -> float:
    """TV between the exact law of the whole loop (every draft draw and verifier outcome enumerated by
    `tests.exact_law`) and the target's."""
    target, draft = toys()
    dec = SpeculativeDecoder(target, drafter_cls(draft, sampling, 3, 0.45), sampling,
                             eos_token_ids=[eos] if eos is not None else [])
    modules = VERIFY_MODULES + ("specdec.methods.sps", __name__)  # ModelDrafter's and DrawnTokenStop's `sample`
    law = exact_law(lambda: tuple(dec.generate(PROMPT, L, None)[0]), modules)
    return law_tv(law, exact_continuations(target, sampling, eos))


@pytest.mark.parametrize("config", [0, 1])
def test_adaptive_chain_whole_loop_law_is_exact(config):
    assert _whole_loop_tv(ModelDrafter, *ADAPTIVE_CONFIGS[config]) < 1e-12


def test_mutation_stop_on_the_drawn_token_is_biased_exactly():
    assert _whole_loop_tv(DrawnTokenStop, *ADAPTIVE_CONFIGS[0]) > 0.05  # 0.069


def test_adaptive_chain_is_shorter_where_the_draft_is_unsure_and_greedy_equals_ar(arch):
    target, draft = tiny_lm(arch, 0), tiny_lm(arch, 3)
    prompt = list(range(5, 20))
    ref, _ = SpeculativeDecoder(target).generate(prompt, 30)
    fixed = SpeculativeDecoder(target, ModelDrafter(draft, GREEDY, 4), GREEDY)
    out, st_fixed = fixed.generate(prompt, 30)
    assert out == ref
    for tau in (0.3, 0.9, 1.0):
        dec = SpeculativeDecoder(target, ModelDrafter(draft, GREEDY, 4, stop_below=tau), GREEDY)
        out, st = dec.generate(prompt, 30)
        assert out == ref, tau
        assert st.tree_tokens < st_fixed.tree_tokens
    # stop_below = 1: only a certain draft drafts at all (never, for a random model)
    assert st.draft_tokens == 0
    with pytest.raises(ValueError, match="probability"):
        ModelDrafter(draft, GREEDY, 4, stop_below=1.5)


def test_specexec_pruned_by_path_probability_is_exact_and_smaller(arch):
    target, draft = tiny_lm(arch, 0), tiny_lm(arch, 3)
    prompt = list(range(5, 20))
    ref, _ = SpeculativeDecoder(target).generate(prompt, 24)
    full = SpeculativeDecoder(target, SpecExecDrafter(draft, GREEDY, 16, 4, 4, 4), GREEDY)
    _, st_full = full.generate(prompt, 24)
    pruned = SpeculativeDecoder(target, SpecExecDrafter(draft, GREEDY, 16, 4, 4, 4, min_prob=0.05), GREEDY)
    out, st = pruned.generate(prompt, 24)
    assert out == ref and st.tree_tokens < st_full.tree_tokens
    scores = pruned.drafter.last_scores
    assert scores is None or bool((scores.exp() >= 0.05 - 1e-12).all())


def test_specexec_pruned_keeps_the_target_distribution():
    from tests.helpers import chi_square_of_decoder

    target, draft = toys()
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    dec = SpeculativeDecoder(target, SpecExecDrafter(draft, sampling, 8, 3, 4, 3, min_prob=0.15), sampling)
    # n = 3000 over 16 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total variation ≥ 0.068
    # from the target's (chi-square divergence ≥ 0.018); sample-and-match has no residual to get wrong.
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=2, max_tree_tokens=8, detects_tv=0.07) > ALPHA
