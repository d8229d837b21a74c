"""Native GGUF weights: the block decoders equal `gguf`'s; the integer kernels compute the scheme of
docs/algorithms.md §15 with the same bits on every build this machine runs (the portable build is
the scalar reference), for any number of rows, row tiling and thread count; a planted change of
the float order is caught; a model computing on blocks (the transformers modules and the lean
runner) scores a chain or tree of k tokens exactly as k one-token steps, and every method's greedy
output equals plain decoding on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from specdec.engine.pipeline import Pipeline
from specdec.models.hf import HFLanguageModel
from specdec.models.native import kernels
from specdec.models.native.attention import use_exact_attention
from specdec.models.native.formats import FORMATS, UnsupportedFormat, dequantize, format_of, random_blocks
from specdec.models.native.linear import GGUFEmbedding, GGUFLinear
from specdec.models.native.lm import NativeLM
from specdec.models.native.runner import NativeModel
from specdec.methods.registry import get_method
from tests.conftest import TINY_VOCAB, kernels_required, needs_kernels
from tests.helpers import every_method_example

NAMES = list(FORMATS)
# f16 scales giving dequantized values of about ±0.3, like the tiny test models' weights
SCALE = {"Q4_0": 0.06, "Q4_1": 0.06, "Q5_0": 0.03, "Q5_1": 0.03, "Q8_0": 0.004, "Q4_K": 0.002, "Q5_K": 0.001,
         "Q6_K": 0.0002}
ISAS = kernels.runnable_isas()


def _blocks(name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return random_blocks(FORMATS[name], rows, cols, torch.Generator().manual_seed(seed), SCALE[name])


def _cols(name: str, n: int = 3) -> int:
    return FORMATS[name].block_size * n


def _gguf_reference(blocks: torch.Tensor, name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize as gguf_dequantize

    return gguf_dequantize(blocks.numpy(), GGMLQuantizationType(FORMATS[name].ggml_type))


def _quantized_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [M, K] as the kernels see it: per row and block, d = amax/127, q = rne(x·(127/amax)), d·q."""
    m, k = x.shape
    xb = x.reshape(m, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(())))
    return (q.double() * (amax / 127.0).double()).reshape(m, k)


def _check_scheme(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, block: int,
                  bias: torch.Tensor | None = None) -> None:
    """y equals (quantized x)·wᵀ (+ bias) up to the float32 round-off of the per-block sums."""
    xq, w64 = _quantized_reference(x, block), w.double()
    ref = xq @ w64.T + (bias.double() if bias is not None else 0)
    blocks = x.shape[1] // block
    bound = 4 * (blocks + 8) * 2.0**-24 * (xq.abs() @ w64.abs().T + (bias.double().abs() if bias is not None else 0))
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


