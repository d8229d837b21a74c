"""`suffix`: the weighted continuation trie on hand traces, greedy equivalence with drafts accepted,
exact sampling end to end, and a planted verifier bug that the chi-square test catches."""

import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.suffix import SuffixDrafter, match_lengths, suffix_tree
from specdec.models.toy import MarkovLM
from tests.helpers import check_greedy_on_repetitive_text, chi_square_of_decoder, shared_uniform_match


def t(*xs):
    return torch.tensor(xs)


def test_match_lengths_count_the_text_suffix_ending_at_each_position():
    #              0  1  2  3  4  5  6  7
    ids = t(9, 1, 2, 5, 1, 2, 8, 2)
    # the suffix is "... 8 2": "2" ends at 2 and 5 (1 token; before them 1 != 8); nothing else
    assert match_lengths(ids, 4).tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert match_lengths(t(1, 2, 1, 2), 4).tolist() == [0, 2, 0]
    assert match_lengths(t(1, 2, 1, 2), 1).tolist() == [0, 1, 0]


def test_frequent_continuations_first_then_the_latest():
    # "1 2" is followed by 3 4, 5 6 and 3 7: 3 has 2 of 3 occurrences, the rest 1 each
    ids = t(1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2)
    tokens, parents = suffix_tree(ids, max_depth=2, budget=3, max_ngram=2)
    assert tokens.tolist() == [3, 5, 7] and parents.tolist() == [-1, -1, 0]  # 7: the latest after 3
    tokens, parents = suffix_tree(ids, max_depth=2, budget=10, max_ngram=2)
    assert sorted(zip(parents.tolist(), tokens.tolist())) == [(-1, 3), (-1, 5), (0, 4), (0, 7), (1, 6)]
    # min_prob drops what fewer than half the occurrences continue with
    tokens, _ = suffix_tree(ids, max_depth=2, budget=10, max_ngram=2, min_prob=0.5)
    assert tokens.tolist() == [3]
    assert suffix_tree(t(1, 2, 3), 4, 8, 2)[0].numel() == 0


def test_a_longer_match_outweighs_a_more_frequent_shorter_one():
    # the text ends "4 1 2"; "4 1 2" occurs once (then 9), "1 2" four times (then 7 thrice)
    ids = t(1, 2, 7, 1, 2, 7, 4, 1, 2, 9, 1, 2, 7, 4, 1, 2)
    tokens, _ = suffix_tree(ids, max_depth=1, budget=1, max_ngram=4)
    assert tokens.tolist() == [9]


def test_trees_are_ancestor_closed_breadth_first_and_within_budget():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ids = torch.randint(0, 4, (60,), generator=g)
        tokens, parents = suffix_tree(ids, max_depth=5, budget=9, max_ngram=6)
        assert tokens.shape[0] <= 9
        assert bool((parents < torch.arange(tokens.shape[0])).all())
        pairs = list(zip(parents.tolist(), tokens.tolist()))
        assert len(set(pairs)) == len(pairs)  # siblings distinct


def test_greedy_equals_ar_and_accepts_on_repetitive_text():
    stats = check_greedy_on_repetitive_text(SuffixDrafter(budget=12, max_depth=4), "suffix", budget=12)
    assert stats.accepted_tokens > 0 and stats.tree_tokens <= 12


def test_sampling_matches_the_target_distribution(one_thread):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    dec = SpeculativeDecoder(target, SuffixDrafter(budget=6, max_depth=2, max_ngram=2), sampling)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3) > 1e-3


def test_mutation_shared_uniform_fails_chi_square(one_thread):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    dec = SpeculativeDecoder(target, SuffixDrafter(budget=6, max_depth=2, max_ngram=2), sampling,
                             verifier=shared_uniform_match)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3) < 1e-3
