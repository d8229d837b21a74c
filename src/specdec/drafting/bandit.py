"""Switching between a few drafters while decoding (`auto`): a bandit on tokens per millisecond.

The tune ranks candidates on three short prompts; the best one for a given prompt can differ (code
that repeats itself favours free trees, fresh prose the draft model). `BanditDrafter` holds the
tune's best few drafters ("arms") and plain decoding. Each arm has its cost per call from the tune
(`ms_per_call`) and an estimate of its tokens per call on this prompt, which starts at the tune's
figure and follows what the arm earns when it is played (an exponential moving average). Every
step plays the arm with the highest estimated tokens per millisecond. An arm left unplayed drifts
back towards the tune's figure, so an arm that did badly a while ago is tried again later (a probe
costs one step of that arm); plain decoding's rate is known exactly, so where nothing pays the
bandit decodes plainly apart from those probes.

Drift alone never tries an arm whose tune figure is below plain decoding (a tune on other prompts
may find that nothing pays, while this prompt's text is easy to draft). So after `probe_every` plain
steps in a row the best drafting arm plays one step anyway, and what it earned replaces its
estimate: an arm that beats plain decoding on this prompt is then played on by the rule above, and
one that does not waits twice as long for its next probe. A probe that fails costs at most one
step of that arm, and the waits double, so probes cost a small, shrinking share of a long answer.

Model-free arms (prompt lookup, suffix drafting: no draft model, proposals a deterministic function
of the text) are also *peeked* every step: their proposal costs no model pass, so the bandit reads it
first and plays it when its expected tokens per millisecond — 1 + (the share of proposed tokens this
arm's steps had accepted) × its size, over the target's pass at that block — beat the best arm's
rate; otherwise the step goes to the bandit's choice as above. So text that repeats earlier text is
copied cheaply, and the draft model drafts the rest (docs/algorithms.md §19.2).

Exactness: which arm proposes at step s depends only on the committed text (the peeked proposal is
a function of it) and on the outcomes of steps before s, never on step s's draws, and each arm's proposal is verified by that arm's own exact rule (`verifier`
dispatches to it), so every step emits the target's distribution given the history
(docs/algorithms.md §2.8, §19). Arms that are not asked for a step hear nothing of it except the
target's logits (`observe_target`, so Token Recycling keeps learning); model drafters catch up on
the committed tokens they missed the next time they propose (§4.6). Arms may share one draft model:
its cache holds committed tokens only between steps, whoever drafted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.drafting.base import Drafter, Proposal, finished, run_proposal
from specdec.models.base import LanguageModel
from specdec.verify.match import verify_sample_and_match


FREE_PRIOR = 0.5
"""Share of a model-free arm's proposed nodes assumed accepted before it has played: optimistic,
because trying a free proposal costs only the wider target pass (a few milliseconds here), and the
arm's own record replaces it after a few plays."""


@dataclass
class Arm:
    """One candidate the bandit may play: its drafter (None = plain decoding) and the tune's figures."""

    drafter: Drafter | None
    ms_per_call: float
    tokens_per_call: float
    label: str = ""


