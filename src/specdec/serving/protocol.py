"""Request bodies of the OpenAI-compatible server (`specdec serve`), as pydantic models.

Validation is strict (a string is not a number, `true` is not an integer) and closed: a field
this server does not know is refused (`extra="forbid"`), and an OpenAI parameter it knows but
cannot honour (penalties, logprobs, tools, …) is accepted only at its neutral value, so a client
never gets an answer that silently ignored what it asked for. The server turns every
`ValidationError` into an OpenAI-style 400.

Needs pydantic (a FastAPI dependency, installed with `pip install 'specdec[server]'`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from specdec.engine.limits import SEED_BOUND
from specdec.methods.registry import all_methods

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256
"""Characters per stop string: the text held back while it might still become one is checked at
every step against each prefix of each stop string, so their length is work the client chooses."""

# OpenAI parameters the server cannot honour, with the values that ask for nothing (what a
# client sends when it fills in defaults). Anything else is refused with a clear message.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


def _check_neutral(value: Any, info: ValidationInfo) -> Any:
    name = info.field_name or "?"
    # Of the same type too: completions' `logprobs: 0` asks for the sampled token's log-probability,
    # although 0 == False.
    if not any(value == v and type(value) is type(v) for v in _NEUTRAL_VALUES[name]):
        raise ValueError(f"{name}={value!r} is not supported by this server (leave it out)")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    """Send one last chunk with `usage` (and no choices) before `data: [DONE]`."""


class SpeculativeOptions(BaseModel):
    """The request's `speculative` field: override the server's method and its options.

    Extra keys are the method's options (`gamma`, `max_ngram`, `expansion`, …); the server parses
    them with the chosen method's `Options` (names and values) when it prepares the request, and
    bounds what they draft per step by its --max-draft-tokens.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    method: str | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str | None) -> str | None:
        methods = all_methods()
        if value is not None and value not in methods:
            raise ValueError(f"unknown method {value!r}; choose one of: {', '.join(methods)}")
        return value

    def method_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class GenerationRequest(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    """The served model's id (GET /v1/models); None means the served model."""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    """Not in OpenAI's API (vLLM's extension): keep the k most likely tokens; 0 or -1 = off."""
    seed: int | None = Field(None, ge=0, lt=SEED_BOUND)
    stop: list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Informational only (OpenAI uses it for abuse monitoring); never changes the output."""
    speculative: SpeculativeOptions | None = None

    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError(f"stop must be a string or a list of up to {MAX_STOP_STRINGS} strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_LENGTH for s in value):
            raise ValueError(f"stop strings may have at most {MAX_STOP_LENGTH} characters, got one of "
                             f"{max(len(s) for s in value)}")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"n={value} is not supported: one choice per request (send separate requests)")
        return value

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias")
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_neutral(value, info)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_with_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value


class CompletionRequest(GenerationRequest):
    """POST /v1/completions: a raw prompt, no chat template."""

    prompt: str | list[int]
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        # OpenAI also takes a batch ([str, …] or [[int, …], …]); this server answers one prompt a request.
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            if len(value) != 1:
                raise ValueError(f"a batch of {len(value)} prompts is not supported: send one prompt per request")
            value = value[0]
        if not isinstance(value, (str, list)):
            raise ValueError("prompt must be a string or a list of token ids")
        return value

    @field_validator("best_of", "echo", "suffix", "logprobs")
    @classmethod
    def _neutral_completion(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_neutral(value, info)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = Field(None, validate_default=True)
    name: str | None = None
    """OpenAI's optional name of the participant: accepted and not used (`template_messages` gives
    the chat template each message's role and content only). Unbounded like `user`: the body limit
    caps it, and it costs no work."""

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any, info: ValidationInfo) -> Any:
        # An assistant turn may be empty (OpenAI's null content beside tool calls); any other has text.
        if value is None and info.data.get("role", "assistant") != "assistant":
            raise ValueError(f"a {info.data['role']} message needs its content")
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions: messages rendered with the target's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; both may be given only with the same value."""
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "response_format")
    @classmethod
    def _neutral_chat(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_neutral(value, info)

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_length(cls, value: int | None, info: ValidationInfo) -> int | None:
        given = info.data.get("max_tokens")
        if None not in (value, given) and value != given:
            raise ValueError(f"max_tokens ({given}) and max_completion_tokens ({value}) differ: send one of them")
        return value

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates take them (`developer` is OpenAI's new name for `system`)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages
        ]
