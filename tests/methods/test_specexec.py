"""SpecExec: the best-first tree builder's invariants, its acceptance law, the whole loop at T > 0
(with the authors' inverted top-p as a mutation that must fail) and greedy equivalence with AR."""

import copy
import itertools

import pytest
import torch

import specdec.engine.decoder as decoder
from specdec.core.sampling import SamplingConfig, logits_to_probs
from specdec.drafting.base import run_proposal
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import Pipeline
from specdec.methods.specexec import SpecExecDrafter
from specdec.models.toy import MarkovLM
from tests.conftest import tiny_lm
from tests.helpers import chi_square_of_decoder, stream_checking_caches

GREEDY = SamplingConfig()
T1 = SamplingConfig(temperature=1.0)


def _propose(drafter, committed, gamma=100):
    drafter.begin(torch.tensor(committed), len(committed) + 64)
    return run_proposal(drafter.propose(torch.tensor(committed), gamma, None))


def _check_invariants(drafter, tree, max_depth):
    parents = (tree.parents[1:] - 1).tolist()  # among the drafted nodes, -1 = child of the root
    assert tree.num_drafted <= drafter.budget
    assert all(-1 <= p < i for i, p in enumerate(parents))  # parents first: the tree is ancestor-closed
    assert tree.max_depth() <= max_depth
    pairs = list(zip(parents, tree.tokens[1:].tolist()))
    assert len(set(pairs)) == len(pairs)  # siblings are distinct
    scores = drafter.last_scores
    for i, p in enumerate(parents):
        if p >= 0:
            assert scores[i] <= scores[p]  # scores never increase along a path


@pytest.mark.parametrize("budget,max_depth,max_beams,width", [(16, 5, 4, 3), (40, 8, 8, 6), (3, 2, 1, 1), (25, 4, 64, 97)])
def test_best_first_tree_invariants_on_a_tiny_model(budget, max_depth, max_beams, width):
    drafter = SpecExecDrafter(tiny_lm("llama", seed=3), T1, budget, max_depth, max_beams, width)
    tree = _propose(drafter, list(range(10, 20)))
    _check_invariants(drafter, tree, max_depth)
    # Every proposed child exists in a 97-token vocabulary: the tree fills the budget unless the beams
    # and width cannot produce that many nodes (w root children, then at most B·w per further level).
    assert tree.num_drafted == min(budget, width + (max_depth - 1) * max_beams * width)
    tree = _propose(drafter, list(range(10, 20)), gamma=2)  # the decoder's cap near max_new_tokens
    assert tree.max_depth() <= 2


def test_best_first_tree_is_the_exact_top_budget_when_unconstrained():
    """With every child proposed and enough beams, the tree is the `budget` most likely draft paths."""
    vocab, depth, budget = 4, 3, 10
    draft = MarkovLM.random(vocab, seed=4, sharpness=1.5)
    committed = [1, 2, 3]
    drafter = SpecExecDrafter(draft, GREEDY, budget=budget, max_depth=depth, max_beams=budget, branch_width=vocab)
    tree = _propose(drafter, committed)
    _check_invariants(drafter, tree, depth)
    score = {}
    for length in range(1, depth + 1):
        for path in itertools.product(range(vocab), repeat=length):
            ctx = committed + list(path)
            log_q = torch.log_softmax(draft.table[ctx[-3], ctx[-2]], -1)[ctx[-1]]
            score[path] = (score[path[:-1]] if length > 1 else 0.0) + float(log_q)
    best = sorted(score, key=lambda p: -score[p])[:budget]
    got = {tuple(int(tree.tokens[n]) for n in tree.path(i)) for i in range(1, tree.num_nodes)}
    assert got == set(best)


