"""The decoding loop: draft → score → verify → commit → feedback.

With no drafter this is plain autoregressive decoding through the very same loop (one target call
per token), so AR and speculative runs share every piece of code except the draft. A proposal is
always a `TokenTree` (a chain is a tree), scored by the target in one pass and verified by the
rule its drafter names (docs/algorithms.md §2–§4).

A step is four pieces — `propose`, the target's pass, `verify`, `commit` — that `stream` runs for
one sequence; the batch engine (`engine.batch`) runs the same pieces for many sequences, with
their proposals and their target passes batched (docs/algorithms.md §4.10).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, logits_to_probs
from specdec.core.tree import TokenTree
from specdec.drafting.base import Drafter, Proposal, finished, run_proposal
from specdec.engine.cost import cost_ratios, standardized_walltime_improvement
from specdec.engine.limits import check_max_new_tokens, context_overflow
from specdec.engine.stats import DecodeStats, StepAccounting
from specdec.models.base import LanguageModel
from specdec.verify.base import Verifier
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match


def prompt_tensor(prompt_ids: object, vocab_size: int) -> Tensor:  # -> [L] int64 on the CPU
    """A prompt's token ids, checked: one flat, non-empty sequence of integers (a list, a 1-D integer
    tensor or array of any integer type), each in [0, vocab_size). ValueError otherwise, before any
    work: an id past the embedding would fail inside the first pass (on CUDA, a device assert that
    ends the process's GPU use), and floats, nested lists or a list of bools would be read as other
    ids (torch promotes a bool among ints to 0 or 1, as Python does)."""
    out_of_range = f"a token id is outside the vocabulary (0 … {vocab_size - 1})"
    if isinstance(prompt_ids, (str, bytes, bytearray, memoryview)):
        raise ValueError(f"the prompt's token ids must be a sequence of integers, not {type(prompt_ids).__name__} "
                         "(encode text first)")
    try:
        ids = torch.as_tensor(prompt_ids)
    except OverflowError:
        raise ValueError(f"prompt: {out_of_range}") from None
    except (TypeError, ValueError, RuntimeError) as exc:
        if "overflow" in str(exc).lower():  # an int past 64 bits, as torch words it
            raise ValueError(f"prompt: {out_of_range}") from None
        raise ValueError(f"the prompt's token ids must be one flat sequence of integers ({exc})") from None
    if ids.numel() == 0 and ids.dim() <= 1:  # [] reads as an empty float tensor
        raise ValueError("the prompt is empty; give at least one token")
    if ids.dim() != 1 or ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise ValueError("the prompt's token ids must be one flat sequence of integers, got a "
                         f"{ids.dim()}-D {str(ids.dtype).removeprefix('torch.')} tensor")
    if ids.dtype == torch.uint64:  # the same bits as int64, where ids past 2**63 read negative
        ids = ids.view(torch.long)
        if bool((ids < 0).any()):
            raise ValueError(f"prompt: {out_of_range}")
    ids = ids.to(device="cpu", dtype=torch.long)  # wider unsigned tensors have no comparisons on the CPU
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(f"prompt: token id {int(ids[bad][0])} is outside the vocabulary (0 … {vocab_size - 1})")
    return ids


_RUN_ON: "weakref.WeakKeyDictionary[LanguageModel, DecodeRun]" = weakref.WeakKeyDictionary()
"""Per target model, the run whose tokens its cache holds. Decoders over one model (one pipeline's,
two pipelines' over the same objects, a tune's) share its cache: a run resumed after another began
would score its tokens against the other's cache."""


def _take(target: LanguageModel, run: "DecodeRun") -> None:
    try:
        _RUN_ON[target] = run
    except TypeError:  # a model that cannot be weakly referenced or hashed: not watched
        pass


def _holds(target: LanguageModel, run: "DecodeRun") -> bool:
    """Whether `run` still owns `target`'s cache (an unwatched model: assumed so)."""
    try:
        return _RUN_ON.get(target, run) is run
    except TypeError:
        return True


def _sync(device: torch.device) -> None:
    # Timings are only honest when queued GPU work is finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DecodeRun:
    """One generation in progress: what `SpeculativeDecoder.start` sets up and each step advances."""

    prompt: Tensor  # [P] int64
    committed: Tensor  # [L] int64: prompt + emitted tokens; the last one is the pending root
    max_new_tokens: int
    generator: torch.Generator | None
    stats: DecodeStats
    acct: StepAccounting
    stopped: str = ""
    """"" while it goes on, then "eos" or "length"."""
    drafted: bool = False
    """Whether this step's proposal came from the drafter (which then gets the step's feedback)."""
    free: bool = False
    """Whether this step's proposal is one the caller drafted without the drafter (`propose_free`)."""


def _greedy_rule(drafter: Drafter) -> bool:
    """Whether the drafter (or an arm of a bandit over drafters) verifies by the greedy walk: built for
    greedy decoding."""
    if drafter.verifier is verify_greedy:
        return True
    return any(arm.drafter is not None and _greedy_rule(arm.drafter) for arm in getattr(drafter, "arms", ()))


class SpeculativeDecoder:
    """Generate with a target model, an optional drafter and an exact verifier (batch 1).

    gamma: an optional cap on the levels drafted per step (the draft length of a chain); by
    default the drafter's own `max_depth`.
    verifier: overrides the rule (tests plant wrong rules to show they fail); by default greedy at
    T = 0 — where every exact rule reduces to it — and the drafter's own rule otherwise.
    """

    def __init__(
        self,
        target: LanguageModel,
        drafter: Drafter | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        gamma: int | None = None,
        verifier: Verifier | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1):
            raise ValueError(f"gamma (draft length) must be >= 1, got {gamma}")
        for lm in drafter.draft_models if drafter is not None else ():
            if lm.vocab_size != target.vocab_size:
                raise ValueError(
                    f"draft and target vocabularies differ ({lm.vocab_size} vs {target.vocab_size} logits); "
                    "speculative decoding needs a drafter with the target's tokenizer"
                )
        self.target = target
        self.drafter = drafter
        self.sampling = sampling
        self.gamma = 0 if drafter is None else min(drafter.max_depth, gamma or drafter.max_depth)
        """Most levels drafted per step."""
        if verifier is None:
            if sampling.greedy:
                verifier = verify_greedy
            else:
                verifier = drafter.verifier if drafter is not None else verify_sample_and_match
                if drafter is not None and _greedy_rule(drafter):  # it would return the argmax of the sampled target
                    raise ValueError(
                        "the drafter was built for greedy decoding and this decoder samples: build the drafter "
                        "with the decoder's SamplingConfig (its draws and its verification rule depend on it)")
        self.verifier = verifier
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.last_stats: DecodeStats | None = None
        self._device = target.device
        self._cost_ratios: list[float] | None = None  # per draft model, found on first use

    def set_cost_ratios(self, ratios: Sequence[float]) -> None:
        """Each draft model's parameter count over the target's (SWI), when the caller knows them
        already: the batch engine, whose per-sequence models are rows of shared ones. [] = unknown."""
        self._cost_ratios = list(ratios)

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

    def block_size(self) -> int:
        """The largest block the target scores: the root plus every drafted node."""
        return 1 + (self.drafter.max_nodes if self.drafter is not None else 0)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> int:
        """The KV length a run needs; ValueError when it exceeds the target's context.

        Callers that must refuse a request before any compute (the server) call it up front;
        `stream` calls it too.
        """
        block = self.block_size()
        max_len = prompt_len + max_new_tokens + block
        if max_len > self.target.context_length:
            raise ValueError(context_overflow(prompt_len, max_new_tokens, block, self.target.context_length))
        return max_len

    def stream(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[list[int]]:
        """Yield the tokens each iteration commits; `last_stats` is set when it ends."""
        run = self.start(prompt_ids, max_new_tokens, generator)
        stats = run.stats
        while not run.stopped:
            if not _holds(self.target, run):
                raise RuntimeError("another generation has started on this model since this stream began, and it "
                                   "shares the model's cache: consume one stream at a time (or use generate_batch)")
            # 1. Draft a tree below the pending root (a chain is a tree; no drafter: the root alone).
            t0 = time.perf_counter()
            tree = run_proposal(self.propose(run))
            _sync(self._device)
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0

            # 2. Score: one target pass over the root and every drafted node.
            logits = self.target.forward(tree.tokens, tree.block_parents())

            # 3. Verify.
            result = self.verify(run, tree, logits)
            _sync(self._device)
            stats.target_s += time.perf_counter() - t1

            # 4. Commit and 5. feedback (the drafter keeps what was committed, drops the rest).
            yield self.commit(run, tree, result)

    # ---- one step in pieces: `stream` above runs them for one sequence; the batch engine
    # (engine.batch) runs them for many, scoring every sequence's tree in one batched target pass.
    def start(
        self,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        generator: torch.Generator | None = None,
        prefill: bool = True,
    ) -> "DecodeRun":
        """Check the request, reset the target and the drafter, and (with `prefill`) run the prompt.

        Without `prefill` the caller fills `run.prompt[:-1]` into the target's cache before the
        first step (the batch engine does it in chunks).
        """
        check_max_new_tokens(max_new_tokens)
        prompt = prompt_tensor(prompt_ids, self.target.vocab_size)
        max_len = self.check_fits(prompt.numel(), max_new_tokens)
        stats = DecodeStats(prompt_tokens=prompt.numel())
        self.last_stats = stats
        # committed = prompt + emitted tokens; its last token (the pending root) is not yet in the
        # target's cache: each iteration scores [root, drafts…] in one pass.
        run = DecodeRun(prompt, prompt.clone(), max_new_tokens, generator, stats, StepAccounting(stats, self.gamma))
        self.target.reset(max_len)
        _take(self.target, run)
        if self.drafter is not None:
            self.drafter.begin(prompt, max_len)
        if prefill and prompt.numel() > 1:  # the last prompt token is the first pending root
            t0 = time.perf_counter()
            self.target.forward(prompt[:-1], last_only=True)
            self.target.commit(prompt.numel() - 1)
            _sync(self._device)
            stats.prefill_s = time.perf_counter() - t0
            stats.target_s += stats.prefill_s
        return run

    def propose(self, run: "DecodeRun", max_depth: int | None = None) -> Proposal:
        """This step's proposal below the pending root; `max_depth` caps it further (0: the root alone).

        The drafter is not asked when nothing may be drafted; it then hears nothing of the step
        (`commit` skips its feedback) and catches up on the committed tokens at its next proposal.
        """
        depth = min(self.gamma, run.max_new_tokens - run.stats.new_tokens - 1)
        if max_depth is not None:
            depth = min(depth, max_depth)
        run.drafted, run.free = self.drafter is not None and depth > 0, False
        if self.drafter is None or depth <= 0:
            return finished(TokenTree.chain(int(run.committed[-1]), run.committed[:0]))
        return self.drafter.propose(run.committed, depth, run.generator)

    def propose_free(self, run: "DecodeRun", tokens: Tensor, parents: Tensor) -> Proposal:  # [N] int64 each
        """A proposal drafted without the drafter: `tokens` below the pending root (`parents`: -1 = the
        root's child), a deterministic function of the committed text (the batch engine's free trees,
        docs/algorithms.md §4.10). The drafter hears nothing of the step, as when nothing is drafted."""
        run.drafted, run.free = False, True
        return finished(TokenTree.from_drafted(int(run.committed[-1]), tokens, parents))

    def rule(self, run: "DecodeRun") -> Verifier:
        """The rule that verifies this step: sample-and-match for a free tree at T > 0 (its nodes carry
        no draft distribution; §3.5), else the decoder's own."""
        return verify_sample_and_match if run.free and not self.sampling.greedy else self.verifier

    def verify(self, run: "DecodeRun", tree: TokenTree, logits: Tensor) -> VerifyResult:  # logits: [N + 1, V]
        """The exact rule's decision on the target's logits at the tree's nodes."""
        rule = self.rule(run)
        if self.sampling.greedy and rule is verify_greedy:  # it reads only the argmax: no one-hot of the vocabulary
            result = rule(tree, logits, run.generator)
        else:
            result = rule(tree, logits_to_probs(logits, self.sampling), run.generator)  # target probs [N + 1, V]
        if self.drafter is not None:
            # After the decision: what the drafter learns here can only shape later proposals.
            self.drafter.observe_target(tree, logits)
        return result

    def commit(self, run: "DecodeRun", tree: TokenTree, result: VerifyResult) -> list[int]:
        """Commit a verified step; returns the tokens it emits (also appended to `run.committed`)."""
        # The root and the accepted path enter the target's cache (in place for a chain, gathered
        # by index for a tree); the recovered/bonus token becomes the next root.
        self.target.commit(1 + result.num_accepted if tree.is_chain else torch.tensor(result.kept_nodes()))
        new, stop = self._emitted(tree, result, run.max_new_tokens - run.stats.new_tokens)
        run.committed = torch.cat([run.committed, torch.tensor(new, dtype=torch.long)])
        run.acct.step(tree, result, len(new))
        if self.drafter is not None and run.drafted and not stop:
            self.drafter.observe(run.committed, result)
        run.acct.finish()
        self._record_cost(run.stats)
        run.stats.stopped_by = run.stopped = stop
        return new

    def _emitted(self, tree: TokenTree, result: VerifyResult, room: int) -> tuple[list[int], str]:
        """The tokens this step emits and why decoding stops ("" = it goes on).

        Nothing after the first EOS (no bonus after an accepted EOS); then the length cap.
        """
        new = tree.tokens[list(result.accepted_nodes)].tolist() + [result.next_token]
        stop = ""
        for i, tok in enumerate(new):
            if tok in self.eos_token_ids:
                new, stop = new[: i + 1], "eos"
                break
        if len(new) >= room and not stop:
            stop = "length"
        return new[:room], stop

    def _record_cost(self, stats: DecodeStats) -> None:
        """SWI and the forward-call trace behind it (`engine.cost`)."""
        if self.drafter is None:  # AR: one target call per token by definition
            stats.swi = standardized_walltime_improvement(stats.new_tokens, stats.target_calls, [], [])
            return
        calls = list(self.drafter.forward_calls())
        stats.draft_forward_calls = calls
        if self._cost_ratios is None:
            self._cost_ratios = cost_ratios(self.target, list(self.drafter.draft_models))
        if self._cost_ratios is None or len(self._cost_ratios) != len(calls):
            return  # a parameter count is unknown: no SWI rather than a wrong one
        stats.draft_cost_ratios = list(self._cost_ratios)
        stats.swi = standardized_walltime_improvement(stats.new_tokens, stats.target_calls, calls, self._cost_ratios)
