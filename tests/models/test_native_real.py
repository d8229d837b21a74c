"""Native GGUF weights on the real files: every layer of SmolLM2 holds exactly the dense model's values,
the kernels compute the scheme on tensors of every format in the three known files with the same bits
on every build, the lean runner scores chains and trees of SmolLM2 as one-token steps, and greedy
decoding with native weights gives the same tokens with every method as plain decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specdec.cli import main
from specdec.engine.pipeline import Pipeline, eos_ids
from specdec.methods.registry import get_method
from specdec.models.hub import load_model
from specdec.models.hub.load import load_native_lm
from specdec.models.hub.registry import KNOWN_MODELS
from specdec.models.native import kernels
from specdec.models.native.formats import dequantize
from specdec.models.native.linear import GGUFEmbedding, GGUFLinear
from specdec.models.native.lm import NativeLM
from tests.conftest import needs_kernels
from tests.helpers import every_method_example
from tests.models.test_native import _check_scheme

pytestmark = pytest.mark.real
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_native():
    return load_model(NAME, weights="native", progress=False)


@pytest.fixture(scope="module")
def smol_lean():
    """(NativeLM, tokenizer, config) of SmolLM2: the lean runner the default path loads."""
    lm, config, tok = load_native_lm(NAME, progress=False)
    assert isinstance(lm, NativeLM)
    return lm, tok, config


def test_every_native_layer_holds_the_dense_models_values(smol, smol_native):
    """The loader maps each GGUF tensor to its layer (llama's q/k row order included): the blocks of every
    native layer dequantize to exactly the dense model's weight, bit for bit."""
    dense, _ = smol
    native, _ = smol_native
    dense_modules = dict(dense.named_modules())
    linears = 0
    for name, module in native.named_modules():
        if isinstance(module, GGUFLinear):
            weight = dense_modules[name].weight
            assert torch.equal(module.dequantized_weight(), weight), name
            linears += 1
        elif isinstance(module, GGUFEmbedding):
            assert torch.equal(module(torch.arange(module.num_embeddings)), dense_modules[name].weight)
    assert linears == 7 * 30 + 1  # every projection of the 30 blocks, and the (tied) head
    assert native.lm_head.blocks is native.model.embed_tokens.blocks  # tied: one copy of the blocks
    for (name, p), (_, q) in zip(native.named_parameters(), dense.named_parameters()):
        assert torch.equal(p, dense.get_parameter(name)), name  # norms


@needs_kernels
@pytest.mark.parametrize("runner", ["transformers", "lean"])
def test_native_smollm2_scores_a_chain_and_a_tree_as_one_token_steps(smol_native, smol_lean, runner):
    """Bit for bit: linear layers, attention and everything between are row-invariant."""
    from specdec.models.hf import HFLanguageModel

    model, tok = smol_native
    lm = HFLanguageModel(model) if runner == "transformers" else smol_lean[0]
    ids = torch.tensor(tok("def fibonacci(n):\n    if n < 2:\n        return n")["input_ids"])
    ctx, block = ids[:-6], ids[-6:]
    lm.reset(len(ids) + 8)
    lm.forward(ctx, last_only=True)
    lm.commit(len(ctx))
    chain = lm.forward(block)  # [6, V]
    tree = lm.forward(block[[0, 1, 2, 3]], torch.tensor([-1, 0, 0, 2]))  # two children of block[0]

    def one_by_one(tokens):  # [m] -> [m, V]
        lm.crop(len(ctx))
        rows = []
        for t in tokens:
            rows.append(lm.forward(t.view(1))[-1])
            lm.commit(1)
        return torch.stack(rows)

    along_chain, along_branch = one_by_one(block), one_by_one(block[[0, 2, 3]])
    assert torch.equal(chain, along_chain)
    assert torch.equal(tree[:2], along_chain[:2]) and torch.equal(tree[2:], along_branch[1:])


def _real_tensors(spec: str):
    """(name, format, blocks, cols) for one non-embedding tensor of each natively computed format of a file."""
    from specdec.models.hub.cache import models_dir
    from specdec.models.hub.convert import open_gguf
    from specdec.models.native.formats import UnsupportedFormat, format_of
    from specdec.models.native.load import tensor_index

    gguf = models_dir() / KNOWN_MODELS[spec].gguf_name
    if not gguf.is_file():
        pytest.skip(f"{spec} is not fetched (specdec models fetch {spec})")
    try:  # transformers' header reader skips the vocabulary: much faster than gguf's
        from transformers.integrations.gguf.reader import GgufHeader

        header = GgufHeader.from_file(str(gguf))
        entries = [(t.name, t.ggml_type, t.shape, header.data_start + t.offset, t.nbytes) for t in header.tensors]
    except (ImportError, AttributeError, ValueError):  # older transformers, or a type it cannot size (Q5_0)
        entries = tensor_index(open_gguf(gguf))[1]
    blob = np.memmap(gguf, mode="r", dtype=np.uint8)
    seen = {}
    for name, ggml_type, shape, offset, nbytes in entries:
        try:
            fmt = format_of(ggml_type)
        except UnsupportedFormat:
            continue
        if fmt.name not in seen and name != "token_embd.weight" and len(shape) == 2:
            rows, cols = min(shape[0], 512), shape[1]  # a slice keeps the test fast; every row is independent
            raw = np.array(blob[offset : offset + rows * fmt.row_bytes(cols)]).reshape(rows, -1)
            seen[fmt.name] = (name, fmt, torch.from_numpy(raw), cols)
    return list(seen.values())


@pytest.mark.slow
@needs_kernels
@pytest.mark.parametrize("spec", sorted(KNOWN_MODELS))
def test_kernels_compute_the_scheme_on_real_tensors(spec):
    from gguf import GGMLQuantizationType, dequantize as gguf_dequantize

    tensors = _real_tensors(spec)
    assert tensors
    gen = torch.Generator().manual_seed(0)
    for name, fmt, blocks, cols in tensors:
        ref = gguf_dequantize(blocks.numpy(), GGMLQuantizationType(fmt.ggml_type))
        w = dequantize(blocks, fmt, cols)
        assert np.array_equal(w.numpy().view(np.uint32), ref.view(np.uint32)), name
        x = torch.randn(5, cols, generator=gen)
        outs = {isa: kernels.linear(x, kernels.repack(blocks, fmt, cols), fmt, blocks.shape[0], isa=isa)
                for isa in kernels.runnable_isas()}
        y = outs["generic"]
        _check_scheme(y, x, w, fmt.block_size)
        assert all(torch.equal(o, y) for o in outs.values()), f"{name}: builds differ"
        assert torch.equal(GGUFLinear(blocks, fmt, cols)(x[2:3]), y[2:3]), f"{name}: not batch-invariant"


@needs_kernels
def test_greedy_native_smollm2_equals_ar_with_every_method(smol_lean):
    lm, tok, config = smol_lean
    shallow = lm.model.first_layers(10)  # a weaker draft sharing the blocks
    pipe = Pipeline.from_models(lm, tok, NativeLM(shallow), eos_ids(config, tok))
    prompt = "Write a Python function that returns the n-th Fibonacci number."
    ref = pipe.generate(prompt, "ar", 20).token_ids
    assert len(ref) == 20
    accepted = 0
    for method, opts in every_method_example(include_profile_methods=False):
        res = pipe.generate(prompt, method, 20, **opts)
        assert res.token_ids == ref, (method, opts)
        accepted += res.stats.accepted_tokens
        if get_method(method).needs_draft_model:  # the real blocks' commit of kept drafts and of refused ones
            assert 0 < res.stats.accepted_tokens < res.stats.draft_tokens, (method, opts, res.stats)
    assert accepted > 0


def test_the_native_cache_spares_later_loads_the_gguf_parse(smol_native, monkeypatch):
    import specdec.models.hub.native as native

    def parse(*_):
        raise AssertionError("the GGUF metadata was parsed again")

    monkeypatch.setattr(native, "open_gguf", parse)
    monkeypatch.setattr(native, "_loaded", {})  # not this process's copy either
    model, tok = load_model(NAME, weights="native", progress=False)
    assert isinstance(model.lm_head, GGUFLinear) and tok.get_vocab() == smol_native[1].get_vocab()
    lm, _, _ = load_native_lm(NAME, progress=False)
    assert isinstance(lm, NativeLM)


def test_cli_generate_and_profile_with_native_weights(capsys, tmp_path):
    rc = main(["generate", "--target", NAME, "--draft", NAME, "--weights", "native", "--method", "sps",
               "--max-new-tokens", "8", "--json", "--prompt", "The capital of France is"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stats"]["new_tokens"] == 8
    out = tmp_path / "profile.json"
    rc = main(["profile", "--target", NAME, "--draft", NAME, "--ks", "1,2", "--repeats", "1", "--context", "8",
               "--paths", "native", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    for role, expected in (("target", ["native"]), ("draft", ["native", "native, Q4_0 (--draft-quant)"])):
        paths = [p["path"] for p in report["models"][role]["profiles"]]
        assert paths == expected, paths
        assert all(float(v) > 0 for p in report["models"][role]["profiles"] for v in p["ms"].values())
