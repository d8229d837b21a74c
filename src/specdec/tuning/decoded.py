"""Pricing by decoding: drafters whose proposals depend on more than the text (Token Recycling learns
from the target's logits; a hybrid calls a draft model only where the free drafters fall short) are
run for real on the tune's prompts, and their steps are counted (docs/algorithms.md §7.7).

The run regenerates as many tokens as the acceptance run produced after each prompt, with the real
target, so its tokens per call are measured, not modelled; its draft time and its per-call work
beyond the target's forward (verification, the drafter's learning from the logits) are measured per
step, the first step left out (it carries the draft's pass over the prompt, which the cost model
prices once per step like every other candidate's catch-up).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from specdec.core.sampling import SamplingConfig
from specdec.drafting.base import Drafter
from specdec.engine.decoder import SpeculativeDecoder
from specdec.models.base import LanguageModel


@dataclass
class DecodeSteps:
    """What decoding the tune's prompts with one drafter did, step by step."""

    emitted: list[int] = field(default_factory=list)
    """Tokens each step emitted."""
    drafted: list[int] = field(default_factory=list)
    """Drafted tokens each step scored (the target's block is 1 + this)."""
    draft_ms: list[float] = field(default_factory=list)
    """The drafter's time per step, the first step of each prompt left out."""
    target_ms: list[float] = field(default_factory=list)
    """The target pass + verification + the drafter's feedback, per step, the first step left out."""
    timed_drafted: list[int] = field(default_factory=list)
    """`drafted` of the steps in `draft_ms` and `target_ms`."""

    @property
    def tokens_per_call(self) -> float:
        return sum(self.emitted) / max(len(self.emitted), 1)


def decode_run(target: LanguageModel, drafter: Drafter, texts: Sequence[tuple[int, Tensor]],
               sampling: SamplingConfig, eos_token_ids: Sequence[int] = (), seed: int = 0) -> DecodeSteps | None:
    """Decode each text's prompt with `drafter` for as many tokens as the text continues; None when
    no text continues."""
    dec = SpeculativeDecoder(target, drafter, sampling, eos_token_ids=eos_token_ids)
    out = DecodeSteps()
    gen = None if sampling.greedy else torch.Generator(device=target.device).manual_seed(seed)
    for prompt_len, ids in texts:
        length = int(ids.shape[0]) - prompt_len
        if length <= 0:
            continue
        first = True
        before = (0.0, 0)
        t_prev = time.perf_counter()
        for chunk in dec.stream(ids[:prompt_len], length, gen):
            st = dec.last_stats
            assert st is not None
            now = time.perf_counter()
            out.emitted.append(len(chunk))
            drafted = st.draft_tokens - before[1]
            out.drafted.append(drafted)
            if not first:
                draft = st.draft_s - before[0]
                out.draft_ms.append(draft * 1e3)
                out.target_ms.append((now - t_prev - draft) * 1e3)
                out.timed_drafted.append(drafted)
            first, before, t_prev = False, (st.draft_s, st.draft_tokens), now
    return out if out.emitted else None
