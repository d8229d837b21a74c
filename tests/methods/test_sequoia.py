"""Sequoia: the DP against exhaustive search and against simulation, SWOR verification by exact
enumeration (with the mutations that must be caught), the drafter's draws, the whole loop."""

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

import specdec.verify.chain as chain
import specdec.verify.swor as swor
from specdec.core.sampling import SamplingConfig
from specdec.core.tree import TokenTree, paths_to_parents
from specdec.drafting.base import run_proposal
from specdec.drafting.sequoia_dp import check_accept, sequoia_dp, star_paths, tree_value
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sequoia import SequoiaDrafter
from specdec.models.toy import MarkovLM
from specdec.verify.match import verify_sample_and_match
from specdec.verify.mss import verify_mss
from specdec.verify.swor import swor_node, verify_swor
from tests.conftest import tiny_lm
from tests.engine.test_distribution import PROMPT
from tests.exact_law import Conditionals, law_tv, sequence_law, speculative_law, tree_target_probs, verifier_law
from tests.helpers import chi_square_of_decoder, stream_checking_caches

GREEDY = SamplingConfig()
T1 = SamplingConfig(temperature=1.0)


# ---- the DP ------------------------------------------------------------------------------------
def _all_trees(n: int, depth: int, width: int):
    """Every tree of n drafted nodes as path tuples, by brute force over parent arrays (parents[i] < i)."""
    for parents in itertools.product(*[range(-1, i) for i in range(n)]):
        paths: list[tuple[int, ...]] = []
        n_children: dict[int, int] = {}
        for p in parents:
            rank = n_children.get(p, 0)
            n_children[p] = rank + 1
            paths.append((paths[p] if p >= 0 else ()) + (rank,))
        if max(len(p) for p in paths) <= depth and max(n_children.values()) <= width:
            yield paths


@pytest.mark.parametrize("accept", [[0.5, 0.2, 0.1], [0.3, 0.35, 0.05], [0.9]])
def test_dp_equals_exhaustive_search(accept):
    dp = sequoia_dp(accept, 6, 4)
    width = len(accept)
    for n in range(1, 7):
        for d in range(1, 5):
            values = [tree_value(paths, accept) for paths in _all_trees(n, d, width)]
            if not values:
                assert not dp.feasible(n, d)
                with pytest.raises(ValueError, match="no tree"):
                    dp.tree(n, d)
                continue
            assert dp.tokens_per_call(n, d) == pytest.approx(max(values), abs=1e-12)
            paths = dp.tree(n, d)
            parents, ranks = paths_to_parents(paths)  # valid, ancestor-closed growmap
            assert len(set(paths)) == len(paths) == n  # exactly the promised size
            assert max(len(p) for p in paths) <= d and int(ranks.max()) < width
            assert tree_value(paths, accept) == pytest.approx(dp.tokens_per_call(n, d), abs=1e-12)


def test_dp_on_large_budgets_and_bad_input():
    dp = sequoia_dp([0.6, 0.1, 0.05, 0.03], 256, 8)
    values = dp.value[1:, 1:]
    both = torch.isfinite(values[1:]) & torch.isfinite(values[:-1])
    assert bool((values[1:] >= values[:-1] - 1e-12)[both].all())  # one more node never hurts where it fits
    assert bool((values[:, 1:] >= values[:, :-1] - 1e-12).all())  # nor does one more level
    assert not dp.feasible(5, 1) and dp.feasible(4, 1)  # at most 4 children per node
    paths = dp.tree(256, 8)
    assert len(paths) == 256 and tree_value(paths, dp.accept) == pytest.approx(dp.tokens_per_call(256, 8))
    assert sequoia_dp([1.0], 5, 5).tree(5, 5) == [(0,) * d for d in range(1, 6)]  # a perfect draft: a chain
    for bad in ([], [0.7, 0.5], [-0.1], "0.5,x"):
        with pytest.raises(ValueError, match="acceptance vector"):
            check_accept(bad)
    # A measured vector of float32 means may sum past 1 by round-off: accepted, scaled to 1.
    measured = check_accept([0.9003318697214127, 0.09966813772916794, 0.0])
    assert float(measured.sum()) <= 1.0 and measured[0] == pytest.approx(0.9003318697214127)
    with pytest.raises(ValueError, match="size <= 256"):
        dp.tree(300, 2)


# ---- exact enumeration of the real SWOR verifier -----------------------------------------------
V = 5


def swor_draws(draft, k):
    """Every ordered draw of k children without replacement from `draft`, with its probability."""
    for draws in itertools.permutations(range(draft.numel()), k):
        prob = 1.0
        for i, x in enumerate(draws):
            # Mass left after the earlier draws, summed directly (1 - Σ would cancel catastrophically).
            left = sum(float(draft[y]) for y in range(draft.numel()) if y not in draws[:i])
            prob *= float(draft[x]) / left if left > 0 else 0.0
        if prob > 0:
            yield draws, prob


