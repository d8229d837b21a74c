"""Bad input gets a clear error and loses nothing."""


import re
import time

import pytest

from specdec.cli import main
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sps import ModelDrafter
from specdec.engine.pipeline import Pipeline, check_same_tokenizer
from specdec.core.sampling import SamplingConfig
from tests.conftest import tiny_lm


def test_mismatched_vocabularies_are_refused():
    target = tiny_lm("llama", vocab=97)
    draft = tiny_lm("llama", vocab=101)
    with pytest.raises(ValueError, match="vocabular"):
        SpeculativeDecoder(target, ModelDrafter(draft, SamplingConfig()), SamplingConfig())


def test_mismatched_tokenizers_are_refused():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    check_same_tokenizer(Tok({"a": 0}), Tok({"a": 0}))
    with pytest.raises(ValueError, match="tokenizer"):
        check_same_tokenizer(Tok({"a": 0, "b": 1}), Tok({"a": 0, "b": 2}))


def test_prompt_longer_than_context():
    target = tiny_lm("llama")  # context 512
    dec = SpeculativeDecoder(target)
    with pytest.raises(ValueError, match="context"):
        dec.generate(list(range(50)) * 10, 20)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_max_new_tokens_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_new_tokens"):
        SpeculativeDecoder(tiny_lm("llama")).generate([1, 2, 3], bad)


def test_empty_prompt_and_bad_gamma():
    target = tiny_lm("llama")
    with pytest.raises(ValueError, match="empty"):
        SpeculativeDecoder(target).generate([], 5)
    with pytest.raises(ValueError, match="gamma"):
        SpeculativeDecoder(target, ModelDrafter(tiny_lm("llama"), SamplingConfig()), gamma=0)


def test_an_empty_text_prompt_is_refused_as_the_cli_refuses_it():
    from tests.serving.server_helpers import tiny_tokenizer

    tok = tiny_tokenizer()  # with a chat template: an empty prompt used to become an empty user turn
    pipe = Pipeline.from_models(tiny_lm("llama", vocab=len(tok)), tok)
    for chat in (None, True, False):
        with pytest.raises(ValueError, match="^the prompt is empty: give the text to continue$"):
            pipe.generate("", "pld", 4, chat=chat)
    with pytest.raises(ValueError, match="the prompt is empty"):
        pipe.generate_batch(["hi", ""], "pld", 4)
    assert len(pipe.generate(" ", "pld", 4).token_ids) == 4  # whitespace is text, as on the command line


def test_gamma_is_the_draft_length_of_chain_methods_and_nothing_else():
    pipe = Pipeline.from_models(tiny_lm("llama"), None, tiny_lm("llama", 1))
    for method, opts in (("sps", {}), ("pld", {}), ("maxgram", {"maxgram_fill": "none"})):
        assert pipe.decoder(method, gamma=3, **opts).drafter.max_depth == 3
    for method in ("specinfer", "specexec", "sequoia", "pld-tree", "csd"):  # trees have max_depth, csd a k-matrix
        with pytest.raises(ValueError, match=f"method '{method}' has no option 'gamma'"):
            pipe.decoder(method, gamma=3)


def test_pipeline_rejects_unknown_method_and_missing_draft():
    pipe = Pipeline.from_models(tiny_lm("llama"), None)
    with pytest.raises(ValueError, match="unknown method"):
        pipe.decoder("nope")
    with pytest.raises(ValueError, match="draft"):
        pipe.decoder("sps")
    res = pipe.generate([1, 2, 3, 1, 2], "pld", 5)
    assert len(res.token_ids) == 5


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "--prompt", "a", "--chat", "b"], "exactly one prompt"),
        (["generate", "hi", "--target", "no-such-model-xyz", "--method", "ar"], "no-such-model-xyz"),
    ],
)
def test_cli_reports_bad_input_clearly(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "specdec: error:" in err and needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("seed", ["-1", str(2**63), "x"])
def test_cli_refuses_a_seed_the_generators_cannot_take(seed, capsys):
    with pytest.raises(SystemExit) as info:  # argparse's own error, before anything loads
        main(["generate", "hi", "--seed", seed])
    assert info.value.code == 2 and "argument --seed" in capsys.readouterr().err


@pytest.mark.parametrize("method,opts,needle", [
    ("pld", {"gamma": 100_000}, "gamma=100000: pld would draft up to 100000 tokens per step"),
    ("sps", {"gamma": 510}, "gamma=510: sps would draft up to 510"),
    ("sequoia", {"budget": 100_000}, "budget=100000: sequoia would draft up to 100000"),
    ("specinfer", {"expansion": "64,64,64"}, "expansion=64,64,64: specinfer would draft up to 266304"),
])
def test_a_draft_larger_than_the_context_is_refused_before_building_it(method, opts, needle):
    lm = tiny_lm("llama")  # context 512
    pipe = Pipeline.from_models(lm, None, tiny_lm("llama", 1))
    t0 = time.monotonic()
    with pytest.raises(ValueError) as info:
        pipe.decoder(method, **opts)
    assert time.monotonic() - t0 < 5.0  # building Sequoia's DP for 100000 nodes would take minutes
    assert needle in str(info.value) and "context of 512 tokens" in str(info.value)
    assert "prompt" not in str(info.value)  # the draft is what does not fit, not the prompt


def test_text_that_is_not_utf8_is_a_clear_error():
    from tests.serving.server_helpers import tiny_tokenizer

    pipe = Pipeline.from_models(tiny_lm("llama"), tiny_tokenizer())
    for text, needle in (("\udcff\udcfe", "byte 0xff at character 0"), ("ok \ud800", "unpaired surrogate U+D800")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            pipe.encode(text)
