"""Linear paths: the ways this machine can run one linear layer, and the module that picks one by
the number of rows it is given.

A *path* turns a linear layer into a module computing the same map another way (plain
`F.linear`, a weight prepacked for oneDNN, a quantized-block kernel, …). Which one is fastest
depends on the machine and on how many rows (tokens) a call carries: on one AVX-512/AMX CPU the
packed oneDNN path was ~1.6x slower than plain for one row and faster from four rows on, on an
AVX2 CPU it won at every row count. So a model's linears are wrapped in `BlockSizeLinear`, which
holds the kernels chosen for the layer's shape and dispatches each call by its row-count bucket
(`models.dense.kernel_choice` measures and chooses).

Every path must compute the layer's own function up to round-off of its dtype (the layer's own
`forward` is the reference); `kernel_choice` checks that at load and drops a path that does not.

Adding a path is one `register_linear_path(LinearPath(name, description, prepare))` call at
import of the module that defines it: `prepare(layer)` returns a module computing the layer, or
None where the path cannot run it (another dtype or device, no kernel on this CPU, no quantized
source for this layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BUCKET_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Bucket b holds calls of BUCKET_ROWS[b-1] < rows <= BUCKET_ROWS[b] (rows > 64 all go to the last
one); each bucket is measured at its upper bound."""


def bucket_of(rows: int) -> int:
    """The bucket of a call with `rows` rows (see BUCKET_ROWS)."""
    return min(max(rows - 1, 0).bit_length(), len(BUCKET_ROWS) - 1)


def bucket_label(b: int) -> str:
    if b == 0:
        return "1"
    lo = BUCKET_ROWS[b - 1] + 1
    if b == len(BUCKET_ROWS) - 1:
        return f"{lo}+"
    return f"{lo}" if lo == BUCKET_ROWS[b] else f"{lo}-{BUCKET_ROWS[b]}"


@dataclass(frozen=True)
class LinearPath:
    """One way to run a linear layer."""

    name: str
    description: str
    prepare: Callable[[nn.Module], nn.Module | None]
    """A module computing `layer`'s map this way ([..., in] -> [..., out]), or None where this path
    cannot run the layer. It may share the layer's tensors or hold its own copy."""
    shares_weight: bool = False
    """True when the prepared module uses the layer's own weight tensor (no extra memory)."""


_PATHS: dict[str, LinearPath] = {}


def register_linear_path(path: LinearPath) -> LinearPath:
    if path.name in _PATHS and _PATHS[path.name] is not path:
        raise ValueError(f"linear path {path.name!r} is registered twice")
    _PATHS[path.name] = path
    return path


def linear_paths() -> list[LinearPath]:
    """Every registered path, "plain" first, then in registration order."""
    return list(_PATHS.values())


def get_linear_path(name: str) -> LinearPath:
    if name not in _PATHS:
        raise ValueError(f"unknown linear path {name!r}; known: {', '.join(_PATHS)}")
    return _PATHS[name]


def is_linear(module: nn.Module) -> bool:
    """A layer a path may replace: `nn.Linear`, or any module declaring `in_features`/`out_features`
    and `is_linear_layer = True` (quantized-weight linears, for instance)."""
    if isinstance(module, BlockSizeLinear):
        return False
    return isinstance(module, nn.Linear) or bool(getattr(module, "is_linear_layer", False))


# ---- the built-in paths ------------------------------------------------------------------------
def _plain(layer: nn.Module) -> nn.Module | None:
    # The layer itself: for nn.Linear that is F.linear on its own weight.
    return layer


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight kept in oneDNN's prepacked layout (CPU; float32, or bfloat16 /
    float16 where oneDNN has kernels for them)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous())
        # Buffers, not parameters: the packed tensor is opaque to autograd and state dicts.
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def packed_dtype_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN has prepacked linear kernels for `dtype` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


def _packed(layer: nn.Module) -> nn.Module | None:
    if type(layer) is not nn.Linear:
        return None
    w = layer.weight
    if w.device.type != "cpu" or not packed_dtype_supported(w.dtype):
        return None
    return PackedLinear(layer)


PLAIN = register_linear_path(LinearPath("plain", "F.linear on the layer's own weight", _plain, shares_weight=True))
PACKED = register_linear_path(LinearPath("packed-onednn", "weight prepacked for oneDNN (CPU)", _packed))


# ---- the dispatcher ----------------------------------------------------------------------------
class BlockSizeLinear(nn.Module):
    """A linear layer that runs each call through the kernel chosen for its row-count bucket.

    kernels: path name -> module computing the layer that way; bucket_paths: the path of each
    bucket of BUCKET_ROWS. Rows are every leading dimension together (batch x tokens).
    """

    def __init__(self, kernels: dict[str, nn.Module], bucket_paths: Sequence[str], in_features: int,
                 out_features: int) -> None:
        super().__init__()
        if len(bucket_paths) != len(BUCKET_ROWS) or set(bucket_paths) - set(kernels):
            raise ValueError(f"need one known path per bucket ({len(BUCKET_ROWS)}), got {list(bucket_paths)}")
        self.in_features, self.out_features = in_features, out_features
        # ModuleDict keys cannot hold some characters; the names are ours and plain.
        self.kernels = nn.ModuleDict({name: k for name, k in kernels.items() if name in bucket_paths})
        self.bucket_paths = tuple(bucket_paths)
        # A plain list (not registered twice) so a call is one index, no dict lookup.
        self._by_bucket = [self.kernels[name] for name in self.bucket_paths]

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        rows = x.numel() // self.in_features
        return self._by_bucket[min(max(rows - 1, 0).bit_length(), len(BUCKET_ROWS) - 1)](x)

    def extra_repr(self) -> str:
        runs = ", ".join(f"{bucket_label(b)}:{p}" for b, p in enumerate(self.bucket_paths))
        return f"in_features={self.in_features}, out_features={self.out_features}, rows->path {{{runs}}}"
