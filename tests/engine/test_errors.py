"""Bad input gets a clear error and loses nothing."""


import re
import time

import pytest
import torch

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


def test_a_greedy_drafter_under_a_sampling_decoder_is_refused():
    """Its rule is the greedy walk: the decoder would return the argmax of the target's sampled
    distribution at every seed, silently."""
    lm = tiny_lm("llama")
    hot = SamplingConfig(temperature=1.0)
    with pytest.raises(ValueError, match="built for greedy decoding and this decoder samples"):
        SpeculativeDecoder(lm, ModelDrafter(lm, SamplingConfig(), gamma=2), hot)
    SpeculativeDecoder(lm, ModelDrafter(lm, hot, gamma=2), hot)  # the same setting on both sides
    SpeculativeDecoder(lm, ModelDrafter(lm, hot, gamma=2), SamplingConfig())  # greedy output reads no draw


@pytest.mark.parametrize("kwargs,needle", [
    ({"dtype": "float32"}, "dtype must be one of torch.float32, torch.bfloat16, torch.float16, got 'float32'"),
    ({"dtype": torch.float64}, "dtype must be one of"),
    ({"weights": "native", "dtype": torch.bfloat16},
     "--weights native computes in float32 on the GGUF blocks; --dtype bfloat16 applies to dense weights"),
    ({"device": "meta"}, "device='meta': this torch"),
    ({"device": "nosuch"}, "device='nosuch': not a device torch knows"),
])
def test_pipeline_arguments_that_cannot_load_are_refused_before_any_file_is_read(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        Pipeline("/nonexistent/model.gguf", **kwargs)


def test_a_stream_refuses_what_it_cannot_run_when_it_is_asked_for_not_at_its_first_step():
    pipe = Pipeline.from_models(tiny_lm("llama", seed=0), None, tiny_lm("llama", seed=1))
    for method in ("sps", "pld", "ar"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            pipe.stream([1, 2, 3], method, 0)
        with pytest.raises(ValueError, match="context"):
            pipe.stream([1, 2, 3], method, 10**6)
    with pytest.raises(TypeError, match="chat must be True, False or None"):
        pipe.stream([1, 2, 3], "ar", 4, chat="no")
    with pytest.raises(ValueError, match="token ids are sent as they are"):
        pipe.stream([1, 2, 3], "ar", 4, chat=True)


def test_engine_limits_are_named_as_python_and_the_command_line_name_them():
    pipe = Pipeline.from_models(tiny_lm("llama", seed=0), None)
    with pytest.raises(ValueError, match=re.escape("max_batch_size (--max-batch-size) must be a positive integer, got 0")):
        pipe.generate_batch([[1, 2, 3]], "ar", 4, max_batch_size=0)


def test_a_bandit_of_greedy_drafters_under_a_sampling_decoder_is_refused():
    from specdec.drafting.bandit import Arm, BanditDrafter

    lm = tiny_lm("llama")
    greedy = BanditDrafter([Arm(ModelDrafter(lm, SamplingConfig(), gamma=2), 10.0, 2.0), Arm(None, 5.0, 1.0)], 5.0)
    with pytest.raises(ValueError, match="built for greedy decoding"):
        SpeculativeDecoder(lm, greedy, SamplingConfig(temperature=1.0))


def test_a_prompt_that_can_never_fit_is_refused_before_auto_may_tune(monkeypatch):
    pipe = Pipeline.from_models(tiny_lm("llama", seed=0), None, tiny_lm("llama", seed=1))
    pipe.autotune = True
    monkeypatch.setattr(Pipeline, "auto_plan", lambda *a, **k: pytest.fail("auto was asked to plan (and tune)"))
    with pytest.raises(ValueError, match="exceeds the target's context"):
        pipe.stream([1, 2, 3], "auto", 10**6)


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


def _tiny_pipe() -> Pipeline:
    from tests.serving.server_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    return Pipeline.from_models(tiny_lm("llama", vocab=len(tok)), tok, tiny_lm("llama", 1, vocab=len(tok)))


def test_a_stream_resumed_after_another_run_began_is_refused_not_corrupted():
    pipe = _tiny_pipe()
    for method in ("sps", "csd", "ar"):
        alone = pipe.generate("abc def", method, 12).token_ids
        _, chunks = pipe.stream("abc def", method, 12)
        first = next(chunks)
        pipe.generate("hello world", method, 4)  # a run inside the loop resets the shared caches
        with pytest.raises(RuntimeError, match="consume one stream at a time"):
            next(chunks)
        assert alone[: len(first)] == first and pipe.generate("abc def", method, 12).token_ids == alone
    # A decoder of the pipeline's used directly inside the loop is another run on the same models.
    _, chunks = pipe.stream("abc def", "sps", 12)
    next(chunks)
    pipe.decoder("sps").generate(pipe.encode("hello world"), 4)
    with pytest.raises(RuntimeError, match="consume one stream at a time"):
        next(chunks)
    # Streams made first and consumed one after the other are each a run of their own; a run that
    # fails its own checks before it starts takes nothing; a finished stream just ends.
    (_, a), (_, b) = pipe.stream("abc def", "sps", 6), pipe.stream("hello world", "sps", 6)
    first = next(a)
    with pytest.raises(ValueError, match="exceeds the target's context"):
        pipe.generate("hello world", "sps", 10**6)
    assert first + sum(a, []) == pipe.generate("abc def", "sps", 6).token_ids
    whole = sum(b, [])
    pipe.generate("xyz", "sps", 3)
    assert next(b, None) is None and whole == pipe.generate("hello world", "sps", 6).token_ids


@pytest.mark.parametrize("prompt,needle", [
    ([1, 2, 10**6], "token id 1000000 is outside the vocabulary"),
    ([1, -3, 5], "token id -3 is outside the vocabulary"),
    ([1, 10**30], "prompt: a token id is outside the vocabulary"),
    (__import__("numpy").array([1, 2**64 - 1], dtype="uint64"), "prompt: a token id is outside the vocabulary"),
    (bytearray(b"hi"), "not bytearray"),
    ([1.7, 2.0], "one flat sequence of integers, got a 1-D float32"),
    ([[1, 2, 3]], "one flat sequence of integers, got a 2-D"),
    ([True, False], "one flat sequence of integers, got a 1-D bool"),
    (b"hello", "not bytes"),
    (__import__("torch").tensor([[1, 2]]), "got a 2-D int64"),
    (["a", "b"], "one flat sequence of integers"),
    ([], "the prompt is empty"),
])
def test_prompt_ids_that_are_not_token_ids_are_refused_before_any_work(prompt, needle):
    pipe = _tiny_pipe()
    with pytest.raises(ValueError, match=re.escape(needle)):
        pipe.generate(prompt, "sps", 4)
    with pytest.raises(ValueError, match=re.escape(needle)):
        pipe.generate_batch([[5, 6, 7], prompt], "sps", 4)


def test_prompt_ids_of_any_integer_type_are_read_as_ids():
    import numpy as np
    import torch

    pipe = _tiny_pipe()
    want = pipe.generate([5, 6, 7], "sps", 4).token_ids
    for ids in (np.array([5, 6, 7], dtype=np.uint16), np.array([5, 6, 7], dtype=np.uint32),
                torch.tensor([5, 6, 7], dtype=torch.int32), (5, 6, 7), range(5, 8)):
        assert pipe.generate(ids, "sps", 4).token_ids == want, ids


def test_generate_batch_checks_its_prompts_before_auto_tunes(monkeypatch):
    pipe = _tiny_pipe()
    built = []
    monkeypatch.setattr(pipe, "decoder", lambda *a, **k: built.append(a))  # where auto's first-use tune runs
    for bad in ({"prompts": [[1, 10**6]]}, {"prompts": [[1, 2]], "seed": 1.5}, {"prompts": [[1, 2]], "max_new_tokens": 0}):
        with pytest.raises(ValueError):
            pipe.generate_batch(**{"max_new_tokens": 4, **bad}, sampling=SamplingConfig(temperature=0.5))
    assert built == []


def test_a_bad_request_is_refused_at_submit_and_leaves_the_others_running():
    import numpy as np

    from specdec.engine.batch import BatchRequest

    pipe = _tiny_pipe()
    engine = pipe.batch_engine()
    good = engine.submit(BatchRequest(np.array([5, 6, 7, 8]), 4, "sps", seed=np.int64(3)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit(BatchRequest([5, 6, 10**6], 4, "sps"))
    with pytest.raises(ValueError, match="seed must be an integer"):
        engine.submit(BatchRequest([5, 6], 4, "sps", seed=1.5))
    assert engine.num_waiting == 1  # the good request alone
    done = []
    while engine.has_work():
        done += [e for e in engine.step() if e.request_id == good and e.error is None]
    assert sum((e.tokens for e in done), []) == pipe.generate([5, 6, 7, 8], "sps", 4).token_ids


def test_generate_batch_arguments_of_the_wrong_shape_are_refused():
    pipe = _tiny_pipe()
    with pytest.raises(TypeError, match="prompts must be a list of prompts"):
        pipe.generate_batch("hello", "sps", 3)
    with pytest.raises(TypeError, match=re.escape("stop must be a list of strings, got str (one string: stop=['x'])")):
        pipe.generate_batch(["hello"], "sps", 3, stop="x")
    for bad in ([""], [None]):
        with pytest.raises(ValueError, match="every stop string must be a non-empty string"):
            pipe.generate_batch(["hello"], "sps", 3, stop=bad)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 3.0"):
        pipe.generate_batch(["hello", "world"], "sps", 3.0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        pipe.generate_batch(["hello", "world"], "sps", 3, sampling=SamplingConfig(temperature=0.7), seed="12")


def test_seeds_and_sampling_of_the_wrong_type_are_refused():
    import numpy as np

    pipe = _tiny_pipe()
    hot = SamplingConfig(temperature=0.8)
    for seed in (1.5, True, "3", 2**64, -1):
        with pytest.raises(ValueError, match="seed must be an integer in"):
            pipe.generate("hello", "sps", 4, sampling=hot, seed=seed)
    assert pipe.generate("hello", "sps", 6, sampling=hot, seed=np.int64(3)).token_ids == \
        pipe.generate("hello", "sps", 6, sampling=hot, seed=3).token_ids
    with pytest.raises(TypeError, match="sampling must be a SamplingConfig"):
        pipe.generate("hello", "sps", 4, sampling={"temperature": 0.7})
    for bad in ({"temperature": True}, {"top_p": True}):
        with pytest.raises(ValueError, match="must be"):
            SamplingConfig(**bad)

