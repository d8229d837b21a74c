"""Token trees and SpecInfer: shapes, level-by-level drafting, MSS exactness, greedy equivalence."""

import itertools
from collections import Counter

import pytest
import torch

import specdec.verify.chain as chain_kernel
import specdec.verify.mss as mss
from specdec.core.sampling import SamplingConfig
from specdec.core.tree import TokenTree, expansion_paths, path_to, paths_to_parents
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.specinfer import TreeDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.hf import HFLanguageModel
from specdec.models.toy import MarkovLM
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match
from specdec.verify.mss import verify_mss
from tests.conftest import TINY_VOCAB, tiny_hf_model, tiny_lm
from tests.engine.test_distribution import PROMPT, chi_square_pvalue, detectable_effect, exact_continuations
from tests.exact_law import Conditionals, law_tv, sequence_law, speculative_law
from tests.helpers import stream_checking_caches

GREEDY = SamplingConfig()


# ---- shapes --------------------------------------------------------------------------------
def test_expansion_paths_match_specinfer_sizes():
    paths = expansion_paths([1, 1, 3, 1, 1, 1, 1, 1])
    assert len(paths) == 1 + 1 + 3 + 3 * 5  # SpecInfer's default tree: 20 speculated tokens
    parents, ranks = paths_to_parents(paths)
    assert parents[:5].tolist() == [-1, 0, 1, 1, 1] and ranks[:5].tolist() == [0, 0, 0, 1, 2]
    assert all(p < i for i, p in enumerate(parents.tolist()))


def test_path_tuples_compile_and_reject_orphans():
    parents, ranks = paths_to_parents([(1,), (0,), (0, 0), (0, 1), (1, 0)])
    assert parents.tolist() == [-1, -1, 0, 0, 1] and ranks.tolist() == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        paths_to_parents([(0, 0)])


# ---- a tree grown level by level in the model layer -----------------------------------------
def test_level_by_level_growth_equals_per_branch_causal(arch):
    model = tiny_hf_model(arch, seed=2)
    lm = HFLanguageModel(model)
    lm.reset(64)
    prefix = torch.randint(0, TINY_VOCAB, (5,), generator=torch.Generator().manual_seed(0))
    lm.forward(prefix)
    lm.commit(5)
    levels = [(torch.tensor([3, 9]), torch.tensor([-1, -1])), (torch.tensor([4, 5, 6]), torch.tensor([0, 0, 1])),
              (torch.tensor([7]), torch.tensor([3]))]
    all_tokens, all_parents, logits = [], [], []
    for toks, pars in levels:
        logits.append(lm.forward(toks, pars, append=True))
        all_tokens += toks.tolist()
        all_parents += pars.tolist()
    logits = torch.cat(logits)
    parents = torch.tensor(all_parents)
    for node in range(len(all_tokens)):
        branch = torch.tensor([all_tokens[i] for i in path_to(parents, node)])
        with torch.no_grad():
            ref = model(torch.cat([prefix, branch])[None]).logits[0, -1]
        torch.testing.assert_close(logits[node], ref, atol=2e-5, rtol=1e-5)
    lm.commit(torch.tensor([1, 4]))  # keep the branch 9 -> 6
    out = lm.forward(torch.tensor([8]))
    with torch.no_grad():
        ref = model(torch.cat([prefix, torch.tensor([9, 6, 8])])[None]).logits[0, -1]
    torch.testing.assert_close(out[-1], ref, atol=2e-5, rtol=1e-5)


# ---- verifiers on hand-made trees -----------------------------------------------------------
def _onehot(tokens, vocab=6):
    out = torch.zeros(len(tokens), vocab, dtype=torch.float64)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return out


