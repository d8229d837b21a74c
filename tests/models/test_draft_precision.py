"""The draft's precision is chosen by a (fake) clock, refused when it would disagree with the float32
draft, cached per machine, and never changes the output."""

import pytest
import torch

import specdec.models.dense.draft_precision as dp
from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sps import ModelDrafter
from specdec.models.dense.draft_precision import choose_draft_precision, format_precision_choice, make_variant
from specdec.models.hf import HFLanguageModel
from tests.conftest import tiny_hf_model

GREEDY = SamplingConfig()
CPU_PRECISIONS = dp.precision_candidates("cpu")


@pytest.fixture(autouse=True)
def _measurements(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path / "measurements"))


def clock(ms: dict[str, float]):
    """A fake clock: each precision's ms per level, recognised by the model's weights."""
    seen = []

    def measure(lm, ids):
        kind = "int8" if lm.dtype == torch.qint8 or "quantized" in str(type(lm.model.model.layers[0].mlp.up_proj)) \
            else str(lm.dtype).replace("torch.", "")
        seen.append(kind)
        return ms[kind], 2 * ms[kind]

    measure.seen = seen
    return measure


def test_the_fastest_agreeing_precision_is_chosen_and_cached():
    fake = clock({"float32": 10.0, "bfloat16": 8.0, "int8": 4.0})
    model, choice = choose_draft_precision(tiny_hf_model("qwen2", seed=0), candidates=["float32", "bfloat16"],
                                           measure=fake, fast_linear="off")
    assert sorted(fake.seen) == ["bfloat16", "float32"]
    assert choice.chosen == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16
    assert choice.agreement["float32"] == 1.0 and "chosen" in format_precision_choice(choice)

    def no_clock(lm, ids):
        raise AssertionError("measured again although the choice is cached")

    again, cached = choose_draft_precision(tiny_hf_model("qwen2", seed=0), candidates=["float32", "bfloat16"],
                                           measure=no_clock, fast_linear="off")
    assert cached.cached and cached.chosen == "bfloat16" and next(again.parameters()).dtype == torch.bfloat16
    # Another set of candidates (another device's) is measured afresh.
    fresh = clock({"float32": 1.0, "bfloat16": 8.0})
    assert choose_draft_precision(tiny_hf_model("qwen2", seed=0), candidates=["float32"], measure=fresh,
                                  fast_linear="off")[1].chosen == "float32"
    assert fresh.seen == ["float32"]


@pytest.mark.skipif("int8" not in CPU_PRECISIONS, reason="no quantized engine in this torch build")
def test_int8_is_chosen_when_fastest(monkeypatch):
    monkeypatch.setattr(dp, "MIN_AGREEMENT", 0.5)  # a tiny random model is touchier than a real one
    fake = clock({"float32": 10.0, "bfloat16": 12.0, "int8": 4.0})
    model, choice = choose_draft_precision(tiny_hf_model("qwen2", seed=0), measure=fake, fast_linear="off")
    assert choice.chosen == "int8" and set(choice.ms_per_level) == set(CPU_PRECISIONS)


def test_a_precision_that_disagrees_with_float32_is_refused(monkeypatch):
    real_top1 = dp.top1

    def top1(lm, ids):  # the bfloat16 copy "predicts" something else at every position
        pred = real_top1(lm, ids)
        return pred + 1 if lm.dtype == torch.bfloat16 else pred

    monkeypatch.setattr(dp, "top1", top1)
    fake = clock({"float32": 10.0, "bfloat16": 1.0})
    _, choice = choose_draft_precision(tiny_hf_model("qwen2", seed=0), candidates=["float32", "bfloat16"],
                                       measure=fake, fast_linear="off", use_cache=False)
    assert choice.agreement["bfloat16"] == 0.0 and choice.chosen == "float32"


@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_every_precision_changes_speed_not_output(precision):
    target = HFLanguageModel(tiny_hf_model("qwen2", seed=0))
    draft = HFLanguageModel(make_variant(tiny_hf_model("qwen2", seed=0), precision))
    prompt = list(range(5, 20))
    ref, _ = SpeculativeDecoder(target).generate(prompt, 24)
    out, stats = SpeculativeDecoder(target, ModelDrafter(draft, GREEDY), GREEDY, gamma=3).generate(prompt, 24)
    assert out == ref and stats.accepted_tokens > 0
    with pytest.raises(ValueError, match="draft precision must be one of"):
        make_variant(tiny_hf_model("qwen2"), "int4")
