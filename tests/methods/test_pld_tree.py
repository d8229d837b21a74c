"""`pld-tree`: the lookup trie on hand traces, greedy equivalence, and exact sampling end to end."""

import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.pld_tree import PromptLookupTreeDrafter, lookup_tree
from specdec.models.toy import MarkovLM
from tests.helpers import check_greedy_on_repetitive_text, chi_square_of_decoder


def t(*xs):
    return torch.tensor(xs)


def test_trie_of_every_earlier_continuation_latest_first():
    # "1 2" occurs at 0 (then 3 4), at 4 (then 5 6) and at 8 (then 3 7): the trie shares the 3.
    ids = t(1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2)
    tokens, parents = lookup_tree(ids, max_depth=2, budget=10, max_ngram=2)
    assert tokens.tolist() == [3, 7, 5, 6, 4]
    assert parents.tolist() == [-1, 0, -1, 2, 0]
    # the budget keeps the latest occurrences' nodes first
    tokens, parents = lookup_tree(ids, max_depth=2, budget=3, max_ngram=2)
    assert tokens.tolist() == [3, 7, 5] and parents.tolist() == [-1, 0, -1]
    # no earlier occurrence of any suffix: nothing to propose
    assert lookup_tree(t(1, 2, 3), 4, 8, 2)[0].numel() == 0


def test_greedy_equals_ar_and_accepts_on_repetitive_text():
    stats = check_greedy_on_repetitive_text(PromptLookupTreeDrafter(budget=12, max_depth=4), "pld-tree", budget=12)
    assert stats.target_calls <= stats.new_tokens and stats.tree_tokens <= 12


def test_sampling_matches_the_target_distribution(one_thread):
    """n = 3000 over 45 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total variation ≥ 0.080
    from the target's (chi-square divergence ≥ 0.026). Sample-and-match has no residual to get wrong."""
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    dec = SpeculativeDecoder(target, PromptLookupTreeDrafter(budget=6, max_depth=2, max_ngram=2), sampling)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3, detects_tv=0.081) > 1e-3
