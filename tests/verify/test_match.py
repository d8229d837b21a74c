"""Sample-and-match: the exact output law of the real `verify_sample_and_match` on deterministic trees.

Every random outcome is enumerated through the verifier itself (`tests.exact_law`: each categorical
draw it makes, with the probability the verifier's own row gives it), so a wrong row, a wrong match
or a walk that goes on past a mismatch shows up as a biased law; `test_mutation_*` proves the test
can fail. Its draws are made only where the walk reaches a node: `test_draws_*` checks that this
gives the tokens picking every row first would, from the same generator.
"""

import pytest
import torch

import specdec.verify.match as match
from specdec.core.results import VerifyResult
from specdec.core.sampling import sample
from specdec.core.tree import TokenTree
from specdec.verify.match import verify_sample_and_match
from specdec.verify.walk import follow_matching_children
from tests.exact_law import Conditionals, law_tv, sequence_law, speculative_law

V = 4

TREES = {
    "chain": TokenTree.chain(0, torch.tensor([1, 2, 0])),
    "wide": TokenTree.from_drafted(0, torch.tensor([0, 1, 2, 3]), torch.tensor([-1, -1, -1, -1])),
    "deep and wide": TokenTree.from_drafted(0, torch.tensor([2, 0, 1, 3, 3, 0]), torch.tensor([-1, -1, 0, 0, 1, 2])),
    "root only": TokenTree.chain(0, torch.zeros(0, dtype=torch.long)),
}


def _law_tv(tree: TokenTree, target: Conditionals, length: int = 3) -> float:
    return law_tv(speculative_law([(1.0, tree)], verify_sample_and_match, target, length), sequence_law(target, length))


@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("seed", [0, 1])
def test_law_is_the_targets(name, seed):
    assert _law_tv(TREES[name], Conditionals(V, seed)) < 1e-12


def test_law_with_tokens_the_target_never_gives():
    """Children the target gives probability 0 are never matched; the walk still ends exactly."""
    assert _law_tv(TREES["deep and wide"], Conditionals(V, 3, zero=(3,))) < 1e-12


def test_mutation_drawing_every_level_from_the_roots_row_is_detected(monkeypatch):
    real = match.follow_drawn_children
    monkeypatch.setattr(match, "follow_drawn_children", lambda tree, draw: real(tree, lambda node: draw(0)))
    assert _law_tv(TREES["deep and wide"], Conditionals(V, 0)) > 0.01


def test_mutation_descending_into_the_first_child_whatever_was_drawn_is_detected(monkeypatch):
    def first_child(tree, draw):  # a walk that checks nothing: the tree's first path, then a draw
        node, path = 0, []
        while True:
            kids = (tree.parents == node).nonzero().flatten()
            if kids.numel() == 0:
                return VerifyResult(tuple(path), draw(node))
            draw(node)
            node = int(kids[0])
            path.append(node)

    monkeypatch.setattr(match, "follow_drawn_children", first_child)
    assert _law_tv(TREES["deep and wide"], Conditionals(V, 0)) > 0.01


@pytest.mark.parametrize("name", list(TREES))
def test_draws_made_where_the_walk_reaches_equal_picking_every_row_first(name):
    """Same generator state, same tokens, same state after: a seeded run repeats whichever way it draws."""
    tree = TREES[name]
    depths = set()
    for seed in range(200):
        probs = torch.softmax(torch.randn(tree.num_nodes, 5, generator=torch.Generator().manual_seed(seed)), -1)
        lazy, eager = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got = verify_sample_and_match(tree, probs, lazy)
        want = follow_matching_children(tree, sample(probs, eager))
        assert (got.accepted_nodes, got.next_token) == (want.accepted_nodes, want.next_token)
        assert torch.equal(lazy.get_state(), eager.get_state())
        depths.add(got.num_accepted)
    assert len(depths) == 1 + max(int(d) for d in tree.depths())  # walks ended at every depth
