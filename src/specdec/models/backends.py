"""Loading a model as a ready `LanguageModel`: one function per weights path, and the default choice.

    load_dense_target   transformers modules with full-precision weights: the linear paths measured
                        per row-count bucket, row invariance in reduced precision, optional offload
    load_dense_draft    the same for a draft: its precision measured or given, an optional pruned head
    load_native         a GGUF file's blocks on the integer kernels (models/native/), draft or target
    load_sharded_target a target sharded over tensor-parallel ranks (models/parallel/)

Each returns a `LoadedModel`: the language model, its tokenizer, its end-of-sequence ids and what
was chosen while loading. `choose_weights` resolves `--weights auto` (the default): a GGUF model on
the CPU computes natively where the native kernel measures faster than dense float32 here
(`models.native.choice`), everything else is dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specdec.models.base import LanguageModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "WEIGHTS",
    "LoadedModel",
    "choose_weights",
    "eos_ids",
    "load_dense_draft",
    "load_dense_target",
    "load_native",
    "load_sharded_target",
]

WEIGHTS = ("auto", "dense", "native")
DRAFT_QUANTS = ("auto", "file", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
"""How a native draft's linear layers are stored: the file's blocks, or requantized to a smaller format."""
AUTO_DRAFT_QUANT = "Q4_0"
"""What `draft_quant="auto"` requantizes a native draft's wider layers to. A draft pass reads every
weight once, so its cost follows its bytes: the default pair's 0.5B (Q5_0 and Q6_K layers, a Q8_0
head) reads 278 MB a pass from its file's blocks and 218 MB as Q4_0; its drafts were accepted as
often on four of six dev prompts and `sps` γ=3 ran 6 % faster (docs/algorithms.md §14.5)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Say = Callable[[str], None]


@dataclass
class LoadedModel:
    """A model ready to decode, and what loading it chose."""

    lm: LanguageModel
    tokenizer: "PreTrainedTokenizerBase | None"
    eos_token_ids: list[int]
    weights: str  # "dense", "native" or "sharded"
    precision: str  # "float32", "bfloat16", "float16", "int8", "native" or "native-Q4_0" (requantized)
    kernel_report: Any = None  # dense: the linear paths chosen (models.dense.kernel_choice)
    precision_choice: Any = None  # dense draft at "auto": the measured precisions
    row_invariant: bool | None = None  # whether the row-invariance check passed (None: not asked for)
    weights_choice: Any = None  # `--weights auto`: the measurement behind the choice
    pruned_head: bool | None = None  # a draft asked to prune its head: whether it did (None: not asked)


