"""The batch step's planner (`engine.schedule`): measured pass times by size, each sequence's recent
acceptance, and the draft depths that maximise a step's expected tokens per second, down to none."""

from __future__ import annotations

import pytest

from specdec.engine.schedule import Acceptance, Candidate, PassTimes, plan_depths


def _times(points: dict[int, float]) -> PassTimes:
    t = PassTimes()
    for k, s in points.items():
        t.observe(k, s)
    return t


FLAT = _times({1: 0.05, 64: 0.05})  # a pass costs the same whatever its size
STEEP = _times({1: 0.05, 2: 0.1, 64: 3.2})  # every token costs a full pass
FREE = PassTimes()
CHAIN = [1, 2, 3, 4]


def test_pass_times_interpolate_and_stay_monotone():
    t = _times({1: 0.05, 8: 0.08, 16: 0.07, 64: 0.2})
    assert float(t.predict(1)) == pytest.approx(0.05)
    assert float(t.predict(4)) == pytest.approx(0.05 + 0.03 * 3 / 7)
    assert float(t.predict(16)) >= float(t.predict(8))  # a noisy dip never makes a bigger pass cheaper
    assert float(t.predict(128)) > float(t.predict(64))  # extended by the last slope
    assert t.largest_within(0.08, 64) == 16 and t.largest_within(0.01, 64) == 0


def test_planner_drafts_when_passes_are_flat_and_not_when_each_token_costs_a_pass():
    cands = [Candidate(4, CHAIN, 0.8), Candidate(4, CHAIN, 0.7)]
    assert plan_depths(cands, FLAT, FREE) == [4, 4]
    assert plan_depths(cands, STEEP, FREE) == [0, 0]


def test_planner_gives_drafts_to_the_sequences_that_accept_them():
    # t(k) grows by a fifth of a pass per token: a draft pays only where it is likely accepted.
    mid = _times({1: 0.05, 64: 0.05 + 63 * 0.01})
    depths = plan_depths([Candidate(4, CHAIN, 0.95), Candidate(4, CHAIN, 0.1)], mid, FREE)
    assert depths[0] > 0 and depths[1] == 0
    # Draft-model time counts too: the same target with a costly draft drafts less.
    costly = _times({1: 0.04, 64: 0.04 * 64})
    assert sum(plan_depths([Candidate(4, CHAIN, 0.95), Candidate(4, CHAIN, 0.1)], mid, costly)) < sum(depths)


def test_planner_respects_each_cap_and_trees_cost_their_nodes():
    assert plan_depths([Candidate(2, CHAIN[:2], 0.9), Candidate(0, [], 0.9)], FLAT, FREE) == [2, 0]
    wide = [8, 16, 24, 32]  # 8 nodes a level
    mid = _times({1: 0.05, 64: 0.05 + 63 * 0.004})
    chain_depth = plan_depths([Candidate(4, CHAIN, 0.8)], mid, FREE)[0]
    tree_depth = plan_depths([Candidate(4, wide, 0.8)], mid, FREE)[0]
    assert tree_depth < chain_depth


def test_acceptance_follows_recent_steps():
    a = Acceptance()
    start = a.rate
    assert start >= 0.8  # optimistic: a new sequence drafts, so its acceptance gets measured
    for _ in range(10):
        a.observe(4, 4)
    assert a.rate > 0.95 and a.rate > start
    for _ in range(40):
        a.observe(4, 0)
    assert a.rate < 0.2
    a.observe(0, 0)  # a step without drafts teaches nothing
    assert a.rate < 0.2


def test_a_slow_outlier_moves_a_timing_little_and_faster_passes_move_it_fast():
    t = _times({2: 0.1})
    t.observe(2, 1.5)  # one pass slowed by another process
    assert float(t.predict(2)) < 0.25
    for _ in range(3):
        t.observe(2, 0.05)
    assert float(t.predict(2)) < 0.06
    for _ in range(40):  # a lasting slowdown is learnt
        t.observe(2, 0.2)
    assert float(t.predict(2)) > 0.19

