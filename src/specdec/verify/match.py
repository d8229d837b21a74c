"""Sample-and-match: exact for deterministic proposals at any temperature (docs/algorithms.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import pick, uniforms
from specdec.core.tree import TokenTree
from specdec.verify.walk import follow_drawn_children


def verify_sample_and_match(
    tree: TokenTree,
    target_probs: Tensor,  # [N + 1, V]
    generator: torch.Generator | None = None,
) -> VerifyResult:
    """Draw one target sample after every node; follow the child holding the sample, emit it where none does.

    Every emitted token is a fresh target sample given the emitted prefix, so this is exact for
    any proposal whose children do not depend on random draws (top-k, best-first, n-gram copies;
    SpecExec's rule and HF's prompt-lookup sampling path). Siblings hold distinct tokens.

    Every node gets its uniform from `generator`, in node order, as one `sample` over every row would
    draw them; a node's pick (`pick`, a pass over the vocabulary) is made only where the walk reaches
    it, which gives the same tokens as picking every row first.
    """
    u = uniforms(tree.num_nodes, generator, target_probs.device)  # [N + 1]
    return follow_drawn_children(tree, lambda node: int(pick(target_probs[node : node + 1], u[node : node + 1])))