def swor_proposals(draft: Conditionals, k: int, grandchildren: int = 0, resort: bool = False):
    """Every tree `SequoiaDrafter` can propose in mode swor, with its probability: k root children
    drawn without replacement from q, in sampling order; with `grandchildren` = c, the first-drawn
    child gets c children drawn without replacement from q(that token). Siblings share a q row.

    The planted bug: `resort` lists the root children by draft probability, not sampling order.
    """
    q = draft(())
    k = min(k, int((q > 0).sum()))  # no more distinct children than the draft's support
    for roots, prob in swor_draws(q, k):
        if resort:
            roots = tuple(sorted(roots, key=lambda x: -float(q[x])))
        below_q = draft((roots[0],))
        c = min(grandchildren, int((below_q > 0).sum()))
        for below, p_below in swor_draws(below_q, c) if c else [((), 1.0)]:
            tree = TokenTree.from_drafted(
                0, torch.tensor(roots + below), torch.tensor([-1] * k + [0] * c), None,
                torch.tensor([0] * k + [1] * c), torch.stack([q, below_q]))  # draft_probs: [2, V]
            yield prob * p_below, tree


def swor_tv(target: Conditionals, proposals, length: int = 2, verifier=verify_swor) -> float:
    """TV between the law of the next `length` tokens through the real verifier and the target's own."""
    return law_tv(speculative_law(proposals, verifier, target, length), sequence_law(target, length))


CASES = {
    "random": dict(),
    "draft_misses_target_support": dict(q_zero=(0,)),
    "target_misses_draft_support": dict(p_zero=(2, 3)),
    "near_one_hot": dict(sharp=30.0),
}


def _pair(case: str, seed: int, vocab: int = V) -> tuple[Conditionals, Conditionals]:
    c = CASES[case]
    return (Conditionals(vocab, seed, c.get("p_zero", ()), c.get("sharp", 1.0)),
            Conditionals(vocab, 100 + seed, c.get("q_zero", ()), c.get("sharp", 1.0)))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", range(1, 5))
def test_swor_children_with_swor_verification_are_exact(case, k):
    target, draft = _pair(case, k, vocab=4)  # k = 1…V (each run enumerates 2^k acceptance outcomes)
    assert swor_tv(target, swor_proposals(draft, k)) < 1e-12


def test_swor_children_and_grandchildren_are_exact():
    """Two levels: the walk descends into an accepted child and verifies its SWOR children there."""
    target, draft = _pair("random", 9, vocab=4)
    assert swor_tv(target, swor_proposals(draft, 2, grandchildren=2), length=3) < 1e-12


def test_one_swor_child_is_leviathan():
    target, draft = _pair("random", 3)
    for x in range(V):
        tree = TokenTree.from_drafted(0, torch.tensor([x]), torch.tensor([-1]), None, torch.tensor([0]),
                                      draft(())[None])
        rows = tree_target_probs(tree, target)
        assert verifier_law(verify_swor, tree, rows) == verifier_law(chain.verify_speculative_sampling, tree, rows)
        accept, leftover = swor_node(rows[0], torch.tensor([x]), draft(()))
        assert float(accept[0]) == float(chain.acceptance_probability(torch.tensor([x]), draft(())[None], rows[:1])[0])
        assert torch.equal(leftover, chain.recovery_distribution(rows[0], draft(())))


def test_mutation_swor_without_zeroing_is_detected(monkeypatch):
    target, draft = _pair("random", 11)
    assert swor_tv(target, swor_proposals(draft, 3)) < 1e-12
    monkeypatch.setattr(swor, "without_token", lambda q, x: q)  # = MSS on SWOR children
    assert swor_tv(target, swor_proposals(draft, 3)) > 0.01


def test_mutation_resorted_siblings_is_detected():
    target, draft = _pair("random", 12)
    assert swor_tv(target, swor_proposals(draft, 3, resort=True)) > 0.01


def test_mutation_residual_equals_target_is_detected(monkeypatch):
    target, draft = _pair("random", 13)
    monkeypatch.setattr(swor, "recovery_distribution", lambda t, d: t)
    assert swor_tv(target, swor_proposals(draft, 3)) > 0.01


def test_swor_verifier_refuses_siblings_from_different_rows():
    tree = TokenTree.from_drafted(0, torch.tensor([1, 2]), torch.tensor([-1, -1]), None, torch.tensor([0, 1]),
                                  torch.full((2, V), 1.0 / V))
    with pytest.raises(ValueError, match="one draft distribution"):
        verify_swor(tree, torch.full((3, V), 1.0 / V), torch.Generator())
    with pytest.raises(ValueError, match="distribution"):
        verify_swor(TokenTree.from_drafted(0, torch.tensor([1]), torch.tensor([-1])), torch.full((2, V), 1.0 / V))


