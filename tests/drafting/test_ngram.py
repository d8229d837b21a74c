"""Prompt lookup proposals on tiny integer arrays (hand traces)."""

import torch

from specdec.drafting.ngram import lookup_continuation


def t(*xs):
    return torch.tensor(xs)


def test_longest_ngram_wins_and_latest_occurrence_is_used():
    # suffix [1, 2] occurs at 0 (followed by 3, 4) and at 4 (followed by 9, 9); latest wins.
    ids = t(1, 2, 3, 4, 1, 2, 9, 9, 5, 1, 2)
    assert lookup_continuation(ids, 2, max_ngram=3).tolist() == [9, 9]
    # with a 3-gram [5, 1, 2] unseen, the 2-gram decides; asking for more tokens copies more
    assert lookup_continuation(ids, 5, max_ngram=3).tolist() == [9, 9, 5, 1, 2]


def test_longer_match_beats_more_recent_shorter_one():
    ids = t(7, 1, 2, 3, 8, 0, 2, 6, 7, 1, 2)
    # 3-gram [7, 1, 2] matches at 0 -> 3, 8; the 1-gram [2] would match later at 6 -> 6
    assert lookup_continuation(ids, 2, max_ngram=3).tolist() == [3, 8]
    assert lookup_continuation(ids, 2, max_ngram=1).tolist() == [6, 7]


def test_no_match_gives_empty_proposal():
    assert lookup_continuation(t(1, 2, 3, 4), 3, max_ngram=3).numel() == 0
    assert lookup_continuation(t(5), 3, max_ngram=3).numel() == 0
    assert lookup_continuation(t(1, 2, 1), 0, max_ngram=3).numel() == 0


def test_continuation_is_truncated_at_the_end():
    # suffix [4] occurs at 1 followed by only [5, 4]; fewer than gamma tokens are proposed
    assert lookup_continuation(t(3, 4, 5, 4), 5, max_ngram=1).tolist() == [5, 4]


def test_min_ngram_limits_fallback():
    ids = t(1, 9, 3, 2)
    assert lookup_continuation(ids, 2, max_ngram=3, min_ngram=2).numel() == 0