def test_sample_and_match_acceptance_law_on_a_context_free_toy(one_thread):
    """E[tokens per call] = 1 + Σ_v Π_{u on path(v)} target(u) for a fixed deterministic tree (docs/algorithms.md §11)."""
    vocab = 5
    gen = torch.Generator().manual_seed(8)
    target_row = torch.randn(vocab, generator=gen, dtype=torch.float64)
    draft_row = target_row + 0.7 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    target = MarkovLM(target_row.expand(vocab, vocab, vocab).clone())
    draft = MarkovLM(draft_row.expand(vocab, vocab, vocab).clone())
    drafter = SpecExecDrafter(draft, T1, budget=7, max_depth=3, max_beams=3, branch_width=3)
    tree = _propose(drafter, [0, 1])
    p = torch.softmax(target_row, -1)
    expected = 1.0 + sum(
        float(torch.prod(p[tree.tokens[tree.path(i)]])) for i in range(1, tree.num_nodes)
    )
    dec = SpeculativeDecoder(target, drafter, T1)
    lengths, emitted, total = [], 0, 1500
    for chunk in dec.stream([0, 1], total, torch.Generator().manual_seed(2)):
        if total - emitted > 4:  # the last calls draft shallower trees (length cap)
            lengths.append(len(chunk))
        emitted += len(chunk)
    x = torch.tensor(lengths, dtype=torch.float64)
    se = float(x.std()) / len(lengths) ** 0.5
    assert abs(float(x.mean()) - expected) < 4 * se, (float(x.mean()), expected, se)


# ---- the whole loop at T > 0 -------------------------------------------------------------------
def _chi_run(sampling, eos, n, detects_tv=None, **kw):
    target = MarkovLM.random(4, seed=11, sharpness=1.5)
    draft = MarkovLM.random(4, seed=12, sharpness=1.5)
    drafter = SpecExecDrafter(draft, sampling, **kw)
    dec = SpeculativeDecoder(target, drafter, sampling, eos_token_ids=[eos] if eos is not None else [])
    return chi_square_of_decoder(dec, target, sampling, eos, n, seed=7, max_tree_tokens=kw["budget"], detects_tv=detects_tv)


@pytest.mark.parametrize("sampling,eos", [
    (SamplingConfig(temperature=0.8, top_p=0.9), 3),
    (SamplingConfig(temperature=1.3, top_k=3), None),
])
def test_specexec_sampling_matches_target_distribution(sampling, eos, one_thread):
    """n = 2000 over 6 and 26 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total variation
    ≥ 0.073 and 0.089 from the target's (chi-square divergence ≥ 0.021 and 0.032). Sample-and-match
    has no residual to get wrong."""
    assert _chi_run(sampling, eos, 2000, 0.09, budget=6, max_depth=2, max_beams=2, branch_width=3) > 1e-3


def _inverted_top_p(logits, cfg):
    """SpecExec's published filter (docs/algorithms.md §6): descending sort with HF's ascending-sort rule."""
    if cfg.greedy or cfg.top_p >= 1.0:
        return logits_to_probs(logits, cfg)
    probs = torch.softmax(logits.double() / cfg.temperature, -1)
    sorted_probs, order = torch.sort(probs, -1, descending=True)
    drop_sorted = sorted_probs.cumsum(-1) <= 1 - cfg.top_p
    drop_sorted[..., -1] = False  # "keep the last one"
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def test_mutation_inverted_top_p_fails_chi_square(monkeypatch, one_thread):
    """The authors' inverted top-p at the target: continuations outside the true nucleus appear, which
    the exact law gives probability 0, so the test fails outright whatever n."""
    sampling = SamplingConfig(temperature=1.0, top_p=0.6)
    probs = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]]).log()
    assert (logits_to_probs(probs, sampling)[0] > 0).tolist() == [True, True, True, False, False]  # true nucleus
    assert (_inverted_top_p(probs, sampling)[0] > 0).tolist() == [False, True, True, True, True]  # drops the top
    monkeypatch.setattr(decoder, "logits_to_probs", _inverted_top_p)
    # Outside the true nucleus: continuations the target can never sample show up.
    with pytest.raises(AssertionError, match="impossible sequence"):
        _chi_run(sampling, None, 2000, budget=6, max_depth=2, max_beams=2, branch_width=3)


@pytest.mark.parametrize("kw", [dict(budget=16, max_depth=5, max_beams=4, branch_width=3),
                                dict(budget=48, max_depth=10, max_beams=16, branch_width=8)])
