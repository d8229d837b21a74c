"""`sps`: classic speculative sampling with a draft model (Leviathan et al.; Chen et al.;
docs/algorithms.md §2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, check_positive_int, option, positive_int, probability
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, logits_to_probs, sample
from specdec.core.tree import TokenTree
from specdec.drafting.base import Proposal, finished
from specdec.drafting.draft_model import DEFAULT_WINDOW, WINDOW_HELP, DraftModel, OneModelDrafter, window_tokens
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.registry import register
from specdec.models.base import LanguageModel
from specdec.verify.greedy import verify_greedy
from specdec.verify.mss import verify_mss

DEFAULT_GAMMA = 4


class ModelDrafter(OneModelDrafter):
    """A small causal LM drafting a chain of `gamma` tokens autoregressively with its own KV cache.

    Drafts are drawn with the same sampling operator as the target (argmax at T = 0) and the
    distribution each was drawn from travels with the chain, as speculative sampling requires
    (docs/algorithms.md §12). The draft model's cache catches up on every committed token it has
    not seen (`DraftModel`), so the bonus token and a fully accepted last draft are never missing.
    """

    def __init__(self, model: LanguageModel, sampling: SamplingConfig, gamma: int = DEFAULT_GAMMA,
                 stop_below: float = 0.0, window: int = DEFAULT_WINDOW) -> None:
        if not 0.0 <= stop_below <= 1.0:
            raise ValueError(f"stop_below must be a probability in [0, 1], got {stop_below}")
        self.stop_below = float(stop_below)
        """Adaptive length: the chain ends before a position where the draft's largest probability
        is below this (0 = always `gamma` drafts). The decision looks only at the distribution the
        next draft would be drawn from, never at the draw, so the chain stays exact under classic
        speculative sampling (docs/algorithms.md §2.8)."""
        self.path_floor = 0.0
        """Adaptive length set from outside each step (the batch engine's planner, `engine.schedule.path_floors`):
        the chain ends after a position where the product of the draft's largest probabilities along
        it so far falls below this, without the draft pass for the next one (0 = off). That position's
        draft is kept: its pass has run, and scoring one more token costs the target little. Exact for
        the same reason as `stop_below`: it reads only the distributions the drafts are drawn from."""
        self.model = model
        self.draft = DraftModel(model, window, compact=True)
        self.draft_models = [model]
        self.sampling = sampling
        self.max_depth = self.max_nodes = check_positive_int("gamma", gamma)
        self.verifier = verify_greedy if sampling.greedy else verify_mss

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        gamma = min(self.max_depth, max_depth)
        root = int(committed_ids[-1])
        if gamma <= 0:
            return (yield from finished(TokenTree.chain(root, committed_ids.new_empty(0))))
        # Logits over the draft's kept tokens when its head is pruned (`DraftModel.kept`): the
        # argmax, softmax and draw then skip the -inf of the rest of the vocabulary (the same
        # token: kept ids ascend, so the first largest logit is the same one).
        logits = yield from self.draft.catch_up(committed_ids)  # [V] or [K]
        tokens: list[Tensor] = []
        probs: list[Tensor] = []
        path = 1.0  # product of the draft's largest probabilities so far
        for i in range(gamma):  # autoregressive by nature: each draft conditions the next pass
            dist = None if self.sampling.greedy else logits_to_probs(logits, self.sampling)  # [V] or [K]: x_i's law
            if self.stop_below > 0.0 or self.path_floor > 0.0:
                # Confidence: the largest probability of the distribution the draft would draw from
                # (its softmax at T = 0, where the draw is the argmax).
                top = float((dist if dist is not None else torch.softmax(logits.float(), -1)).max())
                path *= top
                if top < self.stop_below:
                    break
            index = logits.argmax(-1, keepdim=True) if dist is None else sample(dist, generator).view(1)
            token = self.draft.token_ids(index)
            if dist is not None:
                probs.append(dist)
            tokens.append(token)
            if path < self.path_floor:
                break
            if i < gamma - 1:  # the last draft is run only if it gets accepted (next catch-up)
                logits = (yield from self.draft.extend(token))[-1]
        if not tokens:  # unsure from the first position: a plain target step
            return (yield from finished(TokenTree.chain(root, committed_ids.new_empty(0))))
        return TokenTree.chain(root, torch.cat(tokens), self.draft.full_probs(torch.stack(probs)) if probs else None)

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        self.draft.keep_chain(result.num_accepted)


@dataclass(frozen=True)
class Options(MethodOptions):
    gamma: int = option(DEFAULT_GAMMA, "draft length per target call", positive_int)
    stop_below: float = option(0.0, "adaptive draft length: end the chain before a position where the draft's largest "
                               "probability is below this (0 = off; exact either way)", probability, metavar="P")
    draft_window: int = option(DEFAULT_WINDOW, WINDOW_HELP, window_tokens, metavar="N")

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        return self.gamma


def build(ctx: MethodContext, opts: Options) -> ModelDrafter:
    return ModelDrafter(ctx.drafts[0], ctx.sampling, opts.gamma, opts.stop_below, opts.draft_window)


TUNING = TuningSpace("chain", lambda setting: [
    {"gamma": gamma, **({"stop_below": tau} if tau else {})} for gamma in range(1, 7) for tau in (0.0, 0.2, 0.4, 0.6)
])
"""Every draft length up to 6, fixed and with adaptive stopping at three confidences."""

METHOD = register(Method(
    "sps", "classic speculative sampling with a draft model (Leviathan; Chen)", Options, build,
    needs_draft_model=True, list_rank=10, tuning=TUNING, examples=({"gamma": 3}, {"gamma": 4, "stop_below": 0.3}),
))
