"""High-level API: load a target (and drafters) once, then generate text with any registered method.

    from specdec import Pipeline
    pipe = Pipeline("qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct")
    result = pipe.generate("Write quicksort in Python.", method="sps", max_new_tokens=64)
    print(result.text, result.stats.tokens_per_s)
    results = pipe.generate_batch(["Write quicksort.", "Explain RoPE."], method="sps", max_new_tokens=64)

The command line, the benchmark, the tuner and the server all go through this class. Methods are
found only through the registry (`methods.registry`): a method gets a `MethodContext` (models,
sampling, tokenizer) and its parsed `Options`, never the pipeline.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specdec.core.sampling import SamplingConfig
from specdec.core.store import profile_key
from specdec.engine.batch import (
    DEFAULT_MAX_BATCH_SIZE, DEFAULT_PREFILL_CHUNK, DEFAULT_SPEC_DISABLE_BATCH_SIZE, BatchEngine, BatchRequest, StepEvent,
)
from specdec.engine.build import build_decoder
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.stats import DecodeStats
from specdec.engine.text import TextAssembler
from specdec.methods.base import MethodContext
from specdec.models.base import LanguageModel
from specdec.models.hf import HFLanguageModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        offload: bool = False,
        progress: bool = True,
    ) -> None:
        """Load the models.

        dtype: the target's dtype (and the draft's unless `draft_dtype` says otherwise).
        draft_dtype: None (same as the target), "float32", "bfloat16", "float16" or "int8"
            (dynamic int8 quantization of the draft's linears, CPU). The draft's precision only
            changes speed: every drafted token is verified against the target.
        fast_linear: "auto" (default), "on" or "off": prepacked oneDNN linears on the CPU
            (`models.fastpath`); same function up to float32 round-off.
        offload: keep the target's weights in CPU RAM and stream them to the GPU layer by layer
            (`models.offload`; CUDA only). Every method of this pipeline then sees that target.
        """
        from specdec.models.fastpath import enable_packed_linears, quantize_draft_int8
        from specdec.models.hub import load_model
        from specdec.models.offload import offload_target

        self.target_name, self.draft_name = target, draft
        target_model, self.tokenizer = load_model(target, dtype=dtype, device=device, progress=progress)
        self.fast_linears = enable_packed_linears(target_model, fast_linear)
        self.target_lm: LanguageModel = HFLanguageModel(target_model)
        if offload:
            offload_target(self.target_lm, device)
        self.eos_token_ids = eos_ids(target_model, self.tokenizer)
        if draft_dtype is not None and draft_dtype not in (*DTYPES, "int8"):
            raise ValueError(f"draft dtype must be one of {', '.join((*DTYPES, 'int8'))}, got {draft_dtype!r}")
        self.draft_lms: list[LanguageModel] = []
        for name in [draft] if isinstance(draft, str) else list(draft or []):
            int8 = draft_dtype == "int8"
            ddtype = dtype if draft_dtype in (None, "int8") else DTYPES[draft_dtype]
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
        self.dtype = dtype

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
        pipe.dtype = getattr(target_lm, "dtype", torch.float32)
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
    def context(self, sampling: SamplingConfig = SamplingConfig()) -> MethodContext:
        """What a method sees of this pipeline."""
        return MethodContext(self.target_lm, tuple(self.draft_lms), sampling, self.tokenizer,
                             self.profile_key(sampling))

    def profile_key(self, sampling: SamplingConfig) -> dict[str, Any] | None:
        """The key of the tune profile for this pipeline at `sampling` (None: no single named draft)."""
        drafts = [self.draft_name] if isinstance(self.draft_name, str) else list(self.draft_name or [])
        if len(drafts) != 1:
            return None
        dtype = str(self.dtype).replace("torch.", "")
        return profile_key(self.target_name, drafts[0], torch.device(self.device).type, dtype, sampling.temperature)

    def decoder(
        self, method: str = "sps", sampling: SamplingConfig = SamplingConfig(), gamma: int | None = None, **opts: Any
    ) -> SpeculativeDecoder:
        """A decoder for `method` with its options (unknown or invalid options raise ValueError).

        gamma: the method's draft length where it has one (sps, pld, maxgram); for the others, a
        cap on the levels drafted per step.
        """
        return build_decoder(self.context(sampling), method, sampling, gamma, opts, self.eos_token_ids)

    def stream(
        self,
        prompt: str | list[int],
        method: str = "sps",
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        gamma: int | None = None,
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

    # ---- many requests at once ---------------------------------------------------------------
    def batch_engine(
        self,
        *,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_kv_tokens: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        spec_disable_batch_size: int | None = DEFAULT_SPEC_DISABLE_BATCH_SIZE,
    ) -> BatchEngine:
        """A continuous-batching engine over this pipeline's models (`engine.batch`): submit
        `BatchRequest`s with any mix of methods, options and sampling, then `step()`."""
        return BatchEngine(
            self.target_lm, self.draft_lms, tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids,
            profile_key=self.profile_key, max_batch_size=max_batch_size, max_kv_tokens=max_kv_tokens,
            prefill_chunk=prefill_chunk, spec_disable_batch_size=spec_disable_batch_size,
        )

    def generate_batch(
        self,
        prompts: Sequence[str | list[int]],
        method: str = "sps",
        max_new_tokens: int | Sequence[int] = 128,
        *,
        sampling: SamplingConfig = SamplingConfig(),
        gamma: int | None = None,
        seed: int | Sequence[int | None] | None = None,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_kv_tokens: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        spec_disable_batch_size: int | None = DEFAULT_SPEC_DISABLE_BATCH_SIZE,
        **opts: Any,
    ) -> list[GenerationResult]:
        """Generate for every prompt, up to `max_batch_size` at a time with continuous batching.

        Result i is what `generate(prompts[i], method, max_new_tokens[i], sampling=…, seed=seed[i])`
        gives (token for token when greedy; for a seeded sampled request while the batch stays at or
        below `spec_disable_batch_size`), except that the timings are those of the shared steps.
        `stop`: strings that end a completion (the text stops before the first; `stopped_by` "stop").
        """
        n = len(prompts)
        news = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        seeds = list(seed) if isinstance(seed, Sequence) else [seed] * n
        if len(news) != n or len(seeds) != n:
            raise ValueError(f"give one max_new_tokens and one seed per prompt ({n}), or one for all")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this pipeline has none")
        requests = [
            BatchRequest(self.encode(p, chat) if isinstance(p, str) else list(p), k, method, dict(opts), sampling,
                         gamma, s)
            for p, k, s in zip(prompts, news, seeds)
        ]
        engine = self.batch_engine(max_batch_size=max_batch_size, max_kv_tokens=max_kv_tokens,
                                   prefill_chunk=prefill_chunk, spec_disable_batch_size=spec_disable_batch_size)
        cleans = bool(getattr(self.tokenizer, "clean_up_tokenization_spaces", False))
        texts: dict[int, TextAssembler] = {}

        def watch_stops(event: StepEvent) -> None:
            text = texts.setdefault(event.request_id, TextAssembler(self.decode, list(stop), cleans))
            if event.tokens and text.push(event.tokens)[1]:
                engine.abort(event.request_id)
                if event.stats is not None:
                    event.stats.stopped_by = "stop"

        outs = engine.run_all(requests, watch_stops if stop else None)
        results = []
        for rid, (ids, stats, finished) in enumerate(outs):
            assert stats is not None
            if rid in texts and stats.stopped_by == "stop":
                ids = ids[: texts[rid].completion_tokens]
                results.append(GenerationResult(texts[rid].released, ids, stats))
            else:
                results.append(GenerationResult(self.decode(ids), ids, stats))
        return results
