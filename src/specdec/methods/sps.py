"""`sps`: classic speculative sampling with a draft model (Leviathan et al.; Chen et al.;
docs/algorithms.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, option, positive_int
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, logits_to_probs, sample
from specdec.core.tree import TokenTree
from specdec.drafting.base import Proposal, finished
from specdec.drafting.draft_model import DraftModel
from specdec.methods.base import Method, MethodContext
from specdec.methods.registry import register
from specdec.models.base import LanguageModel
from specdec.verify.greedy import verify_greedy
from specdec.verify.mss import verify_mss

DEFAULT_GAMMA = 4


class ModelDrafter:
    """A small causal LM drafting a chain of `gamma` tokens autoregressively with its own KV cache.

    Drafts are drawn with the same sampling operator as the target (argmax at T = 0) and the
    distribution each was drawn from travels with the chain, as speculative sampling requires
    (docs/algorithms.md §12). The draft model's cache catches up on every committed token it has
    not seen (`DraftModel`), so the bonus token and a fully accepted last draft are never missing.
    """

    def __init__(self, model: LanguageModel, sampling: SamplingConfig, gamma: int = DEFAULT_GAMMA) -> None:
        self.model = model
        self.draft = DraftModel(model)
        self.draft_models = [model]
        self.sampling = sampling
        self.max_depth = self.max_nodes = check_positive_int("gamma", gamma)
        self.verifier = verify_greedy if sampling.greedy else verify_mss

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.draft.begin(max_len + self.max_nodes)

    def forward_calls(self) -> list[int]:
        return [self.draft.calls]

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        gamma = min(self.max_depth, max_depth)
        root = int(committed_ids[-1])
        if gamma <= 0:
            return (yield from finished(TokenTree.chain(root, committed_ids.new_empty(0))))
        logits = yield from self.draft.catch_up(committed_ids)  # [V]
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        for i in range(gamma):  # autoregressive by nature: each draft conditions the next pass
            if self.sampling.greedy:
                token = logits.argmax(-1, keepdim=True)
            else:
                dist = logits_to_probs(logits, self.sampling)
                token = sample(dist, generator).view(1)
                probs.append(dist)
            tokens.append(token)
            if i < gamma - 1:  # the last draft is run only if it gets accepted (next catch-up)
                logits = (yield from self.draft.extend(token))[-1]
        return TokenTree.chain(root, torch.cat(tokens), torch.stack(probs) if probs else None)

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        self.draft.keep_chain(result.num_accepted)


@dataclass(frozen=True)
class Options(MethodOptions):
    gamma: int = option(DEFAULT_GAMMA, "draft length per target call", positive_int)


def build(ctx: MethodContext, opts: Options) -> ModelDrafter:
    return ModelDrafter(ctx.drafts[0], ctx.sampling, opts.gamma)


METHOD = register(Method(
    "sps", "classic speculative sampling with a draft model (Leviathan; Chen)", Options, build,
    needs_draft_model=True,
))
