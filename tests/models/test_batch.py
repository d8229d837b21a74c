"""The batched model layer: a pass over many rows equals each row's own pass; commits equal fresh
prefills; rows come and go without disturbing the others."""

import pytest
import torch

from specdec.core.tree import path_to
from specdec.models.batch import BatchedHFModel, ModelCall, RowView, batched_model, pad_groups, run_calls
from specdec.models.hf import HFLanguageModel
from tests.conftest import TINY_VOCAB, needs_kernels, tiny_hf_model

TOL = dict(atol=2e-5, rtol=1e-5)


def _random_tree(n: int, gen: torch.Generator) -> torch.Tensor:
    parents = [-1]
    for i in range(1, n):
        parents.append(int(torch.randint(0, i, (1,), generator=gen)))
    return torch.tensor(parents)


def _reference(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0, -1]


def test_batched_pass_equals_each_rows_own_pass(arch, seed=0):
    """Ragged prefixes, then chains, trees and appended levels of different sizes in shared passes:
    every row's logits equal a single-sequence model doing the same, and the plain causal pass."""
    model = tiny_hf_model(arch, seed=seed)
    batched = BatchedHFModel(HFLanguageModel(model))
    gen = torch.Generator().manual_seed(seed)
    prefix_lens = [9, 1, 23, 4, 15]
    rows = [batched.new_row() for _ in prefix_lens]
    singles = [HFLanguageModel(model) for _ in prefix_lens]
    prefixes = [torch.randint(0, TINY_VOCAB, (n,), generator=gen) for n in prefix_lens]
    for row, single, prefix in zip(rows, singles, prefixes):
        row.reset(64)
        single.reset(64)
    # Prefill as fills in one shared pass (ragged: 9, 1, 23, 4, 15 tokens).
    outs = run_calls([ModelCall(r, p, fill=True) for r, p in zip(rows, prefixes)])
    for out, single, prefix in zip(outs, singles, prefixes):
        ref = single.forward(prefix, last_only=True)
        single.commit(prefix.numel())
        torch.testing.assert_close(out, ref, **TOL)
    assert [r.kv_len for r in rows] == prefix_lens

    # A tree for some rows, a chain for others, one row left out (rows 0, 2, 3, 4: not consecutive).
    blocks = {0: _random_tree(7, gen), 2: None, 3: _random_tree(3, gen), 4: _random_tree(12, gen)}
    tokens = {i: torch.randint(0, TINY_VOCAB, (5 if p is None else p.numel(),), generator=gen) for i, p in blocks.items()}
    outs = batched.forward_rows([ModelCall(rows[i], tokens[i], blocks[i]) for i in blocks])
    for out, (i, parents) in zip(outs, blocks.items()):
        ref = singles[i].forward(tokens[i], parents)
        torch.testing.assert_close(out, ref, **TOL)
        if i != 3:
            continue  # the single model equals the per-branch causal pass (test_hf); one row checks it directly
        for node in range(tokens[i].numel()):
            branch = tokens[i][path_to(parents, node)]
            torch.testing.assert_close(out[node], _reference(model, torch.cat([prefixes[i], branch])), **TOL)

    # One more level appended below some pending nodes, in the consecutive-rows path (2, 3, 4).
    extra = {2: torch.tensor([4, 4]), 3: torch.tensor([0, 2, 2]), 4: torch.tensor([11, 3])}
    extra_tokens = {i: torch.randint(0, TINY_VOCAB, (p.numel(),), generator=gen) for i, p in extra.items()}
    outs = batched.forward_rows([ModelCall(rows[i], extra_tokens[i], extra[i], append=True) for i in extra])
    for out, i in zip(outs, extra):
        torch.testing.assert_close(out, singles[i].forward(extra_tokens[i], extra[i], append=True), **TOL)

    # last_only rows beside full rows
    outs = batched.forward_rows([ModelCall(rows[0], tokens[0][:3], last_only=True), ModelCall(rows[1], tokens[2])])
    torch.testing.assert_close(outs[0], singles[0].forward(tokens[0][:3], last_only=True), **TOL)
    torch.testing.assert_close(outs[1], singles[1].forward(tokens[2]), **TOL)
    assert outs[0].shape == (1, TINY_VOCAB) and outs[1].shape == (5, TINY_VOCAB)


