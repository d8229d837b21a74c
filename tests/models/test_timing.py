"""t(k) measurement (`models.timing.measure_forward`) on a model whose passes take known times."""

import pytest
import torch

from specdec.models import timing


class _ClockedModel:
    """A pass over k tokens takes k ms of a fake clock; passes number `slow` (counted from the first
    timed one) take 100 ms more, as a burst of another process's work would."""

    vocab_size = 10
    device = torch.device("cpu")

    def __init__(self, clock: list[float], slow: range) -> None:
        self.clock, self.slow, self.timed = clock, slow, -2  # the prefix and the warm-up come first

    def reset(self, max_len: int) -> None:
        pass

    def commit(self, keep: int) -> None:
        pass

    def crop(self, length: int) -> None:
        pass

    def forward(self, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        self.clock[0] += input_ids.numel() * 1e-3 + (0.1 if self.timed in self.slow else 0.0)
        self.timed += 1
        return torch.zeros(1 if last_only else input_ids.numel(), self.vocab_size)


def test_a_burst_of_consecutive_slow_passes_moves_no_median(monkeypatch):
    """Three passes in a row run 100 ms slow. Each round times every size once, so the burst costs one
    sample of each size, which the median of five drops; five repeats of one size in a row would have
    put three of them in it."""
    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    prof = timing.measure_forward(_ClockedModel(clock, range(2, 5)), ks=(1, 2, 4), context=8, repeats=5)
    assert prof.ms == pytest.approx({1: 1.0, 2: 2.0, 4: 4.0})
