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

import functools
import importlib
import os
import secrets
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specdec.core.hardware import check_device
from specdec.core.sampling import SamplingConfig
from specdec.core.store import CUSTOM_MODELS, profile_key
from specdec.engine.batch import (
    DEFAULT_MAX_BATCH_SIZE, DEFAULT_PREFILL_CHUNK, DEFAULT_SPEC_DISABLE_BATCH_SIZE, BatchEngine, BatchRequest, StepEvent,
)
from specdec.engine.build import build_decoder
from specdec.engine.decoder import SpeculativeDecoder, prompt_tensor
from specdec.engine.limits import check_max_new_tokens, check_seed, context_overflow
from specdec.engine.stats import DecodeStats
from specdec.engine.text import TextAssembler
from specdec.methods import DEFAULT_METHOD
from specdec.methods.auto import Planned, planned_request, planner_adapts
from specdec.methods.base import MethodContext
from specdec.methods.registry import get_method
from specdec.models.backends import DTYPES, LoadedModel, choose_weights, eos_ids
from specdec.models.base import LanguageModel
from specdec.models.batch import SerialModel
from specdec.models.hub.registry import DEFAULT_TARGET, check_known_pair, default_draft

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_DRAFT = default_draft(DEFAULT_TARGET)

Tuner = Callable[["Pipeline", SamplingConfig, str], dict[str, Any]]
"""(pipeline, sampling, why no usable profile exists) -> the new profile, saved. Registered by the
tuning layer (`tuning.autotune`), which sits above this one."""
_TUNERS: list[Tuner] = []
TUNER_ENTRY = "specdec.tuning.autotune"
"""The module that registers the first-use tuner when imported: named here, not imported (its
layer sits above this one), and imported the first time a tuner is asked for, so this module
tunes on first use however it was imported."""

_MAILBOXES: "weakref.WeakKeyDictionary[BatchEngine, dict[int, deque[StepEvent]]]" = weakref.WeakKeyDictionary()
"""The events of the auto streams open on a one-sequence engine, by request id, until each stream reads them."""


def register_tuner(tuner: Tuner) -> None:
    """Make `tuner` the one `auto` uses when a setting has no usable profile (the latest wins)."""
    _TUNERS[:] = [tuner]


def registered_tuner() -> Tuner | None:
    if not _TUNERS:
        importlib.import_module(TUNER_ENTRY)  # registers its tuner
    return _TUNERS[0] if _TUNERS else None


def autotune_enabled() -> bool:
    """`SPECDEC_AUTOTUNE=0` turns auto's tune-on-first-use off (it then reports the missing profile)."""
    return os.environ.get("SPECDEC_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: DecodeStats

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


def check_same_tokenizer(
    target_tok: "PreTrainedTokenizerBase", draft_tok: "PreTrainedTokenizerBase", draft_name: str = ""
) -> None:
    """Raise ValueError unless both tokenizers map every string to the same ids."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        which = f"the draft model {draft_name}'s" if draft_name else "the draft model's"
        raise ValueError(
            f"{which} tokenizer differs from the target's; speculative decoding here needs "
            "identical vocabularies (pick a draft model from the target's family)"
        )


def _progress_printer(progress: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr)

    return say


def _many(value: object) -> bool:
    """Whether a per-prompt argument was given as one value per prompt (a list), not one for all."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _check_stops(stop: object) -> None:
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Sequence):
        raise TypeError(f"stop must be a list of strings, got {type(stop).__name__} (one string: stop=[{stop!r}])")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"every stop string must be a non-empty string, got {s!r}")


def _check_sampling(sampling: object) -> None:
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig (e.g. SamplingConfig(temperature=0.7)), got "
                        f"{type(sampling).__name__}")


def check_text(text: str, what: str = "the prompt") -> None:
    """ValueError unless `text` is not empty and can be encoded as UTF-8, which tokenizers need.
    Empty, a chat prompt would still render a turn with no text to continue. Bytes that are not
    UTF-8 on the command line reach Python as lone surrogates (U+DC80…U+DCFF), and so does an
    unpaired \\ud800-style escape in JSON."""
    if not text:
        raise ValueError(f"{what} is empty: give the text to continue")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        detail = (f"byte 0x{code - 0xDC00:02x} at character {exc.start}" if 0xDC80 <= code <= 0xDCFF
                  else f"it holds an unpaired surrogate U+{code:04X} at character {exc.start}")
        raise ValueError(f"{what} is not valid UTF-8 text: {detail}") from None


