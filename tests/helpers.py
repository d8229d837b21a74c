"""Checks shared by several test files."""

from __future__ import annotations

import torch

from specdec.decoder import SpeculativeDecoder


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