# ---- the integer kernels ------------------------------------------------------------------------------
@needs_kernels
def test_activations_are_quantized_per_row_and_block_as_documented():
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0)) * 3
    x[2, :32] = 0.0  # an all-zero block: d = 0, q = 0
    for name, block in (("Q8_0", 32), ("Q4_K", 256)):
        raw = kernels.quantize(x, FORMATS[name])
        per = 40 if block == 32 else 340
        blocks = raw.view(5 * (512 // block), per)
        d = blocks[:, :4].contiguous().view(torch.float32).reshape(5, -1)
        q_at = 8 if block == 32 else 20
        q = blocks[:, q_at:q_at + block].contiguous().view(torch.int8).reshape(5, 512).float()
        xb = x.reshape(5, -1, block)
        amax = xb.abs().amax(-1)
        assert torch.equal(d, amax / 127.0)
        expect = torch.round(xb * torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(())).unsqueeze(-1))
        assert torch.equal(q, expect.reshape(5, 512))
        if block == 32:
            sums = blocks[:, 4:8].contiguous().view(torch.int32)
            assert torch.equal(sums.reshape(-1).long(), expect.reshape(-1, 32).sum(-1).long())
        else:  # Σq per 32 (the K formats' mins), then Q6_K's offsets −32·Σq per 16 values
            sums = blocks[:, 4:20].contiguous().view(torch.int16).reshape(-1).long()
            assert torch.equal(sums, expect.reshape(-1, 32).sum(-1).long())
            offsets = blocks[:, 276:340].contiguous().view(torch.int32).reshape(-1).long()
            assert torch.equal(offsets, -32 * expect.reshape(-1, 16).sum(-1).long())


def _invariance_violations(lib_isa: str | None, name: str, planted: bool = False) -> list[str]:
    """Rows of M-row products (M = 1…64, 1 and 2 threads) that differ from the same row alone."""
    fmt, cols, rows = FORMATS[name], _cols(name, 3), 37  # 37 outputs: a partial last panel
    blocks = _blocks(name, rows, cols)
    x = torch.randn(64, cols, generator=torch.Generator().manual_seed(1))
    lib = kernels.planted_library(lib_isa or "generic") if planted else kernels.native_library(lib_isa)
    packed = kernels.repack(blocks, fmt, cols)
    bias = torch.zeros(48)
    bias[:rows] = torch.randn(rows, generator=torch.Generator().manual_seed(2))

    def run(xs: torch.Tensor) -> torch.Tensor:
        xq = torch.empty(lib.specdec_quantized_bytes(fmt.code, xs.shape[0], cols), dtype=torch.uint8)
        lib.specdec_quantize(fmt.code, xs.data_ptr(), xs.shape[0], cols, cols, xq.data_ptr())
        y = torch.empty(xs.shape[0], rows)
        assert lib.specdec_qgemm(fmt.code, xq.data_ptr(), xs.shape[0], cols, packed.data_ptr(), rows,
                                 bias.data_ptr(), y.data_ptr(), rows) == 0
        return y

    singles = torch.cat([run(x[i : i + 1].contiguous()) for i in range(64)])
    bad = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for m in range(1, 65):
                if not torch.equal(run(x[:m].contiguous()), singles[:m]):
                    bad.append(f"{m} rows, {n_threads} threads")
    finally:
        torch.set_num_threads(threads)
    return bad


@needs_kernels
@pytest.mark.parametrize("name", NAMES)
def test_every_build_computes_the_scheme_with_the_same_bits(name):
    """Each build this CPU runs agrees bit for bit with the portable (scalar) build, which computes
    the documented scheme: (x quantized per row and block)·wᵀ up to float32 round-off."""
    fmt, cols, rows = FORMATS[name], _cols(name, 3), 37
    blocks = _blocks(name, rows, cols)
    w = dequantize(blocks, fmt, cols)
    x = torch.randn(11, cols, generator=torch.Generator().manual_seed(3))
    bias = torch.zeros(48)
    bias[:rows] = torch.randn(rows, generator=torch.Generator().manual_seed(4))
    outs = {isa: kernels.linear(x, kernels.repack(blocks, fmt, cols, isa=isa), fmt, rows, bias, isa=isa)
            for isa in ISAS}
    _check_scheme(outs["generic"], x, w, fmt.block_size, bias[:rows])
    for isa, y in outs.items():
        assert torch.equal(y, outs["generic"]), f"{isa} differs from the portable build on {name}"


@needs_kernels
@pytest.mark.parametrize("name", NAMES)
def test_rows_are_bit_identical_for_any_row_count_and_threads(name):
    for isa in ISAS:
        assert _invariance_violations(isa, name) == [], f"{isa}, {name}"


@needs_kernels
def test_projections_in_one_call_equal_one_call_each():
    """The decoder computes q, k and v (and gate and up) in one parallel call over all their panels:
    every output the same bits as its own call, whatever the formats, rows, builds and threads."""
    specs = [("Q4_K", 37), ("Q5_0", 16), ("Q6_K", 50), ("Q8_0", 3)]
    cols = 512
    gen = torch.Generator().manual_seed(5)
    weights = [(FORMATS[n], kernels.repack(_blocks(n, rows, cols), FORMATS[n], cols), rows) for n, rows in specs]
    bias = torch.zeros(64)
    bias[:50] = torch.randn(50, generator=gen)
    threads = torch.get_num_threads()
    try:
        for isa in ISAS:
            for m in (1, 5, 16):
                x = torch.randn(m, cols, generator=gen)
                xq = {f.block_size: kernels.quantize(x, f, isa) for f, _, _ in weights}
                jobs = [(xq[f.block_size], cols, packed, f, rows, bias if i == 2 else None)
                        for i, (f, packed, rows) in enumerate(weights)]
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    together = kernels.qgemm_many(jobs, m, isa)
                    alone = [kernels.qgemm(xq_, m, c, p, f, n, b, isa=isa) for xq_, c, p, f, n, b in jobs]
                    for (f, _, _), y, ref in zip(weights, together, alone):
                        assert torch.equal(y, ref), f"{isa}, {f.name}, {m} rows, {n_threads} threads"
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_a_planted_order_change_is_caught():
    """A build that sums the blocks of multi-row tiles backwards must fail the invariance check."""
    if kernels.planted_library() is None:
        pytest.fail(f"the planted build could not be made: {kernels.unavailable_reason('generic')}")
    assert _invariance_violations("generic", "Q4_K", planted=True)
    assert _invariance_violations("generic", "Q8_0", planted=True)


@needs_kernels
def test_a_build_killed_midway_does_not_block_the_next():
    """torch's build lock is a file a killed builder leaves behind; loading must not wait on it."""
    import subprocess
    import sys

    isa = kernels.cpu_isa()
    assert kernels.native_library(isa) is not None
    build_dir = kernels.build_folder(isa)
    (build_dir / "lock").touch()
    code = f"from specdec.models.native import kernels; assert kernels._build({isa!r}).is_file()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=240)
    assert not (build_dir / "lock").exists()


@needs_kernels
def test_kernel_refuses_bad_arguments():
    fmt = FORMATS["Q8_0"]
    packed = kernels.repack(_blocks("Q8_0", 4, 64), fmt, 64)
    with pytest.raises(ValueError, match="contiguous float32"):
        kernels.quantize(torch.zeros(2, 64, dtype=torch.float64), fmt)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quantize(torch.zeros(2, 48), fmt)
    with pytest.raises(ValueError, match="padded to a multiple of 16"):
        kernels.linear(torch.zeros(2, 64), packed, fmt, 4, torch.zeros(3))
    with pytest.raises(ValueError, match="repack"):
        kernels.repack(_blocks("Q8_0", 4, 64)[:, :-1], fmt, 64)


def test_isa_setting_forces_a_lower_build(monkeypatch):
    monkeypatch.setenv(kernels.ISA_ENV, "generic")
    assert kernels.cpu_isa() == "generic"
    monkeypatch.setenv(kernels.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="not an instruction set"):
        kernels.cpu_isa()
    missing = [isa for isa in kernels.ISAS if isa not in ISAS]
    if missing:
        monkeypatch.setenv(kernels.ISA_ENV, missing[0])
        with pytest.raises(ValueError, match="cannot run on this CPU"):
            kernels.cpu_isa()


# ---- the modules --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Q4_K", "Q8_0"])
def test_gguf_linear_module(name):
    fmt, cols = FORMATS[name], _cols(name, 2)
    blocks, bias = _blocks(name, 48, cols), torch.randn(48)
    layer = GGUFLinear(blocks, name, cols, bias=bias)
    w = dequantize(blocks, fmt, cols)
    x = torch.randn(2, 5, cols)
    expected = ["gguf"] * (kernels.native_library() is not None) + ["dequant"]
    assert layer.kernels() == expected and layer.kernel == expected[0]
    for kernel in layer.kernels():
        layer.set_kernel(kernel)
        y = layer(x)
        assert y.shape == (2, 5, 48)
        if kernel == "gguf":
            _check_scheme(y.reshape(10, 48), x.reshape(10, cols), w, fmt.block_size, bias)
        else:  # the file's values against float activations
            torch.testing.assert_close(y.reshape(10, 48), x.reshape(10, cols) @ w.T + bias)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert layer(torch.zeros(0, cols)).shape == (0, 48)
    with pytest.raises(ValueError, match="unknown GGUF kernel"):
        layer.set_kernel("fast")
    with pytest.raises(ValueError, match="input has 7 features"):
        layer(torch.zeros(1, 7))
    with pytest.raises(ValueError, match="expected uint8 blocks"):
        GGUFLinear(blocks[:, :-1], name, cols)


def test_gguf_embedding_gathers_exact_rows():
    blocks = _blocks("Q6_K", 50, 256)
    emb = GGUFEmbedding(blocks, "Q6_K", 256)
    ids = torch.tensor([[3, 49, 0], [3, 7, 7]])
    out = emb(ids)
    assert out.shape == (2, 3, 256)
    assert torch.equal(out, dequantize(blocks, FORMATS["Q6_K"], 256)[ids])


def test_gguf_embedding_kept_rows_are_the_dequantized_rows():
    """Small lookups go through the kept (least recently used) rows: the same values as a fresh
    dequantization, through hits, misses, repeats within a lookup and rows dropped for room."""
    blocks = _blocks("Q4_K", 40, 256)
    table = dequantize(blocks, FORMATS["Q4_K"], 256)
    emb = GGUFEmbedding(blocks, "Q4_K", 256)
    emb.CACHED_ROWS = 3
    gen = torch.Generator().manual_seed(5)
    for _ in range(60):
        ids = torch.randint(0, 8, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen)
        assert torch.equal(emb(ids), table[ids])
        assert len(emb._kept) <= 3
    big = torch.arange(40).flip(0)  # a prompt's lookup: dequantized at once, past the kept rows
    assert torch.equal(emb(big), table[big])
    emb(torch.tensor([5]))
    emb(torch.tensor([5]))[0].fill_(0.0)  # a caller writing into its result leaves the kept row as it was
    assert torch.equal(emb(torch.tensor([5])), table[[5]])
    with pytest.raises(IndexError):
        emb(torch.tensor([40]))
    import copy
    import pickle

    for twin in (copy.deepcopy(emb), pickle.loads(pickle.dumps(emb))):  # the lock is made anew, no rows kept
        assert len(twin._kept) == 0 and torch.equal(twin(torch.tensor([5, 6])), table[[5, 6]])


def test_a_chain_block_plans_as_the_general_plan_of_the_same_chain():
    """`block_plan` plans a chain (after a pending chain) without a mask; its positions, slots and
    visibility are those the general plan gives the same chain as explicit parents."""
    from specdec.core.tree import chain_parents
    from specdec.models.native.lm import block_plan, flat_visibility

    for kv_len, n_prev, n, append in ((0, 0, 1, False), (37, 0, 5, False), (37, 3, 2, True), (9, 4, 3, False)):
        pending = chain_parents(n_prev)
        parents = chain_parents(n) + (n_prev if append else 0)
        fast, general = block_plan(kv_len, pending, None, n, append), block_plan(kv_len, pending, parents, n, append)
        for field in ("positions", "slots", "prefix", "all_parents"):
            assert torch.equal(getattr(fast, field), getattr(general, field)), (kv_len, n_prev, n, append, field)
        assert all(torch.equal(a, b) for a, b in zip(flat_visibility(fast.vis), flat_visibility(general.vis)))
    tree = torch.tensor([-1, 0, 0])  # after a pending tree, a chain goes the general way
    assert torch.equal(block_plan(5, tree, None, 2, True).all_parents, torch.tensor([-1, 0, 0, 2, 3]))


def test_without_a_compiler_layers_fall_back_to_dequantizing(monkeypatch):
    kernels._library.cache_clear()
    monkeypatch.setenv(kernels.ISA_ENV, "generic")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setattr(kernels, "runnable_isas", lambda: ["generic"])
    try:
        assert kernels.native_library() is None
        assert "no C++ compiler" in kernels.unavailable_reason()
        layer = GGUFLinear(_blocks("Q4_0", 16, 64), "Q4_0", 64)
        assert layer.kernel == "dequant" and layer.kernels() == ["dequant"]
        with pytest.raises(ValueError, match="not available"):
            layer.set_kernel("gguf")
        x = torch.randn(3, 64)
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T)
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
    emb = random_blocks(FORMATS["Q8_0"], TINY_VOCAB, 256, gen, SCALE["Q8_0"] * 20)
    model.model.embed_tokens = GGUFEmbedding(emb, "Q8_0", 256)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                blocks = random_blocks(FORMATS[name], child.out_features, child.in_features, gen, SCALE[name])
                bias = None if child.bias is None else torch.randn(child.out_features, generator=gen) * 0.1
                setattr(parent, child_name, GGUFLinear(blocks, name, child.in_features, bias=bias))
    model = model.float().eval()
    use_exact_attention(model)
    return model


