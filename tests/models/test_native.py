"""Native GGUF weights: the block decoders equal `gguf`'s, every kernel multiplies the file's own
values (float32 round-off only), the compiled kernel is batch-invariant, and a model computing on
blocks decodes greedily to the same tokens with every method as with plain decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from specdec.engine.pipeline import Pipeline
from specdec.models.hf import HFLanguageModel
from specdec.models.native import kernels
from specdec.models.native.attention import EXACT_ATTENTION, use_exact_attention
from specdec.models.native.formats import FORMATS, UnsupportedFormat, dequantize, format_of, random_blocks
from specdec.models.native.linear import GGUFEmbedding, GGUFLinear
from tests.conftest import TINY_VOCAB
from tests.helpers import every_method_example

NAMES = list(FORMATS)
# f16 scales giving dequantized values of about ±0.3, like the tiny test models' weights
SCALE = {"Q4_0": 0.06, "Q4_1": 0.06, "Q5_0": 0.03, "Q8_0": 0.004, "Q4_K": 0.002, "Q6_K": 0.0002}

needs_kernel = pytest.mark.skipif(
    kernels.native_library() is None, reason=f"no compiled GGUF kernel here: {kernels.unavailable_reason()}"
)


def _blocks(name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return random_blocks(FORMATS[name], rows, cols, torch.Generator().manual_seed(seed), SCALE[name])


def _cols(name: str, n: int = 3) -> int:
    return FORMATS[name].block_size * n


def _gguf_reference(blocks: torch.Tensor, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize as gguf_dequantize

    return gguf_dequantize(blocks.numpy(), GGMLQuantizationType(FORMATS[name].ggml_type))


def _check_layer(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """y equals x·wᵀ (+ bias) up to float32 summation round-off: |error| ≤ K·2⁻²⁴·(|x|·|w|ᵀ) (+ |bias|)."""
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T + (bias.double() if bias is not None else 0)
    bound = x.shape[-1] * 2.0**-24 * (x64.abs() @ w64.abs().T) + (2.0**-24 * bias.double().abs() if bias is not None else 0)
    err = (y.double() - ref).abs()
    assert bool((err <= bound + 1e-30).all()), f"max error {err.max():.3g} exceeds the round-off bound"


# ---- formats --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_dequantize_equals_gguf_bit_for_bit(name):
    for n in (1, 4):
        blocks = _blocks(name, 7, _cols(name, n), seed=n)
        ours = dequantize(blocks, FORMATS[name], _cols(name, n)).numpy()
        ref = _gguf_reference(blocks, name)
        assert ours.shape == ref.shape and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_format_errors():
    assert format_of("Q4_K") is format_of(12)
    with pytest.raises(UnsupportedFormat, match="supported: Q4_0"):
        format_of("IQ2_XS")
    with pytest.raises(UnsupportedFormat, match="multiple of 256"):
        FORMATS["Q6_K"].row_bytes(100)
    with pytest.raises(ValueError, match="uint8 rows"):
        dequantize(torch.zeros(2, 10, dtype=torch.uint8), FORMATS["Q4_0"], 32)


# ---- the compiled kernel ----------------------------------------------------------------------------
def _check_kernel(name: str, isa: str | None) -> None:
    fmt = FORMATS[name]
    cols, rows = _cols(name, 3), 37  # rows: not a multiple of any tile
    blocks = _blocks(name, rows, cols)
    w = dequantize(blocks, fmt, cols)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(rows, generator=gen)
    # On the identity every output is one product: the kernel's weights are the file's values, bit for bit.
    eye = kernels.gguf_linear(torch.eye(cols), blocks, fmt, isa=isa)
    assert torch.equal(eye, w.T)
    x = torch.randn(64, cols, generator=gen)
    full = kernels.gguf_linear(x, blocks, fmt, bias, isa=isa)
    _check_layer(full, x, w, bias)
    # Batch invariance: every row is the same bits whatever the number of rows and threads.
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for m in (1, 2, 3, 7, 16):
                part = kernels.gguf_linear(x[:m].contiguous(), blocks, fmt, bias, isa=isa)
                assert torch.equal(part, full[:m]), f"{name}: {m} rows, {n_threads} threads"
            singles = torch.cat([kernels.gguf_linear(x[i : i + 1].contiguous(), blocks, fmt, bias, isa=isa)
                                 for i in range(0, 64, 9)])
            assert torch.equal(singles, full[::9])
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("name", NAMES)
def test_kernel_multiplies_the_files_values_and_is_batch_invariant(name):
    _check_kernel(name, None)


@needs_kernel
def test_portable_kernel_too():
    """The scalar build (CPUs without AVX2) computes the same values, with the same invariance."""
    if kernels.native_library("generic") is None:
        pytest.skip(f"the portable kernel could not be built: {kernels.unavailable_reason('generic')}")
    for name in NAMES:
        _check_kernel(name, "generic")


@needs_kernel
def test_kernel_refuses_bad_arguments():
    fmt = FORMATS["Q8_0"]
    blocks = _blocks("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="bad arguments"):
        kernels.gguf_linear(torch.zeros(2, 64, dtype=torch.float64), blocks, fmt)
    with pytest.raises(ValueError, match="bad arguments"):
        kernels.gguf_linear(torch.zeros(2, 32), blocks, fmt)
    with pytest.raises(ValueError, match="bias"):
        kernels.gguf_linear(torch.zeros(2, 64), blocks, fmt, torch.zeros(3))


# ---- PyTorch's int4 kernel --------------------------------------------------------------------------
@pytest.mark.parametrize("name", kernels.INT4_FORMATS)
def test_int4pack_forms_the_files_values(name):
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu")
    fmt, cols = FORMATS[name], _cols(name, 2)
    blocks = _blocks(name, 48, cols)
    packed = kernels.int4pack_of(blocks, fmt, cols)
    assert packed is not None
    w = dequantize(blocks, fmt, cols)
    assert torch.equal(kernels.int4pack_linear(torch.eye(cols), *packed), w.T)
    x = torch.randn(9, cols, generator=torch.Generator().manual_seed(2))
    _check_layer(kernels.int4pack_linear(x, *packed), x, w)


def test_int4pack_refuses_an_inexact_zero_point():
    # Q4_1 with d = 1 and m = 2⁻²⁴: the int4 form needs z = m + 8·d = 8 + 2⁻²⁴, not a float32
    blocks = _blocks("Q4_1", 16, 32)
    blocks[0, 0:2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    blocks[0, 2:4] = torch.tensor([2.0**-24], dtype=torch.float16).view(torch.uint8)
    assert kernels.int4pack_of(blocks, FORMATS["Q4_1"], 32) is None
    assert kernels.int4pack_of(_blocks("Q8_0", 16, 32), FORMATS["Q8_0"], 32) is None  # no int4 form
    assert kernels.int4pack_of(_blocks("Q4_0", 15, 32), FORMATS["Q4_0"], 32) is None  # rows not 16k


# ---- the modules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Q4_K", "Q8_0"])
def test_gguf_linear_module(name):
    fmt, cols = FORMATS[name], _cols(name, 2)
    blocks, bias = _blocks(name, 48, cols), torch.randn(48)
    layer = GGUFLinear(blocks, name, cols, bias=bias)
    w = dequantize(blocks, fmt, cols)
    x = torch.randn(2, 5, cols)
    expected = ["gguf"] * (kernels.native_library() is not None) + ["int4pack"] * (name == "Q4_K") + ["dequant"]
    assert layer.kernels() == expected and layer.kernel == expected[0]
    for kernel in layer.kernels():
        layer.set_kernel(kernel)
        y = layer(x)
        assert y.shape == (2, 5, 48)
        _check_layer(y.reshape(10, 48), x.reshape(10, cols), w, bias)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert layer(torch.zeros(0, cols)).shape == (0, 48)
    with pytest.raises(ValueError, match="unknown GGUF kernel"):
        layer.set_kernel("fast")
    with pytest.raises(ValueError, match="input has 7 features"):
        layer(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="expected uint8 blocks"):
        GGUFLinear(blocks[:, :-1], name, cols)
    if name == "Q8_0":
        with pytest.raises(ValueError, match="int4 kernel cannot represent"):
            layer.set_kernel("int4pack")


def test_gguf_embedding_gathers_exact_rows():
    blocks = _blocks("Q6_K", 50, 256)
    emb = GGUFEmbedding(blocks, "Q6_K", 256)
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    out = emb(ids)
    assert out.shape == (2, 3, 256)
    assert torch.equal(out, dequantize(blocks, FORMATS["Q6_K"], 256)[ids])


def test_without_a_compiler_layers_fall_back_to_dequantizing(monkeypatch):
    isa = "generic"  # a build of its own, so the real one stays cached
    kernels._library.cache_clear()
    monkeypatch.setattr(kernels, "cpu_isa", lambda: isa)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    try:
        assert kernels.native_library() is None
        assert "no C++ compiler" in kernels.unavailable_reason()
        layer = GGUFLinear(_blocks("Q4_0", 16, 64), "Q4_0", 64)
        assert layer.kernel == "dequant" and layer.kernels()[-1] == "dequant"
        with pytest.raises(ValueError, match="not available"):
            layer.set_kernel("gguf")
        x = torch.randn(3, 64)
        _check_layer(layer(x), x, layer.dequantized_weight())
    finally:
        kernels._library.cache_clear()


# ---- tiny models computing on blocks ----------------------------------------------------------------
def _tiny_native(name: str, arch: str, seed: int) -> nn.Module:
    """A tiny random model (hidden 256, so that K-quant rows fit) whose every linear layer is `name` blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = (LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common)))
    gen = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                blocks = random_blocks(FORMATS[name], child.out_features, child.in_features, gen, SCALE[name])
                bias = None if child.bias is None else torch.randn(child.out_features, generator=gen) * 0.1
                setattr(parent, child_name, GGUFLinear(blocks, name, child.in_features, bias=bias))
    model = model.float().eval()
    use_exact_attention(model)
    return model


