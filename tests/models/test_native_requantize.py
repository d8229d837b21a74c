"""A native draft requantized to a smaller block format: each block lands on the new format's grid
within half a step (one at the far end), formats already as small come back as they are, and a requantized draft keeps the
greedy output (only acceptance changes)."""

from __future__ import annotations

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import Pipeline
from specdec.methods.sps import ModelDrafter
from specdec.models.native import formats
from specdec.models.native.formats import FORMATS, UnsupportedFormat, dequantize, random_blocks, requantize
from specdec.models.native.lm import NativeLM
from tests.conftest import needs_kernels

Q4_0 = FORMATS["Q4_0"]
WIDER = ["Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q5_K", "Q6_K"]
SCALE = {"Q4_1": 0.06, "Q5_0": 0.03, "Q5_1": 0.03, "Q8_0": 0.004, "Q5_K": 0.001, "Q6_K": 0.0002}


@pytest.mark.parametrize("name", WIDER)
def test_wider_blocks_land_on_the_q4_0_grid(name, monkeypatch):
    fmt, cols = FORMATS[name], 512
    blocks = random_blocks(fmt, 6, cols, torch.Generator().manual_seed(3), SCALE[name])
    out, out_fmt = requantize(blocks, fmt, cols, Q4_0)
    assert out_fmt is Q4_0 and out.dtype == torch.uint8 and out.shape == (6, Q4_0.row_bytes(cols))
    assert out.numel() < blocks.numel()
    before = dequantize(blocks, fmt, cols).reshape(6, -1, 32)
    after = dequantize(out, Q4_0, cols).reshape(6, -1, 32)
    # Q4_0 puts a block's largest magnitude at q = 0 (d = max / -8) and the rest on a grid of |d|,
    # rounded to the nearest step; the far side stops at 7|d|, one step short of −max
    step = (before.gather(-1, before.abs().argmax(-1, keepdim=True)) / 8).abs()
    err = (after - before).abs() / step
    assert float(err.max()) <= 1.01 and float(err.mean()) <= 0.35
    assert bool((err[(before.abs() <= 7 * step)] <= 0.51).all())
    monkeypatch.setattr(formats, "REQUANTIZE_ROWS", 4)  # a few rows at a time: the same blocks
    assert torch.equal(requantize(blocks, fmt, cols, Q4_0)[0], out)


def test_blocks_already_as_small_come_back_as_they_are():
    g = torch.Generator().manual_seed(0)
    for name, to in (("Q4_0", "Q4_0"), ("Q4_K", "Q4_0"), ("Q5_0", "Q8_0")):
        blocks = random_blocks(FORMATS[name], 3, 256, g)
        out, fmt = requantize(blocks, FORMATS[name], 256, FORMATS[to])
        assert out is blocks and fmt is FORMATS[name]
    with pytest.raises(UnsupportedFormat, match="cannot quantize to Q6_K"):
        requantize(random_blocks(FORMATS["Q8_0"], 1, 256, g), FORMATS["Q8_0"], 256, FORMATS["Q6_K"])


def test_draft_quant_is_checked_before_any_load():
    with pytest.raises(ValueError, match="draft quant must be one of"):
        Pipeline("no-such-model", "no-such-draft", draft_quant="Q3_K")
    with pytest.raises(ValueError, match="a dense draft takes --draft-dtype"):
        Pipeline("no-such-model", "no-such-draft", draft_weights="dense", draft_quant="Q4_0")