def _check_load_options(*, weights: str, draft_weights: str, draft_dtype: str | None, draft_vocab: int | str | None,
                        tensor_parallel_size: int, offload: bool, row_invariant: str, draft_quant: str = "auto",
                        dtype: torch.dtype = torch.float32) -> None:
    """Refuse combinations that cannot load, before anything is read (one line each)."""
    from specdec.models.backends import DRAFT_QUANTS, DTYPES, WEIGHTS
    from specdec.models.dense.draft_precision import DRAFT_PRECISIONS

    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of torch.{', torch.'.join(DTYPES)}, got {dtype!r}")
    if weights == "native" and dtype != torch.float32:
        raise ValueError(f"--weights native computes in float32 on the GGUF blocks; --dtype {str(dtype)[6:]} "
                         "applies to dense weights (pass --weights dense, or drop --dtype)")

    for name, value in (("weights", weights), ("draft weights", draft_weights)):
        if value not in WEIGHTS:
            raise ValueError(f"{name} must be one of {', '.join(WEIGHTS)}, got {value!r}")
    choices = (*DRAFT_PRECISIONS, "auto")
    if draft_dtype is not None and draft_dtype not in choices:
        raise ValueError(f"draft dtype must be one of {', '.join(choices)}, got {draft_dtype!r}")
    if draft_quant not in DRAFT_QUANTS:
        raise ValueError(f"draft quant must be one of {', '.join(DRAFT_QUANTS)}, got {draft_quant!r}")
    if draft_quant not in ("auto", "file") and (draft_weights == "dense" or draft_dtype not in (None, "auto", "float32")):
        raise ValueError(f"--draft-quant {draft_quant} requantizes a native draft's GGUF blocks; a dense draft takes "
                         "--draft-dtype instead")
    if row_invariant not in ("auto", "on", "off"):
        raise ValueError(f"row_invariant must be auto, on or off, got {row_invariant!r}")
    from specdec.drafting.vocab import resolve_draft_vocab

    resolve_draft_vocab(draft_vocab, 1 << 20)  # refuses what is neither a count nor "auto"
    if draft_weights == "native" and draft_dtype not in (None, "auto", "float32"):
        raise ValueError(
            f"--draft-dtype {draft_dtype} changes a dense draft; with native draft weights the draft already "
            "computes on its GGUF blocks (drop --draft-dtype, or pass --draft-weights dense)"
        )
    if tensor_parallel_size != 1 and weights == "native":
        raise ValueError("--weights native and --tensor-parallel-size do not combine (the native blocks are not "
                         "sharded); use --weights dense to shard the target")
    if offload and weights == "native":
        raise ValueError("--offload streams dense weights to a GPU; native weights compute on the CPU (use "
                         "--weights dense)")
    if tensor_parallel_size != 1 and offload:
        raise ValueError("offloading and tensor parallelism do not combine: shard the target over several devices, "
                         "or stream it to one, not both")


def _check_drafts(target: str, drafts: list[str]) -> None:
    """A draft that cannot pair with the target is refused before any weights load: known models by
    their registry entries, any model by its tokenizer (loaded first, cheaply)."""
    from specdec.models.hub import load_tokenizer

    twice = next((name for i, name in enumerate(drafts) if name in drafts[:i]), None)
    if twice is not None:  # a second copy costs its memory and drafts nothing the first would not
        raise ValueError(f"draft model {twice!r} is given twice; give each draft model once")
    for name in drafts:
        check_known_pair(target, name)
    if drafts:
        target_tok = load_tokenizer(target)
        for name in drafts:
            check_same_tokenizer(target_tok, load_tokenizer(name), name)


@dataclass
class PlannedRun:
    """A run of `auto` through the per-step planner (`Pipeline.stream`): what it runs, and its
    statistics as a decoder's."""

    planned: Planned
    last_stats: DecodeStats | None = None