@needs_kernel
@pytest.mark.parametrize("name", NAMES)
def test_native_model_passes_are_batch_invariant(name, one_thread):
    """A k-token pass scores each token with the same bits as 1-token passes (every linear is the kernel)."""
    lm = HFLanguageModel(_tiny_native(name, "qwen2", seed=0))
    ids = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    lm.reset(64)
    lm.forward(ids[:12], last_only=True)
    lm.commit(12)
    block = lm.forward(ids[12:])  # [8, V]
    for i in range(8):
        one = lm.forward(ids[12 + i : 13 + i])
        assert torch.equal(one[0], block[i]), f"{name}: token {i} differs between the block and the 1-token pass"
        lm.commit(1)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_gives_ar_output_on_a_native_model(name, one_thread):
    arch = "llama" if name in ("Q4_0", "Q8_0", "Q4_K") else "qwen2"
    target, draft = _tiny_native(name, arch, 0), _tiny_native(name, arch, 1)
    pipe = Pipeline.from_models(HFLanguageModel(target), None, HFLanguageModel(draft))
    prompt = torch.randint(0, TINY_VOCAB, (10,), generator=torch.Generator().manual_seed(5)).tolist() * 2
    ref = pipe.generate(prompt, "ar", 24).token_ids
    assert len(set(ref)) > 3  # not a degenerate model
    for method, opts in every_method_example(include_profile_methods=False):
        assert pipe.generate(prompt, method, 24, **opts).token_ids == ref, f"{method} {opts} on {name} blocks"


# ---- loading errors ---------------------------------------------------------------------------------
def test_native_weights_refuse_what_they_cannot_compute(tmp_path):
    from specdec.models.hub import ModelError, load_model

    with pytest.raises(ModelError, match="checkpoint directory"):
        load_model(str(tmp_path), weights="native")
    with pytest.raises(ModelError, match="weights must be one of"):
        load_model(str(tmp_path), weights="int4")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError, match="computes in float32"):
        load_model(str(gguf), weights="native", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="already computes on its GGUF blocks"):
        Pipeline(str(gguf), str(gguf), draft_dtype="int8", weights="native")
