"""Verifiers: hand-written cases and exact enumeration of output distributions.

The enumeration is built from the very kernels the sampling verifier calls
(`acceptance_probability`, `recovery_distribution`), so a wrong kernel shows up here as a
biased output distribution; `test_mutation_*` proves the test can fail.
"""

import itertools

import pytest
import torch

import specdec.verify.chain as verify
from specdec.core.tree import TokenTree
from specdec.verify.chain import verify_speculative_sampling
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match

V = 5


def chain(drafts: list[int], draft_probs: torch.Tensor | None = None, root: int = 0) -> TokenTree:
    return TokenTree.chain(root, torch.tensor(drafts, dtype=torch.long), draft_probs)


def one_hot_logits(tokens: list[int], vocab: int = V) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 100.0
    return logits


# ---- hand-written greedy cases ------------------------------------------------------------
def test_greedy_perfect_match_gives_bonus():
    res = verify_greedy(chain([1, 2, 3]), one_hot_logits([1, 2, 3, 4]))
    assert (res.num_accepted, res.next_token) == (3, 4)


def test_greedy_early_mismatch_gives_correction():
    res = verify_greedy(chain([1, 0, 3]), one_hot_logits([1, 2, 3, 4]))
    assert (res.num_accepted, res.next_token) == (1, 2)
    res = verify_greedy(chain([0, 2, 3]), one_hot_logits([1, 2, 3, 4]))
    assert (res.num_accepted, res.next_token) == (0, 1)


def test_empty_draft_is_plain_decoding():
    res = verify_greedy(chain([]), one_hot_logits([3]))
    assert (res.num_accepted, res.next_token) == (0, 3)
    res = verify_sample_and_match(chain([]), torch.softmax(one_hot_logits([2]), -1), torch.Generator())
    assert (res.num_accepted, res.next_token) == (0, 2)


def test_speculative_sampling_requires_draft_probs():
    with pytest.raises(ValueError):
        verify_speculative_sampling(chain([1]), torch.full((2, V), 1 / V))


def test_sample_and_match_with_certain_target():
    target = torch.softmax(one_hot_logits([1, 2, 0]).double(), -1)
    res = verify_sample_and_match(chain([1, 2]), target, torch.Generator().manual_seed(0))
    assert (res.num_accepted, res.next_token) == (2, 0)


# ---- exact enumeration --------------------------------------------------------------------
def _dist(gen: torch.Generator, vocab: int = V, zero: list[int] = (), sharp: float = 1.0) -> torch.Tensor:
    logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * sharp
    logits[list(zero)] = float("-inf")
    return torch.softmax(logits, -1)


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def single_step_output(target: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:  # [V]
    """Exact distribution of the emitted token for one draft x ~ draft."""
    out = torch.zeros_like(target)
    for x in range(target.numel()):
        if draft[x] == 0:
            continue
        tok = torch.tensor([x])
        a = float(verify.acceptance_probability(tok, draft[None], target[None])[0])
        out[x] += draft[x] * a
        out += draft[x] * (1 - a) * verify.recovery_distribution(target, draft)
    return out


def chain2_output(p1, p2, p3, q1, q2) -> torch.Tensor:  # [V, V] joint of the first two emitted tokens
    """Exact joint distribution of the first two emitted tokens for a chain of two drafts.

    p1 [V], p2 [V, V] (row = first token), p3 [V, V, V]; q1 [V], q2 [V, V]. After a first
    rejection the second token comes from the next iteration, i.e. from p2 given the recovered
    token (exact plain sampling).
    """
    out = torch.zeros(V, V, dtype=torch.float64)
    for x1, x2 in itertools.product(range(V), range(V)):
        w = q1[x1] * q2[x1, x2]
        if w == 0:
            continue
        toks = torch.tensor([x1, x2])
        dprobs = torch.stack([q1, q2[x1]])
        tprobs = torch.stack([p1, p2[x1], p3[x1, x2]])
        a1, a2 = verify.acceptance_probability(toks, dprobs, tprobs).tolist()
        # rejected at 1: y1 ~ residual, y2 ~ p2(.|y1)
        r1 = verify.recovery_distribution(p1, q1)
        out += w * (1 - a1) * r1[:, None] * p2
        # accepted x1, rejected x2: y2 ~ residual(p2(.|x1), q2(.|x1))
        out[x1] += w * a1 * (1 - a2) * verify.recovery_distribution(p2[x1], q2[x1])
        # both accepted: y2 = x2
        out[x1, x2] += w * a1 * a2
    return out


CASES = {
    "random": dict(),
    "draft_misses_target_support": dict(q_zero=[0, 1]),
    "target_misses_draft_support": dict(p_zero=[3, 4]),
    "near_one_hot": dict(sharp=30.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(4))
def test_single_step_is_exact(case, seed):
    c = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    target = _dist(gen, zero=c.get("p_zero", ()), sharp=c.get("sharp", 1.0))
    draft = _dist(gen, zero=c.get("q_zero", ()), sharp=c.get("sharp", 1.0))
    assert _tv(single_step_output(target, draft), target) < 1e-12


def test_identical_distributions_accept_everything():
    gen = torch.Generator().manual_seed(9)
    p = _dist(gen)
    assert _tv(single_step_output(p, p), p) < 1e-12
    a = verify.acceptance_probability(torch.arange(V), p.expand(V, V), p.expand(V, V))
    assert torch.allclose(a, torch.ones(V, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_chain_of_two_is_exact(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    p1, q1 = _dist(gen), _dist(gen, zero=[4])
    p2 = torch.stack([_dist(gen) for _ in range(V)])
    q2 = torch.stack([_dist(gen, zero=[0]) for _ in range(V)])
    p3 = torch.stack([torch.stack([_dist(gen) for _ in range(V)]) for _ in range(V)])
    expected = p1[:, None] * p2
    assert _tv(chain2_output(p1, p2, p3, q1, q2), expected) < 1e-12


def test_mutation_residual_equals_target_is_detected(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    target, draft = _dist(gen), _dist(gen)
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: t)
    assert _tv(single_step_output(target, draft), target) > 0.01


def test_mutation_residual_equals_draft_is_detected(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    target, draft = _dist(gen), _dist(gen)
    # Accepting with target/draft alone (no residual correction) is the textbook bug.
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: d)
    assert _tv(single_step_output(target, draft), target) > 0.01
