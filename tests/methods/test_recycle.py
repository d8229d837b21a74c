"""`recycle` (Token Recycling): the table and the tree on hand traces, greedy equivalence with drafts
accepted, exact sampling end to end, and a planted verifier bug that the chi-square test catches."""

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.core.tree import TokenTree
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import Pipeline
from specdec.methods.recycle import RecyclingDrafter, latest_successors
from specdec.models.toy import MarkovLM
from tests.conftest import tiny_lm
from tests.helpers import chi_square_of_decoder, shared_uniform_match


def t(*xs):
    return torch.tensor(xs)


def test_prompt_bigrams_seed_rank_zero_latest_first():
    tokens, successor = latest_successors(t(1, 2, 3, 1, 5, 2, 4), vocab_size=10)
    assert dict(zip(tokens.tolist(), successor.tolist())) == {1: 5, 2: 4, 3: 1, 5: 2}


def test_tree_follows_the_table_breadth_first_and_drops_empty_entries():
    d = RecyclingDrafter(10, budget=6, max_depth=3, successors=2)
    d.begin(t(0), 100)
    d.table[1] = t(2, 3).int()
    d.table[2] = t(4, -1).int()  # only one known successor of 2
    d.table[3] = t(5, 6).int()
    tokens, parents, prior = d.expand(1, 3)
    inner = parents >= 0
    assert bool((prior[inner] <= prior[parents[inner]]).all())  # a path's prior never grows
    pairs = {(int(parents[i]), int(tokens[i])) for i in range(tokens.shape[0])}
    # every node is table[parent token, its rank]; rank 1 under 2 is unknown and left out
    index = {i: int(tokens[i]) for i in range(tokens.shape[0])}
    for p, tok in pairs:
        above = 1 if p < 0 else index[p]
        assert tok in d.table[above].tolist()
    assert (-1, 2) in pairs and (-1, 3) in pairs
    d.min_prob = float(prior.max()) + 1e-9  # every estimate is below it but the best one's
    assert d.expand(1, 3)[0].numel() == 0
    d.min_prob = float(prior.max())
    assert d.expand(1, 3)[0].tolist() == [2]  # rank 0 under the root: the most probable node
    assert tokens.shape[0] <= 6 and bool((parents < torch.arange(tokens.shape[0])).all())


def test_the_target_top_k_overwrites_each_scored_token_shallowest_node_first():
    d = RecyclingDrafter(6, budget=4, max_depth=2, successors=2)
    d.begin(t(0), 100)
    tree = TokenTree(t(3, 4, 3), t(-1, 0, 1))  # token 3 at the root and again at depth 2
    logits = torch.tensor([[0.0, 5, 4, 0, 0, 0],  # after the root: 1, then 2
                           [9.0, 0, 0, 0, 0, 8],  # after 4: 0, then 5
                           [0.0, 0, 0, 7, 6, 0]])  # after the second 3 (not kept: the root's wins)
    d.observe_target(tree, logits)
    assert d.table[3].tolist() == [1, 2] and d.table[4].tolist() == [0, 5]


def test_greedy_equals_ar_and_recycled_tokens_are_accepted():
    target = tiny_lm("llama", seed=0)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (12,), generator=g).tolist()
    ref, _ = SpeculativeDecoder(target).generate(prompt, 48)
    dec = SpeculativeDecoder(target, RecyclingDrafter(target.vocab_size, budget=12, max_depth=4))
    out, stats = dec.generate(prompt, 48)
    assert out == ref
    assert stats.accepted_tokens > 0 and stats.target_calls < stats.new_tokens
    assert stats.tree_tokens <= 12
    assert Pipeline.from_models(target, None).generate(prompt, "recycle", 48, budget=12).token_ids == ref


def test_sampling_matches_the_target_distribution(one_thread):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    dec = SpeculativeDecoder(target, RecyclingDrafter(4, budget=6, max_depth=2, successors=4), sampling)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3) > 1e-3


def test_mutation_shared_uniform_fails_chi_square(one_thread):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    drafter = RecyclingDrafter(4, budget=6, max_depth=2, successors=4)
    dec = SpeculativeDecoder(target, drafter, sampling, verifier=shared_uniform_match)
    assert chi_square_of_decoder(dec, target, sampling, None, 3000, seed=3) < 1e-3


def test_the_shape_follows_which_rank_the_target_picks():
    d = RecyclingDrafter(6, budget=5, max_depth=4, successors=2)
    d.begin(t(0), 100)
    # which rank of the root's children gets children of its own
    assert {int(d.ranks[p]) for p in d.parents[d.depth == 1]} == {0}  # the prior favours rank 0
    for _ in range(64):  # the target always picks the old row's rank-1 token after 3
        d.table[3] = t(1, 2).int()
        d.observe_target(TokenTree(t(3), t(-1)), torch.tensor([[0.0, 1, 5, 0, 0, 0]]))
    assert d.rank_accept[1] > 0.9 and d.rank_accept[0] < 0.1
    assert {int(d.ranks[p]) for p in d.parents[d.depth == 1]} == {1}  # reshaped: rank 1 gets the subtree


def test_more_successors_than_the_table_keeps_is_refused_not_clamped():
    from specdec.methods.recycle import RANK_PRIOR, Options

    assert Options.from_mapping({"successors": len(RANK_PRIOR)}).successors == len(RANK_PRIOR)
    with pytest.raises(ValueError, match=f"at most {len(RANK_PRIOR)}"):
        Options.from_mapping({"successors": 100})
