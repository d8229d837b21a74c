"""Linear paths chosen per row-count bucket: the choice follows the (fake) clock, the dispatcher routes
by rows, the model computes the same function, the choice is cached per machine, a path that is not
numerically equal is refused, and memory pressure falls back to one path per shape."""

import json

import pytest
import torch
from torch import nn

import specdec.models.dense.kernel_choice as kc
from specdec.core.hardware import fingerprint
from specdec.engine.decoder import SpeculativeDecoder
from specdec.models.hf import HFLanguageModel
from specdec.models.dense.kernel_choice import (
    apply_linear_paths, best_single_path, choose_buckets, format_kernel_report, kernel_cache_path,
)
from specdec.models.dense.linear_paths import (
    BUCKET_ROWS, PACKED, PLAIN, BlockSizeLinear, LinearPath, PackedLinear, bucket_label, bucket_of,
)
from tests.conftest import TINY_VOCAB, tiny_hf_model

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path / "measurements"))


def test_buckets():
    assert [bucket_of(r) for r in (1, 2, 3, 4, 5, 8, 9, 64, 65, 128, 1000)] == [0, 1, 2, 2, 3, 3, 4, 6, 7, 7, 7]
    assert [bucket_label(b) for b in range(len(BUCKET_ROWS))] == ["1", "2", "3-4", "5-8", "9-16", "17-32", "33-64",
                                                                  "65+"]


def test_choose_buckets_keeps_the_own_path_unless_another_clearly_wins():
    ms = {"plain": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0],
          "fast": [1.5, 1.99, 2.0, 2.0, 4.0, 8.0, 16.0, 32.0]}
    # bucket 1: 1.99 vs 2.0 is within the margin, so the layer keeps its own weight there
    assert choose_buckets(ms) == ["plain", "plain", "fast", "fast", "fast", "fast", "fast", "fast"]
    assert best_single_path(ms) == "fast"
    assert best_single_path({"plain": [1.0] * 8, "fast": [1.0] * 8}) == "plain"  # a tie keeps the own path


def fake_timer(slow_rows_for_packed: int):
    """A clock where the packed path costs 2 ms up to `slow_rows_for_packed` rows and 0.5 ms above,
    plain always 1 ms; it counts its calls."""
    calls = []

    def timer(kernel, x):
        calls.append(type(kernel).__name__)
        rows = x.numel() // x.shape[-1]
        if isinstance(kernel, PackedLinear):
            return 2.0 if rows <= slow_rows_for_packed else 0.5
        return 1.0

    timer.calls = calls
    return timer


class Recorder(nn.Module):
    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return x


def test_dispatcher_routes_by_rows():
    log = []
    layer = BlockSizeLinear({"a": Recorder("a", log), "b": Recorder("b", log)},
                            ["a", "a", "b", "b", "b", "b", "b", "a"], 3, 3)
    for rows in (1, 2, 3, 4, 8, 64, 65, 300):
        layer(torch.zeros(1, rows, 3))
    assert log == ["a", "a", "b", "b", "b", "b", "a", "a"]
    with pytest.raises(ValueError, match="one known path per bucket"):
        BlockSizeLinear({"a": Recorder("a", log)}, ["a", "b"] * 4, 3, 3)


@needs_onednn
def test_measured_choice_per_bucket_same_function_and_cached(arch):
    plain = tiny_hf_model(arch, seed=0)
    model = tiny_hf_model(arch, seed=0)
    timer = fake_timer(slow_rows_for_packed=2)
    report = apply_linear_paths(model, "auto", timer=timer, memory_bytes=None)
    assert timer.calls and report.replaced == sum(isinstance(m, BlockSizeLinear) for m in model.modules()) > 0
    for shape in report.shapes:
        assert shape.bucket_paths == ["plain", "plain"] + ["packed-onednn"] * 6 and not shape.cached
        assert shape.rel_diff["packed-onednn"] < 1e-4
    assert "rows 3-4" in format_kernel_report(report)
    ids = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-4, rtol=1e-4)
    prompt = list(range(3, 15))
    ref, _ = SpeculativeDecoder(HFLanguageModel(plain)).generate(prompt, 24)
    assert SpeculativeDecoder(HFLanguageModel(model)).generate(prompt, 24)[0] == ref

    # Cached for this machine: a second load measures nothing and makes the same choice.
    def no_clock(kernel, x):
        raise AssertionError("measured again although the choice is cached")

    again = apply_linear_paths(tiny_hf_model(arch, seed=0), "auto", timer=no_clock, memory_bytes=None)
    assert [s.bucket_paths for s in again.shapes] == [s.bucket_paths for s in report.shapes]
    assert all(s.cached for s in again.shapes)


@needs_onednn
def test_other_machine_or_corrupt_cache_measures_again(monkeypatch, caplog):
    apply_linear_paths(tiny_hf_model("llama"), "auto", timer=fake_timer(2), memory_bytes=None)
    path = kernel_cache_path(fingerprint("cpu"))
    assert path.is_file()
    # Another thread count is another machine as far as speed goes: measured again, other file.
    old = torch.get_num_threads()
    torch.set_num_threads(1 if old > 1 else 2)
    try:
        timer = fake_timer(64)
        rep = apply_linear_paths(tiny_hf_model("llama"), "auto", timer=timer, memory_bytes=None)
        assert timer.calls and rep.shapes[0].bucket_paths == ["plain"] * 7 + ["packed-onednn"]
        assert kernel_cache_path(fingerprint("cpu")) != path
    finally:
        torch.set_num_threads(old)
    path.write_text("{broken")
    timer = fake_timer(2)
    with caplog.at_level("WARNING"):
        apply_linear_paths(tiny_hf_model("llama"), "auto", timer=timer, memory_bytes=None)
    assert timer.calls and "unreadable cache file" in caplog.text
    assert json.loads(path.read_text())["version"] == kc.KERNEL_CACHE_VERSION  # rewritten


def test_a_path_that_changes_the_function_is_refused(caplog):
    class Noisy(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x) * 1.01  # 1% off: far beyond float32 round-off

    noisy = LinearPath("noisy", "wrong on purpose", lambda layer: Noisy(layer))
    model = tiny_hf_model("llama")
    timer = fake_timer(0)  # the noisy path would be "faster" (it is not PackedLinear: 1 ms like plain)
    with caplog.at_level("WARNING"):
        report = apply_linear_paths(model, "auto", paths=[PLAIN, noisy], timer=timer, memory_bytes=None)
    assert report.replaced == 0 and all(s.candidates == ["plain"] for s in report.shapes)
    assert "differs from" in caplog.text and not timer.calls


@needs_onednn
def test_memory_pressure_falls_back_to_one_path_per_shape():
    model = tiny_hf_model("llama")
    report = apply_linear_paths(model, "auto", timer=fake_timer(2), memory_bytes=1000, use_cache=False)
    assert report.memory_fallback
    assert all(len(set(s.bucket_paths)) == 1 for s in report.shapes)
    assert not any(isinstance(m, BlockSizeLinear) for m in model.modules())
    assert any(isinstance(m, PackedLinear) for m in model.modules())  # packed wins 6 buckets of 8


@needs_onednn
def test_modes_on_and_off():
    model = tiny_hf_model("llama")
    assert apply_linear_paths(model, "off").replaced == 0
    on = apply_linear_paths(model, "on")
    assert on.replaced == sum(isinstance(m, PackedLinear) for m in model.modules()) > 0
    assert on.paths_used() == {PACKED.name}
    with pytest.raises(ValueError, match="must be one of auto, on, off"):
        apply_linear_paths(model, "fast")
