"""Model-free proposals from the text itself: prompt lookup and Max-Gram (docs/algorithms.md §8, §9).

Both copy what followed an earlier occurrence of the text's suffix; they differ in which
occurrence: prompt lookup takes the *latest* occurrence of a bounded n-gram, Max-Gram the
*earliest* occurrence of the *longest* suffix that occurs earlier, then follows a bigram table
(`drafting.bigram`) for the rest. Their proposals are deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_SEARCHES = 2
"""Max-Gram's suffix searches per proposal before the bigram fill takes over (the reference's two)."""
NO_SUCCESSOR = -1
"""Bigram table entry of a token never followed by anything in the corpus: the bigram chain stops there."""


def lookup_continuation(
    ids: Tensor,  # [L] int64
    gamma: int,
    max_ngram: int,
    min_ngram: int = 1,
) -> Tensor:  # [<= γ] int64
    """Tokens that followed the latest earlier occurrence of the longest matching suffix n-gram
    (n <= max_ngram; nothing when even the longest match is shorter than min_ngram).

    The occurrences of the last n tokens are found for n = 1, 2, … at once, one tensor op per n,
    and the search stops as soon as none is left: its cost follows the longest match, not
    `max_ngram` (which a client of the server chooses).
    """
    length = ids.shape[0]
    top = min(max_ngram, length - 1)
    if gamma <= 0 or top < min_ngram:
        return ids.new_empty(0)
    ends = torch.arange(length - 1, device=ids.device)  # where an occurrence may end (a token follows)
    alive = ids[: length - 1] == ids[length - 1]  # [L - 1]: occurrences of the last n tokens, n = 1
    best: Tensor | None = None
    for n in range(1, top + 1):
        if not bool(alive.any()):
            break
        if n >= min_ngram:
            best = alive
        if n < top:
            # An occurrence ending at e matches n + 1 tokens if it matched n and ids[e - n] is the
            # token n places before the end of the text.
            alive = alive & (ends >= n) & (ids[(ends - n).clamp_min(0)] == ids[length - 1 - n])
    if best is None:
        return ids.new_empty(0)
    start = int(best.nonzero()[-1].item()) + 1
    return ids[start : start + gamma]


def longest_suffix_match(ids: Tensor) -> tuple[int, int]:  # ids: [L] int64
    """(n, start): the longest suffix of `ids` (length n) that also occurs earlier in `ids`, and the
    index of the token that follows its **earliest** occurrence; (0, -1) when even the last token is new.

    "Earlier" means the occurrence ends before the last position, so a token follows it
    (occurrences may overlap the suffix itself). All candidate occurrences are extended together,
    one tensor op per extra matched token.
    """
    length = ids.shape[0]
    if length < 2:
        return 0, -1
    ends = torch.arange(length - 1, device=ids.device)  # where an occurrence may end (a token follows)
    alive = ids[: length - 1] == ids[length - 1]  # [L - 1]: occurrences matching the last n tokens
    n = 0
    best = alive
    while bool(alive.any()):
        n += 1
        best = alive
        # An occurrence ending at e matches n + 1 tokens if it matched n and ids[e - n] equals the
        # token n places before the end of the text.
        before = ids[(ends - n).clamp_min(0)]
        alive = alive & (ends >= n) & (before == ids[length - 1 - n])
    if n == 0:
        return 0, -1
    earliest_end = int(best.nonzero()[0].item())
    return n, earliest_end + 1


def bigram_chain(
    next_token: Tensor,  # [V] int (NO_SUCCESSOR where unknown)
    start_token: int,
    n: int,
) -> Tensor:  # [<= n] int64
    """Follow the table from `start_token` for up to n steps, stopping at a token with no successor.

    Each step depends on the previous one, so this is a short walk (n is a draft length), not a
    tensor op; it runs on a Python list of the table made once per sequence.
    """
    table = next_token.tolist() if isinstance(next_token, Tensor) else next_token
    out: list[int] = []
    cur = start_token
    for _ in range(n):
        cur = table[cur] if 0 <= cur < len(table) else NO_SUCCESSOR
        if cur == NO_SUCCESSOR:
            break
        out.append(cur)
    return torch.tensor(out, dtype=torch.long)


def maxgram_continuation(
    ids: Tensor,  # [L] int64: the current text
    k: int,
    next_token: Tensor | list[int] | None = None,  # [V] bigram table; None = copy only, no fill
) -> Tensor:  # [<= k] int64
    """Max-Gram's proposal of up to k tokens after `ids` (see the module docstring)."""
    if k <= 0:
        return ids.new_empty(0)
    ids = ids.cpu()
    seq = ids
    copied = 0
    for _ in range(MAX_SEARCHES):
        if copied >= k:
            break
        n, start = longest_suffix_match(seq)
        if n == 0:
            break
        chunk = seq[start : start + k - copied]  # never empty: start <= len(seq) - 1
        seq = torch.cat([seq, chunk])
        copied += chunk.shape[0]
    proposal = seq[ids.shape[0] :]
    if copied < k and next_token is not None:
        proposal = torch.cat([proposal, bigram_chain(next_token, int(seq[-1]), k - copied)])
    return proposal
