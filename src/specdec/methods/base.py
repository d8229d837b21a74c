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
    """The key of this setting's tune profile (`core.store.profile_key`), when known."""
    tuner: Callable[[str], dict[str, Any]] | None = None
    """Tunes this setting and returns the saved profile, given why no usable profile exists (the
    pipeline supplies it when a tuner is registered; `auto` calls it). None: report the problem."""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    """One line for `--help`, `/v1/models` and the README."""
    options: type[MethodOptions]
    build: Callable[[MethodContext, Any], Drafter | None]
    """(context, options) -> the drafter, or None for plain decoding."""
    needs_draft_model: bool = False
    wants_draft_model: bool | None = None
    """Whether front ends load a draft model for this method (default: `needs_draft_model`); `auto`
    works without one but uses one when it can."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loads_draft_model(self) -> bool:
        return self.needs_draft_model if self.wants_draft_model is None else self.wants_draft_model

    def make_options(self, values: dict[str, Any] | None = None) -> MethodOptions:
        return self.options.from_mapping(values, self.name)