def eos_ids(model: Any, tokenizer: "PreTrainedTokenizerBase | None") -> list[int]:
    """Every id that ends a generation: the generation config's EOS list, the config's, the tokenizer's.

    model: anything with a `config` (and maybe a `generation_config`): a transformers model, or a
    transformers config itself.
    """
    config = getattr(model, "config", model)
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    ids: set[int] = set()
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def choose_weights(spec: str, weights: str, device: str | torch.device, dtype: torch.dtype,
                   say: Say | None = None) -> tuple[str, Any]:
    """("dense" | "native", the measurement when `weights` is "auto" and one was taken)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights != "auto":
        return weights, None
    from specdec.models.hub.load import is_gguf, native_linear_shape

    if not is_gguf(spec) or torch.device(device).type != "cpu" or dtype != torch.float32:
        return "dense", None
    from specdec.models.native.choice import choose_weights as measure

    shape = native_linear_shape(spec)
    if shape is None:
        return "dense", None
    choice = measure(*shape, device)
    if say is not None and not choice.cached:
        say(f"{spec}: {choice.weights} weights ({choice.reason})")
    return choice.weights, choice


def load_native(spec: str, *, progress: bool = True, say: Say | None = None,
                keep_tokens: Callable[[int], torch.Tensor] | None = None, optional: bool = False,
                quant: str = "file") -> LoadedModel:
    """The GGUF model `spec` computing on its own blocks (activations quantized per row and block);
    `keep_tokens(head size)`: the token ids a pruned output head keeps (None: the whole head).
    `optional`: a model off the lean runner keeps its whole head instead of refusing.
    `quant` (drafts): "file" (the file's blocks) or a smaller format its wider layers are requantized
    to (`native.formats.requantize`)."""
    from specdec.models.hub.load import load_native_lm
    from specdec.models.native.formats import format_of
    from specdec.models.native.lm import NativeLM

    to = None if quant == "file" else format_of(quant)
    lm, config, tokenizer = load_native_lm(spec, progress=progress, say=say, requantize_to=to)
    pruned = keep_tokens is not None and isinstance(lm, NativeLM)
    if keep_tokens is not None and not pruned and not optional:
        raise ValueError(f"a pruned output head needs the lean native runner, which {spec} does not run on; "
                         "pass --draft-weights dense to prune a dense draft's head")
    if pruned:
        lm.model = lm.model.with_pruned_head(keep_tokens(lm.vocab_size))
    from transformers import GenerationConfig

    source = _ConfigOnly(config, GenerationConfig.from_model_config(config))
    done = lm.model.requantized_to if isinstance(lm, NativeLM) else None  # None: the file's blocks throughout
    precision = "native" if done is None else f"native-{done.name}"
    return LoadedModel(lm, tokenizer, eos_ids(source, tokenizer), "native", precision,
                       pruned_head=pruned if keep_tokens is not None else None)


@dataclass
class _ConfigOnly:
    config: Any
    generation_config: Any


def load_dense_target(spec: str, *, dtype: torch.dtype, device: str | torch.device, fast_linear: str,
                      row_invariant: bool, offload: bool, progress: bool, say: Say) -> LoadedModel:
    """The target with full-precision weights on the linear paths measured for it here.

    row_invariant: make a k-token pass score each token exactly as a 1-token pass (one linear path
    for every block size, sequential attention; checked at load), for bfloat16 and float16.
    """
    from specdec.models.dense.kernel_choice import apply_linear_paths
    from specdec.models.dense.offload import offload_target
    from specdec.models.hf import HFLanguageModel
    from specdec.models.hub import load_model

    from specdec.models.dense.exact_linear import exact_linear_available

    model, tokenizer = load_model(spec, dtype=dtype, device=device, progress=progress)
    # Row invariance needs one fixed order per output: the exact linear kernel where it runs (it
    # replaces the linears in `make_row_invariant`), else one measured path for every block size.
    exact = row_invariant and exact_linear_available(model)
    report = apply_linear_paths(model, "off" if exact else fast_linear, progress=say, single_path=row_invariant)
    passed = None
    if row_invariant:
        from specdec.models.dense.draft_precision import probe_ids
        from specdec.models.dense.invariance import make_row_invariant

        passed = make_row_invariant(model, probe_ids(model.config.vocab_size, tokenizer)[:24])
        if not passed:
            say(f"warning: this {str(dtype).replace('torch.', '')} target scores a block of tokens differently "
                "from one token at a time on this machine, so greedy speculative output may differ from plain "
                "decoding at near-ties; use --dtype float32 for exact equality")
    lm = HFLanguageModel(model)
    if offload:
        offload_target(lm, device)
    return LoadedModel(lm, tokenizer, eos_ids(model, tokenizer), "dense", str(dtype).replace("torch.", ""),
                       kernel_report=report, row_invariant=passed)


def load_dense_draft(spec: str, *, precision: str, device: str | torch.device, fast_linear: str,
                     keep_tokens: Callable[[int], torch.Tensor] | None, tokenizer: Any, progress: bool,
                     say: Say) -> LoadedModel:
    """A draft with full-precision weights: `precision` "auto" (the fastest measured here whose
    top-1 agrees with float32), "float32", "bfloat16", "float16" or "int8"; `keep_tokens(head
    size)`: the token ids its pruned output head keeps (None: the whole head)."""
    from specdec.models.dense.draft_precision import choose_draft_precision, make_variant
    from specdec.models.hf import HFLanguageModel
    from specdec.models.hub import load_model

    load_dtype = torch.float32 if precision in ("auto", "int8") else DTYPES[precision]
    model, draft_tokenizer = load_model(spec, dtype=load_dtype, device=device, progress=progress)
    if keep_tokens is not None:
        from specdec.models.dense.pruned_head import prune_output_head

        prune_output_head(model, keep_tokens(model.get_output_embeddings().weight.shape[0]))
    choice = None
    if precision == "auto":
        model, choice = choose_draft_precision(model, fast_linear=fast_linear, tokenizer=tokenizer, progress=say)
        precision = choice.chosen
    else:
        model = make_variant(model.float() if precision == "int8" else model, precision, fast_linear)
    return LoadedModel(HFLanguageModel(model), draft_tokenizer, eos_ids(model, draft_tokenizer), "dense", precision,
                       precision_choice=choice, pruned_head=True if keep_tokens is not None else None)


def load_sharded_target(spec: str, size: int, *, dtype: torch.dtype, device: str | torch.device,
                        progress: bool) -> LoadedModel:
    """The target sharded over `size` tensor-parallel ranks (gloo on CPU, NCCL on CUDA); this process
    becomes rank 0 and starts the others (or joins torchrun's ranks)."""
    from specdec.models.parallel.launch import check_size, start_sharded_target

    check_size(size)
    lm, tokenizer = start_sharded_target(spec, size, dtype=dtype, device=device, progress=progress)
    return LoadedModel(lm, tokenizer, eos_ids(lm.model, tokenizer), "sharded", str(dtype).replace("torch.", ""),
                       kernel_report={})
