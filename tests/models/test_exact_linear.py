"""The dense row-invariant linear layer (bfloat16/float16): one fixed float32 order per output, so
every row is the same bits for any number of rows, any thread count and on every build; its result is
the exact product up to float32 round-off and one final rounding to the 16-bit type."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specdec.models.dense.exact_linear import ExactLinear, use_exact_linears
from specdec.models.native import kernels
from tests.conftest import needs_kernels, tiny_hf_model


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rows_are_the_same_bits_for_any_row_count_thread_count_and_build(dtype):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(100, 37).to(dtype)  # K not a multiple of 4, N not of 16
    with torch.no_grad():
        linear.weight.copy_(torch.randn(37, 100, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(37, generator=gen))
    x = torch.randn(64, 100, generator=gen).to(dtype)
    layer = ExactLinear(linear)
    singles = torch.cat([layer(x[i : i + 1]) for i in range(64)])
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    step = torch.finfo(dtype).eps  # one rounding to the 16-bit type, plus float32 sums
    assert bool(((singles.double() - exact).abs() <= step * exact.abs() + 1e-3).all())
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for m in (2, 3, 5, 8, 17, 64):
                assert torch.equal(layer(x[:m]), singles[:m]), f"{m} rows, {n_threads} threads"
    finally:
        torch.set_num_threads(threads)
    w = linear.weight.detach()
    builds = [kernels.dense_linear(x, kernels.dense_repack(w, isa=isa), 37, linear.bias.detach(), isa=isa)
              for isa in kernels.runnable_isas()]
    assert all(torch.equal(b, singles) for b in builds)


@needs_kernels
def test_use_exact_linears_replaces_reduced_precision_linears_only():
    model = tiny_hf_model("qwen2", seed=0)
    assert use_exact_linears(model) == 0  # float32: BLAS sums are not the problem there
    model = model.to(torch.bfloat16)
    n = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert use_exact_linears(model) == n
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
