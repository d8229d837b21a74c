import pytest
import torch

from specdec.core.sampling import SamplingConfig, logits_to_probs, pick, residual, sample


def test_temperature_zero_is_exact_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.999, -3.0], [5.0, 1.0, 0.0, 4.99]])
    probs = logits_to_probs(logits, SamplingConfig(temperature=0))
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_temperature_scales_softmax():
    logits = torch.randn(3, 10, dtype=torch.float64)
    probs = logits_to_probs(logits, SamplingConfig(temperature=0.7))
    assert probs.dtype == torch.float64
    torch.testing.assert_close(probs, torch.softmax(logits / 0.7, -1))


def test_top_k_keeps_k_most_likely():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0])
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    expected = torch.softmax(torch.tensor([4.0, 3.0]), -1)
    torch.testing.assert_close(probs, torch.tensor([0.0, expected[0], expected[1], 0.0, 0.0]))


def test_top_p_keeps_smallest_set_reaching_mass():
    base = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = base.log()
    # 0.5 < 0.7 so the second token is needed; 0.5 + 0.3 >= 0.7 so the third is not.
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64))
    # Once the mass is reached no further token is kept.
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.79))
    assert (probs > 0).sum() == 2
    # A very small top_p still keeps the most likely token.
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=1e-6))
    assert torch.equal(probs, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_temperature_and_top_p_still_give_distributions(dtype):
    """Valid settings at the edge of the float range: the most likely token, not a NaN row (the
    division overflowed to ±inf; a top_p under the dtype's smallest number compared as 0)."""
    logits = torch.tensor([[1.0, 30.0, -2.0, 29.5], [-1.0, -0.5, -3.0, -0.75]], dtype=dtype)
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=dtype)
    for cfg in (SamplingConfig(temperature=1e-300), SamplingConfig(temperature=1e-38),
                SamplingConfig(temperature=1.0, top_p=1e-46), SamplingConfig(temperature=1.0, top_p=1e-320)):
        assert torch.equal(logits_to_probs(logits, cfg), expected), cfg
    # Just below the shift's threshold, where the plain division is still finite: the same distribution.
    wide = torch.tensor([[0.0, 1e-3, -2e-3, 5e-4]], dtype=torch.float64)
    torch.testing.assert_close(logits_to_probs(wide.to(dtype), SamplingConfig(temperature=5e-5)),
                               torch.softmax(wide / 5e-5, -1).to(dtype))


def test_top_p_breaks_ties_at_the_cut_by_token_id():
    """Exactly tied logits across the cut: the lowest token ids are kept (a stable sort). With
    torch's unstable sort (32 or more values on the CPU) other ids of the tie would survive."""
    vocab = 32
    # All tied: probabilities 1/32 (exact), so top_p = 1/4 keeps exactly 8 tokens, ids 0…7.
    probs = logits_to_probs(torch.zeros(vocab), SamplingConfig(temperature=1.0, top_p=0.25))
    assert (probs > 0).nonzero().flatten().tolist() == list(range(8))
    torch.testing.assert_close(probs[:8], torch.full((8,), 1 / 8))
    # One clear winner (id 5, mass 1/2), the other 31 tied at 1/62: the cut falls inside the tie
    # after 4 of them, so the winner and the 4 lowest other ids survive.
    logits = torch.zeros(vocab, dtype=torch.float64)
    logits[5] = torch.log(torch.tensor(31.0, dtype=torch.float64))
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_p=0.5 + 3.5 / 62))
    assert (probs > 0).nonzero().flatten().tolist() == [0, 1, 2, 3, 5]


def test_top_k_then_top_p_matches_hand_computation():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    probs = logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=3, top_p=0.7))
    k = torch.softmax(logits[:3], -1)  # top-k renormalised: [0.665, 0.245, 0.090]
    assert k[0] < 0.7 and k[0] + k[1] >= 0.7
    expected = torch.zeros(5, dtype=torch.float64)
    expected[:2] = k[:2] / k[:2].sum()
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.2},
        {"top_k": -1},
        {"top_k": 2.5},
    ],
)
def test_invalid_sampling_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.7"])
def test_every_bad_temperature_gets_the_same_message(bad):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0 = greedy\)"):
        SamplingConfig(temperature=bad)


@pytest.mark.parametrize("bad", [2, -0.5, "nan", float("inf"), "x"])
def test_every_bad_probability_option_gets_the_same_message(bad):
    from specdec.core.options import probability

    with pytest.raises(ValueError, match=r"must be a probability in \[0, 1\]"):
        probability(bad)


def test_residual_guards_zero_mass():
    p = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    r = residual(p, p.clone())
    assert torch.isfinite(r).all()
    torch.testing.assert_close(r, p)
    r = residual(p, torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64))
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_sample_is_reproducible_with_generator():
    probs = torch.softmax(torch.randn(5, 50), -1)
    a = sample(probs, torch.Generator().manual_seed(3))
    b = sample(probs, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (5,)


# ---- the draw: inverse transform on one uniform (core.sampling.pick) ----------------------------
TOY = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0])  # zero mass first, between and last


def test_pick_gives_each_token_exactly_its_share_of_the_unit_interval():
    # Every uniform in [0, 1): token i owns [cdf[i-1], cdf[i]) of it, so enumerating u on a grid
    # that contains the boundaries gives each token its exact probability.
    u = torch.arange(64, dtype=torch.float64) / 64
    tokens = pick(TOY.expand(64, -1), u)
    counts = torch.bincount(tokens, minlength=TOY.numel()).double() / 64
    assert torch.equal(counts, TOY.double())
    assert int(pick(TOY[None], torch.zeros(1, dtype=torch.float64))) == 1  # u = 0: not the zero-mass token 0


def test_pick_never_draws_a_token_of_zero_mass_at_the_top_of_the_interval():
    top = torch.tensor([1.0 - 2.0 ** -53], dtype=torch.float64)  # u·total may round up to the total
    assert int(pick(TOY[None], top)) == 4
    odd = torch.tensor([[0.1, 0.7, 0.2, 0.0]]) * 3.0  # an unnormalized row: the same shares
    assert int(pick(odd, top)) == 2 and int(pick(odd, torch.tensor([0.5], dtype=torch.float64))) == 1


def test_sample_follows_the_distribution_chi_square():
    from scipy.stats import chisquare

    probs = torch.tensor([0.05, 0.0, 0.3, 0.15, 0.0, 0.5])
    draws = sample(probs.expand(40_000, -1), torch.Generator().manual_seed(7))
    counts = torch.bincount(draws, minlength=6)
    assert counts[1] == 0 and counts[4] == 0
    keep = probs > 0
    assert chisquare(counts[keep].double().numpy(), (probs[keep] * 40_000).double().numpy()).pvalue > 1e-4


@pytest.mark.parametrize("row", [[0.0, 0.0, 0.0], [0.5, float("nan"), 0.5]])
def test_pick_refuses_a_row_without_mass(row):
    with pytest.raises(ValueError, match="positive mass"):
        sample(torch.tensor([row]), torch.Generator().manual_seed(0))
