"""The model layer: tree passes equal per-branch causal passes; commits equal fresh prefills."""

import pytest
import torch

from specdec.core.tree import ancestor_mask, chain_parents, depths, path_to, validate_parents
from tests.conftest import TINY_VOCAB, tiny_hf_model
from specdec.models.hf import HFLanguageModel


def _reference_last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0, -1]


# ---- hand-written trees -------------------------------------------------------------------
def test_chain_buffers():
    parents = chain_parents(4)
    assert parents.tolist() == [-1, 0, 1, 2]
    assert depths(parents).tolist() == [0, 1, 2, 3]
    assert torch.equal(ancestor_mask(parents), torch.ones(4, 4, dtype=torch.bool).tril())


def test_two_by_two_tree_buffers():
    # root 0; children 1, 2; grandchildren 3, 4 under 1 and 5, 6 under 2
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
    assert depths(parents).tolist() == [0, 1, 1, 2, 2, 2, 2]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0, 0],
            [1, 1, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 0, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(ancestor_mask(parents), expected)
    assert path_to(parents, 6) == [0, 2, 6]


def test_skewed_tree_buffers():
    # a chain 0-1-2-3 with a side branch 4 off node 1 and 5 off node 4
    parents = torch.tensor([-1, 0, 1, 2, 1, 4])
    assert depths(parents).tolist() == [0, 1, 2, 3, 2, 3]
    mask = ancestor_mask(parents)
    assert mask[5].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert not mask[4, 2] and not mask[2, 4]  # cousins never see each other


def test_invalid_parents_rejected():
    with pytest.raises(ValueError):
        validate_parents(torch.tensor([-1, 1]))
    with pytest.raises(ValueError):
        validate_parents(torch.tensor([-1, -2]))


# ---- tree pass on real (tiny) transformers ----------------------------------------------
def _random_tree(n: int, gen: torch.Generator) -> torch.Tensor:
    parents = [-1]
    for i in range(1, n):
        parents.append(int(torch.randint(0, i, (1,), generator=gen)))
    return torch.tensor(parents)


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_pass_equals_per_branch_causal_pass(arch, seed):
    model = tiny_hf_model(arch, seed=seed)
    lm = HFLanguageModel(model)
    gen = torch.Generator().manual_seed(seed)
    lm.reset(64)
    prefix = torch.randint(0, TINY_VOCAB, (9,), generator=gen)
    lm.forward(prefix)
    lm.commit(prefix.numel())
    parents = _random_tree(14, gen)
    tokens = torch.randint(0, TINY_VOCAB, (14,), generator=gen)
    logits = lm.forward(tokens, parents)
    for node in range(14):
        branch = tokens[path_to(parents, node)]
        ref = _reference_last_logits(model, torch.cat([prefix, branch]))
        torch.testing.assert_close(logits[node], ref, atol=2e-5, rtol=1e-5)


def test_commit_path_equals_fresh_prefill_and_kv(arch):
    model = tiny_hf_model(arch, seed=3)
    lm = HFLanguageModel(model)
    gen = torch.Generator().manual_seed(5)
    lm.reset(64)
    prefix = torch.randint(0, TINY_VOCAB, (6,), generator=gen)
    lm.forward(prefix)
    lm.commit(6)
    parents = torch.tensor([-1, 0, 0, 1, 2, 4, 4])
    tokens = torch.randint(0, TINY_VOCAB, (7,), generator=gen)
    lm.forward(tokens, parents)
    path = [0, 2, 4, 6]
    lm.commit(torch.tensor(path))
    assert lm.kv_len == 10
    committed = torch.cat([prefix, tokens[path]])

    nxt = torch.tensor([7, 8])
    logits = lm.forward(nxt)
    ref = _reference_last_logits(model, torch.cat([committed, nxt]))
    torch.testing.assert_close(logits[-1], ref, atol=2e-5, rtol=1e-5)

    # KV equality: the committed entries equal a fresh prefill of the committed tokens.
    fresh = HFLanguageModel(model)
    fresh.reset(64)
    fresh.forward(committed)
    fresh.commit(committed.numel())
    for layer in range(model.config.num_hidden_layers):
        k, v = lm.cached_kv(layer)
        fk, fv = fresh.cached_kv(layer)
        torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)


def test_crop_then_continue(arch):
    model = tiny_hf_model(arch, seed=4)
    lm = HFLanguageModel(model)
    lm.reset(32)
    ids = torch.arange(1, 11)
    lm.forward(ids)
    lm.commit(10)
    lm.crop(6)
    logits = lm.forward(torch.tensor([42]))
    ref = _reference_last_logits(model, torch.cat([ids[:6], torch.tensor([42])]))
    torch.testing.assert_close(logits[-1], ref, atol=2e-5, rtol=1e-5)


def test_context_and_capacity_errors():
    lm = HFLanguageModel(tiny_hf_model("llama"))
    with pytest.raises(ValueError, match="context"):
        lm.reset(10_000)
    lm.reset(8)
    with pytest.raises(ValueError, match="overflow"):
        lm.forward(torch.arange(9))
    with pytest.raises(ValueError):
        lm.crop(3)  # nothing cached yet
