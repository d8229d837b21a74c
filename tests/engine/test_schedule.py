"""The batch step's planner (`engine.schedule`): measured pass times by size, each sequence's recent
acceptance, and the draft depths that maximise a step's expected tokens per second, down to none."""

from __future__ import annotations

import pytest
import torch

from specdec.engine.schedule import (
    EXPECTED_MIN_ANSWER, FREE_PRIOR, POOL_DECAY, POOL_PRIOR_WEIGHT, Acceptance, Candidate, FreeRate, Load, PassTimes, Plan, free_gain_floor,
    expected_remaining, path_floors, plan_depths, take_free, with_free,
)


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


def test_one_size_is_predicted_as_the_tensor_path_predicts_it():
    sizes = [0.5, 1, 2.5, 8, 12, 16, 40, 64, 100]
    for t in (_times({1: 0.05, 8: 0.08, 16: 0.07, 64: 0.2}), _times({4: 0.03}), PassTimes()):
        t.load.factor = 1.3
        batch = t.predict(torch.tensor(sizes, dtype=torch.float64)).tolist()
        assert [t.predict(k) for k in sizes] == pytest.approx(batch, rel=1e-12, abs=0.0)
        assert all(isinstance(t.predict(k), float) for k in sizes)


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
    low = a.rate
    for _ in range(30):  # steps without drafts teach nothing but let older counts fade: it tries again
        a.observe(0, 0)
    assert low < a.rate and a.rate > 0.6


def test_a_new_sequence_starts_from_what_recent_sequences_accepted():
    pool = Acceptance(decay=0.98)
    first = Acceptance(prior=pool)
    for _ in range(30):
        first.observe(4, 0)  # every drafted level rejected
    assert pool.rate < 0.3
    assert Acceptance(prior=pool).rate == pytest.approx(pool.rate)
    assert Acceptance().rate >= 0.8  # no history: optimistic


def test_an_engine_made_pessimistic_by_one_request_drafts_again_after_steps_without_drafts():
    """The engine's rate is every new sequence's start. One short request whose only draft was
    rejected must not leave it where a one-level chain no longer pays (the engine believes its start
    as POOL_PRIOR_WEIGHT levels). Where the engine's rate is that low all the same, new sequences
    draft nothing and nothing is measured: their steps without drafts fade the engine's counts back
    towards the optimistic start, until drafting pays again."""
    mid = _times({1: 0.05, 2: 0.06, 64: 0.05 + 63 * 0.01})
    draft = _times({1: 0.025, 64: 0.025 * 64})
    engine = Acceptance(decay=POOL_DECAY, prior_weight=POOL_PRIOR_WEIGHT)  # as the batch engine keeps it
    Acceptance(prior=engine).observe(1, 0)
    assert plan_depths([Candidate(4, CHAIN, Acceptance(prior=engine).rate)], mid, draft)[0] > 0
    pool = Acceptance(decay=POOL_DECAY)  # believed as little as a sequence: one rejection is enough
    Acceptance(prior=pool).observe(1, 0)
    assert plan_depths([Candidate(4, CHAIN, Acceptance(prior=pool).rate)], mid, draft) == [0]
    waited = 0
    while plan_depths([Candidate(4, CHAIN, (seq := Acceptance(prior=pool)).rate)], mid, draft) == [0]:
        seq.observe(0, 0)  # a step of a new sequence that drafted nothing
        waited += 1
        assert waited < 100, f"still not drafting at an engine rate of {pool.rate:.2f}"
    assert pool.rate > 0.6


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



def test_the_load_moves_the_sizes_no_longer_measured():
    # Calibrated while another process ran (every size twice as slow), then only 1-token passes run.
    load = Load()
    target, draft = PassTimes(load=load), PassTimes(load=load)
    for k, ms in {1: 70, 4: 80, 16: 160}.items():
        target.calibrated(k, ms / 1e3)
    draft.calibrated(1, 0.034)
    for _ in range(20):
        target.observe(1, 0.035)
    assert float(target.predict(1)) == pytest.approx(0.035, rel=0.05)
    assert float(target.predict(4)) < 0.06 and float(target.predict(16)) < 0.12  # the unmeasured sizes followed
    assert float(draft.predict(1)) < 0.025  # and so did the other model on the same cores


