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


def _lookup_reference(ids, gamma, max_ngram, min_ngram=1):
    """The direct definition: for n = max_ngram down to min_ngram, compare every earlier window."""
    length = ids.shape[0]
    if gamma <= 0:
        return ids.new_empty(0)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        windows = ids[: length - 1].unfold(0, n, 1)
        hits = (windows == ids[length - n:]).all(-1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return ids[start: start + gamma]
    return ids.new_empty(0)


def test_lookup_equals_the_direct_definition_on_random_texts():
    gen = torch.Generator().manual_seed(0)
    for trial in range(400):
        length = int(torch.randint(1, 40, (1,), generator=gen))
        vocab = int(torch.randint(2, 6, (1,), generator=gen))  # few symbols: long repeated n-grams
        ids = torch.randint(0, vocab, (length,), generator=gen)
        max_ngram = int(torch.randint(1, 50, (1,), generator=gen))
        min_ngram = int(torch.randint(1, max_ngram + 1, (1,), generator=gen))
        gamma = int(torch.randint(0, 6, (1,), generator=gen))
        got = lookup_continuation(ids, gamma, max_ngram, min_ngram).tolist()
        assert got == _lookup_reference(ids, gamma, max_ngram, min_ngram).tolist(), (ids.tolist(), max_ngram, min_ngram)


def test_a_huge_max_ngram_is_taken_as_is():
    # A server client may send max_ngram = 10**9; the answer is the longest match's continuation.
    assert lookup_continuation(torch.arange(5000), 4, max_ngram=10**9).numel() == 0
    ids = torch.cat([torch.arange(100), torch.arange(100)])  # the last 100 tokens occurred at the start
    assert lookup_continuation(ids, 3, max_ngram=10**9).tolist() == [0, 1, 2]
