"""The serving tests' models: a tiny random target and a noisy copy as its draft, saved as
checkpoint directories and loaded as `specdec serve --target DIR --draft DIR --fast-linear off`
loads them (one pair per test module)."""

from __future__ import annotations

import pytest

from specdec.engine.pipeline import Pipeline
from tests.serving.server_helpers import save_tiny_checkpoints, tiny_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("tiny-ckpt"), tiny_tokenizer())


@pytest.fixture(scope="module")
def pipe(checkpoints):
    target, draft = checkpoints
    return Pipeline(str(target), str(draft), fast_linear="off", progress=False)
