"""A draft model with a bounded window (`DraftModel.window`, sps `draft_window`): on a long prompt it
reads the first `SINK` and the last `window` tokens only, then follows the committed text as usual.
Greedy output still equals AR, sampled output keeps the target's law (the window changes q, which
travels with the chain), and drafters that share one model agree on what its cache leaves out."""

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.drafting.base import run_proposal
from specdec.drafting.draft_model import SINK, DraftModel, window_tokens
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sps import ModelDrafter
from specdec.models.toy import MarkovLM
from tests.engine.test_distribution import V
from tests.helpers import chi_square_of_decoder


@pytest.fixture(autouse=True)
def _toy_threads(one_thread):
    yield


def toys():
    return MarkovLM.random(V, seed=11, sharpness=1.5), MarkovLM.random(V, seed=12, sharpness=1.5)


def long_prompt(n: int = 30) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(5)).tolist()


def test_first_pass_reads_the_sink_and_the_window_then_follows_the_text():
    target, draft = toys()
    prompt = long_prompt()
    dec = SpeculativeDecoder(target, ModelDrafter(draft, SamplingConfig(), gamma=3, window=8))
    committed = list(prompt)
    first = True
    for chunk in dec.stream(prompt, 12):
        if first:  # the prefill pass: the sink, then the prompt's last 8 tokens, nothing between
            assert draft._tokens[: SINK + 8] == prompt[:SINK] + prompt[-8:]
            first = False
        committed += chunk
        if dec.last_stats.stopped_by:
            break
        skipped = len(prompt) - SINK - 8
        assert draft._tokens == (committed[:SINK] + committed[SINK + skipped :])[: draft.kv_len]
        assert draft.kv_len + skipped >= len(committed) - len(chunk)  # caught up before drafting


@pytest.mark.parametrize("window", [0, 4, 8, 100])
def test_greedy_output_equals_ar_at_any_window(window):
    target, draft = toys()
    prompt = long_prompt()
    ref, _ = SpeculativeDecoder(target).generate(prompt, 20)
    out, st = SpeculativeDecoder(target, ModelDrafter(draft, SamplingConfig(), gamma=3, window=window)).generate(
        prompt, 20)
    assert out == ref and st.draft_tokens > 0


def test_a_short_prompt_is_read_whole():
    _, draft = toys()
    dm = DraftModel(draft, window=8)
    dm.begin(64)
    ids = torch.tensor(long_prompt(SINK + 8))
    run_proposal(dm.catch_up(ids))
    assert draft._tokens == ids.tolist() and dm.skipped == 0


def test_drafters_sharing_a_model_share_what_its_cache_leaves_out():
    _, draft = toys()
    windowed, whole = DraftModel(draft, window=6), DraftModel(draft)
    windowed.begin(64)
    ids = torch.tensor(long_prompt())
    run_proposal(windowed.catch_up(ids))
    more = torch.cat([ids, torch.tensor([1, 2, 3])])
    assert whole.unseen(more).tolist() == [1, 2, 3]  # the other drafter reads on after the window
    whole.begin(64)  # a reset forgets the window
    assert whole.unseen(more).tolist() == more.tolist()


def test_window_option_parses_non_negative_integers():
    assert window_tokens("0") == 0 and window_tokens(128) == 128
    for bad in (-1, "x", True, 1.5):
        with pytest.raises(ValueError):
            window_tokens(bad)
    with pytest.raises(ValueError):
        DraftModel(toys()[1], window=-1)


def test_sampled_chain_with_a_window_keeps_the_target_distribution():
    """The chi-square of `tests.helpers` on 3-token continuations of its short prompt: a window of 2
    cuts that prompt too (SINK + 2 < its length), so q comes from a truncated context."""
    sampling = SamplingConfig(temperature=1.0)
    target, draft = toys()
    dec = SpeculativeDecoder(target, ModelDrafter(draft, sampling, gamma=2, window=1), sampling)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=7) > 1e-3
