"""What a method is: a name, its options, how it builds a drafter from a small context, and what it
declares for the lists the rest of the package derives from the registry (listing order, tuning
candidates, test fixtures)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
class TuneSetting:
    """What the quick tune can offer a method's candidates on this machine."""

    bigram_cached: bool = False
    """Whether Max-Gram's bigram table is cached for the target's tokenizer (a tune never builds one:
    that takes a while; without it Max-Gram candidates copy from the context only)."""


Candidates = Callable[[TuneSetting], Sequence[Mapping[str, Any]]]
"""The option sets (as `Method.make_options` takes them) that the quick tune prices for a method."""


@dataclass(frozen=True)
class TuningSpace:
    """What `specdec tune --quick` and `auto`'s first use price for a method: its candidate option
    sets and the rule that knows their tokens per call on the one cost model (`tuning.pricing`
    implements each rule; a new method names the rule that fits how it drafts):

    - "plain": no drafts (the baseline row, measured);
    - "chain": a draft model's chain (`gamma`, `stop_below`), from the measured chain acceptance;
    - "tree-dp": Sequoia's DP trees (`budget`, `max_depth`: every depth up to it), per mode;
    - "static-tree": a static shape (`expansion`), from the positional acceptance vector;
    - "cascade": a draft model over Max-Gram (`k_matrix`), replayed;
    - "replay": a model-free deterministic drafter (chain or tree), built from the options and
      replayed on the text the target produced (exact for its acceptance);
    - "decode": a drafter whose proposals depend on more than the text (one that learns from the
      target's logits, or calls a draft model only sometimes), run for real on the tune's prompts
      (`tuning.decoded`): tokens per call and its own time measured.
    """

    rule: str
    candidates: Candidates = lambda setting: ({},)


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
    list_rank: int = 50
    """Where lists show the method (`--help`, `/v1/models`, the tune's table): ascending, ties by name."""
    tuning: TuningSpace | None = None
    """The candidates the quick tune prices for this method (None: never a tune candidate)."""
    examples: tuple[Mapping[str, Any], ...] | None = ({},)
    """Small option sets the every-method tests run this method with (tiny models without a
    tokenizer, one or two draft models, a few drafted tokens per step), each as
    `Method.make_options` takes them. None: the method decodes by a tune profile, which those
    tests write for it (`auto`)."""

    @property
    def loads_draft_model(self) -> bool:
        return self.needs_draft_model if self.wants_draft_model is None else self.wants_draft_model

    def make_options(self, values: Mapping[str, Any] | None = None) -> MethodOptions:
        return self.options.from_mapping(values, self.name)

    def own_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options in `given` that this method has. The command line, the server and the bench
        each take one set of option values for several methods (`--gamma 6`, a server's defaults,
        `--opt budget=16`): every method gets the ones it has, and only those."""
        names = self.options.names()
        return {name: value for name, value in given.items() if name in names}
