"""Checks shared by several test files."""

from __future__ import annotations

import torch

from specdec.engine.decoder import SpeculativeDecoder


def stream_checking_caches(
    dec: SpeculativeDecoder, target, drafts: list, prompt: list[int], max_new_tokens: int, seed: int = 0
) -> list[int]:
    """Decode with toy models (`MarkovLM`) and, after every iteration, check that the target's and
    each drafter's caches hold exactly committed tokens: nothing speculative survives a commit."""
    committed = list(prompt)
    for chunk in dec.stream(prompt, max_new_tokens, torch.Generator().manual_seed(seed)):
        committed += chunk
        if dec.last_stats.stopped_by:
            break  # the last iteration may skip drafting and feedback
        assert target._tokens == committed[:-1]
        for lm in drafts:
            assert lm._tokens == committed[: lm.kv_len]
            assert lm.kv_len >= len(committed) - len(chunk)  # caught up before drafting, then kept what held
    return committed


def chi_square_of_decoder(
    dec: SpeculativeDecoder, target, sampling, eos: int | None, n: int, seed: int, max_tree_tokens: int | None = None,
    detects_tv: float | None = None,
) -> float:
    """Decode 3 tokens after `PROMPT` n times and return the chi-square p-value of the outputs
    against the target's exact distribution over 3-token continuations (toy `MarkovLM` target).

    `detects_tv`: the total variation the caller says the test detects with power ≥ 0.99 (checked
    against `detectable_effect` before decoding)."""
    from collections import Counter

    from tests.engine.test_distribution import PROMPT, chi_square_pvalue, detectable_effect, exact_continuations

    expected = exact_continuations(target, sampling, eos)
    if detects_tv is not None:
        power = detectable_effect(n, expected)
        assert power.tv <= detects_tv, f"n = {n} detects only TV >= {power.tv:.3f}, not {detects_tv}"

    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    accepted = 0
    for _ in range(n):
        out, stats = dec.generate(PROMPT, 3, gen)
        counts[tuple(out)] += 1
        accepted += stats.accepted_tokens
        assert 1 <= stats.target_calls <= stats.new_tokens
        assert max_tree_tokens is None or stats.tree_tokens <= max_tree_tokens
    assert accepted > 0.2 * n, "drafts were rarely accepted: the test would not exercise verification"
    return chi_square_pvalue(counts, expected, n)
