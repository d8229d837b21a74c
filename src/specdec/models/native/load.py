"""A transformers model built around a GGUF file's quantized blocks (`--weights native`).

The architecture is the config transformers reads from the file (the one the dense path gets),
built without allocating weights. Every linear layer whose weight is stored in a supported block
format becomes a `GGUFLinear` over the file's rows, the token embedding a `GGUFEmbedding`, and the
remaining tensors (norms, biases, unquantized or unsupported weights) get their dequantized values
exactly as transformers' GGUF loader computes them. So the model has the dense path's weight values
(the float32 values `gguf` dequantizes to); only where they are multiplied differs.

The output head: when the file has `output.weight` it is used (as the dense path and llama.cpp do);
when it has none the embedding is tied and the head shares the embedding's blocks. Either way the
head stays quantized: it is the largest matrix of a small model (the 1.5B's Q6_K head is 233 M
values, 191 MB as blocks, 933 MB as float32) and is read in full at every step.

On the CPU the model also gets the batch-invariant attention (`attention.py`), so that a k-token pass
scores each token with the bits of a 1-token step, as the linear kernel does.

Architectures whose GGUF conversion reorders rows (llama's q/k permutation) are handled by replaying
transformers' own tensor processor on row indices; one that changes quantized values is refused.

The tensor table (`TensorEntry` list) comes from `gguf.GGUFReader` once; the hub caches it, so later
loads only map the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from specdec.models.native.attention import use_exact_attention
from specdec.models.native.formats import BlockFormat, UnsupportedFormat, dequantize, format_of, requantize
from specdec.models.native.linear import GGUFEmbedding, GGUFLinear
from specdec.models.native.runner import NativeLayer, NativeModel, QLinear, config_unsupported

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["TensorEntry", "build_native_model", "build_native_runner", "native_summary", "tensor_index"]

log = logging.getLogger(__name__)


class TensorEntry(NamedTuple):
    """One tensor of a GGUF file: where its bytes are and what they hold."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: (rows, cols) for a matrix
    offset: int  # absolute byte offset in the file
    nbytes: int


def tensor_index(reader: Any) -> tuple[str, list[TensorEntry]]:
    """(architecture, tensor table) of an open `gguf.GGUFReader`."""
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    entries = [
        TensorEntry(t.name, int(t.tensor_type), tuple(int(d) for d in reversed(t.shape.tolist())), int(t.data_offset),
                    int(t.n_bytes))
        for t in reader.tensors
    ]
    return arch, entries


def _row_order(processor: Any, name: str, rows: int, mapping: dict[str, str], parsed: dict) -> tuple[np.ndarray, str]:
    """What transformers' tensor processor does to the rows of tensor `name`: (row order, new name)."""
    index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
    out = processor.process(weights=index, name=name, tensor_key_mapping=mapping, parsed_parameters=parsed)
    order = np.asarray(out.weights).reshape(-1)
    if order.shape != (rows,) or not np.array_equal(np.sort(order), np.arange(rows)):
        raise UnsupportedFormat(
            f"transformers transforms the values of {name} when it loads this architecture; --weights native "
            f"cannot keep them quantized (use --weights dense)"
        )
    return order.astype(np.int64), out.name


def _dense_values(entry: TensorEntry, raw: np.ndarray) -> np.ndarray:  # raw: the tensor's bytes
    """The float32 values of an unquantized (or not natively computed) tensor, as transformers gets them."""
    from gguf import GGMLQuantizationType, dequantize as gguf_dequantize

    qtype = GGMLQuantizationType(entry.ggml_type)
    if qtype.name not in ("F32", "F16", "BF16"):
        log.info("%s is %s, which is not computed on natively: using its dequantized values", entry.name, qtype.name)
    rows = int(np.prod(entry.shape[:-1])) if len(entry.shape) > 1 else 1
    return np.asarray(gguf_dequantize(raw.reshape(rows, -1), qtype), dtype=np.float32).reshape(entry.shape)


def _read(f: Any, entry: TensorEntry) -> np.ndarray:
    """The bytes of one tensor, read into memory of their own (the file stays unmapped)."""
    f.seek(entry.offset)
    raw = np.fromfile(f, dtype=np.uint8, count=entry.nbytes)
    if raw.size != entry.nbytes:
        raise UnsupportedFormat(f"the file ends inside tensor {entry.name}")
    return raw