def test_a_long_catch_up_is_shared_over_the_tokens_left():
    t = _times({1: 0.035, 8: 0.045, 64: 0.3})
    d = _times({1: 0.015, 8: 0.02, 64: 0.12, 512: 1.0})
    near_end = Candidate(4, CHAIN, 0.9, backlog=500, remaining=4)
    long_run = Candidate(4, CHAIN, 0.9, backlog=500, remaining=4000)
    assert plan_depths([near_end], t, d) == [0]
    assert plan_depths([long_run], t, d)[0] > 0


def test_an_answer_is_expected_to_go_on_as_long_as_it_has():
    assert [expected_remaining(e, cap) for e, cap in ((0, 96), (0, 4000), (50, 46), (500, 3500), (80, 16), (0, 0))] \
        == [EXPECTED_MIN_ANSWER, EXPECTED_MIN_ANSWER, 46, 500, 16, 1]
    t = _times({1: 0.035, 8: 0.045, 64: 0.3})
    d = _times({1: 0.015, 8: 0.02, 64: 0.12, 512: 1.0})
    fresh = Candidate(4, CHAIN, 0.9, backlog=500, remaining=expected_remaining(0, 4000))
    under_way = Candidate(4, CHAIN, 0.9, backlog=500, remaining=expected_remaining(600, 3400))
    assert plan_depths([fresh], t, d) == [0]  # priced over the 4000 it may emit, it would fill now
    assert plan_depths([under_way], t, d)[0] > 0


def test_path_floors_price_the_next_draft_pass_against_plain_decoding():
    t = _times({1: 0.035, 8: 0.045, 64: 0.3})
    cheap, dear = _times({1: 0.003, 64: 0.03}), _times({1: 0.01, 64: 0.1})
    cands = [Candidate(4, CHAIN, 0.9), Candidate(4, CHAIN, 0.9)]
    assert path_floors(cands, [0, 0], t, dear) == [0.0, 0.0]
    low, high = path_floors(cands, [2, 2], t, cheap), path_floors(cands, [2, 2], t, dear)
    assert 0 < low[0] < high[0] < 1
    unsure = path_floors([Candidate(4, CHAIN, 0.9), Candidate(4, CHAIN, 0.5)], [2, 2], t, dear)
    assert unsure[1] > unsure[0]  # a sequence whose drafts fail more needs a surer chain to go on


def test_mode_rates_weigh_drafting_by_what_it_measured_against_its_prediction():
    from specdec.engine.schedule import MODE_PRIOR_STEPS, MODE_PROBE_EVERY, ModeRates, Plan

    modes = ModeRates()
    assert modes.spec_scale(4) == (1.0, False)  # nothing measured: the planner as it is
    modes.observe(4, False, Plan([0] * 4, 4.0, 0.1), tokens=4, seconds=0.1)  # plain steps as predicted
    assert modes.spec_scale(4) == (1.0, False)  # drafting not measured yet
    # Steps with drafts: 3/4 of the expected tokens, in 5/4 of the predicted time.
    modes.observe(4, True, Plan([3] * 4, 8.0, 0.2), tokens=6, seconds=0.25)
    assert modes.factor(4, True) == pytest.approx(0.75 / 1.25) and modes.factor(4, False) == pytest.approx(1.0)
    # One step each: the factor is weighed against the prediction's (1) as MODE_PRIOR_STEPS steps.
    spec = (0.6 + MODE_PRIOR_STEPS) / (1 + MODE_PRIOR_STEPS)
    assert modes.belief(4, True) == pytest.approx(spec) and modes.belief(4, False) == pytest.approx(1.0)
    scales = [modes.spec_scale(4) for _ in range(2 * MODE_PROBE_EVERY)]
    assert scales.count((1.0, True)) == 2  # one step per period weighs drafting as predicted, to measure it again
    assert all(x == pytest.approx(spec) and not probe for x, probe in scales if x != 1.0)
    assert modes.spec_scale(8)[0] == pytest.approx(spec)  # a bigger batch not measured yet: the nearest smaller one's
    assert modes.spec_scale(2) == (1.0, False)  # nothing smaller measured
    modes.observe(1, False, Plan([0], 1.0, 0.1), tokens=1, seconds=0.1)
    modes.observe(1, True, Plan([3], 3.0, 0.2), tokens=1, seconds=0.4)
    assert modes.spec_scale(1) == (1.0, False)  # one sequence: the planner alone
    assert modes.spec_scale(3)[0] == pytest.approx(1.0) and modes.spec_scale(4)[0] == pytest.approx(spec)
    modes.observe(4, True, Plan([3] * 4, 8.0, 0.2), tokens=0, seconds=0.2)  # nothing committed: no information
    modes.observe(4, True, Plan([0] * 4, 0.0, 0.0), tokens=4, seconds=0.2)  # no prediction: none either
    assert modes.factor(4, True) == pytest.approx(0.6)
    # Sums, not an average of per-step ratios: a step accepting everything and one accepting nothing
    # (12 and 4 tokens of 8 expected, on time) measure as the planner predicted.
    even = ModeRates()
    even.observe(2, True, Plan([3, 3], 8.0, 0.2), tokens=12, seconds=0.2)
    even.observe(2, True, Plan([3, 3], 8.0, 0.2), tokens=4, seconds=0.2)
    assert 0.9 < even.factor(2, True) < 1.0  # the older step weighs MODE_DECAY of the newer


