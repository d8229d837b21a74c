"""Replaying deterministic drafters on text the target produced: their tokens per call, without
running the target again.

A deterministic drafter (prompt lookup, Max-Gram, the cascade's chain) proposes a function of the
text so far, and sample-and-match (greedy at T = 0) accepts its drafts while they equal the
target's own draws. Text that lossless decoding produced *is* a sequence of target draws, and the
position of every step (the previous step's position + accepted + 1) depends only on the text
before it. So walking the text — propose from text[:s], accept the longest prefix equal to
text[s:], jump past it and the target's own token — gives accepted counts with exactly the
distribution the real method has, at any temperature (docs/algorithms.md §13).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.tree import TokenTree, tree_walk

Propose = Callable[[Tensor], "Tensor | TokenTree"]
"""text so far ([s] int64) -> the drafter's proposal: a chain ([<= γ] int64) or a token tree."""


@dataclass
class ReplayStep:
    proposed: int
    accepted: int


def common_prefix(a: Tensor, b: Tensor) -> int:  # a: [A], b: [B] int64
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def replay(texts: Sequence[tuple[int, Tensor]], propose: Propose,
           start: Callable[[Tensor, int], None] | None = None) -> list[ReplayStep]:
    """Every step a deterministic drafter would take on each text ((prompt length, [L] ids)); the
    last token of each text is never a step's start (there is nothing after it to compare).
    `start(prompt, length)` runs before each text, as a decoder starts its drafter."""
    steps: list[ReplayStep] = []
    for prompt_len, ids in texts:
        if start is not None:
            start(ids[:prompt_len], ids.shape[0])
        s = prompt_len  # ids[s] is the first token to predict; ids[:s] is what the drafter sees
        while s < ids.shape[0]:
            draft = propose(ids[:s])
            if isinstance(draft, TokenTree):
                n, proposed = tree_walk(draft, ids[s:]), draft.num_drafted
            else:
                n, proposed = common_prefix(draft, ids[s:]), int(draft.shape[0])
            steps.append(ReplayStep(proposed, n))
            s += n + 1
    return steps


def cascade_replay(
    texts: Sequence[tuple[int, Tensor]],
    draft_pred: Sequence[Tensor],  # per text: [L] the draft's argmax after each prefix text[: i + 1]
    k_matrix: Sequence[Sequence[int]],  # 2 x 2: one draft model above Max-Gram
    maxgram: Callable[[Tensor, int], Tensor],  # (text, k) -> Max-Gram's proposal
) -> list[tuple[ReplayStep, int]]:
    """The cascade (one draft model + Max-Gram, lenience 1): per step its replay and the draft's
    forward passes (reviews).

    With lenience 1 a review keeps exactly the tokens equal to the reviewer's argmax, so the top
    row's first K[0][0] tokens are the draft's greedy chain and the next K[0][1] are Max-Gram's,
    whatever the reviews looked like; acceptance is replayed exactly. The reviews' count is an
    estimate: along the text the draft's argmax is known (`draft_pred`), and each review of a
    K[1][1]-token Max-Gram chunk yields the chunk's prefix the draft agrees with plus its own token;
    once the draft's chain has left the text, reviews are counted as yielding one token.
    """
    (k00, k01), (_, k11) = k_matrix
    out: list[tuple[ReplayStep, int]] = []
    for (prompt_len, ids), pred in zip(texts, draft_pred):
        s = prompt_len
        while s < ids.shape[0]:
            # The draft's greedy chain from s, as far as it stays on the text.
            on_path = 0
            while on_path < k00 and s + on_path < ids.shape[0] and int(pred[s + on_path - 1]) == int(ids[s + on_path]):
                on_path += 1
            accepted = on_path
            if on_path == k00:
                mg = maxgram(ids[: s + k00], k01)
                accepted += common_prefix(mg, ids[s + k00 :])
            # Reviews the draft needs for its k00 tokens.
            reviews, made = 0, 0
            while made < k00:
                reviews += 1
                pos = s + made
                if made < on_path:  # on the text: Max-Gram's chunk is kept while it matches the draft
                    chunk = maxgram(ids[:pos], k11)
                    agree = 0
                    while agree < chunk.shape[0] and pos + agree < ids.shape[0] and \
                            int(chunk[agree]) == int(pred[pos + agree - 1]) and agree < on_path - made:
                        agree += 1
                    made += agree + 1
                else:
                    made += 1
            out.append((ReplayStep(k00 + k01, accepted), reviews))
            s += accepted + 1
    return out


def mean(values: Sequence[float]) -> float:
    return float(torch.tensor(list(values), dtype=torch.float64).mean()) if values else 0.0