def test_batched_commit_equals_fresh_prefill_kv(arch):
    model = tiny_hf_model(arch, seed=3)
    batched = BatchedHFModel(HFLanguageModel(model))
    gen = torch.Generator().manual_seed(5)
    rows = [batched.new_row() for _ in range(3)]
    prefixes = [torch.randint(0, TINY_VOCAB, (n,), generator=gen) for n in (6, 11, 2)]
    for row in rows:
        row.reset(48)
    run_calls([ModelCall(r, p, fill=True) for r, p in zip(rows, prefixes)])
    parents = torch.tensor([-1, 0, 0, 1, 2, 4, 4])
    blocks = [torch.randint(0, TINY_VOCAB, (7,), generator=gen) for _ in rows]
    batched.forward_rows([ModelCall(r, t, parents) for r, t in zip(rows, blocks)])
    paths = [[0, 2, 4, 6], [0, 1, 3], [0]]  # different accepted lengths per row
    for row, path in zip(rows, paths):
        row.commit(torch.tensor(path))
    for row, prefix, block, path in zip(rows, prefixes, blocks, paths):
        committed = torch.cat([prefix, block[path]])
        assert row.kv_len == committed.numel()
        fresh = HFLanguageModel(model)
        fresh.reset(48)
        fresh.forward(committed)
        fresh.commit(committed.numel())
        for layer in range(model.config.num_hidden_layers):
            for got, want in zip(row.cached_kv(layer), fresh.cached_kv(layer)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # and the next pass continues from the committed path
        nxt = torch.tensor([7, 8])
        torch.testing.assert_close(row.forward(nxt)[-1], _reference(model, torch.cat([committed, nxt])), **TOL)


def test_rows_come_and_go_without_disturbing_the_others():
    model = tiny_hf_model("qwen2", seed=2)
    batched = BatchedHFModel(HFLanguageModel(model))
    gen = torch.Generator().manual_seed(0)
    a, b, c = (batched.new_row() for _ in range(3))
    assert [a.index, b.index, c.index] == [0, 1, 2]
    texts = {}
    for row, n, cap in ((a, 5, 32), (b, 40, 96), (c, 7, 32)):
        row.reset(cap)
        texts[row.index] = torch.randint(0, TINY_VOCAB, (n,), generator=gen)
        run_calls([ModelCall(row, texts[row.index], fill=True)])
    assert batched.slots_if_added(10) == 4 * 96
    batched.release(b)  # the long row leaves: the buffers may shrink, a and c keep their K/V
    assert batched.slots_if_added(10) == 3 * 32  # b's row is reused before a new one is made
    d = batched.new_row()
    assert d.index == 1 and d.kv_len == 0
    d.reset(16)
    texts[1] = torch.randint(0, TINY_VOCAB, (3,), generator=gen)
    nxt = torch.tensor([1, 2])
    outs = run_calls([ModelCall(a, nxt), ModelCall(c, nxt), ModelCall(d, texts[1], fill=True)])
    for row, out in ((a, outs[0]), (c, outs[1])):
        torch.testing.assert_close(out[-1], _reference(model, torch.cat([texts[row.index], nxt])), **TOL)
    torch.testing.assert_close(outs[2][-1], _reference(model, texts[1]), **TOL)
    a.crop(2)
    torch.testing.assert_close(a.forward(nxt)[-1], _reference(model, torch.cat([texts[0][:2], nxt])), **TOL)
    for row in (a, c, d):
        batched.release(row)
    assert batched.rows_in_use() == 0 and batched.slots_if_added(8) == 8


def test_row_errors():
    batched = BatchedHFModel(HFLanguageModel(tiny_hf_model("llama")), max_rows=1)
    row = batched.new_row()
    with pytest.raises(ValueError, match="rows"):
        batched.new_row()
    with pytest.raises(ValueError, match="context"):
        row.reset(10_000)
    row.reset(8)
    with pytest.raises(ValueError, match="overflow"):
        row.forward(torch.arange(9))
    with pytest.raises(ValueError, match="crop"):
        row.crop(3)
    with pytest.raises(ValueError, match="one block per row"):
        batched.forward_rows([ModelCall(row, torch.arange(2)), ModelCall(row, torch.arange(2))])
    batched.release(row)
    with pytest.raises(ValueError, match="not in use"):
        row.forward(torch.arange(2))


def test_pad_groups_split_only_when_padding_outweighs_a_pass():
    assert pad_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]  # equal blocks: one pass
    assert pad_groups([1] * 15 + [33]) == [[15, 0, 1], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert pad_groups([512, 1, 1]) == [[0], [1, 2]]  # a long prefill chunk does not pad the decoders
    groups = pad_groups([3, 9, 1, 17, 4, 4, 250, 6])
    assert sorted(i for g in groups for i in g) == list(range(8))


def test_run_calls_shares_one_pass_per_model_and_group(monkeypatch):
    model = tiny_hf_model("llama", seed=1)
    batched = batched_model(HFLanguageModel(model))
    assert isinstance(batched, BatchedHFModel)
    rows = [batched.new_row() for _ in range(4)]
    for r in rows:
        r.reset(400)
    passes = []
    original = BatchedHFModel.forward_rows
    monkeypatch.setattr(BatchedHFModel, "forward_rows", lambda self, calls: passes.append(len(calls)) or original(self, calls))
    single = HFLanguageModel(model)
    single.reset(400)
    calls = [ModelCall(rows[0], torch.arange(300) % TINY_VOCAB, fill=True)] + [
        ModelCall(r, torch.tensor([i + 1]), fill=True) for i, r in enumerate(rows[1:])
    ] + [ModelCall(single, torch.tensor([3, 4]))]
    outs = run_calls(calls)
    assert passes == [1, 3]  # the long prefill alone, the three short ones together; the lone model apart
    assert [r.kv_len for r in rows] == [300, 1, 1, 1] and single.kv_len == 0
    assert outs[-1].shape == (2, TINY_VOCAB) and all(o.shape == (1, TINY_VOCAB) for o in outs[:-1])
    assert isinstance(rows[0], RowView)


# ---- native rows: one flat pass, nothing padded ----------------------------------------------------
@needs_kernels
def test_native_batched_pass_equals_each_rows_own_pass_bit_for_bit():
    """Fills of ragged lengths, then chains, trees and appended levels of several rows in one flat
    pass: every row's logits are exactly its own `NativeLM`'s, and commits by index equal them too."""
    from specdec.models.batch import BatchedNativeModel
    from specdec.models.native.lm import NativeLM
    from specdec.models.native.runner import NativeModel
    from tests.models.test_native import _tiny_native

    model = NativeModel.from_hf(_tiny_native("Q4_K", "qwen2", seed=0))
    batched = batched_model(NativeLM(model))
    assert isinstance(batched, BatchedNativeModel) and not batched.pads
    gen = torch.Generator().manual_seed(0)
    prefix_lens = [9, 1, 23, 4]
    rows = [batched.new_row() for _ in prefix_lens]
    singles = [NativeLM(model) for _ in prefix_lens]
    prefixes = [torch.randint(0, TINY_VOCAB, (n,), generator=gen) for n in prefix_lens]
    for row, single in zip(rows, singles):
        row.reset(64)
        single.reset(64)
    outs = run_calls([ModelCall(r, p, fill=True) for r, p in zip(rows, prefixes)])
    for out, single, prefix in zip(outs, singles, prefixes):
        assert torch.equal(out, single.forward(prefix, last_only=True))
        single.commit(prefix.numel())
    blocks = {0: _random_tree(7, gen), 1: None, 3: _random_tree(4, gen)}
    tokens = {i: torch.randint(0, TINY_VOCAB, (5 if p is None else p.numel(),), generator=gen) for i, p in blocks.items()}
    outs = batched.forward_rows([ModelCall(rows[i], tokens[i], blocks[i]) for i in blocks])
    for out, (i, parents) in zip(outs, blocks.items()):
        assert torch.equal(out, singles[i].forward(tokens[i], parents)), f"row {i}"
    # a level appended to row 0's tree, alone in its pass; then commits by index in both
    level = torch.randint(0, TINY_VOCAB, (2,), generator=gen)
    out = batched.forward_rows([ModelCall(rows[0], level, torch.tensor([6, 7]), append=True)])[0]
    assert torch.equal(out, singles[0].forward(level, torch.tensor([6, 7]), append=True))
    for i, keep in ((0, torch.tensor([0, 6, 7])), (1, 3), (3, torch.tensor([0, 2]))):
        rows[i].commit(keep)
        singles[i].commit(keep)
        for layer in range(model.num_layers):
            for a, b in zip(rows[i].cached_kv(layer), singles[i].cached_kv(layer)):
                assert torch.equal(a, b)
    nxt = torch.randint(0, TINY_VOCAB, (1,), generator=gen)
    outs = run_calls([ModelCall(rows[i], nxt) for i in (0, 1, 3)])
    for out, i in zip(outs, (0, 1, 3)):
        assert torch.equal(out, singles[i].forward(nxt))