def _meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The architecture without weights: parameters on the meta device, buffers (rotary) real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _file_params(path: Path, model: nn.Module, config: PretrainedConfig, arch: str,
                 entries: list[TensorEntry]) -> Iterator[tuple[str, str, Any]]:
    """(module path, parameter name, value) for every tensor of the file the model has a place for.

    value: (blocks [rows, row_bytes] uint8, BlockFormat, cols) for a matrix in a supported block
    format (rows in transformers' order), else a float32 tensor of its values.
    """
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    parsed = {"config": config.to_dict(), "tensors": {}}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
    mapping = _name_map(model, arch, config)
    with open(path, "rb") as f:
        for entry in entries:
            try:
                fmt = format_of(entry.ggml_type) if len(entry.shape) == 2 else None
            except UnsupportedFormat:
                fmt = None
            if fmt is not None:
                rows, cols = entry.shape
                order, name = _row_order(processor, entry.name, rows, mapping, parsed)
                if name not in mapping:
                    continue
                blocks = torch.from_numpy(_read(f, entry).reshape(rows, fmt.row_bytes(cols)))
                if not np.array_equal(order, np.arange(rows)):
                    blocks = blocks[torch.from_numpy(order)].contiguous()
                value: Any = (blocks, fmt, cols)
            else:
                out = processor.process(weights=_dense_values(entry, _read(f, entry)), name=entry.name,
                                        tensor_key_mapping=mapping, parsed_parameters=parsed)
                if out.name not in mapping:
                    continue
                name, value = out.name, torch.from_numpy(np.array(out.weights, dtype=np.float32))
            module_path, _, param = mapping[name].rpartition(".")
            yield module_path, param, value


def build_native_model(
    path: str | Path, config: PretrainedConfig, arch: str, entries: list[TensorEntry], device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """An eval-mode transformers causal LM for the GGUF file at `path` whose linear layers compute on its blocks."""
    path = Path(path)
    model = _meta_model(config)
    found: dict[str, dict[str, Any]] = {}  # module path -> {"weight": (blocks, fmt, cols) or tensor, "bias": …}
    for module_path, param, value in _file_params(path, model, config, arch, entries):
        found.setdefault(module_path, {})[param] = value

    embed_blocks = None
    for module_path, params in found.items():
        module = model.get_submodule(module_path)
        weight = params.get("weight")
        if isinstance(weight, tuple) and isinstance(module, nn.Linear):
            _replace(model, module_path, GGUFLinear(*weight, bias=params.get("bias")))
            continue
        if isinstance(weight, tuple) and isinstance(module, nn.Embedding):
            embed_blocks = weight
            _replace(model, module_path, GGUFEmbedding(*weight))
            continue
        for param, value in params.items():
            if isinstance(value, tuple):  # quantized, but not for a linear layer or embedding: dense values
                value = dequantize(*value)
            setattr(module, param, nn.Parameter(value.reshape(getattr(module, param).shape), requires_grad=False))

    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear) and head.weight.is_meta and embed_blocks is not None:
        _replace(model, _path_of(model, head), GGUFLinear(*embed_blocks))  # tied: share the embedding's blocks
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise UnsupportedFormat(
            f"{path.name}: --weights native found no tensor for {len(missing)} weights ({', '.join(missing[:4])}); "
            f"use --weights dense"
        )
    model.requires_grad_(False)
    model = model.to(device).eval()
    use_exact_attention(model)  # CPU: batch-invariant attention too, so k-token passes equal 1-token steps
    return model


def _odd_matrices(entries: list[TensorEntry]) -> str:
    """Why some matrix of the file is not for the integer kernels ("" when every one is)."""
    from gguf import GGMLQuantizationType

    odd: dict[str, int] = {}
    for e in entries:
        if len(e.shape) != 2:
            continue
        try:
            format_of(e.ggml_type)
        except UnsupportedFormat:
            name = GGMLQuantizationType(e.ggml_type).name
            odd[name] = odd.get(name, 0) + 1
    return ", ".join(f"{n} matrices in {kind}" for kind, n in sorted(odd.items())) + (
        " are not computed by the integer kernels" if odd else "")


