"""Bad input gets a clear error and loses nothing."""


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