class Pipeline:
    """A target model, an optional draft model and their tokenizer, ready to generate."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        draft: str | list[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        draft_dtype: str | None = "auto",
        fast_linear: str = "auto",
        offload: bool = False,
        progress: bool = True,
        tensor_parallel_size: int = 1,
        weights: str = "auto",
        draft_weights: str | None = None,
        row_invariant: str = "auto",
        draft_vocab: int | str | None = "auto",
        draft_quant: str = "auto",
    ) -> None:
        """Load the models.

        dtype: the target's dtype (and the draft's when `draft_dtype` is None).
        draft_dtype: "auto" (default: the fastest precision measured on this machine, cached;
            `models.dense.draft_precision`), None (the target's dtype), "float32", "bfloat16", "float16"
            or "int8" (dynamic int8 quantization of the draft's linears, CPU). The draft's precision
            only changes speed: every drafted token is verified against the target. Dense drafts only.
        fast_linear: "auto" (default: the linear path per row-count bucket measured on this machine,
            cached; `models.dense.kernel_choice`), "on" (prepacked oneDNN linears wherever they apply)
            or "off"; every path computes the same function up to round-off. Dense weights only.
        offload: keep the target's weights in CPU RAM and stream them to the GPU layer by layer
            (`models.dense.offload`; CUDA only). Every method of this pipeline then sees that target.
        tensor_parallel_size: shard the target over this many processes with transformers'
            tensor-parallel plan (`models.parallel`; gloo on CPU, NCCL on CUDA, one GPU per rank). This
            process becomes rank 0 and starts the others, or, under torchrun, joins its ranks. The
            drafts stay in this process; `close()` (or the end of the process) stops the other ranks.
        weights: "auto" (default: a GGUF model on the CPU computes on its own blocks where that
            measures faster here than dense float32, `models.native.choice`; everything else is
            dense), "dense" (full-precision copies of the weights) or "native" (the GGUF file's blocks
            on our integer kernels, `models.native`: activations quantized per row and block, exact
            integer sums, every token scored as in a 1-token step).
        draft_weights: the same for the draft models (default: as `weights`).
        row_invariant: "auto" (default: on for bfloat16 and float16 targets), "on" or "off": make
            a dense target score a block of k tokens bit for bit like k one-token passes (checked at
            load, `models.dense.invariance`). Native weights are row-invariant by construction.
        draft_vocab: keep only this many of the most frequent tokens in the drafts' output heads
            (`models.dense.pruned_head`, `NativeModel.with_pruned_head`): a cheaper draft step; the
            target still verifies and emits over its full vocabulary, so only acceptance and speed
            change. "auto" (default): 32 768 for heads of at least 65 536 tokens
            (`drafting.vocab.resolve_draft_vocab`), where it measured faster; None or 0: whole heads.
        draft_quant: how native drafts store their linear layers and head: "file" (the GGUF file's
            blocks), a smaller block format ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0") that the wider
            layers are requantized to at load (`native.formats.requantize`), or "auto" (default:
            `backends.AUTO_DRAFT_QUANT`). A cheaper draft pass; only acceptance and speed change.
        """
        draft_names = [draft] if isinstance(draft, str) else list(draft or [])
        draft_weights = draft_weights or weights
        _check_load_options(weights=weights, draft_weights=draft_weights, draft_dtype=draft_dtype,
                            draft_vocab=draft_vocab, tensor_parallel_size=tensor_parallel_size, offload=offload,
                            row_invariant=row_invariant, draft_quant=draft_quant, dtype=dtype)
        check_device(device, f"device={str(device)!r}")
        if offload:
            from specdec.models.dense.offload import check_offload_device

            check_offload_device(device)
        say = _progress_printer(progress)
        _check_drafts(target, draft_names)
        invariant = row_invariant == "on" or (row_invariant == "auto" and dtype in (torch.bfloat16, torch.float16))
        loaded = self._load_target(target, weights, device=device, dtype=dtype, fast_linear=fast_linear,
                                   offload=offload, progress=progress, tensor_parallel_size=tensor_parallel_size,
                                   row_invariant=invariant, say=say)
        from specdec.drafting.vocab import resolve_draft_vocab

        optional = draft_vocab == "auto"  # a draft whose head cannot be pruned keeps it, silently
        if optional and loaded.tokenizer is None:  # no tokenizer to count frequencies with: whole heads
            draft_vocab = None
        draft_vocab = resolve_draft_vocab(draft_vocab, loaded.lm.vocab_size)
        drafts = [self._load_draft(name, draft_weights, device=device, dtype=dtype, draft_dtype=draft_dtype,
                                   fast_linear=fast_linear, draft_vocab=draft_vocab, optional=optional,
                                   draft_quant=draft_quant, tokenizer=loaded.tokenizer, progress=progress, say=say)
                  for name in draft_names]
        if optional and draft_vocab is not None and any(d.pruned_head is False for d in drafts):
            draft_vocab = None  # the profile key names a pruned head only where there is one
        self._assemble(target, draft, loaded, drafts, device=device, dtype=dtype, draft_vocab=draft_vocab,
                       tensor_parallel_size=tensor_parallel_size, autotune=True)

    @staticmethod
    def _load_target(target: str, weights: str, *, device: str | torch.device, dtype: torch.dtype, fast_linear: str,
                     offload: bool, progress: bool, tensor_parallel_size: int, row_invariant: bool,
                     say: Callable[[str], None]) -> LoadedModel:
        from specdec.models import backends

        if tensor_parallel_size != 1 or isinstance(tensor_parallel_size, bool):
            return backends.load_sharded_target(target, tensor_parallel_size, dtype=dtype, device=device,
                                                progress=progress)
        # Offloading streams dense weights: it decides `auto` (and refuses a CPU run with its own reason).
        chosen, measured = choose_weights(target, "dense" if offload and weights == "auto" else weights, device, dtype,
                                          say)
        if chosen == "native":
            loaded = backends.load_native(target, progress=progress, say=say)
        else:
            loaded = backends.load_dense_target(target, dtype=dtype, device=device, fast_linear=fast_linear,
                                                row_invariant=row_invariant, offload=offload, progress=progress,
                                                say=say)
        loaded.weights_choice = measured
        return loaded

    @staticmethod
    def _load_draft(name: str, weights: str, *, device: str | torch.device, dtype: torch.dtype,
                    draft_dtype: str | None, fast_linear: str, draft_vocab: int | None, optional: bool,
                    draft_quant: str, tokenizer: Any, progress: bool, say: Callable[[str], None]) -> LoadedModel:
        from specdec.models import backends

        dense_only = draft_dtype not in (None, "auto", "float32")
        chosen, measured = choose_weights(name, "dense" if dense_only and weights == "auto" else weights, device,
                                          torch.float32, say)
        keep = None
        if draft_vocab is not None:
            from specdec.drafting.vocab import tokens_to_keep

            if tokenizer is None:
                raise ValueError("a pruned draft head needs the tokenizer to count token frequencies")
            keep = functools.partial(lambda n, size: tokens_to_keep(tokenizer, size, n), int(draft_vocab))
        if chosen == "native":
            quant = backends.AUTO_DRAFT_QUANT if draft_quant == "auto" else draft_quant
            loaded = backends.load_native(name, progress=progress, say=say, keep_tokens=keep, optional=optional,
                                          quant=quant)
        else:
            if draft_quant not in ("auto", "file"):
                say(f"{name}: --draft-quant {draft_quant} requantizes native drafts; this one loads dense")
            precision = str(dtype).replace("torch.", "") if draft_dtype is None else draft_dtype
            loaded = backends.load_dense_draft(name, precision=precision, device=device, fast_linear=fast_linear,
                                               keep_tokens=keep, tokenizer=tokenizer, progress=progress, say=say)
        if draft_quant not in ("auto", "file") and chosen == "native" and loaded.precision == "native":
            say(f"{name}: --draft-quant {draft_quant} left it on the file's blocks (none wider, or no lean runner)")
        loaded.weights_choice = measured
        return loaded

    def _assemble(self, target_name: str, draft_name: str | list[str] | None, target: LoadedModel,
                  drafts: list[LoadedModel], *, device: str | torch.device, dtype: torch.dtype,
                  draft_vocab: int | None, tensor_parallel_size: int, autotune: bool) -> None:
        """Every field of a pipeline, from loaded models (both constructors end here)."""
        for name, d in zip([draft_name] if isinstance(draft_name, str) else list(draft_name or []), drafts):
            if d.lm.vocab_size != target.lm.vocab_size:
                raise ValueError(f"draft model {name} has {d.lm.vocab_size} output logits, target "
                                 f"{target.lm.vocab_size}; they must match")
        self.target_name, self.draft_name = target_name, draft_name
        self.target_lm: LanguageModel = target.lm
        self.tokenizer = target.tokenizer
        self.eos_token_ids = list(target.eos_token_ids)
        self.draft_lms: list[LanguageModel] = [d.lm for d in drafts]
        self.draft_lm: LanguageModel | None = self.draft_lms[0] if self.draft_lms else None
        self.draft_precisions = [d.precision for d in drafts]
        self.precision_choices = [d.precision_choice for d in drafts if d.precision_choice is not None]
        self.kernel_reports = {"target": target.kernel_report} if target.kernel_report else {}
        self.fast_linears = getattr(target.kernel_report, "replaced", 0)
        self.row_invariant: bool | None = target.row_invariant
        """Whether the target passed the row-invariance check (None: not asked for)."""
        custom = target.weights == CUSTOM_MODELS
        self.weights = ("dense" if custom else target.weights.replace("sharded", "dense"),
                        drafts[0].weights if drafts and not custom else "dense")
        self.weights_choices = {n: m.weights_choice for n, m in (("target", target), ("draft", drafts[0] if drafts
                                                                                          else None)) if m is not None
                                and m.weights_choice is not None}
        self.draft_vocab = draft_vocab
        self.device = torch.device(device)
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.autotune = autotune
        """Whether `auto` may tune this pipeline on first use (needs a registered tuner)."""

    def close(self) -> None:
        """Stop the other ranks of a sharded target (nothing to do otherwise); the pipeline is unusable after."""
        close = getattr(self.target_lm, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @classmethod
    def from_models(
        cls,
        target_lm: LanguageModel,
        tokenizer: "PreTrainedTokenizerBase | None",
        draft_lm: LanguageModel | None = None,
        eos_token_ids: list[int] | None = None,
    ) -> "Pipeline":
        """Wrap models that are already loaded (tests, custom models); `auto` then needs a profile
        (or set `autotune = True`)."""
        def custom(lm: LanguageModel) -> LoadedModel:
            return LoadedModel(lm, tokenizer, list(eos_token_ids or []), CUSTOM_MODELS,
                               str(lm.dtype).replace("torch.", ""))

        pipe = cls.__new__(cls)
        pipe._assemble(CUSTOM_MODELS, CUSTOM_MODELS if draft_lm is not None else None, custom(target_lm),
                       [custom(draft_lm)] if draft_lm is not None else [], device=target_lm.device,
                       dtype=target_lm.dtype, draft_vocab=None,
                       tensor_parallel_size=int(getattr(target_lm, "tensor_parallel_size", 1)), autotune=False)
        return pipe

    # ---- prompts -------------------------------------------------------------------------
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, text: str, chat: bool | None = None) -> list[int]:
        """Token ids of a raw prompt, or of a user message rendered with the chat template."""
        if self.tokenizer is None:
            raise ValueError("this pipeline has no tokenizer; pass token ids instead")
        check_text(text)
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
        tuner = registered_tuner()
        tune = None
        if tuner is not None and self.autotune and autotune_enabled():
            def tune(reason: str) -> dict[str, Any]:
                return tuner(self, sampling, reason)
        return MethodContext(self.target_lm, tuple(self.draft_lms), sampling, self.tokenizer,
                             self.profile_key(sampling), tune)

    def profile_key(self, sampling: SamplingConfig) -> dict[str, Any] | None:
        """The key of the tune profile for this pipeline at `sampling` (None: several draft models)."""
        drafts = [self.draft_name] if isinstance(self.draft_name, str) else list(self.draft_name or [])
        if len(drafts) > 1:
            return None
        dtype = str(self.dtype).replace("torch.", "")
        device = torch.device(self.device).type
        weights = getattr(self, "weights", ("dense", "dense"))
        if weights != ("dense", "dense"):  # other kernels, other timings: their own tune profile
            dtype += f"-weights-{weights[0]}-{weights[1]}"
        draft_dtype = self.draft_precisions[0] if drafts and self.draft_precisions else dtype
        if drafts and getattr(self, "draft_vocab", None):  # a pruned head accepts differently: its own profile
            draft_dtype += f"+vocab{self.draft_vocab}"
        key = profile_key(self.target_name, drafts[0] if drafts else None, device, dtype,
                          sampling.temperature, draft_dtype)
        if getattr(self, "tensor_parallel_size", 1) > 1:  # a sharded target has timings of its own
            key["tensor_parallel_size"] = self.tensor_parallel_size
        return key

    def decoder(self, method: str = DEFAULT_METHOD, sampling: SamplingConfig = SamplingConfig(),
                **opts: Any) -> SpeculativeDecoder:
        """A decoder for `method` with its options (unknown or invalid options raise ValueError)."""
        return build_decoder(self.context(sampling), method, sampling, opts, self.eos_token_ids)

    def stream(
        self,
        prompt: str | list[int],
        method: str = DEFAULT_METHOD,
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int | None = None,
        chat: bool | None = None,
        **opts: Any,
    ) -> tuple[SpeculativeDecoder | PlannedRun, Iterator[list[int]]]:
        """The decoder (whose `last_stats` fill in as it runs) and an iterator of token chunks.

        `auto` decodes through the batch engine's per-step planner as one sequence where the tune
        found drafting pays (`methods.auto.planned_request`); a seeded sampled run through one whose
        plans depend on no timing (`BatchEngine.fix_plans`), so that it repeats. Its `PlannedRun`
        holds `last_stats` as a decoder does."""
        _check_sampling(sampling)
        seed = check_seed(seed)
        check_max_new_tokens(max_new_tokens)  # now, not at the iterator's first step
        ids = self._prompt_ids(prompt, chat)
        room = self.target_lm.context_length
        if len(ids) + max_new_tokens + 1 > room:  # never fits, whatever drafts: refused before auto may tune
            raise ValueError(context_overflow(len(ids), max_new_tokens, 1, room))
        planned = self.auto_plan(sampling, seed, **opts) if method == "auto" else None
        if planned is not None:
            return self._planned_stream(ids, planned, max_new_tokens, sampling, seed)
        dec = self.decoder(method, sampling, **opts)
        dec.check_fits(len(ids), max_new_tokens)  # now, not at the iterator's first step
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=self.device)
            # An unseeded run draws its seed without touching torch's global RNG.
            generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return dec, dec.stream(ids, max_new_tokens, generator)

    def _prompt_ids(self, prompt: object, chat: bool | None) -> list[int]:
        """A prompt as token ids: text encoded, ids checked (`decoder.prompt_tensor`)."""
        if chat is not None and not isinstance(chat, bool):
            raise TypeError(f"chat must be True, False or None (the template where the tokenizer has one), got {chat!r}")
        if isinstance(prompt, str):
            return self.encode(prompt, chat)
        if chat:
            raise ValueError("chat=True renders a text prompt with the chat template; token ids are sent as they are")
        return prompt_tensor(prompt, self.target_lm.vocab_size).tolist()

    def auto_plan(self, sampling: SamplingConfig = SamplingConfig(), seed: int | None = None,
                  **opts: Any) -> Planned | None:
        """What `auto` with these options runs through the per-step planner (`methods.auto.planned_request`),
        or None where it decodes with its own drafter: a target the engine cannot give rows
        (`models.batch.SerialModel`), or a seeded sampled run whose profile has no pass times to plan
        from. Tunes on first use, as `auto` does."""
        planned = planned_request(self.context(sampling), get_method("auto").make_options(dict(opts)))
        if planned is None or isinstance(self._solo_planner(planned).target, SerialModel):
            return None
        if not planner_adapts(sampling, seed) and self._tuned_times(planned) is None:
            return None
        return planned

    def _tuned_times(self, planned: Planned) -> dict[str, dict[int, float]] | None:
        """The tune's pass times (ms by tokens) of the target and the draft; None where the profile lacks them."""
        ms = {key: {int(k): float(v) for k, v in (planned.timing.get(f"{key}_ms") or {}).items()}
              for key in ("target", "draft")}
        return ms if ms["target"] and (ms["draft"] or not self.draft_lms) else None

    def _solo_planner(self, planned: Planned) -> BatchEngine:
        """The one-sequence adaptive engine `auto` decodes through where the planner follows timings
        (greedy, or sampled without a seed), made on first use and kept: its measurements and
        acceptance priors carry over from run to run. It starts from the tune's pass times where the
        profile has them rather than probing the models for seconds first, and the steps refine them."""
        engine = getattr(self, "_solo_engine", None)
        if engine is None:
            engine = self._solo_engine = self.batch_engine(max_batch_size=1, adaptive=True)
            times = self._tuned_times(planned)
            if times is not None:
                engine.assume_times(times["target"], times["draft"])
        return engine

    def _fixed_planner(self, planned: Planned) -> BatchEngine:
        """A one-sequence engine for one seeded sampled run, which must repeat: made for the run, it plans
        from the tune's pass times alone (`BatchEngine.fix_plans`), whatever ran before."""
        times = self._tuned_times(planned)
        if times is None:
            raise ValueError("a seeded sampled auto run plans from the tune's pass times; its profile has none")
        engine = self.batch_engine(max_batch_size=1, adaptive=True)
        engine.assume_times(times["target"], times["draft"])
        engine.fix_plans()
        return engine

    def _planned_stream(self, ids: list[int], planned: Planned, max_new_tokens: int, sampling: SamplingConfig,
                        seed: int | None = None) -> tuple[PlannedRun, Iterator[list[int]]]:
        adapts = planner_adapts(sampling, seed)
        engine = self._solo_planner(planned) if adapts else self._fixed_planner(planned)
        run = PlannedRun(planned)
        request = BatchRequest(ids, max_new_tokens, planned.method, planned.options, sampling, seed)
        engine.check(request)  # now, not at the iterator's first step

        def chunks() -> Iterator[list[int]]:
            rid = engine.submit(request)
            # Streams over one engine read in turns: whichever steps it keeps the others' events for them.
            mail = _MAILBOXES.setdefault(engine, {})
            mine = mail[rid] = deque()
            done = False
            try:
                while not done:
                    if not mine:
                        if not engine.has_work():  # never expected: fail rather than spin
                            raise RuntimeError("auto's one-sequence engine dropped this request")
                        for event in engine.step():
                            if event.request_id in mail:
                                mail[event.request_id].append(event)
                        continue
                    event = mine.popleft()
                    run.last_stats = event.stats or run.last_stats
                    if event.error is not None:
                        raise event.error
                    done = bool(event.finished)
                    if event.tokens:
                        yield event.tokens
            finally:
                del mail[rid]
                if not done:  # abandoned or failed: the step that applies the abort frees its rows now
                    engine.abort(rid)
                    for event in engine.step() if engine.has_work() else ():
                        if event.request_id in mail:
                            mail[event.request_id].append(event)

        return run, chunks()

    def generate(self, prompt: str | list[int], method: str = DEFAULT_METHOD, max_new_tokens: int = 128,
                 **kw: Any) -> GenerationResult:
        """Generate with `method` (default auto: the tuned choice for this machine, tuned on first use)."""
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
        **policies: Any,
    ) -> BatchEngine:
        """A continuous-batching engine over this pipeline's models (`engine.batch`): submit
        `BatchRequest`s with any mix of methods, options and sampling, then `step()`. `policies`:
        `BatchEngine`'s adaptive, max_fill_ms and prefix_cache_mb."""
        return BatchEngine(
            self.target_lm, self.draft_lms, tokenizer=self.tokenizer, eos_token_ids=self.eos_token_ids,
            profile_key=self.profile_key, max_batch_size=max_batch_size, max_kv_tokens=max_kv_tokens,
            prefill_chunk=prefill_chunk, spec_disable_batch_size=spec_disable_batch_size, **policies,
        )

    def generate_batch(
        self,
        prompts: Sequence[str | list[int]],
        method: str = DEFAULT_METHOD,
        max_new_tokens: int | Sequence[int] = 128,
        *,
        sampling: SamplingConfig = SamplingConfig(),
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
        below `spec_disable_batch_size`, and for `auto` what it gives with `no_planner=True`: alone,
        a seeded auto run goes through the planner), except that the timings are those of the shared
        steps.
        `stop`: strings that end a completion (the text stops before the first; `stopped_by` "stop").
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of prompts (texts or token-id lists), got "
                            f"{type(prompts).__name__}; for one prompt use generate")
        n = len(prompts)
        news = list(max_new_tokens) if _many(max_new_tokens) else [max_new_tokens] * n
        seeds = list(seed) if _many(seed) else [seed] * n
        if len(news) != n or len(seeds) != n:
            raise ValueError(f"give one max_new_tokens and one seed per prompt ({n}), or one for all")
        _check_sampling(sampling)
        _check_stops(stop)
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this pipeline has none")
        for k in news:
            check_max_new_tokens(k)
        requests = [BatchRequest(self._prompt_ids(p, chat), k, method, dict(opts), sampling, seed=check_seed(s))
                    for p, k, s in zip(prompts, news, seeds)]
        self.decoder(method, sampling, **opts)  # the options checked, and `auto` tuned on first use as in generate
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
                results.append(GenerationResult(texts[rid].released, ids, stats.cut_to(len(ids))))
            else:
                results.append(GenerationResult(self.decode(ids), ids, stats))
        return results
