"""`hybrid`: scored trees merged by shared prefixes, the draft model called only where the free
speculators promise little, greedy equivalence with drafts accepted, exact sampling end to end, and
a planted verifier bug that the chi-square test catches."""

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.drafting.scored_tree import best_nodes, merge_scored, node_paths
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.hybrid import HybridDrafter
from specdec.models.toy import MarkovLM
from tests.conftest import TINY_VOCAB, tiny_lm
from tests.helpers import chi_square_of_decoder, shared_uniform_match


def t(*xs, dtype=torch.long):
    return torch.tensor(xs, dtype=dtype)


def test_merge_shares_prefixes_and_keeps_the_larger_score():
    a = (t(5, 6, 7), t(-1, 0, 0), t(0.9, 0.5, 0.2, dtype=torch.float64))  # 5 -> {6, 7}
    b = (t(5, 6, 8), t(-1, 0, 1), t(0.4, 0.3, 0.25, dtype=torch.float64))  # 5 -> 6 -> 8
    tokens, parents, score = merge_scored([a, b])
    paths = {tuple(x for x in row if x >= 0): float(s) for row, s in zip(node_paths(tokens, parents).tolist(), score)}
    assert paths == {(5,): 0.9, (5, 6): 0.5, (5, 7): 0.2, (5, 6, 8): 0.25}
    tokens, parents, score = best_nodes((tokens, parents, score), 3)
    kept = {tuple(x for x in row if x >= 0) for row in node_paths(tokens, parents).tolist()}
    assert kept == {(5,), (5, 6), (5, 6, 8)}  # 0.25 beats 0.2; the tree stays ancestor-closed
    assert best_nodes((tokens, parents, score), 5, min_score=0.6)[0].tolist() == [5]


@pytest.mark.parametrize("model_below", [0.0, 1.5, 100.0])
def test_greedy_equals_ar_with_the_model_called_as_asked(model_below):
    target = tiny_lm("llama", seed=0)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, TINY_VOCAB, (6,), generator=g).tolist()
    prompt = base + [7] + base + [9] + base
    ref, _ = SpeculativeDecoder(target).generate(prompt, 40)
    drafter = HybridDrafter(tiny_lm("llama", seed=0), SamplingConfig(), budget=10, max_depth=4, gamma=3,
                            stop_below=0.0, model_below=model_below)
    out, stats = SpeculativeDecoder(target, drafter).generate(prompt, 40)
    assert out == ref and stats.accepted_tokens > 0
    if model_below == 0.0:
        assert drafter.model_steps == 0 and drafter.forward_calls() == [0]
    elif model_below == 100.0:
        assert drafter.model_steps == stats.drafted_calls  # a copy of the target always drafts
        assert stats.tokens_per_call > 3  # its chain is always right
    else:
        assert 0 < drafter.model_steps < stats.target_calls


def test_draft_cache_holds_only_committed_tokens(one_thread):
    target = MarkovLM.random(6, seed=1, sharpness=2.0)
    draft = MarkovLM.random(6, seed=1, sharpness=2.0)
    drafter = HybridDrafter(draft, SamplingConfig(temperature=1.0), budget=6, max_depth=3, gamma=3,
                            stop_below=0.0, model_below=1.0)
    dec = SpeculativeDecoder(target, drafter, SamplingConfig(temperature=1.0))
    committed = [1, 2, 3, 1, 2]
    behind = 0
    for chunk in dec.stream(committed, 30, torch.Generator().manual_seed(2)):
        committed += chunk
        if dec.last_stats.stopped_by:
            break
        assert target._tokens == committed[:-1]
        # the draft holds committed tokens only; on steps without a chain it falls behind and
        # catches up when it is next asked
        assert draft._tokens == committed[: draft.kv_len]
        behind += draft.kv_len < len(committed) - len(chunk)
    assert 0 < drafter.model_steps and behind > 0


def _decoder(verifier=None):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    # model_below=100: every step merges the draft's chain with the free speculators' nodes
    drafter = HybridDrafter(MarkovLM.random(4, seed=12, sharpness=1.5), sampling, budget=6, max_depth=2, gamma=2,
                            stop_below=0.0, model_below=100.0)
    return SpeculativeDecoder(target, drafter, sampling, verifier=verifier), target, sampling


def test_sampling_matches_the_target_distribution(one_thread):
    dec, target, sampling = _decoder()
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3) > 1e-3
    assert dec.drafter.model_steps > 0


def test_mutation_shared_uniform_fails_chi_square(one_thread):
    dec, target, sampling = _decoder(shared_uniform_match)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3) < 1e-3