class BanditDrafter:
    """Plays, each step, the arm with the most estimated tokens per millisecond (module docstring)."""

    def __init__(self, arms: Sequence[Arm], ar_ms: float, smoothing: float = 0.3, drift: float = 0.05,
                 probe_every: int = 16, block_ms: Callable[[int], float] | None = None,
                 prefill_ms: Callable[[int], float] | None = None) -> None:
        if not arms or ar_ms <= 0 or not 0 < smoothing <= 1 or not 0 <= drift <= 1 or probe_every < 0:
            raise ValueError("need >= 1 arm, ar_ms > 0, smoothing in (0, 1], drift in [0, 1] and probe_every >= 0")
        self.probe_every = probe_every
        """Plain steps in a row before a drafting arm is probed (0: never probe)."""
        self.block_ms = block_ms or (lambda drafted: ar_ms)
        """Milliseconds of a step whose target pass scores the root and `drafted` nodes and whose
        drafter ran no model (what a peeked model-free proposal costs)."""
        self.prefill_ms = prefill_ms
        """Milliseconds of a draft model's pass over n tokens it has not seen (its prefill, paid when
        an arm first plays); None: not priced."""
        self._room = 0  # the length decoding may reach (prompt + new tokens)
        self.arms = [a for a in arms if a.drafter is not None] + [Arm(None, ar_ms, 1.0, "ar")]
        self.smoothing, self.drift = smoothing, drift
        drafters = [a.drafter for a in self.arms if a.drafter is not None]
        self.max_depth = max(d.max_depth for d in drafters) if drafters else 1
        self.max_nodes = max(d.max_nodes for d in drafters) if drafters else 0
        self.draft_models: list[LanguageModel] = []
        for d in drafters:
            for lm in d.draft_models:
                if all(lm is not seen for seen in self.draft_models):
                    self.draft_models.append(lm)
        self.free = [i for i, a in enumerate(self.arms) if a.drafter is not None and not a.drafter.draft_models]
        """The model-free arms, peeked every step."""
        self.estimate = [a.tokens_per_call for a in self.arms]
        self.plays = [0] * len(self.arms)
        """Steps each arm played since `begin` (the last entry: plain decoding)."""
        self.accept_share = [FREE_PRIOR] * len(self.arms)
        """Per model-free arm, the share of its proposed nodes the target accepted (a moving average)."""
        self._current = len(self.arms) - 1
        self._drafted = 0  # nodes the played free arm proposed this step
        self._reset_probes()

    def _reset_probes(self) -> None:
        self._plain_run = 0  # plain steps in a row
        self._wait = self.probe_every  # plain steps before the next probe
        self._probing = False

    def verifier(self, tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None) -> VerifyResult:
        """The rule of the arm that proposed this step's tree."""
        drafter = self.arms[self._current].drafter
        if drafter is None or tree.num_drafted == 0:  # the root alone: a plain draw from the target
            return verify_sample_and_match(tree, target_probs, generator)
        return drafter.verifier(tree, target_probs, generator)

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        # Shared draft models are reset by each arm that uses them: the widest arm last, so the
        # cache is sized for it.
        for arm in sorted((a for a in self.arms if a.drafter is not None), key=lambda a: a.drafter.max_nodes):
            arm.drafter.begin(prompt_ids, max_len)
        self._room = max_len - 1 - self.max_nodes  # the decoder sizes caches for the widest block past it
        self.estimate = [a.tokens_per_call for a in self.arms]
        self.plays = [0] * len(self.arms)
        self.accept_share = [FREE_PRIOR] * len(self.arms)
        self._current = len(self.arms) - 1
        self._reset_probes()

    def peek_free(self, committed_ids: Tensor, max_depth: int) -> tuple[int, TokenTree] | None:
        """A model-free arm's proposal for this step when its expected tokens per millisecond beat the
        best arm's estimated rate, else None."""
        rates = self.rates(committed_ids.shape[0])
        best = max(r for i, r in enumerate(rates) if i not in self.free)
        pick = None
        for i in self.free:
            # Deterministic drafters draw nothing: no generator, so peeking consumes no randomness.
            tree = run_proposal(self.arms[i].drafter.propose(committed_ids, max_depth, None))
            n = tree.num_drafted
            rate = (1.0 + self.accept_share[i] * n) / self.block_ms(n) if n else 0.0
            if rate > best:
                best, pick = rate, (i, tree)
        return pick

    def rates(self, length: int) -> list[float]:
        """Estimated tokens per millisecond of every arm at a text of `length` tokens. A model arm
        whose draft has not read the text yet also pays that prefill, spread over the calls it would
        play until the answer's length cap: on a long prompt with a short budget the draft's prefill
        can cost more than its drafts save."""
        out = []
        for e, a in zip(self.estimate, self.arms):
            cost = a.ms_per_call
            if self.prefill_ms is not None and a.drafter is not None:
                unseen = max((length - lm.kv_len for lm in a.drafter.draft_models if lm.kv_len == 0), default=0)
                if unseen:
                    calls = max((self._room - length) / max(e, 1.0), 1.0)
                    cost += self.prefill_ms(unseen) / calls
            out.append(e / cost)
        return out

    def choose(self, length: int = 0) -> int:
        """The model arm or plain decoding with the most estimated tokens per millisecond (the earlier
        one on a tie), or a probe of the best model arm after `probe_every` (doubling on each failure)
        plain steps. Model-free arms play only when peeked (`peek_free`): chosen blind, they would
        often have nothing to propose and make a plain step of a model arm's turn."""
        rates = self.rates(length)
        plain = len(self.arms) - 1
        models = [i for i in range(plain) if i not in self.free]
        best = max(models + [plain], key=lambda i: (rates[i], -i))
        if best != plain or not models or not self.probe_every:
            self._plain_run = 0
            return best
        self._plain_run += 1
        if self._plain_run <= self._wait:
            return best
        # A probe is a bet on one step; one whose draft would first read a long text costs that
        # prefill too, so it is made only where the prefill's share is at most one call's cost.
        bets = [i for i in models if 2.0 * rates[i] * self.arms[i].ms_per_call >= self.estimate[i]]
        if not bets:
            return best
        self._plain_run, self._probing = 0, True
        return max(bets, key=lambda i: (rates[i], -i))

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        peeked = self.peek_free(committed_ids, max_depth) if self.free else None
        self._current = self.choose(committed_ids.shape[0]) if peeked is None else peeked[0]
        self.plays[self._current] += 1
        drafter = self.arms[self._current].drafter
        if drafter is None:
            return finished(TokenTree.chain(int(committed_ids[-1]), committed_ids.new_empty(0)))
        if self._current not in self.free:
            return drafter.propose(committed_ids, max_depth, generator)
        # A model-free arm's proposal is run here (or was, to peek), so its size is known.
        tree = peeked[1] if peeked is not None else run_proposal(drafter.propose(committed_ids, max_depth, None))
        self._drafted = tree.num_drafted
        return finished(tree)

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        drafter = self.arms[self._current].drafter
        if drafter is not None:
            drafter.observe(committed_ids, result)
        if self._current in self.free and self._drafted:
            share = self.accept_share[self._current]
            self.accept_share[self._current] = share + self.smoothing * (result.num_accepted / self._drafted - share)
        self.record(self._current, result.num_accepted + 1.0)

    def record(self, played: int, tokens: float) -> None:
        """The played arm's estimate follows what it earned (a probe's result replaces it); the others
        drift back to the tune's figure."""
        for i, arm in enumerate(self.arms):
            if i == played:
                self.estimate[i] += (1.0 if self._probing else self.smoothing) * (tokens - self.estimate[i])
            else:
                self.estimate[i] += self.drift * (arm.tokens_per_call - self.estimate[i])
        if self._probing:
            pays = tokens / self.arms[played].ms_per_call > 1.0 / self.arms[-1].ms_per_call
            self._wait = self.probe_every if pays else 2 * self._wait
            self._probing = False

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        for arm in self.arms:
            if arm.drafter is not None:
                arm.drafter.observe_target(tree, target_logits)

    def forward_calls(self) -> list[int]:
        calls = [0] * len(self.draft_models)
        for arm in self.arms:
            if arm.drafter is None:
                continue
            for lm, n in zip(arm.drafter.draft_models, arm.drafter.forward_calls()):
                calls[next(i for i, seen in enumerate(self.draft_models) if seen is lm)] += n
        return calls