def _near_native(name: str, arch: str, seed: int = 0, share: float = 0.3) -> nn.Module:
    """A draft for `_tiny_native(name, arch, seed)`: the same model with a random `share` of its output
    head's rows (tokens) replaced by other random blocks, so that it agrees with the target on most
    tokens and not on all: a test's drafts are then both accepted and rejected. (A draft of another
    seed agrees with these tiny random targets almost never, which leaves only rejection tested.)"""
    model = _tiny_native(name, arch, seed)
    gen = torch.Generator().manual_seed(seed + 99)
    head = model.lm_head
    other = random_blocks(FORMATS[name], head.out_features, head.in_features, gen, SCALE[name])
    swapped = torch.rand(head.out_features, generator=gen) < share
    blocks = head.blocks.clone()
    blocks[swapped] = other[swapped]
    model.lm_head = GGUFLinear(blocks, name, head.in_features, bias=head.bias)
    return model


def _passes_equal_steps(lm, ids: torch.Tensor) -> list[str]:
    """Where a chain pass, a tree pass and a level appended to a pending tree score a token
    differently from the 1-token step that decodes it."""
    bad = []
    lm.reset(64)
    lm.forward(ids[:12], last_only=True)
    lm.commit(12)
    steps = []
    for i in range(8):
        steps.append(lm.forward(ids[12 + i : 13 + i])[0])
        lm.commit(1)
    lm.crop(12)
    chain = lm.forward(ids[12:20])
    bad += [f"chain token {i}" for i in range(8) if not torch.equal(chain[i], steps[i])]
    # a tree: two children of the root, the real continuation under the second one
    tree = lm.forward(torch.tensor([int(ids[12]), 5, int(ids[12]), int(ids[13])]), torch.tensor([-1, -1, -1, 2]))
    bad += [f"tree node {n}" for n, s in ((0, 0), (2, 0), (3, 1)) if not torch.equal(tree[n], steps[s])]
    level = lm.forward(ids[14:16], torch.tensor([3, 4]), append=True)  # grows the tree under node 3
    bad += [f"appended level {i}" for i in range(2) if not torch.equal(level[i], steps[2 + i])]
    lm.commit(torch.tensor([2, 3, 4, 5]))
    after = lm.forward(ids[16:17])
    if not torch.equal(after[0], steps[4]):
        bad.append("the step after committing a tree path")
    return bad


