"""A draft head pruned to frequent tokens: the kept logits are the full head's, the rest −∞, the
output is unchanged (greedy equality, chi-square), and reporting the unpruned q is caught."""

from collections import Counter

import pytest
import torch

from specdec.core.sampling import SamplingConfig, logits_to_probs
from specdec.core.tree import TokenTree
from specdec.drafting.vocab import AUTO_DRAFT_VOCAB, frequent_tokens, resolve_draft_vocab
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import Pipeline
from specdec.methods.sequoia import SequoiaDrafter
from specdec.methods.specexec import SpecExecDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.hf import HFLanguageModel
from specdec.models.dense.pruned_head import PrunedHead, prune_output_head
from specdec.models.toy import MarkovLM
from tests.conftest import TINY_VOCAB, tiny_hf_model
from tests.engine.test_distribution import ALPHA, L, PROMPT, V, chi_square_pvalue, exact_continuations

GREEDY = SamplingConfig()
KEPT = torch.arange(0, TINY_VOCAB, 2)  # every other token


def test_pruned_logits_are_the_full_ones_on_kept_tokens(arch):
    full = tiny_hf_model(arch, seed=0)
    pruned = tiny_hf_model(arch, seed=0)
    head = prune_output_head(pruned, KEPT)
    assert isinstance(pruned.get_output_embeddings(), PrunedHead) and head.out_features == TINY_VOCAB
    ids = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full(ids).logits, pruned(ids).logits
    torch.testing.assert_close(b[..., KEPT], a[..., KEPT])
    rest = torch.ones(TINY_VOCAB, dtype=torch.bool)
    rest[KEPT] = False
    assert bool(torch.isneginf(b[..., rest]).all())
    assert HFLanguageModel(pruned).vocab_size == TINY_VOCAB
    with pytest.raises(ValueError, match="subset"):
        PrunedHead(full.get_output_embeddings(), torch.tensor([TINY_VOCAB]))


def test_pruned_draft_gives_the_targets_greedy_output(arch):
    target = HFLanguageModel(tiny_hf_model(arch, seed=0))
    draft_model = tiny_hf_model(arch, seed=0)
    prune_output_head(draft_model, KEPT)
    draft = HFLanguageModel(draft_model)
    prompt = list(range(5, 20))
    ref, _ = SpeculativeDecoder(target).generate(prompt, 30)
    for drafter in (ModelDrafter(draft, GREEDY, 4), SpecExecDrafter(draft, GREEDY, 8, 4, 4, 3),
                    SequoiaDrafter(draft, GREEDY, [(0,), (1,), (0, 0)])):
        out, st = SpeculativeDecoder(target, drafter, GREEDY).generate(prompt, 30)
        assert out == ref
        assert st.accepted_tokens > 0  # the target's own argmax is often a kept token


def pruned_toy(keep: list[int]) -> MarkovLM:
    """The draft toy with every token outside `keep` at logit −∞ (what a pruned head gives)."""
    table = MarkovLM.random(V, seed=12, sharpness=1.5).table.clone()
    mask = torch.ones(V, dtype=torch.bool)
    mask[keep] = False
    table[..., mask] = float("-inf")
    return MarkovLM(table)


class ReportsUnprunedQ(ModelDrafter):
    """The planted bug: drafts drawn from the pruned distribution, but q reported from the full head."""

    def __init__(self, model, sampling, gamma, full):
        super().__init__(model, sampling, gamma)
        self.full = full

    def propose(self, committed_ids, max_depth, generator):
        tree = yield from super().propose(committed_ids, max_depth, generator)
        if tree.num_drafted == 0:
            return tree
        ctx = committed_ids.tolist() + tree.drafted_tokens.tolist()
        full_q = torch.stack([logits_to_probs(self.full.table[ctx[i - 2], ctx[i - 1]], self.sampling)
                              for i in range(len(committed_ids), len(committed_ids) + tree.num_drafted)])
        return TokenTree.chain(int(committed_ids[-1]), tree.drafted_tokens, full_q)


@pytest.mark.parametrize("bug", [False, True])
def test_pruned_draft_keeps_the_target_distribution_and_the_wrong_q_is_caught(one_thread, bug):
    sampling = SamplingConfig(temperature=1.0)
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    draft = pruned_toy([0, 1, 2])  # token 3 is never drafted; the target still emits it
    drafter = ReportsUnprunedQ(draft, sampling, 2, MarkovLM.random(V, seed=12, sharpness=1.5)) if bug else \
        ModelDrafter(draft, sampling, 2)
    dec = SpeculativeDecoder(target, drafter, sampling)
    gen = torch.Generator().manual_seed(3)
    n, counts, accepted = 4000, Counter(), 0
    for _ in range(n):
        out, st = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        accepted += st.accepted_tokens
    assert accepted > 0.2 * n and any(3 in c for c in counts)
    p = chi_square_pvalue(counts, exact_continuations(target, sampling, None), n)
    assert (p < ALPHA) if bug else (p > ALPHA)


def test_frequent_tokens():
    counts = torch.tensor([5, 0, 9, 9, 1, 0])
    assert frequent_tokens(counts, 2).tolist() == [2, 3]  # ties by id
    assert frequent_tokens(counts, 3, torch.tensor([5])).tolist() == [0, 2, 3, 5]
    with pytest.raises(ValueError, match="at least one"):
        frequent_tokens(counts, 0)


def test_auto_prunes_only_large_heads_and_bad_values_are_refused():
    assert resolve_draft_vocab("auto", 151_936) == AUTO_DRAFT_VOCAB
    assert resolve_draft_vocab("auto", 2 * AUTO_DRAFT_VOCAB) == AUTO_DRAFT_VOCAB
    assert resolve_draft_vocab("auto", 2 * AUTO_DRAFT_VOCAB - 1) is None  # SmolLM2's 49 152: whole head
    assert resolve_draft_vocab(1000, 151_936) == 1000
    assert resolve_draft_vocab(0, 151_936) is None and resolve_draft_vocab(None, 151_936) is None
    for bad in (-1, "many", 2.5, True):
        with pytest.raises(ValueError, match="draft_vocab"):
            resolve_draft_vocab(bad, 151_936)


def test_the_cli_takes_auto_or_a_count(capsys):
    from specdec.cli import main

    with pytest.raises(SystemExit) as info:
        main(["generate", "--draft-vocab", "lots", "hi"])
    assert info.value.code == 2 and "--draft-vocab" in capsys.readouterr().err
    with pytest.raises(ValueError, match="draft_vocab"):
        Pipeline("nonexistent-target", draft_vocab=-5)  # refused before anything loads
