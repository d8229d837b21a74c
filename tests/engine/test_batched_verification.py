"""Batched verification (`verify.batched.verify_batch`): equal to each sequence's own verifier, and
exact on its own.

- Equality: random batches mixing every rule (greedy on chains and trees, sample-and-match, chains
  by speculative sampling, MSS trees with several drafters and duplicate draws, SWOR trees, root-only
  steps) under several samplings: every result equals the per-sequence verifier's, and every
  generator ends in the same state (the same random numbers were drawn).
- Exactness of the batched form itself: one batch of many sequences, each drafting its children from
  its own generator, gives first tokens distributed as the target (chi-square); planted mutations
  of the batched code (SWOR without removing rejected tokens; chains reading a neighbour's draft
  distribution) must fail that test.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import specdec.verify.batched as batched
from specdec.core.sampling import SamplingConfig, logits_to_probs
from specdec.core.tree import TokenTree
from specdec.verify.batched import Verification, verify_batch
from specdec.verify.chain import verify_speculative_sampling
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match
from specdec.verify.mss import verify_mss
from specdec.verify.swor import verify_swor
from tests.engine.test_distribution import ALPHA, chi_square_pvalue

V = 7
SAMPLINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=4),
             SamplingConfig(temperature=1.2, top_p=0.8)]


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _dist(gen: torch.Generator, rows: int = 1) -> torch.Tensor:  # [rows, V]
    return torch.softmax(2 * torch.randn(rows, V, generator=gen), -1)


def _chain(gen: torch.Generator, gamma: int, with_q: bool = True) -> TokenTree:
    q = _dist(gen, gamma) if with_q else None
    drafts = torch.multinomial(q, 1, generator=gen).squeeze(-1) if q is not None else \
        torch.randint(0, V, (gamma,), generator=gen)
    return TokenTree.chain(int(torch.randint(0, V, (1,), generator=gen)), drafts, q)


def _mss_tree(gen: torch.Generator) -> TokenTree:
    """Two levels; each node's children i.i.d. from two drafters (duplicates share a node)."""
    q = _dist(gen, 4)
    tokens, parents, cand_nodes, cand_rows = [], [], [], []
    for parent, rows in ((-1, (0, 1, 0)), (0, (2, 3))):
        seen: dict[int, int] = {}
        for r in rows:
            x = int(torch.multinomial(q[r], 1, generator=gen))
            if x not in seen:
                seen[x] = len(tokens)
                tokens.append(x)
                parents.append(parent)
            cand_nodes.append(seen[x])
            cand_rows.append(r)
    return TokenTree.from_drafted(int(torch.randint(0, V, (1,), generator=gen)), torch.tensor(tokens),
                                  torch.tensor(parents), torch.tensor(cand_nodes), torch.tensor(cand_rows), q)


def _swor_tree(gen: torch.Generator, width: int = 3) -> TokenTree:
    """The root's children drawn without replacement from one row, the first child with one child."""
    q = _dist(gen, 2)
    kids = torch.multinomial(q[0], width, replacement=False, generator=gen)
    grand = torch.multinomial(q[1], 1, generator=gen)
    tokens = torch.cat([kids, grand])
    parents = torch.tensor([-1] * width + [0])
    rows = torch.tensor([0] * width + [1])
    return TokenTree.from_drafted(int(torch.randint(0, V, (1,), generator=gen)), tokens, parents, None, rows, q)


def _det_tree(gen: torch.Generator) -> TokenTree:
    kids = torch.randperm(V, generator=gen)[:3]
    tokens = torch.cat([kids, torch.randperm(V, generator=gen)[:2]])
    return TokenTree.from_drafted(int(torch.randint(0, V, (1,), generator=gen)), tokens,
                                  torch.tensor([-1, -1, -1, 1, 1]))


