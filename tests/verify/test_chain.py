"""Verifiers: hand-written cases and the exact output law of the chain verifier.

The law is enumerated through the real `verify_speculative_sampling` (every draft sequence with
its draft probability, every random outcome of the verifier with the probability the verifier
gave it: `tests.exact_law`), so a wrong threshold, residual, row or prefix rule anywhere in the
verifier shows up as a biased law; `test_mutation_*` proves the test can fail.
"""

import itertools

import pytest
import torch

import specdec.verify.chain as verify
import specdec.verify.walk as walk
from specdec.core.tree import TokenTree
from specdec.verify.chain import verify_speculative_sampling
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match
from tests.exact_law import Conditionals, law_tv, sequence_law, speculative_law, tree_target_probs, verifier_law

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


# ---- exact enumeration of the real verifier -----------------------------------------------------
def chain_proposals(draft: Conditionals, gamma: int):
    """Every chain of γ drafts x_i ~ draft(x_<i), with its probability (what `ModelDrafter` draws)."""
    for drafts in itertools.product(range(draft.vocab), repeat=gamma):
        prob, rows = 1.0, []
        for i, x in enumerate(drafts):
            rows.append(draft(drafts[:i]))
            prob *= float(rows[-1][x])
        if prob > 0:
            yield prob, chain(list(drafts), torch.stack(rows))  # draft_probs: [γ, V]


def chain_tv(target: Conditionals, draft: Conditionals, gamma: int) -> float:
    """TV between the law of the next γ + 1 tokens through the verifier and the target's own law."""
    law = speculative_law(chain_proposals(draft, gamma), verify_speculative_sampling, target, gamma + 1)
    return law_tv(law, sequence_law(target, gamma + 1))


CASES = {
    "random": dict(),
    "draft_misses_target_support": dict(q_zero=(0, 1)),
    "target_misses_draft_support": dict(p_zero=(3, 4)),
    "near_one_hot": dict(sharp=30.0),
}


def _pair(case: str, seed: int) -> tuple[Conditionals, Conditionals]:
    c = CASES[case]
    target = Conditionals(V, seed, zero=c.get("p_zero", ()), sharp=c.get("sharp", 1.0))
    draft = Conditionals(V, 1000 + seed, zero=c.get("q_zero", ()), sharp=c.get("sharp", 1.0))
    return target, draft


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", range(4))
def test_single_draft_is_exact(case, seed):
    target, draft = _pair(case, seed)
    assert chain_tv(target, draft, 1) < 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_chain_of_two_is_exact(case):
    target, draft = _pair(case, 100)
    assert chain_tv(target, draft, 2) < 1e-12


def test_identical_distributions_accept_everything():
    target = Conditionals(V, 9)
    law = speculative_law(chain_proposals(target, 2), verify_speculative_sampling, target, 4)
    assert law_tv(law, sequence_law(target, 4)) < 1e-12
    # Every call emits both drafts and the bonus: the fourth token always comes from the next call.
    lengths = {}
    for prob, tree in chain_proposals(target, 2):
        for out, p in verifier_law(verify_speculative_sampling, tree, tree_target_probs(tree, target)).items():
            lengths[len(out)] = lengths.get(len(out), 0.0) + prob * p
    assert lengths == pytest.approx({3: 1.0}, abs=1e-12)
    a = verify.acceptance_probability(torch.arange(V), target(()).expand(V, V), target(()).expand(V, V))
    assert torch.allclose(a, torch.ones(V, dtype=torch.float64))


# ---- planted bugs: each must make the real verifier's law biased -------------------------------
def test_mutation_residual_equals_target_is_detected(monkeypatch):
    target, draft = _pair("random", 1)
    assert chain_tv(target, draft, 2) < 1e-12
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: t)
    assert chain_tv(target, draft, 2) > 0.01


def test_mutation_residual_equals_draft_is_detected(monkeypatch):
    target, draft = _pair("random", 2)
    # Accepting with target/draft alone (no residual correction) is the textbook bug.
    monkeypatch.setattr(verify, "recovery_distribution", lambda t, d: d)
    assert chain_tv(target, draft, 2) > 0.01


def test_mutation_accepting_past_a_rejection_is_detected(monkeypatch):
    """Counting every passed test instead of the leading run (a draft kept after an earlier one was
    rejected): the kernels are right, only the verifier's use of them is wrong."""
    target, draft = _pair("random", 3)
    monkeypatch.setattr(verify, "accepted_prefix", lambda accept: int(accept.sum()))
    assert chain_tv(target, draft, 2) > 0.01
    assert walk.accepted_prefix(torch.tensor([True, False, True])) == 1  # the real one stops at the rejection
