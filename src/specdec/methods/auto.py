"""`auto`: whatever `specdec tune` found fastest for this model pair, device, dtype and temperature —
a Sequoia tree, or no speculation at all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specdec.core.options import MethodOptions, choice, option
from specdec.methods.base import Method, MethodContext
from specdec.methods.registry import register
from specdec.methods.sequoia import MODES, SequoiaDrafter, parse_tree, tuned_drafter, tuned_profile


@dataclass(frozen=True)
class Options(MethodOptions):
    tree: str = option("auto", "auto (the tuned profile for this setting) or a tune profile .json", parse_tree,
                       metavar="auto|PROFILE.json", file_path=True, symbols=("auto", "dp"))
    sequoia_mode: str | None = option(None, "override the tuned tree's mode (swor or greedy)", choice(*MODES),
                                      choices=MODES)

    def draft_tokens_per_step(self, num_drafts: int = 1) -> None:
        return None  # the tuned tree's size is in its profile, which the operator chose


def build(ctx: MethodContext, opts: Options) -> SequoiaDrafter | None:
    profile: dict[str, Any] = tuned_profile(ctx, opts.tree)
    return tuned_drafter(ctx, profile, opts.sequoia_mode)


METHOD = register(Method(
    "auto",
    "whatever `specdec tune` found fastest for this model pair, device, dtype and temperature "
    "(a Sequoia tree or no speculation)",
    Options, build, needs_draft_model=True,
))