def build_native_runner(path: str | Path, config: PretrainedConfig, arch: str, entries: list[TensorEntry],
                        requantize_to: BlockFormat | None = None,
                        requantized: dict[str, torch.Tensor] | None = None) -> NativeModel:
    """The lean `NativeModel` of a llama-family GGUF file, each weight repacked as it is read (the
    file's bytes are never all in memory at once); UnsupportedFormat says why a file has none.

    requantize_to: a draft model's linear layers and output head in this smaller format where the
    file's are wider (`formats.requantize`; fewer bytes to read per pass, other values). The token
    embedding stays as stored: a pass reads only its tokens' rows. requantized: blocks already in
    `requantize_to` by module path, used where present; those computed here are added to it.
    """
    changed: list[str] = []

    def packed(name: str, blocks: torch.Tensor, fmt: BlockFormat, cols: int,
               bias: torch.Tensor | None = None) -> QLinear:
        if requantize_to is not None:
            was = fmt
            blocks, fmt = _requantized(name, blocks, fmt, cols, requantize_to, requantized)
            if fmt is not was:
                changed.append(name)
        return QLinear(blocks, fmt, cols, bias=bias)

    why = config_unsupported(config) or _odd_matrices(entries)
    if why:
        raise UnsupportedFormat(why)
    path = Path(path)
    model = _meta_model(config)
    linears: dict[str, QLinear] = {}
    pending: dict[str, dict[str, Any]] = {}  # a linear's weight waits for its bias, or the other way round
    found: dict[str, Any] = {}
    for module_path, param, value in _file_params(path, model, config, arch, entries):
        module = model.get_submodule(module_path)
        if isinstance(module, nn.Linear):
            pending.setdefault(module_path, {})[param] = value
            parts = pending[module_path]
            if "weight" in parts and ("bias" in parts or module.bias is None):
                weight = parts.pop("weight")
                if not isinstance(weight, tuple):
                    raise UnsupportedFormat(f"{module_path} is not stored in a supported block format")
                linears[module_path] = packed(module_path, *weight, bias=parts.pop("bias", None))
        else:
            found[f"{module_path}.{param}"] = value
    embed = found.get("model.embed_tokens.weight")
    if not isinstance(embed, tuple):
        raise UnsupportedFormat("the token embedding is not stored in a supported block format")
    head = linears.get("lm_head") or packed("lm_head", *embed)  # no output.weight: tied to the embedding
    inner = model.model
    layers = []
    for i, block in enumerate(inner.layers):
        names = [f"model.layers.{i}.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        missing = [n for n in names if n not in linears]
        if missing:
            raise UnsupportedFormat(f"no quantized weight for {missing[0]}")
        if block.self_attn.o_proj.bias is not None:
            raise UnsupportedFormat("an output projection with a bias")
        layers.append(NativeLayer(found[f"model.layers.{i}.input_layernorm.weight"].contiguous(),
                                  found[f"model.layers.{i}.post_attention_layernorm.weight"].contiguous(),
                                  *(linears[n] for n in names)))
    runner = NativeModel(config, GGUFEmbedding(*embed), layers, found["model.norm.weight"].contiguous(), head,
                         inner.rotary_emb, inner.norm.variance_epsilon)
    runner.requantized_to = requantize_to if changed else None
    if "lm_head" in linears:  # a head of its own: `with_pruned_head` reads its rows again when asked
        runner.head_source = lambda kept: _rows(_head_blocks(path, config, arch, entries), kept, requantize_to)
    elif requantize_to is not None:  # tied: a pruned head's rows are the embedding's, requantized as the head was
        runner.head_source = lambda kept: _rows(embed, kept, requantize_to)
    return runner


def _requantized(name: str, blocks: torch.Tensor, fmt: BlockFormat, cols: int, to: BlockFormat,
                 known: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, BlockFormat]:
    """A weight's (blocks, format) in `to` where that is smaller: from `known` where it holds them,
    else computed (and added to `known`)."""
    stored = None if known is None else known.get(name)
    if stored is not None and stored.dtype == torch.uint8 and stored.shape == (blocks.shape[0], to.row_bytes(cols)):
        return stored, to
    out, out_fmt = requantize(blocks, fmt, cols, to)
    if out is not blocks and known is not None:
        known[name] = out
    return out, out_fmt


def _rows(weight: tuple[Any, ...], kept: torch.Tensor, to: BlockFormat | None) -> tuple[Any, ...]:
    """Rows `kept` [K] of (blocks, format, in_features), requantized to `to` where that is smaller."""
    blocks, fmt, cols = weight
    blocks = blocks.index_select(0, kept)
    return (blocks, fmt, cols) if to is None else (*requantize(blocks, fmt, cols, to), cols)


def _head_blocks(path: Path, config: PretrainedConfig, arch: str, entries: list[TensorEntry]) -> tuple[Any, ...]:
    """The output head's (blocks, format, in_features) as the file stores them."""
    for module_path, param, value in _file_params(path, _meta_model(config), config, arch,
                                                  [e for e in entries if e.name == "output.weight"]):
        if module_path == "lm_head" and param == "weight" and isinstance(value, tuple):
            return value
    raise UnsupportedFormat("the file's output head is not stored in a supported block format")


def _name_map(model: nn.Module, arch: str, config: PretrainedConfig) -> dict[str, str]:
    """{GGUF tensor name: transformers parameter name}, from gguf's own table for the file's architecture.

    (transformers' `get_gguf_hf_weights_map` does the same but rebuilds gguf's table once per submodule,
    which takes seconds.)
    """
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise UnsupportedFormat(f"the gguf package does not know the architecture {arch!r}")
    names = get_tensor_name_map(arch_id, config.get_text_config().num_hidden_layers)
    mapping = {}
    for hf_name in model.state_dict():
        base, dot, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base) if suffix in ("weight", "bias") else names.get_name(hf_name)
        if gguf_name is not None:
            mapping[gguf_name + (dot + suffix if suffix in ("weight", "bias") else "")] = hf_name
    return mapping


def _replace(model: nn.Module, module_path: str, new: nn.Module) -> None:
    parent_path, _, child = module_path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def native_summary(model: nn.Module) -> dict[str, int]:
    """How many linear layers of each format and kernel a model computes on, e.g. {'Q4_K/gguf': 141}."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            key = f"{m.fmt.name}/{m.kernel}"
            counts[key] = counts.get(key, 0) + 1
    return counts