def test_tree_greedy_follows_argmax_branch():
    # root (node 0) children: 2 (node 1), 3 (node 2); under 3: 4 (node 3), 5 (node 4); under 5: 1 (node 5)
    tree = TokenTree(torch.tensor([0, 2, 3, 4, 5, 1]), torch.tensor([-1, 0, 0, 2, 2, 4]))
    target = _onehot([3, 0, 5, 0, 1, 0])  # rows: root, node1..node5
    res = verify_greedy(tree, target)
    assert res.accepted_nodes == (2, 4, 5) and res.next_token == 0
    target = _onehot([4, 0, 0, 0, 0, 0])  # no child of the root matches
    res = verify_greedy(tree, target)
    assert res.accepted_nodes == () and res.next_token == 4
    res = verify_sample_and_match(tree, _onehot([3, 0, 4, 2, 0, 0]), torch.Generator())
    assert res.accepted_nodes == (2, 3) and res.next_token == 2


# ---- exact enumeration of the real MSS verifier ----------------------------------------------------
V = 4


def iid_proposals(drafters: list[tuple[Conditionals, int]], grandchildren: int = 0,
                  sort_by_q: bool = False, merge_duplicates: bool = False):
    """Every tree `TreeDrafter` can propose, with its probability: drafters = [(q_s, k_s)], drafter s
    drawing k_s i.i.d. root children from q_s (drafter by drafter, in proposal order); with
    `grandchildren` = c (one drafter), every root draw then gets c i.i.d. children from q_s(x).
    Equal draws under one parent share a node and stay separate candidates (docs/algorithms.md §5.3).

    The planted bugs: `sort_by_q` visits the root candidates by draft probability instead of
    proposal order; `merge_duplicates` keeps one candidate per distinct root token.
    """
    slots = [(s, q) for s, (q, k) in enumerate(drafters) for _ in range(k)]
    first = drafters[0][0]
    vocab = first.vocab
    for roots in itertools.product(range(vocab), repeat=len(slots)):
        prob = 1.0
        for (_, q), x in zip(slots, roots):
            prob *= float(q(())[x])
        cands = list(zip(roots, [s for s, _ in slots]))  # (token, q row) per root candidate
        if sort_by_q:
            cands.sort(key=lambda c: -float(drafters[c[1]][0](())[c[0]]))
        if merge_duplicates:
            cands = [c for i, c in enumerate(cands) if c[0] not in [d[0] for d in cands[:i]]]
        for below in itertools.product(range(vocab), repeat=grandchildren * len(roots)):
            p_below = 1.0
            for i, y in enumerate(below):
                p_below *= float(first((roots[i // grandchildren],))[y])
            if prob * p_below > 0:
                yield prob * p_below, _tree(cands, roots, below, grandchildren, drafters)


def _tree(cands, roots, below, grandchildren, drafters) -> TokenTree:
    """The merged tree: a node per distinct (parent, token), one candidate per draw, q rows per drafter
    at the root and per level-1 node below it."""
    tokens, parents, index = [], [], {}

    def node(parent: int, token: int) -> int:
        if (parent, token) not in index:
            index[parent, token] = len(tokens)
            tokens.append(token)
            parents.append(parent)
        return index[parent, token]

    rows = [q(()) for q, _ in drafters]
    cand_nodes, cand_rows = [], []
    for token, row in cands:
        cand_nodes.append(node(-1, token))
        cand_rows.append(row)
    row_of: dict[int, int] = {}
    for i, y in enumerate(below):  # the children of root draw i // c, all drawn from q(that token)
        x = roots[i // grandchildren]
        parent = node(-1, x)
        if parent not in row_of:
            row_of[parent] = len(rows)
            rows.append(drafters[0][0]((x,)))
        cand_nodes.append(node(parent, y))
        cand_rows.append(row_of[parent])
    return TokenTree.from_drafted(0, torch.tensor(tokens), torch.tensor(parents), torch.tensor(cand_nodes),
                                  torch.tensor(cand_rows), torch.stack(rows))  # draft_probs: [rows, V]


def mss_tv(target: Conditionals, proposals, length: int = 2, verifier=verify_mss) -> float:
    """TV between the law of the next `length` tokens through the real verifier and the target's own."""
    return law_tv(speculative_law(proposals, verifier, target, length), sequence_law(target, length))


@pytest.mark.parametrize("k", range(1, V + 1))
def test_iid_children_with_mss_are_exact(k):
    target, draft = Conditionals(V, k), Conditionals(V, 100 + k)
    assert mss_tv(target, iid_proposals([(draft, k)])) < 1e-12


def test_iid_children_and_grandchildren_with_mss_are_exact():
    """Two levels: the walk descends into an accepted child and verifies its candidates there."""
    target, draft = Conditionals(3, 21), Conditionals(3, 22)  # V = 3 keeps the enumeration small
    assert mss_tv(target, iid_proposals([(draft, 2)], grandchildren=1), length=3) < 1e-12


def test_several_drafters_with_mss_are_exact():
    target, q1, q2 = Conditionals(V, 7), Conditionals(V, 8), Conditionals(V, 9, sharp=3.0)
    assert mss_tv(target, iid_proposals([(q1, 2), (q2, 1)])) < 1e-12
    assert mss_tv(target, iid_proposals([(q1, 1), (q2, 2)])) < 1e-12


def test_near_one_hot_and_disjoint_support_are_exact():
    target = Conditionals(V, 3, sharp=25.0)
    draft = Conditionals(V, 4, zero=(0, 3))
    assert mss_tv(target, iid_proposals([(draft, 3)])) < 1e-12


def swor_star_proposals(draft: Conditionals, k: int):
    """Root children drawn without replacement from one q, in sampling order (Sequoia's drafter)."""
    q = draft(())
    for draws in itertools.permutations(range(draft.vocab), k):
        prob, left = 1.0, 1.0
        for x in draws:
            prob *= float(q[x]) / left
            left -= float(q[x])
        yield prob, TokenTree.from_drafted(0, torch.tensor(draws), torch.full((k,), -1), None,
                                           torch.zeros(k, dtype=torch.long), q[None])


def test_swor_children_with_mss_are_biased():
    # A pair whose residual keeps two tokens (with a one-token residual the mismatch is harmless).
    target, draft = Conditionals(V, 11), Conditionals(V, 111)
    assert mss_tv(target, swor_star_proposals(draft, 2)) > 0.01


def test_resorted_siblings_are_biased():
    target, draft = Conditionals(V, 12), Conditionals(V, 13)
    assert mss_tv(target, iid_proposals([(draft, 3)])) < 1e-12
    assert mss_tv(target, iid_proposals([(draft, 3)], sort_by_q=True)) > 0.01


def test_merged_multi_drafter_duplicates_are_biased():
    target, q1, q2 = Conditionals(V, 13), Conditionals(V, 14, sharp=2.0), Conditionals(V, 15, sharp=2.0)
    assert mss_tv(target, iid_proposals([(q1, 1), (q2, 1)])) < 1e-12
    assert mss_tv(target, iid_proposals([(q1, 1), (q2, 1)], merge_duplicates=True)) > 1e-3


def test_mutation_without_residual_update_is_detected(monkeypatch):
    """MSS that tests every sibling against the unchanged target (no residual after a rejection),
    through the whole real verifier, and on a chain through the chain kernel it delegates to."""
    target, draft = Conditionals(V, 16), Conditionals(V, 17)
    monkeypatch.setattr(mss, "recovery_distribution", lambda t, d: t)
    assert mss_tv(target, iid_proposals([(draft, 3)])) > 0.01
    monkeypatch.setattr(chain_kernel, "recovery_distribution", lambda t, d: t)
    assert mss_tv(target, iid_proposals([(draft, 1)])) > 0.01


# ---- the whole loop ---------------------------------------------------------------------------
def _ar(target, prompt, n):
    return SpeculativeDecoder(target).generate(prompt, n)[0]


@pytest.mark.parametrize("expansion", [[1, 1, 3, 1, 1], [2, 2, 1], [4]])
def test_specinfer_greedy_equals_ar(arch, expansion):
    target = tiny_lm(arch, seed=0)
    prompt = list(range(10, 22))
    ref = _ar(target, prompt, 40)
    for drafts in ([tiny_lm(arch, seed=0)], [tiny_lm(arch, seed=5)], [tiny_lm(arch, seed=5), tiny_lm(arch, seed=6)]):
        drafter = TreeDrafter(drafts, GREEDY, expansion=expansion)
        dec = SpeculativeDecoder(target, drafter, GREEDY)
        out = []
        for chunk in dec.stream(prompt, 40):
            assert 1 <= len(chunk) <= len(expansion) + 1
            out += chunk
            if dec.last_stats.stopped_by == "":
                assert target.kv_len == len(prompt) + len(out) - 1
                for lm in drafts:  # drafters never hold uncommitted tokens
                    assert lm.kv_len <= len(prompt) + len(out)
        assert out == ref
        stats = dec.last_stats
        assert stats.target_calls <= stats.new_tokens
        assert stats.tree_tokens <= drafter.max_nodes
    same = TreeDrafter([tiny_lm(arch, seed=0)], GREEDY, expansion=expansion)
    dec = SpeculativeDecoder(target, same, GREEDY)
    assert dec.generate(prompt, 40)[0] == ref
    assert dec.last_stats.mean_accepted_per_call >= min(len(expansion), 39) * 0.9


TREE_CONFIGS = [
    ([2, 2], 1, SamplingConfig(temperature=1.0)),
    ([1, 3], 2, SamplingConfig(temperature=0.7, top_p=0.9)),
]


def _tree_counts(expansion, n_drafters, sampling, n):
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    drafts = [MarkovLM.random(4, seed=12 + i, sharpness=1.5) for i in range(n_drafters)]
    dec = SpeculativeDecoder(target, TreeDrafter(drafts, sampling, expansion=expansion), sampling)
    gen = torch.Generator().manual_seed(5)
    counts = Counter(tuple(dec.generate(PROMPT, 3, gen)[0]) for _ in range(n))
    return counts, exact_continuations(target, sampling, None)


@pytest.mark.parametrize("expansion,n_drafters,sampling", TREE_CONFIGS)
def test_specinfer_sampling_matches_target_distribution(expansion, n_drafters, sampling, one_thread):
    """n = 5000 over 48 and 10 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total variation
    ≥ 0.063 and 0.049 from the target's (chi-square divergence ≥ 0.016 and 0.010)."""
    n = 5000
    counts, expected = _tree_counts(expansion, n_drafters, sampling, n)
    assert detectable_effect(n, expected).tv < 0.065
    assert chi_square_pvalue(counts, expected, n) > 1e-3


@pytest.mark.parametrize("expansion,n_drafters,sampling", TREE_CONFIGS)
def test_specinfer_mutation_without_residual_update_fails(expansion, n_drafters, sampling, monkeypatch, one_thread):
    """MSS keeping the target unchanged after a rejection (the recovered token and every later sibling
    tested against the target instead of norm(max(0, target − q))). Its chi-square divergence from the
    target's law, from 30 000 mutated runs: 0.34 and 0.28, caught with power ≥ 0.99 from n ≈ 230 and
    180 on; n = 1000 here, a fifth of the pass test's."""
    monkeypatch.setattr(mss, "recovery_distribution", lambda t, d: t)
    monkeypatch.setattr(chain_kernel, "recovery_distribution", lambda t, d: t)  # trees that are chains
    n = 1000
    counts, expected = _tree_counts(expansion, n_drafters, sampling, n)
    assert detectable_effect(n, expected).divergence < 0.25
    assert chi_square_pvalue(counts, expected, n) < 1e-3


@pytest.mark.parametrize("kind", ["sps", "specinfer", "specinfer-2"])
def test_drafter_caches_hold_exactly_committed_tokens(kind, one_thread):
    """Output tests cannot see a drafter rollback bug (any q is exact): check the caches directly."""
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(6, seed=1, sharpness=2.0)
    drafts = [MarkovLM.random(6, seed=2, sharpness=2.0), MarkovLM.random(6, seed=3, sharpness=2.0)]
    if kind == "sps":
        drafts = drafts[:1]
        drafter = ModelDrafter(drafts[0], sampling)
        dec = SpeculativeDecoder(target, drafter, sampling, gamma=3)
    else:
        drafts = drafts[: 1 if kind == "specinfer" else 2]
        dec = SpeculativeDecoder(target, TreeDrafter(drafts, sampling, expansion=[2, 1, 2]), sampling)
    stream_checking_caches(dec, target, drafts, [1, 2, 3, 4], 60)
