"""High-level API: load a target (and drafter) once, then generate text with any method.

    from specdec import Pipeline
    pipe = Pipeline("qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct")
    result = pipe.generate("Write quicksort in Python.", method="sps", max_new_tokens=64)
    print(result.text, result.stats.tokens_per_s)

The command line, the benchmark and the server all go through this class.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specdec.cascade import make_csd_drafter
from specdec.decoder import DecodeStats, SpeculativeDecoder
from specdec.drafters import Drafter, ModelDrafter, PromptLookupDrafter, TreeDrafter
from specdec.lm import HFLanguageModel, LanguageModel
from specdec.maxgram import make_maxgram_drafter
from specdec.sampling import SamplingConfig
from specdec.sequoia import make_auto_drafter, make_sequoia_drafter
from specdec.specexec import make_specexec_drafter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_EXPANSION = (1, 1, 3, 1, 1, 1, 1, 1)  # SpecInfer's default ⟨1,1,3,1,1,1,1,1⟩


@dataclass(frozen=True)
class MethodInfo:
    name: str
    needs_draft_model: bool
    description: str
    make_drafter: Callable[["Pipeline", SamplingConfig, dict[str, Any]], Drafter | None]


def _no_drafter(pipe: "Pipeline", sampling: SamplingConfig, opts: dict[str, Any]) -> Drafter | None:
    return None


def _model_drafter(pipe: "Pipeline", sampling: SamplingConfig, opts: dict[str, Any]) -> Drafter:
    assert pipe.draft_lm is not None
    return ModelDrafter(pipe.draft_lm, sampling)


def _expansion(value: Any) -> list[int]:
    if value is None:
        return list(DEFAULT_EXPANSION)
    if isinstance(value, str):
        try:
            return [int(v) for v in value.replace(" ", "").strip("<>[]()").split(",") if v]
        except ValueError:
            raise ValueError(f"expansion must look like 1,1,3,1 (children per level), got {value!r}") from None
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _tree_drafter(pipe: "Pipeline", sampling: SamplingConfig, opts: dict[str, Any]) -> Drafter:
    return TreeDrafter(pipe.draft_lms, sampling, expansion=_expansion(opts.get("expansion")))


def _pld_drafter(pipe: "Pipeline", sampling: SamplingConfig, opts: dict[str, Any]) -> Drafter:
    return PromptLookupDrafter(max_ngram=int(opts.get("max_ngram", 3)), min_ngram=int(opts.get("min_ngram", 1)))


METHODS: dict[str, MethodInfo] = {
    "ar": MethodInfo("ar", False, "plain autoregressive decoding (the baseline)", _no_drafter),
    "sps": MethodInfo("sps", True, "classic speculative sampling with a draft model (Leviathan; Chen)", _model_drafter),
    "pld": MethodInfo("pld", False, "prompt lookup: n-gram copy from prompt + output, no draft model", _pld_drafter),
    "specinfer": MethodInfo(
        "specinfer", True,
        "SpecInfer token trees (--expansion, one or several --draft models merged), one-pass tree verification",
        _tree_drafter,
    ),
    # ---- cascade methods (issue 6: csd, maxgram) register below this line ----
    "csd": MethodInfo(
        "csd", True,
        "Cascade Speculative Drafting: --draft models (largest first) + Max-Gram review each other's drafts "
        "(--k-matrix, --lenience below the target, --no-maxgram)",
        make_csd_drafter,
    ),
    "maxgram": MethodInfo(
        "maxgram", False, "Max-Gram: longest earlier match of the text's suffix, then a bigram table; no draft model",
        make_maxgram_drafter,
    ),
    # ---- SpecExec / Sequoia methods (issue 7: specexec, sequoia) register below this line ----
    "specexec": MethodInfo(
        "specexec", True,
        "SpecExec: a best-first draft tree of up to --budget tokens (--max-depth, --max-beams, --branch-width), "
        "sample-and-match verification",
        make_specexec_drafter,
    ),
    "sequoia": MethodInfo(
        "sequoia", True,
        "Sequoia: a DP-optimal tree (--budget, --max-depth, --accept; --tree auto = the `specdec tune` winner), "
        "children drawn without replacement and SWOR-verified (--sequoia-mode greedy: top-k, sample-and-match)",
        make_sequoia_drafter,
    ),
    "auto": MethodInfo(
        "auto", True, "whatever `specdec tune` found fastest for this model pair, device, dtype and temperature "
        "(a Sequoia tree or no speculation)",
        make_auto_drafter,
    ),
}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: DecodeStats

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


def eos_ids(model: Any, tokenizer: "PreTrainedTokenizerBase | None") -> list[int]:
    """Every id that ends a generation: the generation config's EOS list plus the tokenizer's."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def check_same_tokenizer(target_tok: "PreTrainedTokenizerBase", draft_tok: "PreTrainedTokenizerBase") -> None:
    """Raise ValueError unless both tokenizers map every string to the same ids."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise ValueError(
            "the draft model's tokenizer differs from the target's; speculative decoding here needs "
            "identical vocabularies (pick a draft model from the target's family)"
        )


class Pipeline:
    """A target model, an optional draft model and their tokenizer, ready to generate."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        draft: str | list[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        draft_dtype: str | None = None,
        fast_linear: str = "auto",
        progress: bool = True,
    ) -> None:
        """Load the models.

        dtype: the target's dtype (and the draft's unless `draft_dtype` says otherwise).
        draft_dtype: None (same as the target), "float32", "bfloat16", "float16" or "int8"
            (dynamic int8 quantization of the draft's linears, CPU). The draft's precision only
            changes speed: every drafted token is verified against the target.
        fast_linear: "auto" (default), "on" or "off": prepacked oneDNN linears on the CPU
            (`specdec.fastpath`); same function up to float32 round-off.
        """
        from specdec.fastpath import enable_packed_linears, quantize_draft_int8
        from specdec.hub import load_model

        self.target_name, self.draft_name = target, draft
        target_model, self.tokenizer = load_model(target, dtype=dtype, device=device, progress=progress)
        self.fast_linears = enable_packed_linears(target_model, fast_linear)
        self.target_lm: LanguageModel = HFLanguageModel(target_model)
        self.eos_token_ids = eos_ids(target_model, self.tokenizer)
        if draft_dtype is not None and draft_dtype not in (*_DTYPES, "int8"):
            raise ValueError(f"draft dtype must be one of {', '.join((*_DTYPES, 'int8'))}, got {draft_dtype!r}")
        self.draft_lms: list[LanguageModel] = []
        for name in [draft] if isinstance(draft, str) else list(draft or []):
            int8 = draft_dtype == "int8"
            ddtype = dtype if draft_dtype in (None, "int8") else _DTYPES[draft_dtype]
            draft_model, draft_tok = load_model(name, dtype=torch.float32 if int8 else ddtype, device=device, progress=progress)
            check_same_tokenizer(self.tokenizer, draft_tok)
            if int8:
                draft_model = quantize_draft_int8(draft_model)
            else:
                enable_packed_linears(draft_model, fast_linear)
            draft_lm = HFLanguageModel(draft_model)
            if draft_lm.vocab_size != self.target_lm.vocab_size:
                raise ValueError(
                    f"draft model {name} has {draft_lm.vocab_size} output logits, target {self.target_lm.vocab_size}; "
                    "they must match"
                )
            self.draft_lms.append(draft_lm)
        self.draft_lm: LanguageModel | None = self.draft_lms[0] if self.draft_lms else None
        self.device = torch.device(device)

    @classmethod
    def from_models(
        cls,
        target_lm: LanguageModel,
        tokenizer: "PreTrainedTokenizerBase | None",
        draft_lm: LanguageModel | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> "Pipeline":
        """Wrap models that are already loaded (tests, custom models)."""
        pipe = cls.__new__(cls)
        pipe.target_name, pipe.draft_name = "custom", ("custom" if draft_lm is not None else None)
        pipe.target_lm, pipe.tokenizer, pipe.draft_lm = target_lm, tokenizer, draft_lm
        pipe.draft_lms = [draft_lm] if draft_lm is not None else []
        pipe.eos_token_ids = list(eos_token_ids or [])
        pipe.device = getattr(target_lm, "device", torch.device("cpu"))
        return pipe

    # ---- prompts -------------------------------------------------------------------------
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of a raw prompt, or of a user message rendered with the chat template."""
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer; pass token ids instead")
        if chat is None:
            chat = self.has_chat_template()
        if chat:
            if not self.has_chat_template():
                raise ValueError("the target's tokenizer has no chat template; use a raw prompt instead")
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- generation ----------------------------------------------------------------------
    def decoder(
        self, method: str = "sps", sampling: SamplingConfig = SamplingConfig(), gamma: int = 4, **opts: Any
    ) -> SpeculativeDecoder:
        info = METHODS.get(method)
        if info is None:
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
        if info.needs_draft_model and self.draft_lm is None:
            raise ValueError(f"method {method!r} needs a draft model (--draft)")
        drafter = info.make_drafter(self, sampling, opts)
        return SpeculativeDecoder(self.target_lm, drafter, sampling, gamma=gamma, eos_token_ids=self.eos_token_ids)

    def stream(
        self,
        prompt: str | list[int],
        method: str = "sps",
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        gamma: int = 4,
        seed: int | None = None,
        chat: bool | None = None,
        **opts: Any,
    ) -> tuple[SpeculativeDecoder, Iterator[list[int]]]:
        """The decoder (whose `last_stats` fill in as it runs) and an iterator of token chunks."""
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else list(prompt)
        dec = self.decoder(method, sampling, gamma, **opts)
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            # An unseeded run draws its seed without touching torch's global RNG.
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return dec, dec.stream(ids, max_new_tokens, generator)

    def generate(self, prompt: str | list[int], method: str = "sps", max_new_tokens: int = 128, **kw: Any) -> GenerationResult:
        dec, chunks = self.stream(prompt, method, max_new_tokens, **kw)
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk)
        assert dec.last_stats is not None
        return GenerationResult(self.decode(ids), ids, dec.last_stats)
