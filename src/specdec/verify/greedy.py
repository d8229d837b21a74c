"""Greedy verification: the longest path matching the target's argmax (docs/algorithms.md §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.verify.walk import follow_matching_children


def verify_greedy(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V] (logits work too: only the argmax is read)
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Follow the child equal to the target's argmax; emit the argmax where none matches.

    Exact at temperature 0 for any proposal: the output is AR greedy decoding token for token.
    """
    return follow_matching_children(tree, target_probs.argmax(-1))
