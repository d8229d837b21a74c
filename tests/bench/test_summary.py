"""`specdec bench` summary math: geometric means of per-prompt ratios, per-call figures, the tables."""

import math

import pytest

from specdec.bench.summary import geomean, render_summary, summarize


def _row(pid, task, method, tps, t=0.0, rep=0, equal=True, **stats):
    base = {"new_tokens": 10, "target_calls": 10, "draft_tokens": 0, "accepted_tokens": 0,
            "accepted_per_position": [], "tokens_per_s": tps}
    if method == "sps":
        base["draft_tokens"] = 12
    base.update(stats)
    return {"id": pid, "task": task, "method": method, "temperature": t, "repeat": rep,
            "output_equals_ar": equal if t == 0 else None, "token_ids": [], "stats": base}


def test_summary_is_geometric_mean_of_per_prompt_ratios():
    rows = [
        _row("a", "qa", "ar", 10.0), _row("a", "qa", "sps", 20.0, target_calls=4, accepted_tokens=6,
                                          accepted_per_position=[1.0, 0.5]),
        _row("b", "qa", "ar", 40.0), _row("b", "qa", "sps", 20.0, target_calls=6, accepted_tokens=4,
                                          accepted_per_position=[0.5], swi=0.25, equal=False),
        _row("c", "math", "ar", 10.0, decode_tokens_per_s=12.0, after_prefill_tokens_per_s=11.0),
        _row("c", "math", "sps", 30.0, target_calls=5, accepted_tokens=5, accepted_per_position=[0.0, 0.0], swi=0.75,
             decode_tokens_per_s=48.0, after_prefill_tokens_per_s=27.5),
        _row("a", "qa", "hf-ar", 5.0), _row("a", "qa", "hf-pld", 20.0, target_calls=None, accepted_tokens=None),
        _row("a", "qa", "ar", 10.0, t=0.7), _row("a", "qa", "sps", 15.0, t=0.7),
    ]
    s = summarize(rows)
    sps = s.table[("sps", 0.0)]
    assert sps.speedup["qa"] == pytest.approx(1.0)  # sqrt(2 * 0.5)
    assert sps.speedup["math"] == pytest.approx(3.0)
    assert sps.speedup["all"] == pytest.approx((2 * 0.5 * 3) ** (1 / 3))
    assert sps.tokens_per_call == pytest.approx(30 / 15) and sps.accepted_per_call == pytest.approx(15 / 15)
    assert sps.acceptance_by_position == pytest.approx([0.5, 0.25])
    assert sps.swi == pytest.approx(0.5)
    # decode-only: only prompt c reports it on both sides (48 / 12)
    assert sps.decode_speedup == {"math": pytest.approx(4.0), "all": pytest.approx(4.0)}
    assert sps.after_prefill_speedup == {"math": pytest.approx(2.5), "all": pytest.approx(2.5)}
    assert (sps.mismatches, sps.compared) == (1, 3)
    ar = s.table[("ar", 0.0)]
    assert ar.speedup["all"] == pytest.approx(1.0) and ar.accepted_per_call is None and ar.mismatches is None
    hf = s.table[("hf-pld", 0.0)]
    assert hf.speedup["all"] == pytest.approx(2.0) and hf.speedup_vs_hf["all"] == pytest.approx(4.0)
    assert hf.tokens_per_call is None and hf.mismatches == 0
    assert s.table[("sps", 0.7)].speedup["all"] == pytest.approx(1.5) and s.table[("sps", 0.7)].mismatches is None
    assert s.greedy_mismatches() == 1 and s.prompts_per_task == {"math": 1, "qa": 2}
    md = render_summary(s, command="specdec bench --x")
    assert md.splitlines()[3] == "specdec bench --x"
    assert "| `sps` | 3 | 23.33 | 3.00× | 1.00× | 1.44× | 4.00× | 2.50× | 2.00 | 1.00 | 0.50 0.25 | 0.50 | **1/3** |" in md
    assert "| `hf-pld` | 2.00× |" not in md and "| `hf-pld` | — | 4.00× | 4.00× |" in md
    assert "1 greedy outputs differ from AR" in md
    assert math.isnan(geomean([]))


def test_summary_says_what_auto_followed():
    rows = [_row("a", "qa", "ar", 10.0), _row("a", "qa", "auto", 20.0), _row("b", "qa", "ar", 10.0),
            _row("b", "qa", "auto", 10.0)]
    rows[1]["auto_choice"] = rows[3]["auto_choice"] = "sps gamma=5"
    s = summarize(rows)
    assert s.table[("auto", 0.0)].auto_choices == {"sps gamma=5": 2}
    assert "`auto` ran as: `sps gamma=5` (2 rows)." in render_summary(s)
