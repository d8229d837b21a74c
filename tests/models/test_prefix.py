"""The prefix cache's bookkeeping (`models.prefix`): whole blocks keyed by their exact token ids and
their parent, the longest stored prefix found, only new blocks read out of a row, and eviction
within the byte budget that never strands a block (leaves first, least recently used first).
That reused K/V equal recomputed ones is tested on native rows in tests/engine/test_batch_policies.py."""

from __future__ import annotations

import torch

from specdec.models.prefix import BLOCK, PrefixCache

LAYERS, HEADS, DIM = 2, 1, 4


def _row(tokens: torch.Tensor):
    """A fake row whose K/V at slot i hold the token there (so a copied block shows what it holds),
    and the list of (start, end) reads made of it."""
    reads: list[tuple[int, int]] = []

    def read(start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        reads.append((start, end))
        t = tokens[start:end].to(torch.float32)
        keys = t.expand(LAYERS, HEADS, DIM, -1).clone()  # [L, Hkv, d, n]
        return keys, keys.transpose(-1, -2).clone()  # values [L, Hkv, n, d]

    return read, reads


BLOCK_BYTES = 2 * LAYERS * HEADS * DIM * BLOCK * 4


def test_the_longest_whole_block_prefix_is_found_for_its_own_model_only():
    cache = PrefixCache(1 << 20)
    tokens = torch.arange(3 * BLOCK + 5)
    read, reads = _row(tokens)
    assert cache.insert(7, tokens, read) == 3 and reads == [(0, 3 * BLOCK)]
    assert cache.insert(7, tokens, read) == 0 and len(reads) == 1  # stored already: nothing read
    other = tokens.clone()
    other[2 * BLOCK + 3] += 1  # the third block differs
    found = cache.lookup(7, other, other.numel())
    assert len(found) == 2
    keys, values = PrefixCache.join(found)
    assert keys.shape == (LAYERS, HEADS, DIM, 2 * BLOCK) and values.shape == (LAYERS, HEADS, 2 * BLOCK, DIM)
    assert torch.equal(keys[0, 0, 0], tokens[: 2 * BLOCK].float())
    assert len(cache.lookup(7, tokens, 3 * BLOCK - 1)) == 2  # the limit cuts the last block
    assert cache.lookup(8, tokens, tokens.numel()) == []  # another model's K/V are never handed out
    # A longer sequence reads only its new blocks.
    longer = torch.cat([tokens[: 3 * BLOCK], torch.arange(BLOCK) + 1000])
    read2, reads2 = _row(longer)
    assert cache.insert(7, longer, read2) == 1 and reads2 == [(3 * BLOCK, 4 * BLOCK)]


def test_eviction_keeps_the_budget_and_drops_leaves_least_recently_used_first():
    cache = PrefixCache(3 * BLOCK_BYTES)
    a = torch.arange(2 * BLOCK)
    b = torch.cat([a[:BLOCK], torch.arange(BLOCK) + 500])  # shares a's first block
    cache.insert(0, a, _row(a)[0])
    cache.insert(0, b, _row(b)[0])
    assert len(cache) == 3 and cache.bytes == 3 * BLOCK_BYTES
    cache.lookup(0, a, a.numel())  # a's blocks are now the most recent
    c = torch.arange(BLOCK) + 900
    cache.insert(0, c, _row(c)[0])
    assert cache.bytes <= cache.budget and len(cache) == 3
    assert len(cache.lookup(0, b, b.numel())) == 1  # b's own block went (the least recent leaf)
    assert len(cache.lookup(0, a, a.numel())) == 2 and len(cache.lookup(0, c, c.numel())) == 1
    # A budget below one block keeps nothing, and a zero budget stores nothing at all.
    small = PrefixCache(BLOCK_BYTES - 1)
    small.insert(0, a, _row(a)[0])
    assert len(small) == 0 and small.bytes == 0
    assert PrefixCache(0).insert(0, a, _row(a)[0]) == 0
