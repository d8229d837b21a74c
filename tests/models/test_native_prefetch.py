"""The kernels' prefetch distance: set at run time, measured once per machine, and never a change to
any output bit (a prefetch only moves bytes into the cache)."""

from __future__ import annotations

import pytest
import torch

from specdec.models.native import kernels, prefetch
from specdec.models.native.formats import FORMATS, random_blocks
from tests.conftest import needs_kernels


@pytest.fixture
def restore_distance():
    lib = kernels.native_library()
    before = lib.specdec_set_prefetch_bytes(12288) if lib is not None else None
    yield
    if lib is not None:
        lib.specdec_set_prefetch_bytes(before)


@needs_kernels
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_the_prefetch_distance_changes_no_bit(name, restore_distance):
    fmt = FORMATS[name]
    rows, cols = 80, fmt.block_size * (8 if fmt.block_size == 32 else 4)
    blocks = random_blocks(fmt, rows, cols, torch.Generator().manual_seed(0), 0.01)
    x = torch.randn(16, cols, generator=torch.Generator().manual_seed(1))
    for isa in kernels.runnable_isas():
        lib = kernels.native_library(isa)
        packed = kernels.repack(blocks, fmt, cols, isa)
        outs = {}
        for distance in (0, 1, 4096, 6144, 12288, 1 << 20):
            lib.specdec_set_prefetch_bytes(distance)
            outs[distance] = [kernels.linear(x[:m].contiguous(), packed, fmt, rows, isa=isa) for m in (1, 5, 8, 16)]
        lib.specdec_set_prefetch_bytes(12288)
        for distance, ys in outs.items():
            assert all(torch.equal(y, ref) for y, ref in zip(ys, outs[12288])), f"{isa}, {name}, {distance} bytes"


@needs_kernels
def test_the_fastest_distance_is_chosen_in_alternating_rounds_and_cached(restore_distance, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_MEASUREMENTS", str(tmp_path))  # not the session's: a load may have measured there
    calls = []

    def timer(distance: int) -> float:  # 6144 fastest; the machine slows down round by round
        calls.append(distance)
        return abs(distance - 6144) / 1e6 + len(calls) * 1e-3

    assert prefetch.use_measured_prefetch(timer=timer) == 6144
    lib = kernels.native_library()
    assert lib.specdec_set_prefetch_bytes(12288) == 6144  # the library runs at the chosen distance
    cands = list(prefetch.CANDIDATES)
    assert calls == [cands[0]] + cands * prefetch.ROUNDS  # a warm-up, then every candidate each round

    def no_timing(distance: int) -> float:
        raise AssertionError("a cached choice is not measured again")

    assert prefetch.use_measured_prefetch(timer=no_timing) == 6144
    assert lib.specdec_set_prefetch_bytes(12288) == 6144
    assert prefetch.prefetch_cache_path(prefetch.fingerprint("cpu")).is_file()
