"""What a generation did, and the per-step accounting behind it (kept beside the loop, not in it)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree


@dataclass
class DecodeStats:
    """What one `generate` call did. Field names are a public contract (CLI `--json`, bench, server)."""

    new_tokens: int = 0
    target_calls: int = 0
    """Target forward passes after the prompt prefill (= decoding iterations)."""
    drafted_calls: int = 0
    """Target calls that scored at least one drafted token."""
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
    accepted_by_position: list[int] = field(default_factory=list)
    """Accepted drafted tokens at draft position (tree depth) i, 0-based: the counts behind
    `accepted_per_position`, and what the server's per-position metric adds up."""
    tree_tokens: float = 0.0
    """Drafted tokens scored per target call (tree size; the draft length for chains)."""
    tokens_per_s: float = 0.0
    """End to end: new_tokens / wall_s (the prompt's prefill included)."""
    wall_s: float = 0.0
    """Prefill + decoding, excluding model loading."""
    prefill_s: float = 0.0
    """The target's pass over the prompt."""
    ttft_s: float = 0.0
    """Time to the first emitted token(s): the prefill plus the first decoding iteration (whose draft
    catches up on the prompt)."""
    decode_tokens_per_s: float | None = None
    """Decoding alone: the tokens emitted after the first iteration over the time they took
    (None when the first iteration emitted everything). Long-prompt, short-answer runs are
    dominated by the prefill end to end; this rate is not. It also leaves out the first iteration's
    tokens, which favours a method whose first iteration emits fewer: compare short answers on
    `after_prefill_tokens_per_s`."""
    after_prefill_tokens_per_s: float | None = None
    """Every new token over the time after the target's prompt pass (`prefill_s`): the draft's own
    prompt pass and the first iteration counted, the target's prefill (the same for every method)
    not. None when no time is left after the prefill."""
    draft_s: float = 0.0
    target_s: float = 0.0
    """Target forward time, prefill included."""
    prompt_tokens: int = 0
    stopped_by: str = ""
    """"eos" or "length"."""
    swi: float | None = None
    """Standardized walltime improvement (CS Drafting's cost model, `engine.cost`): the cost of AR
    decoding over this run's, each model's forward call costing its parameter count, Max-Gram and
    prompt lookup free. 1.0 for AR; None when a parameter count is unknown. A cost model, not a
    clock: compare it with `tokens_per_s`."""
    draft_forward_calls: list[int] = field(default_factory=list)
    """Forward passes of each draft model (in the drafter's order, largest first), when reported."""
    draft_cost_ratios: list[float] = field(default_factory=list)
    """Parameter count of each draft model over the target's: what SWI charges per draft call."""

    def to_dict(self) -> dict:
        return asdict(self)

    def cut_to(self, n: int) -> "DecodeStats":
        """These statistics for the first `n` of the new tokens, where the completion ended inside the
        last step (a stop string) and the rest of that step's tokens are not returned. The tokens cut
        are the last step's: its bonus token first, then its accepted drafts; the rates count `n`
        tokens over the same times."""
        cut = self.new_tokens - n
        if cut <= 0:
            return self
        if cut > 1:  # the bonus token, then accepted drafts
            self.accepted_tokens = max(self.accepted_tokens - (cut - 1), 0)
        span = self.wall_s - self.ttft_s
        if self.decode_tokens_per_s is not None and span > 0:
            after = round(self.decode_tokens_per_s * span) - cut
            self.decode_tokens_per_s = after / span if after > 0 else None
        calls = max(self.target_calls, 1)
        self.new_tokens = n
        self.mean_accepted_per_call = self.accepted_tokens / calls
        self.tokens_per_call = n / calls
        self.tokens_per_s = n / self.wall_s if self.wall_s > 0 else 0.0
        after_prefill_s = self.wall_s - self.prefill_s
        self.after_prefill_tokens_per_s = n / after_prefill_s if n > 0 and after_prefill_s > 0 else None
        return self


class StepAccounting:
    """Counts one generation's steps into a `DecodeStats` (timings, acceptance by depth, totals)."""

    def __init__(self, stats: DecodeStats, max_depth: int) -> None:
        self.stats = stats
        self.t_start = time.perf_counter()
        self.proposed = [0] * max_depth  # by tree depth (draft position for chains)
        self.accepted = [0] * max_depth
        self.first_tokens: int | None = None  # tokens the first iteration emitted

    def step(self, tree: TokenTree, result: VerifyResult, emitted: int) -> None:
        """One target call: `tree` was scored, `result` verified, `emitted` tokens committed."""
        st = self.stats
        st.target_calls += 1
        st.drafted_calls += tree.num_drafted > 0
        st.draft_tokens += tree.num_drafted
        # Drafts cut by EOS or the length cap do not count as accepted. The accepted drafts are a
        # root-to-node path, so a step that accepted k of them accepted positions 0 … k-1.
        accepted = min(result.num_accepted, emitted)
        st.accepted_tokens += accepted
        st.new_tokens += emitted
        depth = tree.max_depth()
        if depth > len(self.proposed):  # a tree not from the drafter (the batch engine's free trees) may go deeper
            self.proposed += [0] * (depth - len(self.proposed))
            self.accepted += [0] * (depth - len(self.accepted))
        for i in range(depth):
            self.proposed[i] += 1
            self.accepted[i] += i < accepted

    def finish(self) -> None:
        st = self.stats
        st.wall_s = time.perf_counter() - self.t_start
        calls = max(st.target_calls, 1)
        st.mean_accepted_per_call = st.accepted_tokens / calls
        st.tree_tokens = st.draft_tokens / calls
        st.tokens_per_call = st.new_tokens / calls
        st.tokens_per_s = st.new_tokens / st.wall_s if st.wall_s > 0 else 0.0
        if self.first_tokens is None:
            self.first_tokens, st.ttft_s = st.new_tokens, st.wall_s
        after, span = st.new_tokens - self.first_tokens, st.wall_s - st.ttft_s
        st.decode_tokens_per_s = after / span if after > 0 and span > 0 else None
        after_prefill_s = st.wall_s - st.prefill_s
        st.after_prefill_tokens_per_s = st.new_tokens / after_prefill_s if st.new_tokens > 0 and after_prefill_s > 0 \
            else None
        # Positions never proposed (short proposals, or none at all) have no rate: trim them.
        used = sum(1 for p in self.proposed if p)
        st.accepted_per_position = [a / p for a, p in zip(self.accepted[:used], self.proposed[:used])]
        st.accepted_by_position = self.accepted[: sum(1 for a in self.accepted if a)]
