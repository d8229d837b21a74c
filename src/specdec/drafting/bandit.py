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

Exactness: which arm proposes at step s depends only on the outcomes of steps before s, never on
step s's draws, and each arm's proposal is verified by that arm's own exact rule (`verifier`
dispatches to it), so every step emits the target's distribution given the history
(docs/algorithms.md §2.8, §19). Arms that are not asked for a step hear nothing of it except the
target's logits (`observe_target`, so Token Recycling keeps learning); model drafters catch up on
the committed tokens they missed the next time they propose (§4.6). Arms may share one draft model:
its cache holds committed tokens only between steps, whoever drafted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.drafting.base import Drafter, Proposal, finished
from specdec.models.base import LanguageModel
from specdec.verify.match import verify_sample_and_match


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
                 probe_every: int = 16) -> None:
        if not arms or ar_ms <= 0 or not 0 < smoothing <= 1 or not 0 <= drift <= 1 or probe_every < 0:
            raise ValueError("need >= 1 arm, ar_ms > 0, smoothing in (0, 1], drift in [0, 1] and probe_every >= 0")
        self.probe_every = probe_every
        """Plain steps in a row before a drafting arm is probed (0: never probe)."""
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
        self.estimate = [a.tokens_per_call for a in self.arms]
        self.plays = [0] * len(self.arms)
        """Steps each arm played since `begin` (the last entry: plain decoding)."""
        self._current = len(self.arms) - 1
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
        self.estimate = [a.tokens_per_call for a in self.arms]
        self.plays = [0] * len(self.arms)
        self._current = len(self.arms) - 1
        self._reset_probes()

    def choose(self) -> int:
        """The arm with the most estimated tokens per millisecond (the earlier one on a tie), or a
        probe of the best drafting arm after `probe_every` (doubling on each failure) plain steps."""
        rates = [e / a.ms_per_call for e, a in zip(self.estimate, self.arms)]
        best = max(range(len(rates)), key=lambda i: (rates[i], -i))
        plain = len(self.arms) - 1
        if best != plain or plain == 0 or not self.probe_every:
            self._plain_run = 0
            return best
        self._plain_run += 1
        if self._plain_run <= self._wait:
            return best
        self._plain_run, self._probing = 0, True
        return max(range(plain), key=lambda i: (rates[i], -i))

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        self._current = self.choose()
        self.plays[self._current] += 1
        drafter = self.arms[self._current].drafter
        if drafter is None:
            return finished(TokenTree.chain(int(committed_ids[-1]), committed_ids.new_empty(0)))
        return drafter.propose(committed_ids, max_depth, generator)

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        drafter = self.arms[self._current].drafter
        if drafter is not None:
            drafter.observe(committed_ids, result)
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
