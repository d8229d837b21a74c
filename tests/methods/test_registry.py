"""Everything the package lists about its methods comes from the registry: a method added the way a
new file in `specdec/methods/` adds one (its `Options`, drafter, list rank, tuning space and test
examples, registered) is listed, gets its command-line flags, is priced by the quick tune and runs in
the every-method tests, with no other edit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from specdec.cli.common import option_specs
from specdec.core.options import MethodOptions, option, positive_int
from specdec.core.sampling import SamplingConfig
from specdec.engine.pipeline import Pipeline
from specdec.methods import registry
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.maxgram import MaxGramDrafter
from specdec.methods.registry import all_methods
from specdec.tuning.quick import quick_tune
from tests.conftest import tiny_lm
from tests.helpers import every_method_example
from tests.tuning.test_quick import PROMPTS, SMALL


@dataclass(frozen=True)
class EchoOptions(MethodOptions):
    """A new method's options, declared once."""

    gamma: int = option(2, "draft length per target call", positive_int)


def _build(ctx: MethodContext, opts: EchoOptions) -> MaxGramDrafter:
    return MaxGramDrafter(None, opts.gamma)  # copies from the context only: no model, no tokenizer


ECHO = Method("echo", "a method added later (Max-Gram without a table)", EchoOptions, _build, list_rank=55,
              tuning=TuningSpace("replay", lambda setting: [{"gamma": 2}, {"gamma": 5}]), examples=({"gamma": 3},))


@pytest.fixture
def echo(monkeypatch):
    all_methods()  # the package's own methods first
    monkeypatch.setitem(registry._METHODS, "echo", ECHO)
    return ECHO


def test_a_new_method_is_listed_flagged_priced_and_tested_by_itself(echo, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path))
    names = list(all_methods())
    assert names.index("maxgram") < names.index("echo") < names.index("specexec")  # by its list rank
    assert ("echo", {"gamma": 3}) in every_method_example()
    assert "echo" in [m for m, _ in option_specs()["gamma"]]  # --gamma's help now names it too
    target, draft = tiny_lm("llama", 0), tiny_lm("llama", 1)
    pipe = Pipeline.from_models(target, None, draft)
    greedy = SamplingConfig()
    profile = quick_tune(target, draft, PROMPTS, greedy, pipe.profile_key(greedy), settings=SMALL, progress=False)
    assert {r["label"] for r in profile["candidates"] if r["method"] == "echo"} == {"echo gamma=2", "echo gamma=5"}
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    assert pipe.generate(prompt, "echo", 12, gamma=3).token_ids == pipe.generate(prompt, "ar", 12).token_ids


def test_a_method_naming_an_unknown_tuning_rule_is_reported(monkeypatch):
    all_methods()
    bad = Method("bad", "prices itself by a rule nobody knows", EchoOptions, _build, tuning=TuningSpace("guess"))
    monkeypatch.setitem(registry._METHODS, "bad", bad)
    target = tiny_lm("llama", 0)
    key = Pipeline.from_models(target, None).profile_key(SamplingConfig())
    with pytest.raises(ValueError, match="method 'bad' names the tuning rule 'guess'"):
        quick_tune(target, None, PROMPTS, SamplingConfig(), key, settings=SMALL, progress=False)
