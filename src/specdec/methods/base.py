"""What a method is: a name, its options, and how it builds a drafter from a small context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from specdec.core.options import MethodOptions
from specdec.core.sampling import SamplingConfig
from specdec.drafting.base import Drafter
from specdec.models.base import LanguageModel


@dataclass(frozen=True)
class MethodContext:
    """What a method may use to build its drafter: the models, the sampling and the tokenizer.

    Methods never see the `Pipeline`, the command line or the server.
    """

    target: LanguageModel
    drafts: Sequence[LanguageModel] = ()
    """Draft models in the order the user gave them (largest first for cascades)."""
    sampling: SamplingConfig = SamplingConfig()
    tokenizer: Any = None
    profile_key: dict[str, Any] | None = None
    """The key of this setting's tune profile (target, draft, device, dtype, temperature), when known."""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    """One line for `--help`, `/v1/models` and the README."""
    options: type[MethodOptions]
    build: Callable[[MethodContext, Any], Drafter | None]
    """(context, options) -> the drafter, or None for plain decoding."""
    needs_draft_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def make_options(self, values: dict[str, Any] | None = None) -> MethodOptions:
        return self.options.from_mapping(values, self.name)
