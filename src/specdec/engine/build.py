"""Building a decoder for a method: the one place where a method name and its options become a
drafter and a `SpeculativeDecoder` (used by `Pipeline.decoder` and the batch engine)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from specdec.core.options import MethodOptions, format_option_value
from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.base import MethodContext
from specdec.methods.registry import get_method


def describe_options(options: MethodOptions, names: Iterable[str]) -> str:
    """"gamma=100000" or "budget=512, max_depth=6": the options behind a size, for error messages."""
    values = options.to_dict()
    return ", ".join(f"{n}={format_option_value(values[n])}" for n in names if n in values)


SIZE_OPTIONS = ("gamma", "budget", "expansion", "k_matrix")
"""The options that set how many tokens a step drafts (named in the errors about it)."""


def check_draft_fits(method: str, options: MethodOptions, num_drafts: int, context_length: int) -> None:
    """ValueError, before any drafter is built, when one step would draft more tokens than the
    target's context can hold beside a prompt token and a new one (building such a drafter can
    itself be the expensive part: Sequoia's DP grows with the square of its budget)."""
    drafted = options.draft_tokens_per_step(num_drafts)
    if drafted is not None and drafted + 3 > context_length:
        raise ValueError(
            f"{describe_options(options, SIZE_OPTIONS)}: {method} would draft up to {drafted} tokens per step, "
            f"which leaves no room in the target's context of {context_length} tokens; ask for fewer"
        )


def parse_options(method: str, options: MethodOptions | Mapping[str, Any]) -> MethodOptions:
    """`method`'s options: as given when already parsed, else parsed from user-given values
    (unknown or invalid ones raise ValueError)."""
    m = get_method(method)
    if isinstance(options, MethodOptions):
        if not isinstance(options, m.options):
            raise ValueError(f"{type(options).__name__} are not the options of method {method!r}")
        return options
    return m.make_options(dict(options))


def build_decoder(
    ctx: MethodContext,
    method: str,
    sampling: SamplingConfig,
    options: MethodOptions | Mapping[str, Any],
    eos_token_ids: Sequence[int] = (),
) -> SpeculativeDecoder:
    """A decoder for `method` over the context's models, with its options parsed (`MethodOptions`)
    or as a user gives them (unknown or invalid options raise ValueError)."""
    m = get_method(method)
    if m.needs_draft_model and not ctx.drafts:
        raise ValueError(f"method {method!r} needs a draft model (--draft)")
    made = parse_options(method, options)
    check_draft_fits(method, made, len(ctx.drafts), ctx.target.context_length)
    drafter = m.build(ctx, made)
    return SpeculativeDecoder(ctx.target, drafter, sampling, eos_token_ids=eos_token_ids)
