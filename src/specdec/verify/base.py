"""The verifier protocol shared by every rule."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree


class Verifier(Protocol):
    def __call__(
        self,
        tree: TokenTree,
        target_probs: Tensor,  # [N + 1, V]: row i = the target's distribution after node i's path
        generator: torch.Generator | None = None,
    ) -> VerifyResult: ...