@needs_kernels
@pytest.mark.parametrize("name", NAMES)
def test_transformers_native_model_passes_equal_one_token_steps(name, one_thread):
    lm = HFLanguageModel(_tiny_native(name, "qwen2", seed=0))
    ids = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    assert _passes_equal_steps(lm, ids) == []


@needs_kernels
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_runner_passes_equal_one_token_steps_on_every_build(arch):
    """The lean runner scores chains, trees and appended levels as 1-token steps, on every build this
    machine runs, with the same logits on each; with 1 and 2 threads."""
    model = NativeModel.from_hf(_tiny_native("Q4_K", arch, seed=0))
    ids = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    reference = None
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for isa in ISAS:
                lm = NativeLM(model.with_library(kernels.native_library(isa)))
                assert _passes_equal_steps(lm, ids) == [], f"{isa}, {n_threads} threads"
                lm.reset(64)
                logits = lm.forward(ids)
                reference = logits if reference is None else reference
                assert torch.equal(logits, reference), f"{isa} differs from {ISAS[0]}"
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_lean_runner_with_a_planted_attention_order_is_caught():
    model = NativeModel.from_hf(_tiny_native("Q8_0", "llama", seed=0))
    planted = kernels.planted_library()
    ids = torch.randint(0, TINY_VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    assert _passes_equal_steps(NativeLM(model.with_library(planted)), ids) != []


def _dense_reference(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the same weights (dequantized) in float64 with eager attention: the exact model."""
    import copy

    dense = copy.deepcopy(model)
    for parent in list(dense.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, GGUFLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data = child.dequantized_weight()
                if child.bias is not None:
                    linear.bias.data = child.bias
                setattr(parent, child_name, linear)
    dense.config._attn_implementation = "eager"
    with torch.no_grad():
        return dense.double()(ids[None]).logits[0].float()


@needs_kernels
def test_lean_runner_is_as_close_to_the_exact_model_as_the_transformers_native_one():
    """Same weights and integer linear kernel; the float16 KV cache and our own norms, rotary and
    attention add rounding only: the lean runner is no farther from the float64 model than the
    transformers modules are (both carry the activations' 8-bit rounding)."""
    hf = _tiny_native("Q6_K", "qwen2", seed=0)
    ids = torch.randint(0, TINY_VOCAB, (24,), generator=torch.Generator().manual_seed(4))
    exact = _dense_reference(hf, ids)
    errors = {}
    for name, lm in (("transformers", HFLanguageModel(hf)), ("lean", NativeLM(NativeModel.from_hf(hf)))):
        lm.reset(64)
        logits = lm.forward(ids)
        errors[name] = float(((logits - exact).abs().amax(-1) / exact.abs().amax(-1)).max())
        assert float((logits.argmax(-1) == exact.argmax(-1)).float().mean()) >= 0.9, name
    assert errors["lean"] <= 1.25 * errors["transformers"] + 1e-3, errors


@needs_kernels
def test_lean_runner_commit_equals_a_fresh_prefill():
    model = NativeModel.from_hf(_tiny_native("Q4_0", "llama", seed=2))
    ids = torch.randint(0, TINY_VOCAB, (16,), generator=torch.Generator().manual_seed(6))
    a, b = NativeLM(model), NativeLM(model)
    a.reset(32)
    a.forward(ids[:10])
    a.commit(10)
    a.forward(torch.tensor([int(ids[10]), 7, int(ids[11])]), torch.tensor([-1, -1, 0]))
    a.commit(torch.tensor([0, 2]))
    b.reset(32)
    b.forward(ids[:12])
    b.commit(12)
    for layer in range(model.num_layers):
        for x, y in zip(a.cached_kv(layer), b.cached_kv(layer)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_gives_ar_output_on_native_models(name, one_thread):
    arch = "llama" if name in ("Q4_0", "Q8_0", "Q4_K", "Q5_1") else "qwen2"
    target, draft = _tiny_native(name, arch, 0), _near_native(name, arch, 0)
    # Q4_K and Q5_0 run on the lean runner (the kernels are required where they are built), the rest
    # through the transformers modules computing on blocks.
    lean = name in ("Q4_K", "Q5_0") and (kernels.native_library() is not None or kernels_required())
    wrap = (lambda m: NativeLM(NativeModel.from_hf(m))) if lean else HFLanguageModel
    pipe = Pipeline.from_models(wrap(target), None, wrap(draft))
    prompt = torch.randint(0, TINY_VOCAB, (10,), generator=torch.Generator().manual_seed(5)).tolist() * 2
    ref = pipe.generate(prompt, "ar", 24)
    assert len(set(ref.token_ids)) > 3  # not a degenerate model
    accepted = 0
    for method, opts in every_method_example(include_profile_methods=False):
        res = pipe.generate(prompt, method, 24, **opts)
        assert res.token_ids == ref.token_ids, f"{method} {opts} on {name} blocks"
        accepted += res.stats.accepted_tokens
        if get_method(method).needs_draft_model:  # both of the commit's paths: drafts kept and drafts refused
            assert 0 < res.stats.accepted_tokens < res.stats.draft_tokens, (method, opts, res.stats)
    assert accepted > 0


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
    with pytest.raises(ValueError, match="--offload streams dense weights"):
        Pipeline(str(gguf), weights="native", offload=True)
