"""The decoding loop: draft → score → verify → commit → feedback.

With no drafter this is plain autoregressive decoding through the very same loop (one
target call per token), so AR and speculative runs share every piece of code except the
draft.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from specdec.drafters import Drafter, Proposal
from specdec.cost import cost_ratios, standardized_walltime_improvement
from specdec.lm import LanguageModel
from specdec.sampling import SamplingConfig, logits_to_probs
from specdec.tree import TokenTree
from specdec.verify import TreeVerifier, Verifier, choose_tree_verifier, choose_verifier


@dataclass
class DecodeStats:
    """What one `generate` call did. Field names are a public contract (CLI `--json`, bench)."""

    new_tokens: int = 0
    target_calls: int = 0
    """Target forward passes after the prompt prefill (= decoding iterations)."""
    draft_tokens: int = 0
    """Tokens proposed by the drafter (and scored by the target)."""
    accepted_tokens: int = 0
    """Drafted tokens accepted by the verifier (recovered/bonus tokens not counted)."""
    mean_accepted_per_call: float = 0.0
    """accepted_tokens / target_calls."""
    tokens_per_call: float = 0.0
    """new_tokens / target_calls: accepted drafts plus the target's own token, per call."""
    accepted_per_position: list[float] = field(default_factory=list)
    """Acceptance rate at draft position (tree depth) i: accepted / proposed at that position."""
    tree_tokens: float = 0.0
    """Drafted tokens scored per target call (tree size; the draft length for chains)."""
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    """Prefill + decoding, excluding model loading."""
    draft_s: float = 0.0
    target_s: float = 0.0
    """Target forward time, prefill included."""
    prompt_tokens: int = 0
    stopped_by: str = ""
    """"eos" or "length"."""
    swi: float | None = None
    """Standardized walltime improvement (CS Drafting's cost model, `specdec.cost`): the cost of AR
    decoding over this run's, each model's forward call costing its parameter count, Max-Gram and
    prompt lookup free. 1.0 for AR; None when the drafter does not report its forward calls or a
    parameter count is unknown. A cost model, not a clock: compare it with `tokens_per_s`."""
    draft_forward_calls: list[int] = field(default_factory=list)
    """Forward passes of each draft model (in the drafter's order, largest first), when reported."""
    draft_cost_ratios: list[float] = field(default_factory=list)
    """Parameter count of each draft model over the target's: what SWI charges per draft call."""

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    # Timings are only honest when queued GPU work is finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SpeculativeDecoder:
    """Generate with a target model, an optional drafter and an exact verifier (batch 1)."""

    def __init__(
        self,
        target: LanguageModel,
        drafter: Drafter | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        gamma: int = 4,
        verifier: Verifier | None = None,
        eos_token_ids: Sequence[int] = (),
        tree_verifier: TreeVerifier | None = None,
    ) -> None:
        if drafter is not None and gamma < 1:
            raise ValueError(f"gamma (draft length) must be >= 1, got {gamma}")
        draft_lm = getattr(drafter, "model", None)
        if draft_lm is not None and draft_lm.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft and target vocabularies differ ({draft_lm.vocab_size} vs {target.vocab_size} logits); "
                "speculative decoding needs a drafter with the target's tokenizer"
            )
        self.target = target
        self.drafter = drafter
        self.sampling = sampling
        # Tree drafters fix their own depth; `gamma` is then the number of levels they draft.
        self.gamma = int(getattr(drafter, "max_depth", gamma)) if drafter is not None else 0
        has_probs = drafter is not None and drafter.has_draft_probs
        # A drafter whose proposals need a particular rule (e.g. children drawn without replacement)
        # names it as `drafter.verifier` / `drafter.tree_verifier`; otherwise the rule follows from
        # the sampling mode and whether the drafter reports its distribution.
        self.verifier = verifier or getattr(drafter, "verifier", None) or choose_verifier(sampling.greedy, has_probs)
        self.tree_verifier = (
            tree_verifier or getattr(drafter, "tree_verifier", None) or choose_tree_verifier(sampling.greedy, has_probs)
        )
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.last_stats: DecodeStats | None = None
        self._device = getattr(target, "device", torch.device("cpu"))
        self._cost_ratios: list[float] | None = None  # per draft model, found on first use

    def generate(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
    ) -> tuple[list[int], DecodeStats]:
        """All new token ids (prompt excluded) and the statistics of the run."""
        out: list[int] = []
        for chunk in self.stream(prompt_ids, max_new_tokens, generator):
            out.extend(chunk)
        assert self.last_stats is not None
        return out, self.last_stats

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> int:
        """The KV length a run needs; ValueError when it exceeds the target's context.

        Callers that must refuse a request before any compute (the server) call it up front;
        `stream` calls it too.
        """
        # Room for the largest block the target will score: the root plus every drafted node.
        block = 1 + (getattr(self.drafter, "max_nodes", self.gamma) if self.drafter is not None else 0)
        max_len = prompt_len + max_new_tokens + block
        if max_len > self.target.context_length:
            raise ValueError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens (+{block} for drafts) "
                f"exceeds the target's context of {self.target.context_length} tokens"
            )
        return max_len

    def stream(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[list[int]]:
        """Yield the tokens each iteration commits; `last_stats` is set when it ends."""
        if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().cpu()
        if prompt.numel() == 0:
            raise ValueError("the prompt is empty; give at least one token")
        max_len = self.check_fits(prompt.numel(), max_new_tokens)
        stats = DecodeStats(prompt_tokens=prompt.numel())
        self.last_stats = stats
        per_pos_proposed = [0] * self.gamma  # by draft position (chains) or tree depth
        per_pos_accepted = [0] * self.gamma
        # committed = prompt + emitted tokens; its last token (the pending root) is not yet in
        # the target's cache: each iteration scores [root, drafts…] in one pass.
        committed = prompt.clone()
        t_start = time.perf_counter()

        self.target.reset(max_len)
        if self.drafter is not None:
            self.drafter.begin(prompt, max_len)
        if prompt.numel() > 1:
            t0 = time.perf_counter()
            self.target.forward(prompt[:-1], last_only=True)
            self.target.commit(prompt.numel() - 1)
            _sync(self._device)
            stats.target_s += time.perf_counter() - t0

        while stats.new_tokens < max_new_tokens:
            # 1. Draft.
            t0 = time.perf_counter()
            gamma = min(self.gamma, max_new_tokens - stats.new_tokens - 1)
            if self.drafter is not None and gamma > 0:
                proposal = self.drafter.propose(committed, gamma, generator)
            else:
                proposal = Proposal(committed.new_empty(0), None)
            _sync(self._device)
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0
            drafted = proposal.tokens.cpu()
            is_tree = isinstance(proposal, TokenTree)

            # 2. Score: one target pass over the root and the drafts (a chain or a whole tree).
            block_ids = torch.cat([committed[-1:], drafted])
            logits = self.target.forward(block_ids, proposal.target_parents() if is_tree else None)
            target_probs = logits_to_probs(logits, self.sampling)  # [N + 1, V]

            # 3. Verify.
            if is_tree:
                result = self.tree_verifier(proposal, target_probs, generator)
            else:
                result = self.verifier(drafted, proposal.draft_probs, target_probs, generator)
            _sync(self._device)
            stats.target_s += time.perf_counter() - t1
            n_acc = result.num_accepted
            path = list(result.path())

            # 4. Commit: the root and the accepted drafts enter the target cache (gathered by
            # index for a tree); the recovered/bonus token becomes the next root.
            if is_tree:
                self.target.commit(torch.tensor([0] + [node + 1 for node in path]))
            else:
                self.target.commit(1 + n_acc)
            new = drafted[path].tolist() + [result.next_token]
            stats.target_calls += 1
            stats.draft_tokens += drafted.numel()
            proposed_depth = proposal.max_depth() if is_tree else drafted.numel()
            for i in range(proposed_depth):
                per_pos_proposed[i] += 1
                per_pos_accepted[i] += i < n_acc

            # EOS: nothing after the first EOS (no bonus after an accepted EOS); then the length cap.
            stop = ""
            for i, tok in enumerate(new):
                if tok in self.eos_token_ids:
                    new, stop = new[: i + 1], "eos"
                    break
            room = max_new_tokens - stats.new_tokens
            if len(new) >= room and not stop:
                stop = "length"
            new = new[:room]
            committed = torch.cat([committed, torch.tensor(new, dtype=torch.long)])
            stats.new_tokens += len(new)
            stats.accepted_tokens += min(n_acc, len(new))  # drafts cut by EOS or the cap do not count

            # 5. Feedback.
            if self.drafter is not None and not stop:
                self.drafter.observe(committed, result)
            self._finish(stats, t_start, per_pos_proposed, per_pos_accepted)
            self._record_cost(stats)
            stats.stopped_by = stop
            yield new
            if stop:
                break

    def _record_cost(self, stats: DecodeStats) -> None:
        """SWI and the forward-call trace behind it (`specdec.cost`)."""
        if self.drafter is None:  # AR: one target call per token by definition
            stats.swi = standardized_walltime_improvement(stats.new_tokens, stats.target_calls, [], [])
            return
        report = getattr(self.drafter, "forward_calls", None)
        if report is None:
            return
        calls = list(report())
        stats.draft_forward_calls = calls
        if self._cost_ratios is None:
            self._cost_ratios = cost_ratios(self.target, list(getattr(self.drafter, "draft_models", [])))
        if self._cost_ratios is None or len(self._cost_ratios) != len(calls):
            return  # a parameter count is unknown: no SWI rather than a wrong one
        stats.draft_cost_ratios = list(self._cost_ratios)
        stats.swi = standardized_walltime_improvement(stats.new_tokens, stats.target_calls, calls, self._cost_ratios)

    @staticmethod
    def _finish(stats: DecodeStats, t_start: float, proposed: list[int], accepted: list[int]) -> None:
        stats.wall_s = time.perf_counter() - t_start
        calls = max(stats.target_calls, 1)
        stats.mean_accepted_per_call = stats.accepted_tokens / calls
        stats.tree_tokens = stats.draft_tokens / calls
        stats.tokens_per_call = stats.new_tokens / calls
        stats.tokens_per_s = stats.new_tokens / stats.wall_s if stats.wall_s > 0 else 0.0
        # Positions never proposed (short proposals, or none at all) have no rate: trim them.
        used = sum(1 for p in proposed if p)
        stats.accepted_per_position = [a / p for a, p in zip(accepted[:used], proposed[:used])]
