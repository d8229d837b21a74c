"""`ar`: plain autoregressive decoding, the baseline. It runs through the same decoding loop with
no drafter (one target call per token), so AR and speculative runs share every piece of code but
the draft."""

from __future__ import annotations

from dataclasses import dataclass

from specdec.core.options import MethodOptions
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register


@dataclass(frozen=True)
class Options(MethodOptions):
    """Plain decoding has no options."""

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return 0


def build(ctx: MethodContext, opts: Options) -> None:
    return None


METHOD = register(Method("ar", "plain autoregressive decoding (the baseline)", Options, build, list_rank=0,
                         tuning=TuningSpace("plain")))
