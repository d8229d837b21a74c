"""Prefill reported apart from decoding: ttft_s, prefill_s, decode_tokens_per_s and
after_prefill_tokens_per_s."""

import pytest
import torch

import specdec.engine.stats as stats_mod
from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.stats import DecodeStats, StepAccounting
from tests.conftest import tiny_lm


def test_decode_rate_leaves_out_the_first_step(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(stats_mod.time, "perf_counter", lambda: now[0])
    st = DecodeStats(prefill_s=1.5)
    acct = StepAccounting(st, 4)
    tree = TokenTree.chain(1, torch.tensor([2, 3]))
    for emitted, elapsed in [(3, 2.0), (2, 0.5), (1, 0.5)]:  # 2 s = prefill + first step
        now[0] += elapsed
        acct.step(tree, VerifyResult(accepted_nodes=(1, 2)[: emitted - 1], next_token=9), emitted)
        acct.finish()
    assert st.wall_s == 3.0 and st.ttft_s == 2.0 and st.tokens_per_s == pytest.approx(6 / 3)
    assert st.decode_tokens_per_s == pytest.approx((6 - 3) / 1.0)
    assert st.after_prefill_tokens_per_s == pytest.approx(6 / (3.0 - 1.5))  # every token, the first step's too
    one = DecodeStats()
    StepAccounting(one, 1).finish()
    assert one.decode_tokens_per_s is None and one.after_prefill_tokens_per_s is None  # no tokens


def test_decoder_fills_prefill_and_ttft():
    dec = SpeculativeDecoder(tiny_lm("llama", 0))
    _, st = dec.generate(list(range(3, 40)), 6)
    assert 0 < st.prefill_s <= st.ttft_s <= st.wall_s
    assert st.decode_tokens_per_s is not None and st.decode_tokens_per_s > 0
    assert st.after_prefill_tokens_per_s == pytest.approx(st.new_tokens / (st.wall_s - st.prefill_s))
    assert {"prefill_s", "ttft_s", "decode_tokens_per_s", "after_prefill_tokens_per_s"} <= set(st.to_dict())
