"""Building a decoder for a method: the one place where a method name, its options and `gamma`
become a drafter and a `SpeculativeDecoder` (used by `Pipeline.decoder` and the batch engine)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.base import MethodContext
from specdec.methods.registry import get_method


def build_decoder(
    ctx: MethodContext,
    method: str,
    sampling: SamplingConfig,
    gamma: int | None,
    opts: Mapping[str, Any],
    eos_token_ids: Sequence[int] = (),
) -> SpeculativeDecoder:
    """A decoder for `method` over the context's models (unknown or invalid options raise ValueError).

    gamma: the method's draft length where it has one (sps, pld, maxgram); for the others, a cap on
    the levels drafted per step.
    """
    m = get_method(method)
    if m.needs_draft_model and not ctx.drafts:
        raise ValueError(f"method {method!r} needs a draft model (--draft)")
    options = dict(opts)
    cap = None
    if gamma is not None:
        if "gamma" in m.options.names():
            options["gamma"] = gamma
        else:
            cap = gamma
    drafter = m.build(ctx, m.make_options(options))
    return SpeculativeDecoder(ctx.target, drafter, sampling, gamma=cap, eos_token_ids=eos_token_ids)
