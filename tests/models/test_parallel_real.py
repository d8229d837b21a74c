"""Tensor parallelism on the real SmolLM2-135M (9 attention heads, 3 KV heads): sharded over 3 CPU
processes, every method gives the single-process output (greedy and seeded-sampled); 2 is refused."""

from __future__ import annotations

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.pipeline import Pipeline
from specdec.methods.registry import all_methods

pytestmark = [pytest.mark.real, pytest.mark.slow]

SMOL = "smollm2-135m-instruct"
PROMPT = "Write a Python function that reverses a string."
OPTS = {"csd": {"maxgram_fill": "none"}, "maxgram": {"maxgram_fill": "none"}}


@pytest.fixture(scope="module")
def pipes(smol):  # `smol` fetches and converts the model once
    old = torch.get_num_threads()
    # The int8 draft is a different model from the target, so drafts are sometimes rejected.
    kw = dict(draft=SMOL, draft_dtype="int8", fast_linear="off", progress=False)
    sharded = Pipeline(SMOL, tensor_parallel_size=3, **kw)
    single = Pipeline(SMOL, **kw)
    yield single, sharded
    sharded.close()
    torch.set_num_threads(old)


def test_two_ranks_are_refused_with_the_sizes_that_fit(smol):
    with pytest.raises(ValueError, match=r"9 attention heads and 3 key/value heads, which do not split evenly over 2 "
                                         r"tensor-parallel ranks; sizes that divide both: 1, 3"):
        Pipeline(SMOL, tensor_parallel_size=2, progress=False)


@pytest.mark.parametrize("method", [m for m in all_methods() if m != "auto"])
def test_greedy_output_over_3_ranks_equals_one_process(pipes, method):
    single, sharded = pipes
    ref = single.generate(PROMPT, method, 8, **OPTS.get(method, {}))
    got = sharded.generate(PROMPT, method, 8, **OPTS.get(method, {}))
    assert got.token_ids == ref.token_ids and len(got.token_ids) == 8
    assert (got.stats.target_calls, got.stats.accepted_tokens) == (ref.stats.target_calls, ref.stats.accepted_tokens)


def test_seeded_sampling_over_3_ranks_equals_one_process(pipes):
    single, sharded = pipes
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)  # Sequoia's SWOR tree: the richest sampling path
    ref = single.generate(PROMPT, "sequoia", 12, sampling=sampling, seed=3)
    assert sharded.generate(PROMPT, "sequoia", 12, sampling=sampling, seed=3).token_ids == ref.token_ids
