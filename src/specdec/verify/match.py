"""Sample-and-match: exact for deterministic proposals at any temperature (docs/algorithms.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import sample
from specdec.core.tree import TokenTree
from specdec.verify.walk import follow_matching_children


def verify_sample_and_match(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Draw one target sample after every node; follow the child holding the sample, emit it where none does.

    Every emitted token is a fresh target sample given the emitted prefix, so this is exact for
    any proposal whose children do not depend on random draws (top-k, best-first, n-gram copies;
    SpecExec's rule and HF's prompt-lookup sampling path). Siblings hold distinct tokens.
    """
    return follow_matching_children(tree, sample(target_probs, generator))
