"""A draft output head over part of the vocabulary: a cheaper draft step, still exact after verification.

The output head is a large share of a small draft's weights (136 M of the Qwen2.5-0.5B draft's 494 M:
151 936 rows of 896), and every draft step reads all of it. Keeping only the rows of the tokens
the draft is likely to need — the most frequent ones (`drafting.vocab`) — cuts that read; the
other tokens get logit −∞, so the draft never proposes them and its distribution q is exactly the
softmax over the kept tokens. Every drafter computes q from these logits through the same sampling
operator, so q is the distribution the drafts were really drawn from, and verification stays
exact; the target, which keeps its full head, still emits any token (through the residual, or as
its own token). Pruning changes acceptance and speed, never the output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PrunedHead(nn.Module):
    """Logits for `kept` tokens only (the rows of the original head), −∞ for every other token."""

    def __init__(self, head: nn.Module, kept: Tensor) -> None:  # kept: [K] int64 token ids
        super().__init__()
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("only a linear output head (a [V, H] weight) can be pruned")
        kept = torch.unique(kept.long().cpu())
        if kept.numel() == 0 or int(kept.min()) < 0 or int(kept.max()) >= weight.shape[0]:
            raise ValueError(f"kept token ids must be a non-empty subset of [0, {weight.shape[0]})")
        self.out_features, self.in_features = weight.shape[0], weight.shape[1]
        bias = getattr(head, "bias", None)
        # An nn.Linear over the kept rows, so linear paths and int8 quantization apply to it too.
        self.proj = nn.Linear(self.in_features, kept.numel(), bias=bias is not None, device=weight.device,
                              dtype=weight.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(weight.detach()[kept.to(weight.device)])
            if bias is not None:
                self.proj.bias.copy_(bias.detach()[kept.to(weight.device)])
        self.register_buffer("kept", kept.to(weight.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # [..., H] -> [..., V]
        part = self.proj(x)  # [..., K]
        out = part.new_full((*part.shape[:-1], self.out_features), float("-inf"))
        return out.index_copy_(-1, self.kept, part)

    def extra_repr(self) -> str:
        return f"kept {self.kept.numel()} of {self.out_features} tokens"


def prune_output_head(model: nn.Module, kept: Tensor) -> PrunedHead:
    """Replace the model's output head by a `PrunedHead` over `kept` ([K] ids); returns it."""
    head = PrunedHead(model.get_output_embeddings(), kept)
    model.set_output_embeddings(head)  # the embedding keeps its own (possibly tied) weight
    return head