# ---- top-k children + sample-and-match, enumerated through the real tree verifier ---------------
def _topk_tree(draft: Conditionals, with_probs: bool = False) -> TokenTree:
    """The draft's top-2 root children, and the top child under the first: a deterministic tree."""
    top = torch.topk(draft(()), 2).indices
    below = int(draft((int(top[0]),)).argmax())
    probs = (torch.tensor([0, 0, 1]), torch.stack([draft(()), draft((int(top[0]),))])) if with_probs else (None, None)
    return TokenTree.from_drafted(0, torch.cat([top, torch.tensor([below])]), torch.tensor([-1, -1, 0]), None, *probs)


def test_topk_tree_with_sample_and_match_is_exact():
    target, draft = _pair("random", 5, vocab=4)
    law = speculative_law([(1.0, _topk_tree(draft))], verify_sample_and_match, target, 3)
    assert law_tv(law, sequence_law(target, 3)) < 1e-12


def test_topk_children_verified_by_mss_are_biased():
    target, draft = Conditionals(V, 6), Conditionals(V, 106, sharp=2.0)
    assert swor_tv(target, [(1.0, _topk_tree(draft, with_probs=True))], verifier=verify_mss) > 0.01


# ---- the drafter -------------------------------------------------------------------------------
def test_drafter_draws_children_without_replacement_in_sampling_order():
    draft = torch.softmax(torch.tensor([1.5, 0.2, -0.3, 0.9, -1.0]), -1)
    lm = MarkovLM(torch.log(draft).expand(V, V, V).clone())
    drafter = SequoiaDrafter(lm, T1, star_paths(3))
    n = 20000
    tokens, drawn, probs = drafter._rank_children(torch.log(draft).expand(n, V), 2, torch.Generator().manual_seed(0))
    assert bool(drawn.all()) and bool((tokens[:, 0] != tokens[:, 1]).all())
    counts = Counter(map(tuple, tokens.tolist()))
    exact = dict(swor_draws(draft.double(), 2))
    cells = sorted(exact)
    assert chisquare([counts.get(c, 0) for c in cells], [exact[c] * n for c in cells]).pvalue > 1e-3
    # A filtered distribution with fewer tokens than children: the extra children are not drawn.
    filtered = SequoiaDrafter(lm, SamplingConfig(temperature=1.0, top_k=2), star_paths(3))
    tree = run_proposal(filtered.propose(torch.tensor(PROMPT), 4, torch.Generator().manual_seed(1)))
    assert tree.num_drafted == 2 and sorted(tree.tokens[1:].tolist()) == [0, 3]


def test_drafter_rejects_bad_shapes():
    lm = MarkovLM.random(4, seed=0)
    with pytest.raises(ValueError, match="mode"):
        SequoiaDrafter(lm, T1, star_paths(2), mode="iid")
    with pytest.raises(ValueError, match="at least one"):
        SequoiaDrafter(lm, T1, [])
    with pytest.raises(ValueError, match="vocabulary"):
        SequoiaDrafter(lm, T1, star_paths(5))


# ---- the DP's value is the simulated tokens per call on a context-free toy ----------------------
def _context_free(row):
    vocab = row.numel()
    return MarkovLM(row.expand(vocab, vocab, vocab).clone())


@pytest.mark.parametrize("mode", ["swor", "greedy"])
def test_dp_value_equals_simulated_tokens_per_call(mode, one_thread):
    gen = torch.Generator().manual_seed(21)
    target_row = torch.randn(V, generator=gen, dtype=torch.float64) * 1.2
    draft_row = target_row + torch.randn(V, generator=gen, dtype=torch.float64) * 0.8
    target_probs, draft_probs = torch.softmax(target_row, -1), torch.softmax(draft_row, -1)
    width = 3
    # Positional acceptance, exactly: it holds in a context-free model (the same p and q at every node).
    if mode == "swor":
        accept = torch.zeros(width, dtype=torch.float64)
        for draws, prob in swor_draws(draft_probs, width):
            a, _ = swor_node(target_probs, torch.tensor(draws), draft_probs)
            reach = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - a, 0)[:-1]])
            accept += prob * a * reach
    else:
        accept = target_probs[torch.topk(draft_probs, width).indices]
    dp = sequoia_dp(accept, 8, 3)
    paths = dp.tree(8, 3)
    dec = SpeculativeDecoder(_context_free(target_row), SequoiaDrafter(_context_free(draft_row), T1, paths, mode), T1)
    lengths, emitted, total = [], 0, 1500
    for chunk in dec.stream([0, 1], total, torch.Generator().manual_seed(3)):
        if total - emitted > dp.max_depth + 1:  # the last calls draft shallower trees (length cap)
            lengths.append(len(chunk))
        emitted += len(chunk)
    x = torch.tensor(lengths, dtype=torch.float64)
    se = float(x.std()) / len(lengths) ** 0.5
    assert abs(float(x.mean()) - dp.tokens_per_call(8, 3)) < 4 * se, (float(x.mean()), dp.tokens_per_call(8, 3), se)


