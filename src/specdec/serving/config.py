"""What `specdec serve` gives a request that does not say otherwise, and its limits: one
`ServerConfig`, checked once when the server starts (before any model loads, from the command line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specdec.core.options import OptionSpec
from specdec.core.sampling import SamplingConfig
from specdec.engine.build import SIZE_OPTIONS, describe_options
from specdec.engine.limits import DEFAULT_PREFIX_CACHE_MB, BatchLimits
from specdec.methods import DEFAULT_METHOD
from specdec.methods.registry import all_methods, get_method
from specdec.serving.guards import ServerLimits

DEFAULT_TEMPERATURE = 1.0
"""What a request that leaves `temperature` out samples at: OpenAI's default."""
SERVER_BATCH_DEFAULTS = {"adaptive": True, "prefix_cache_mb": DEFAULT_PREFIX_CACHE_MB}
"""Where the server's batching differs from `BatchLimits`' library defaults: speculation adapts to the
load (never slower than plain decoding) and shared prompt prefixes are reused."""


@dataclass
class ServerConfig:
    """What a request gets when it does not say otherwise, and the server's limits."""

    model_name: str = "specdec"
    default_method: str = DEFAULT_METHOD
    default_opts: dict[str, Any] = field(default_factory=dict)
    """Method options (as `Method.make_options` takes them, `gamma` among them): each applies to the
    methods that have it. They may name files (`tree=PROFILE.json`); requests may not."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=DEFAULT_TEMPERATURE))
    """temperature, top_p and top_k for requests that leave them out (a request's own values win)."""
    max_tokens: int = 128
    """max_tokens when a request leaves it out (within the limit, checked at start; cut to the room a
    long prompt leaves in the context)."""
    seed: int | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    batch: BatchLimits = field(default_factory=lambda: BatchLimits(**SERVER_BATCH_DEFAULTS))
    api_key: str | None = None
    """When set, every route but /health and /metrics needs `Authorization: Bearer <api_key>`."""

    def options_for(self, method: str) -> dict[str, Any]:
        """The server's default options that `method` has: a default set for one method never reaches
        another that lacks it (`--max-ngram` does not break a request for sps)."""
        return get_method(method).own_options(self.default_opts)

    def check(self, num_drafts: int | None = None) -> None:
        """ValueError unless the defaults can serve: a known method, positive max tokens within the
        limit, a non-empty key, every default option taken by some method and the default method's share
        taken as a whole; with `num_drafts` (once the models are known), the default method's
        drafts within the cap. Checked once, so that a mistyped default is not a 400 on every request."""
        get_method(self.default_method)  # ValueError: unknown method
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"--max-new-tokens must be a positive integer, got {self.max_tokens!r}")
        limit = self.limits.max_tokens_limit
        if limit is not None and self.max_tokens > limit:
            raise ValueError(f"--max-new-tokens {self.max_tokens} is above --max-tokens-limit {limit}: a request "
                             "that left max_tokens out would be refused its default; lower it or raise the limit")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")
        check_default_options(self.default_opts)
        options = get_method(self.default_method).make_options(self.options_for(self.default_method))
        drafted = options.draft_tokens_per_step(num_drafts) if num_drafts is not None else None
        if drafted is not None and drafted > self.limits.max_draft_tokens:
            raise ValueError(
                f"the default method {self.default_method} ({describe_options(options, SIZE_OPTIONS)}) drafts up to "
                f"{drafted} tokens per step, more than --max-draft-tokens ({self.limits.max_draft_tokens}); raise it "
                "or ask for fewer"
            )
        self._check_kv_budget(drafted or 0)

    def _check_kv_budget(self, drafted: int) -> None:
        """ValueError when the KV budget cannot hold a request of the default length (a 1-token prompt,
        the answer, a step's block: the pending token and the default method's drafts)."""
        kv, need = self.batch.max_kv_tokens, self.max_tokens + 2 + drafted
        if kv is not None and kv < need:
            raise ValueError(f"the KV budget of {kv} tokens (--max-kv-tokens) cannot hold a request of the default "
                             f"length: --max-new-tokens {self.max_tokens} after a 1-token prompt with "
                             f"{self.default_method}'s drafts needs {need}; raise the budget or lower --max-new-tokens")


def check_default_options(default_opts: dict[str, Any]) -> None:
    """ValueError unless every default option is an option of some method whose parser takes its
    value (a value only some methods take, `tree=dp`: sequoia, not auto, is left to the requests
    that pick one)."""
    declared: dict[str, list[OptionSpec]] = {}
    for m in all_methods().values():
        for spec in m.options.specs():
            declared.setdefault(spec.name, []).append(spec)
    for name, value in default_opts.items():
        if name not in declared:
            raise ValueError(f"{name!r} is not an option of any method")
        if value is None:
            continue
        problems = []
        for spec in declared[name]:
            try:
                if spec.parse is not None:
                    spec.parse(value)
                break
            except (TypeError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
        else:
            raise ValueError(problems[0])