def test_specexec_greedy_equals_ar(arch, kw):
    target = tiny_lm(arch, seed=0)
    prompt = list(range(10, 22))
    ref = SpeculativeDecoder(target).generate(prompt, 40)[0]
    for draft_seed in (0, 5):
        draft = tiny_lm(arch, seed=draft_seed)
        dec = SpeculativeDecoder(target, SpecExecDrafter(draft, GREEDY, **kw), GREEDY)
        out: list[int] = []
        for chunk in dec.stream(prompt, 40):
            out += chunk
            assert 1 <= len(chunk) <= kw["max_depth"] + 1
            if not dec.last_stats.stopped_by:
                assert target.kv_len == len(prompt) + len(out) - 1
                assert draft.kv_len <= len(prompt) + len(out)
        assert out == ref
        assert dec.last_stats.tree_tokens <= kw["budget"]
        if draft_seed == 0:
            assert dec.last_stats.tokens_per_call > 2.5


def test_specexec_drafter_cache_holds_exactly_committed_tokens(one_thread):
    target = MarkovLM.random(6, seed=1, sharpness=2.0)
    draft = MarkovLM.random(6, seed=2, sharpness=2.0)
    dec = SpeculativeDecoder(target, SpecExecDrafter(draft, T1, budget=8, max_depth=4, max_beams=3, branch_width=2), T1)
    stream_checking_caches(dec, target, [draft], [1, 2, 3, 4], 60)


def test_pipeline_methods_and_bad_options():
    target, draft = tiny_lm("llama", seed=0), tiny_lm("llama", seed=0)
    pipe = Pipeline.from_models(target, None, draft)
    prompt = list(range(10, 22))
    ref = pipe.generate(prompt, "ar", 24).token_ids
    assert pipe.generate(prompt, "specexec", 24, budget=12, max_depth=4, max_beams=4, branch_width=4).token_ids == ref
    assert pipe.generate(prompt, "sequoia", 24, budget=10, max_depth=4, accept="0.6,0.2,0.1").token_ids == ref
    assert pipe.generate(prompt, "sequoia", 24, sequoia_mode="greedy").token_ids == ref
    for bad in [dict(budget=0), dict(max_beams=-1), dict(branch_width="wide"), dict(max_depth=2.5)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            pipe.generate(prompt, "specexec", 8, **bad)
    with pytest.raises(ValueError, match="acceptance vector"):
        pipe.generate(prompt, "sequoia", 8, accept="0.9,0.9")
    with pytest.raises(ValueError, match="sequoia_mode"):
        pipe.generate(prompt, "sequoia", 8, sequoia_mode="iid")
    with pytest.raises(ValueError, match="no tune profile"):
        pipe.generate(prompt, "sequoia", 8, tree="auto")
    with pytest.raises(ValueError, match="no tune profile"):
        pipe.generate(prompt, "auto", 8)


# ---- the real SmolLM2-135M ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real
def test_specexec_and_sequoia_greedy_equivalence_on_smollm2(smol):
    from specdec.drafting.sequoia_dp import sequoia_dp
    from specdec.engine.pipeline import eos_ids
    from specdec.methods.sequoia import SequoiaDrafter
    from specdec.models.hf import HFLanguageModel

    model, tok = smol
    prompt = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    eos = eos_ids(model, tok)
    target = HFLanguageModel(model)
    ref, _ = SpeculativeDecoder(target, None, GREEDY, eos_token_ids=eos).generate(prompt, 24)
    shallow_model = copy.deepcopy(model)  # the first 8 blocks: a weaker drafter with the same vocabulary
    shallow_model.model.layers = shallow_model.model.layers[:8]
    shallow_model.config.num_hidden_layers = 8
    shallow, full = HFLanguageModel(shallow_model), HFLanguageModel(model)
    paths = sequoia_dp([0.7, 0.1, 0.05], 10, 4).tree(10, 4)
    for name, drafter in [
        ("specexec/full", SpecExecDrafter(full, GREEDY, budget=16, max_depth=5, max_beams=4, branch_width=4)),
        ("specexec/shallow", SpecExecDrafter(shallow, GREEDY, budget=16, max_depth=5, max_beams=4, branch_width=4)),
        ("sequoia/shallow", SequoiaDrafter(shallow, GREEDY, paths)),
    ]:
        dec = SpeculativeDecoder(target, drafter, GREEDY, eos_token_ids=eos)
        out, stats = dec.generate(prompt, 24)
        assert out == ref, f"{name} changed the greedy output"
        if name == "specexec/full":
            assert stats.tokens_per_call > 2.5