def test_a_draft_models_fills_count_against_drafting_at_that_batch_size():
    """Steps that fill are never observed, so the seconds a draft model spends on fills (new prompts,
    long catch-ups) are charged to drafting's sums at that size: they are what drafting costs there."""
    from specdec.engine.schedule import ModeRates, Plan

    modes = ModeRates()
    modes.charge(4, 0.2)  # no drafting step of that size yet: nothing to weigh the charge by
    assert modes.factor(4, True) is None
    modes.observe(4, True, Plan([3] * 4, 8.0, 0.2), tokens=8, seconds=0.2)  # as predicted
    modes.observe(4, False, Plan([0] * 4, 4.0, 0.1), tokens=4, seconds=0.1)
    drafted = modes.factor(4, True)  # aged once by the plain step
    modes.charge(4, modes.sums[(4, True)][2])  # fills as long as the drafting steps took
    assert modes.factor(4, True) == pytest.approx(drafted / 2)
    assert modes.factor(4, False) == pytest.approx(1.0)  # plain decoding never pays for them
    modes.charge(2, 0.2)
    assert modes.factor(2, True) is None and modes.factor(4, True) == pytest.approx(drafted / 2)


def test_a_mode_judged_slow_is_believed_less_while_the_other_runs_and_tried_again():
    from specdec.engine.schedule import ModeRates, Plan

    modes = ModeRates()
    for _ in range(60):  # drafting measured at half its prediction for many steps, plain as predicted
        modes.observe(4, True, Plan([3] * 4, 8.0, 0.2), tokens=4, seconds=0.2)
        modes.observe(4, False, Plan([0] * 4, 4.0, 0.1), tokens=4, seconds=0.1)
    assert modes.spec_scale(4)[0] == pytest.approx(0.5, abs=0.05)  # many steps: believed as measured
    scales = []
    for _ in range(1000):  # the planner then decodes plainly: no drafting step measures again
        modes.observe(4, False, Plan([0] * 4, 4.0, 0.1), tokens=4, seconds=0.1)
        scales.append(modes.belief(4, True) / modes.belief(4, False))
    assert modes.factor(4, True) == pytest.approx(0.5)  # what drafting measured stands ...
    assert all(a < b for a, b in zip(scales, scales[1:]))  # ... believed less with every plain step
    # ... slowly, as a mode that lost (MODE_LOSING_DECAY), until the planner's prediction decides again
    assert scales[0] < 0.6 and scales[199] < 0.8 and scales[-1] > 0.99
    # Drafting that measured better than plain decoding ages at MODE_DECAY's pace.
    won = ModeRates()
    for _ in range(60):
        won.observe(4, True, Plan([3] * 4, 8.0, 0.2), tokens=8, seconds=0.1)
        won.observe(4, False, Plan([0] * 4, 4.0, 0.1), tokens=4, seconds=0.1)
    for _ in range(200):
        won.observe(4, False, Plan([0] * 4, 4.0, 0.1), tokens=4, seconds=0.1)
    assert won.factor(4, True) == pytest.approx(2.0) and won.spec_scale(4)[0] < 1.01