@pytest.mark.real
@needs_kernels
def test_a_requantized_smollm2_draft_reads_fewer_bytes_and_keeps_the_greedy_output(one_thread):
    name = "smollm2-135m-instruct"  # Q4_1 layers and a tied Q8_0 embedding-head
    pipe = Pipeline(name, name, weights="native", draft_quant="Q4_0", draft_vocab=None, progress=False)
    file_pipe = Pipeline(name, name, weights="native", draft_quant="file", draft_vocab=None, progress=False)
    assert pipe.draft_precisions == ["native-Q4_0"] and file_pipe.draft_precisions == ["native"]
    wider = Pipeline(name, name, weights="native", draft_quant="Q8_0", draft_vocab=None, progress=False)
    assert wider.draft_precisions == ["native"]  # nothing in the file is wider than Q8_0: its blocks as they are
    assert pipe.profile_key(SamplingConfig()) != file_pipe.profile_key(SamplingConfig())
    draft, file_draft = pipe.draft_lm.model, file_pipe.draft_lm.model
    linears = [getattr(layer, n) for layer in draft.layers for n in ("q", "k", "v", "o", "gate", "up", "down")]
    assert {w.fmt.name for w in linears} | {draft.head.fmt.name} == {"Q4_0"}
    assert {w.fmt.name for w in (file_draft.head, file_draft.layers[0].q)} == {"Q8_0", "Q4_1"}
    assert draft.nbytes() < file_draft.nbytes() and draft.embed.fmt.name == "Q8_0"  # the embedding as stored
    pruned = draft.with_pruned_head(torch.arange(0, 4096))  # a tied head's rows, requantized as the head was
    assert pruned.head.fmt.name == "Q4_0" and pruned.head.out_features == 4096

    target = pipe.target_lm
    prompt = pipe.encode("Write a Python function that adds two numbers.", chat=True)
    ref, _ = SpeculativeDecoder(target).generate(prompt, 32)
    out, stats = SpeculativeDecoder(target, ModelDrafter(pipe.draft_lm, SamplingConfig(), 4)).generate(prompt, 32)
    assert out == ref and stats.accepted_tokens > 0
    assert isinstance(pipe.draft_lm, NativeLM)


@pytest.mark.real
@needs_kernels
def test_requantized_blocks_are_kept_for_later_loads(monkeypatch, caplog, tmp_path):
    import shutil

    from specdec.models.hub import load as hub_load
    from specdec.models.hub import native as hub_native
    from specdec.models.hub.resolve import resolve
    from specdec.models.native import load as native_load

    name = "smollm2-135m-instruct"
    hub_load.load_native_lm(name, progress=False)  # the shared native cache exists; work on a copy of it
    shared = hub_load._native_source(resolve(name), False)[1]
    shutil.copytree(shared, tmp_path / shared.name, ignore=shutil.ignore_patterns("requantized-*"))
    monkeypatch.setattr(hub_load, "native_root", lambda: tmp_path)
    kept = hub_native._requantized_path(tmp_path / shared.name, Q4_0)
    said: list[str] = []

    def packed(lm) -> list[torch.Tensor]:
        return [lm.model.layers[0].q.packed, lm.model.layers[-1].down.packed, lm.model.head.packed]

    first, _, _ = hub_load.load_native_lm(name, progress=False, requantize_to=Q4_0, say=said.append)
    assert kept.is_file() and len(said) == 1 and "requantizing" in said[0]

    def refuse(*args):
        raise AssertionError("requantized again although the blocks were kept")

    with monkeypatch.context() as m:
        m.setattr(native_load, "requantize", refuse)
        again, _, _ = hub_load.load_native_lm(name, progress=False, requantize_to=Q4_0, say=said.append)
    assert all(torch.equal(a, b) for a, b in zip(packed(first), packed(again))) and len(said) == 1

    kept.write_bytes(b"not a safetensors file")  # a damaged copy costs a load its time, nothing else
    with caplog.at_level("WARNING"):
        third, _, _ = hub_load.load_native_lm(name, progress=False, requantize_to=Q4_0)
    assert "requantizing again" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(packed(first), packed(third))) and kept.stat().st_size > 1000

    # Blocks made from another file are not used: the metadata names the source.
    meta = hub_load._native_source(resolve(name), False)[2]
    hub_native._write_requantized(kept.parent, Q4_0, {"lm_head": torch.zeros(1, 18, dtype=torch.uint8)},
                                  {**meta, "size": -1})
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert hub_native._read_requantized(kept.parent, Q4_0, meta) == {}
    assert "does not name this file" in caplog.text

    # A cache that cannot be written (safetensors' own error, not an OSError) costs the load nothing.
    def full(*args, **kw):
        from safetensors import SafetensorError

        raise SafetensorError("No space left on device")

    kept.unlink()
    monkeypatch.setattr("safetensors.torch.save_file", full)
    fourth, _, _ = hub_load.load_native_lm(name, progress=False, requantize_to=Q4_0)
    assert all(torch.equal(a, b) for a, b in zip(packed(first), packed(fourth))) and not kept.exists()