# ---- the whole loop ----------------------------------------------------------------------------
CHI_PATHS = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)]
CHI_CONFIGS = [
    ("swor", SamplingConfig(temperature=1.0), None),
    ("swor", SamplingConfig(temperature=0.6, top_k=3), 3),
    ("greedy", SamplingConfig(temperature=0.7, top_p=0.9), 3),
]


def _chi_run(mode, sampling, eos, n, detects_tv=None):
    # Draft seed 16 against target seed 11: a pair where SWOR without the q update is visibly biased.
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    draft = MarkovLM.random(4, seed=16, sharpness=1.5)
    dec = SpeculativeDecoder(target, SequoiaDrafter(draft, sampling, CHI_PATHS, mode), sampling,
                             eos_token_ids=[eos] if eos is not None else [])
    return chi_square_of_decoder(dec, target, sampling, eos, n, seed=5, detects_tv=detects_tv)


@pytest.mark.parametrize("mode,sampling,eos", CHI_CONFIGS)
def test_sequoia_sampling_matches_target_distribution(mode, sampling, eos, one_thread):
    """n = 2000 over 42, 10 and 5 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total
    variation ≥ 0.097, 0.078 and 0.071 from the target's (chi-square divergence ≥ 0.038, 0.024, 0.020);
    both planted bugs below diverge by 0.10–0.23."""
    assert _chi_run(mode, sampling, eos, 2000, detects_tv=0.1) > 1e-3


def test_sequoia_mutation_without_zeroing_fails_chi_square(monkeypatch, one_thread):
    """SWOR children verified without removing the rejected token from q (= MSS on SWOR children):
    chi-square divergence 0.097 (30 000 mutated runs), caught with power ≥ 0.99 from n ≈ 770 on."""
    monkeypatch.setattr(swor, "without_token", lambda q, x: q)
    assert _chi_run("swor", SamplingConfig(temperature=1.0), None, 2000, detects_tv=0.5 * 0.097**0.5) < 1e-3


@pytest.mark.parametrize("config", [0, 1])
def test_sequoia_mutation_residual_equals_target_fails_chi_square(config, monkeypatch, one_thread):
    """The subtle bug: after a rejection the target is replaced by itself, not by norm(max(0, target − q)).
    Chi-square divergence 0.18 and 0.23 on the two SWOR configurations (30 000 mutated runs), caught
    with power ≥ 0.99 from n ≈ 430 and 210 on; n = 1000 here, half the pass test's."""
    mode, sampling, eos = CHI_CONFIGS[config]
    monkeypatch.setattr(swor, "recovery_distribution", lambda t, d: t)
    assert _chi_run(mode, sampling, eos, 1000, detects_tv=0.5 * 0.18**0.5) < 1e-3


@pytest.mark.parametrize("mode", ["swor", "greedy"])
def test_sequoia_greedy_equals_ar(arch, mode):
    target = tiny_lm(arch, seed=0)
    prompt = list(range(10, 22))
    ref = SpeculativeDecoder(target).generate(prompt, 40)[0]
    paths = sequoia_dp([0.6, 0.2, 0.1], 12, 4).tree(12, 4)
    for draft_seed in (0, 5):  # the target itself (everything accepted) and an unrelated draft
        draft = tiny_lm(arch, seed=draft_seed)
        dec = SpeculativeDecoder(target, SequoiaDrafter(draft, GREEDY, paths, mode), GREEDY)
        out: list[int] = []
        for chunk in dec.stream(prompt, 40):
            out += chunk
            assert 1 <= len(chunk) <= 5
            if not dec.last_stats.stopped_by:
                assert target.kv_len == len(prompt) + len(out) - 1
                assert draft.kv_len <= len(prompt) + len(out)  # the draft never holds uncommitted tokens
        assert out == ref
        if draft_seed == 0:
            assert dec.last_stats.tokens_per_call > 3.5


def test_sequoia_drafter_cache_holds_exactly_committed_tokens(one_thread):
    target = MarkovLM.random(6, seed=1, sharpness=2.0)
    draft = MarkovLM.random(6, seed=2, sharpness=2.0)
    dec = SpeculativeDecoder(target, SequoiaDrafter(draft, T1, [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]), T1)
    stream_checking_caches(dec, target, [draft], [1, 2, 3, 4], 60)