def test_a_batch_whose_drafts_measured_slower_than_predicted_decodes_plainly():
    from specdec.engine.schedule import plan_step

    cands = [Candidate(4, CHAIN, 0.9), Candidate(4, CHAIN, 0.9)]
    plan = plan_step(cands, FLAT, FREE)
    assert plan.depths == [4, 4] and plan.tokens == pytest.approx(2 * sum(0.9**k for k in range(5)))
    assert plan.seconds == pytest.approx(0.05)
    assert plan_step(cands, FLAT, FREE, spec_scale=0.2).depths == [0, 0]
    plain = plan_step(cands, FLAT, FREE, spec_scale=0.2)
    assert plain.tokens == 2.0 and plain.seconds == pytest.approx(0.05)


def test_a_step_is_priced_at_the_depths_it_drafted():
    from specdec.engine.schedule import plan_step, price_depths

    cands = [Candidate(4, CHAIN, 0.9), Candidate(4, CHAIN, 0.6)]
    draft = _times({1: 0.01, 64: 0.05})
    plan = plan_step(cands, FLAT, draft)
    same = price_depths(cands, plan.depths, FLAT, draft)
    assert (same.tokens, same.seconds) == pytest.approx((plan.tokens, plan.seconds))
    short = price_depths(cands, [1, 0], FLAT, draft)  # a chain ended by its drafter's confidence
    assert short.tokens == pytest.approx(2 + 0.9) and short.seconds < price_depths(cands, [4, 4], FLAT, draft).seconds
    assert price_depths(cands, [0, 0], FLAT, draft).seconds == pytest.approx(0.05)  # plain: the target's pass alone


def test_free_nodes_are_taken_while_they_raise_the_steps_rate():
    """A free node adds its expected gain and one token to the target's pass: taken where the gain
    outweighs the pass's growth, best first, none where each token costs a full pass."""
    plan = Plan([0, 0], 2.0, 0.1, 2.0)  # two plain sequences, one pass of 2 tokens
    gains = torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=torch.float64)
    gentle = _times({1: 0.05, 2: 0.05, 16: 0.064})  # 1 ms a token above 2
    assert take_free(plan, gains, gentle) == 3  # 0.01 tokens do not pay a millisecond at 2.0 tokens / 0.1 s
    assert take_free(plan, gains, FLAT) == 4
    assert take_free(plan, gains, STEEP) == 0
    assert take_free(plan, torch.zeros(0, dtype=torch.float64), FLAT) == 0
    # The floor: a node's share of the extra time at the plan's rate (20 tokens/s × 1 ms).
    assert free_gain_floor(plan, gentle, 4) == pytest.approx(0.02)
    assert free_gain_floor(plan, STEEP, 4) == pytest.approx(1.0)  # a certain node only breaks even
    priced = with_free(plan, gains[:3], gentle)
    assert priced.tokens == pytest.approx(3.6) and priced.block == 5.0
    assert priced.seconds == pytest.approx(0.1 + 0.003)


def test_free_rate_follows_what_free_trees_accepted_and_fades_back():
    engine = FreeRate(decay=0.98)
    seq = FreeRate(prior=engine)
    assert seq.ratio == pytest.approx(FREE_PRIOR)
    for _ in range(20):
        seq.observe(3.0, 3)  # every estimated token accepted
    assert seq.ratio > 0.9 and engine.ratio > 0.8  # the engine's prior learns from every sequence
    for _ in range(20):
        seq.observe(3.0, 0)
    assert seq.ratio < 0.15
    for _ in range(60):  # steps without a free tree: back towards the engine's
        seq.observe(0.0, 0)
    assert seq.ratio == pytest.approx(engine.ratio, abs=0.05)


def test_a_free_tree_is_plain_decodings_alternative_in_the_plan():
    """Where a sequence's free tree is expected to yield more than its draft model's chain for less, the
    planner drafts nothing for it (the free tree takes its place); without one it drafts."""
    from dataclasses import replace

    from specdec.engine.schedule import plan_step, price_depths

    draft = _times({1: 0.01, 64: 0.05})
    cand = Candidate(4, CHAIN, 0.6)
    assert plan_step([cand], FLAT, draft).depths[0] > 0
    free = replace(cand, free_gain=2.5, free_nodes=6)
    plan = plan_step([free], FLAT, draft)
    assert plan.depths == [0] and plan.tokens == pytest.approx(3.5) and plan.block == 7
    assert price_depths([free], [2], FLAT, draft).block == 3  # drafting: the chain's nodes, not the free tree's
