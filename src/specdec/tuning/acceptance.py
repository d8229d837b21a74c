"""Measure the draft's positional acceptance vectors: P(the k-th child of a node is the accepted one).

Star trees of width W are decoded at the root of every step, and at each step the exact
probability that child k is accepted is added up (Rao-Blackwellised): for children drawn without
replacement from `swor_node`'s acceptance probabilities, for the draft's top-k children the
target's probability of the k-th one (sample-and-match takes child k with probability p(x_k)).
Both vectors therefore come from the same target passes (docs/algorithms.md §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from specdec.core.options import check_positive_int
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig
from specdec.core.tree import TokenTree
from specdec.drafting.sequoia_dp import star_paths
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sequoia import SequoiaDrafter
from specdec.models.base import LanguageModel
from specdec.verify.swor import swor_node

DEFAULT_WIDTH = 8


@dataclass
class Acceptance:
    """Estimated positional acceptance vectors: entry k = P(the k-th child of a node is accepted)."""

    swor: list[float] | None  # children drawn without replacement, SWOR verification (T > 0 only)
    topk: list[float]  # the draft's top-k children, sample-and-match (greedy walk at T = 0)
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return {"swor": self.swor, "topk": self.topk, "iterations": self.iterations}


def measure_acceptance(
    target: LanguageModel,
    draft: LanguageModel,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    width: int = DEFAULT_WIDTH,
    gen_tokens: int = 24,
    seed: int = 0,
    eos_token_ids: Sequence[int] = (),
) -> Acceptance:
    """Decode each prompt with a star tree of `width` children and add up, at every step, the exact
    probability that child k is the accepted one (for SWOR children and for top-k children)."""
    width = check_positive_int("width", width)
    swor_sum = torch.zeros(width, dtype=torch.float64)
    topk_sum = torch.zeros(width, dtype=torch.float64)
    steps = 0
    mode = "greedy" if sampling.greedy else "swor"
    drafter = SequoiaDrafter(draft, sampling, star_paths(width), mode)
    dec = SpeculativeDecoder(target, drafter, sampling, eos_token_ids=eos_token_ids)
    verify = dec.verifier

    def recording_verifier(
        tree: TokenTree,
        target_probs: Tensor,  # [N + 1, V]: row 0 = the target at the root
        generator: torch.Generator | None,
    ) -> VerifyResult:
        nonlocal steps
        if tree.num_drafted == 0:  # the last step of a run drafts nothing: no children to measure
            return verify(tree, target_probs, generator)
        root_probs = target_probs[0].double().cpu()  # [V] the target at the root
        children = tree.tokens[1:]  # [k] the star's children, in rank (= sampling) order
        k = children.shape[0]
        if tree.draft_probs is not None:
            draft_probs = tree.draft_probs[int(tree.cand_draft_row[0])].double().cpu()  # [V]
            accept, _ = swor_node(root_probs, children, draft_probs)  # [k] conditional on earlier rejections
            reach = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - accept, 0)[:-1]])  # [k]
            swor_sum[:k] += accept * reach
            top_tokens = torch.topk(draft_probs, width).indices  # [width]
        else:
            top_tokens = children
        topk_sum[: top_tokens.shape[0]] += root_probs[top_tokens]  # sample-and-match takes child k w.p. p(x_k)
        steps += 1
        return verify(tree, target_probs, generator)

    dec.verifier = recording_verifier
    gen = None if sampling.greedy else torch.Generator(device=target.device).manual_seed(seed)
    for ids in prompts:
        dec.generate(ids, gen_tokens, gen)
    if steps == 0:
        raise ValueError("no acceptance was measured (no prompt produced a draft step); use longer generations")
    return Acceptance(
        (swor_sum / steps).tolist() if mode == "swor" else None, (topk_sum / steps).tolist(), steps
    )
