"""The suite fails on a FutureWarning from what specdec calls (pyproject's `filterwarnings`), so a
deprecated argument is found here, not by users of the transformers release that removes it."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.conftest import tiny_lm


def test_a_deprecated_forward_argument_fails_the_suite():
    """The filter at work: passing the cache under its old name, where transformers deprecates it,
    raises here instead of warning (without the filter, this test fails: the call only warns)."""
    lm = tiny_lm("llama")
    if "cache" not in inspect.signature(lm.model.forward).parameters:
        pytest.skip("this transformers takes past_key_values without deprecating it")
    lm._cache_arg = "past_key_values"  # what models/hf.py passed before transformers renamed it
    lm.reset(8)
    with pytest.raises(FutureWarning, match="past_key_values"):
        lm.forward(torch.tensor([1, 2, 3]))