def _random_batch(seed: int) -> tuple[list[Verification], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    items, logits = [], []
    for j in range(12):
        kind = j % 7
        sampling = SAMPLINGS[(seed + j) % len(SAMPLINGS)]
        if kind == 0:
            tree, rule, sampling = _chain(gen, 3, with_q=False), verify_greedy, SamplingConfig()
        elif kind == 1:
            tree, rule, sampling = _det_tree(gen), verify_greedy, SamplingConfig()
        elif kind == 2:
            tree, rule = _chain(gen, 1 + j % 4), verify_speculative_sampling if j % 2 else verify_mss
        elif kind == 3:
            tree, rule = _mss_tree(gen), verify_mss
        elif kind == 4:
            tree, rule = _swor_tree(gen), verify_swor
        elif kind == 5:
            tree, rule = _det_tree(gen), verify_sample_and_match
        else:
            tree, rule = _chain(gen, 0), [verify_mss, verify_swor, verify_sample_and_match][j % 3]
        # Sharp target logits, so that greedy paths and acceptances happen, with plenty of mismatches.
        logits.append(3 * torch.randn(tree.num_nodes, V, generator=gen))
        items.append(Verification(tree, sampling, rule, torch.Generator().manual_seed(1000 * seed + j)))
    return items, logits


@pytest.mark.parametrize("seed", range(25))
def test_batched_equals_each_sequences_own_verifier(seed):
    items, logits = _random_batch(seed)
    twins = [torch.Generator().manual_seed(1000 * seed + j) for j in range(len(items))]
    alone = [it.rule(it.tree, logits_to_probs(lg, it.sampling), g) for it, lg, g in zip(items, logits, twins)]
    together = verify_batch(items, logits)
    assert together == alone
    for it, g in zip(items, twins):  # the same random numbers were drawn, no more, no fewer
        assert torch.equal(it.generator.get_state(), g.get_state())


def test_sample_and_match_sequences_of_two_logits_dtypes_each_equal_their_own_verifier():
    """Joined, float32 logits beside float64 ones would be processed in float64: a top-p cut at a
    float32 boundary then falls elsewhere. Each dtype is walked apart."""
    def cut_at(gap: float) -> tuple[torch.Tensor, SamplingConfig]:  # top-p exactly at the first token's mass
        near = torch.tensor([0.0, -gap])
        return near, SamplingConfig(temperature=1.0, top_p=float(torch.softmax(near, -1)[0]))

    def splits(gap: float) -> bool:  # its top-p keeps one token in float32 and two in float64, or the reverse
        near, cfg = cut_at(gap)
        return bool((logits_to_probs(near, cfg)[1] == 0) != (logits_to_probs(near.double(), cfg)[1] == 0))

    near, cfg = cut_at(next(i * 1e-4 for i in range(1, 20000) if splits(i * 1e-4)))  # found, not assumed
    root = TokenTree.chain(0, torch.zeros(0, dtype=torch.long))
    differs = 0
    for seed in range(60):
        items = [Verification(root, cfg, verify_sample_and_match, torch.Generator().manual_seed(seed)),
                 Verification(root, SamplingConfig(temperature=0.5), verify_sample_and_match, torch.Generator())]
        got = verify_batch(items, [near[None].clone(), torch.zeros(1, 2, dtype=torch.float64)])[0]
        alone = verify_sample_and_match(root, logits_to_probs(near[None], cfg), torch.Generator().manual_seed(seed))
        assert (got.accepted_nodes, got.next_token) == (alone.accepted_nodes, alone.next_token)
        differs += verify_sample_and_match(root, logits_to_probs(near[None].double(), cfg),
                                           torch.Generator().manual_seed(seed)).next_token != alone.next_token
    assert differs > 0  # float64 processing would have drawn other tokens


def test_accepted_paths_are_exercised():
    accepted = Counter()
    for seed in range(25):
        items, logits = _random_batch(seed)
        for it, res in zip(items, verify_batch(items, logits)):
            accepted[_kind_name(it)] += res.num_accepted > 0
    assert all(accepted[k] > 0 for k in ("greedy", "chain", "mss", "swor", "match")), accepted


def _kind_name(item: Verification) -> str:
    return batched._kind(item)


def test_a_planted_rule_is_called_as_it_is():
    calls = []

    def planted(tree, probs, generator=None):
        calls.append(tree)
        return verify_greedy(tree, probs, generator)

    items, logits = _random_batch(3)
    items[4] = Verification(items[4].tree, items[4].sampling, planted, items[4].generator)
    verify_batch(items, logits)
    assert calls == [items[4].tree]


# ---- exactness of the batched form ------------------------------------------------------------
N = 3000
TARGET = torch.softmax(torch.tensor([1.2, 0.1, -0.5, 0.8, -1.0, 0.3, 0.0]) * 1.5, -1)
DRAFT = torch.softmax(torch.tensor([0.2, 2.5, 0.4, -0.3, 1.6, -0.8, 0.1]) * 1.5, -1)  # peaked: removal matters


def _first_tokens(kind: str, seed: int) -> Counter:
    """N sequences in ONE batched call, each drafting from its own generator: their first emitted tokens."""
    gen = torch.Generator().manual_seed(seed)
    items, logits = [], []
    rule = {"swor": verify_swor, "mss": verify_mss, "chain": verify_speculative_sampling}[kind]
    sampling = SamplingConfig(temperature=1.0)
    for i in range(N):
        if kind == "swor":
            kids = torch.multinomial(DRAFT, 3, replacement=False, generator=gen)
            tree = TokenTree.from_drafted(0, kids, torch.full((3,), -1), None, torch.zeros(3, dtype=torch.long),
                                          DRAFT[None])
        elif kind == "mss":
            draws = torch.multinomial(DRAFT, 3, replacement=True, generator=gen).tolist()
            uniq = list(dict.fromkeys(draws))
            tree = TokenTree.from_drafted(0, torch.tensor(uniq), torch.full((len(uniq),), -1),
                                          torch.tensor([uniq.index(x) for x in draws]), torch.zeros(3, dtype=torch.long),
                                          DRAFT[None])
        else:  # chains whose draft distributions differ from sequence to sequence
            q = torch.stack([DRAFT, TARGET]) if i % 2 else torch.stack([TARGET.flip(0), DRAFT])
            drafts = torch.multinomial(q, 1, generator=gen).squeeze(-1)
            tree = TokenTree.chain(0, drafts, q)
        logits.append(TARGET.log().expand(tree.num_nodes, V).clone())
        items.append(Verification(tree, sampling, rule, torch.Generator().manual_seed(seed * N + i)))
    counts: Counter = Counter()
    for it, res in zip(items, verify_batch(items, logits)):
        first = int(it.tree.tokens[res.accepted_nodes[0]]) if res.accepted_nodes else res.next_token
        counts[(first,)] += 1
    return counts


def _pvalue(counts: Counter) -> float:
    exact = TARGET.double() / TARGET.double().sum()
    return chi_square_pvalue(counts, {(t,): float(p) for t, p in enumerate(exact)}, N)


@pytest.mark.parametrize("kind", ["swor", "mss", "chain"])
def test_one_batch_of_many_sequences_keeps_the_target_distribution(kind):
    assert _pvalue(_first_tokens(kind, seed=1)) > ALPHA


# Sample-and-match on a deterministic tree: the root's children hold tokens 0 and 3, the node of 0 holds
# 0 and 5. The walk emits one token where the root's draw matches no child, two where it does.
MATCH_TREE = TokenTree.from_drafted(6, torch.tensor([0, 3, 0, 5]), torch.tensor([-1, -1, 0, 0]))


def _match_outcomes(seed: int) -> Counter:
    """N sequences of the same tree in ONE batched call, each with its own generator: the first two
    tokens each emits (one where it emits one)."""
    items = [Verification(MATCH_TREE, SamplingConfig(temperature=1.0), verify_sample_and_match,
                          torch.Generator().manual_seed(seed * N + i)) for i in range(N)]
    logits = [TARGET.log().expand(MATCH_TREE.num_nodes, V).clone() for _ in range(N)]
    return Counter((tuple(int(MATCH_TREE.tokens[n]) for n in res.accepted_nodes) + (res.next_token,))[:2]
                   for res in verify_batch(items, logits))


def _match_pvalue(counts: Counter) -> float:
    t = (TARGET.double() / TARGET.double().sum()).tolist()
    exact = {(a, b): t[a] * t[b] for a in (0, 3) for b in range(V)}  # the same target at every position
    exact.update({(a,): t[a] for a in range(V) if a not in (0, 3)})
    return chi_square_pvalue(counts, exact, N)


def test_one_batch_of_sample_and_match_walks_keeps_the_target_distribution():
    assert _match_pvalue(_match_outcomes(seed=4)) > ALPHA


def test_mutation_match_walks_sharing_one_uniform_fail(monkeypatch):
    """Each node needs a uniform of its own: one drawn for the root and read at every level makes the
    second token repeat the first's interval."""
    def shared(n, generator=None, device="cpu"):
        return torch.rand(1, dtype=torch.float64, generator=generator).expand(n).to(device)

    monkeypatch.setattr(batched, "uniforms", shared)
    assert _match_pvalue(_match_outcomes(seed=5)) < ALPHA


def test_mutation_swor_without_removal_fails(monkeypatch):
    monkeypatch.setattr(batched, "_without", lambda q, token: q)  # MSS on SWOR children: biased
    assert _pvalue(_first_tokens("swor", seed=2)) < ALPHA


def test_mutation_chains_reading_a_neighbours_draft_rows_fails(monkeypatch):
    real = batched.chains_batch

    def shifted(items, probs):
        trees = [it.tree for it in items]
        moved = [Verification(TokenTree.chain(int(t.tokens[0]), t.tokens[1:], trees[(i + 1) % len(trees)].draft_probs),
                              it.sampling, it.rule, it.generator) for i, (it, t) in enumerate(zip(items, trees))]
        return real(moved, probs)

    monkeypatch.setattr(batched, "chains_batch", shifted)
    assert _pvalue(_first_tokens("chain", seed=3)) < ALPHA
