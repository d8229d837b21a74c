"""Continuous batching on the real SmolLM2-135M-Instruct: one request per method and option set
(`Method.examples`), with different prompts and lengths, in one batch, each equal to its output
served alone (fp32, greedy)."""

import pytest

from specdec.engine.batch import BatchRequest
from specdec.engine.pipeline import Pipeline, eos_ids
from specdec.models.hf import HFLanguageModel
from tests.engine.test_batch import assert_same_or_tie
from tests.engine.test_real import _shallow_copy
from tests.helpers import every_method_example

pytestmark = pytest.mark.real

QUESTIONS = [
    "List three prime numbers and explain why each is prime.",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Explain in one paragraph how a hash table works, with an example of a collision and how it is resolved.",
    "Give me a haiku about the sea.",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish, French and German.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


@pytest.mark.slow
def test_a_batch_of_every_method_on_smollm2_equals_each_alone(smol, one_thread):
    model, tok = smol
    pipe = Pipeline.from_models(HFLanguageModel(model), tok, HFLanguageModel(_shallow_copy(model, 8)),
                                eos_token_ids=eos_ids(model, tok))
    prompts = [pipe.encode(q) for q in QUESTIONS]
    methods = every_method_example(include_profile_methods=False)  # every method, in one batch
    news = [24, 16, 10, 20, 12, 18, 14, 8]
    reqs = [BatchRequest(prompts[i % len(prompts)], news[i % len(news)], m, o) for i, (m, o) in enumerate(methods)]
    engine = pipe.batch_engine(max_batch_size=len(reqs), prefill_chunk=64)
    outs = engine.run_all(reqs)
    ties = 0
    for req, (tokens, stats, finished) in zip(reqs, outs):
        alone = pipe.generate(req.prompt_ids, req.method, req.max_new_tokens, **req.options).token_ids
        ties += assert_same_or_tie(model, list(req.prompt_ids), alone, tokens)
        assert finished in ("eos", "length") and stats.target_calls <= stats.new_tokens
    assert ties == 0, f"{ties} outputs differed at float32 ties of the target"
