"""The bookkeeping every model-based drafter shares: catch-up, growing a pending tree, call counts,
and keeping what the target accepted (docs/algorithms.md §4).

The draft model's cache holds committed tokens only, plus this proposal's pending block. Before a
proposal, every committed token it has not seen — at least the pending root, more when drafts
were accepted or a bonus token was emitted — is fed in one pass (the catch-up), so the cache is
never missing the bonus token or a fully accepted last draft. Drafted nodes are then run as
pending blocks appended level by level; after verification the accepted nodes that were run are
committed by index and the rest dropped. Nodes that were drafted but never run (the last level)
are caught up at the next proposal like any unseen committed token.

`catch_up` and `extend` are sub-coroutines of a drafter's proposal (`drafting.base.Proposal`): they
yield the pass they need as a `ModelCall` and return its logits (`yield from draft.catch_up(…)`).
The catch-up is a *fill* (run and commit), which a batch engine may spread over several steps when
it is long (a new prompt).
"""

from __future__ import annotations

import weakref
from collections.abc import Generator

import torch
from torch import Tensor

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.models.base import LanguageModel, kept_token_ids
from specdec.models.batch import ModelCall


SINK = 4
"""Tokens at the start of the text a windowed draft always keeps: attention heads park much of their
weight on the first tokens (StreamingLLM's "attention sinks"), and a model that loses them drifts."""

DEFAULT_WINDOW = 0
"""The draft's window when a method's option leaves it unset (0 = the whole text)."""
WINDOW_HELP = ("the draft model reads only the first few and the last N tokens of a long prompt (a bounded prefill; "
               "0 = the whole prompt; exact either way)")


def window_tokens(value: object) -> int:
    """A draft window: an int >= 0 (0 = the whole text)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise ValueError(f"must be an integer >= 0, got {value!r}")
    return int(value)


_SKIPPED: "weakref.WeakKeyDictionary[LanguageModel, int]" = weakref.WeakKeyDictionary()
"""Per draft model, the tokens its cache leaves out (`DraftModel.skipped`): kept with the model, not
the drafter, because drafters that share one model (`auto`'s arms) share its cache."""


class DraftModel:
    """A draft `LanguageModel` with its catch-up, pending slots and forward-call count.

    With a `window`, the draft reads only the first `SINK` tokens and the last `window` tokens of a
    long prompt: its prefill, which every proposal after a new prompt waits for, then costs a bounded
    pass instead of one over the whole prompt (on this CPU the 0.5B draft reads a 775-token prompt in
    about a second, more than its drafts save on a short answer). Its proposals are only guesses
    that the target verifies, so a narrower view changes acceptance, never the output.
    """

    def __init__(self, lm: LanguageModel, window: int = 0, compact: bool = False) -> None:
        if window < 0:
            raise ValueError(f"the draft's window must be >= 0 tokens (0 = the whole text), got {window}")
        self.lm = lm
        self.window = window
        """Prompt tokens the draft reads after the sink (0 = all of them)."""
        self.kept = kept_token_ids(lm) if compact else None
        """[K] int64, ascending: with `compact` and a pruned head, `catch_up` and `extend` return the
        logits of these tokens only ([.., K]: a drafter maps an index i back to token `kept[i]`, and a
        pruned head's other logits are -inf anyway); None: logits over the whole vocabulary (V)."""
        self.calls = 0
        """Forward passes since `begin` (the SWI cost model charges each one)."""
        self.pending = 0
        """Tokens run in this proposal's pending block (their slots are 0 … pending-1)."""

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def begin(self, max_len: int) -> None:
        self.lm.reset(max_len)
        self.calls = 0
        self.pending = 0
        _SKIPPED[self.lm] = 0

    @property
    def skipped(self) -> int:
        """Committed tokens between the sink and the window that the model's cache leaves out."""
        return _SKIPPED.get(self.lm, 0)

    def unseen(self, committed_ids: Tensor) -> Tensor:  # [L] -> [n] int64
        """The committed tokens the cache lacks; on the first pass over a long prompt with a window,
        the sink and the window's tokens only (their positions close up: RoPE sees the window as it
        would a short prompt after the sink)."""
        if self.lm.kv_len == 0 and self.window and committed_ids.shape[0] > SINK + self.window:
            skipped = _SKIPPED[self.lm] = committed_ids.shape[0] - SINK - self.window
            return torch.cat([committed_ids[:SINK], committed_ids[SINK + skipped :]])
        return committed_ids[self.lm.kv_len + self.skipped :]

    def catch_up(self, committed_ids: Tensor) -> Generator[ModelCall, Tensor, Tensor]:  # [L] -> [V or K] logits
        """Run every committed token the cache lacks (at least the pending root) and commit them
        (one fill); returns the logits after the last one."""
        logits = yield ModelCall(self.lm, self.unseen(committed_ids), fill=True, compact=self.kept is not None)
        self.calls += 1
        self.pending = 0
        return self._checked(logits[-1])

    def extend(
        self,
        tokens: Tensor,  # [n] int64
        slot_parents: Tensor | None = None,  # [n] parent slot in the pending block, -1 = the last committed token
    ) -> Generator[ModelCall, Tensor, Tensor]:  # -> [n, V or K] logits (K: `kept`)
        """Run a block of drafted nodes after the pending ones; None parents = continue the pending chain."""
        logits = yield ModelCall(self.lm, tokens, slot_parents, append=True, compact=self.kept is not None)
        self.calls += 1
        self.pending += tokens.shape[0]
        return self._checked(logits)

    def _checked(self, logits: Tensor) -> Tensor:  # [..., V or K]
        """The logits as asked for: a runner that rebuilt the call and lost `compact` would hand back
        the whole vocabulary, whose indices are not positions in `kept`."""
        if self.kept is not None and logits.shape[-1] != self.kept.shape[0]:
            raise ValueError(f"the draft model returned {logits.shape[-1]} logits per token where the "
                             f"{self.kept.shape[0]} kept ones were asked for (a call rebuilt without `compact`?)")
        return logits

    def token_ids(self, index: Tensor) -> Tensor:  # [...] int64 -> [...] int64
        """The tokens at these positions of the logits `catch_up` and `extend` return."""
        return index if self.kept is None else self.kept.to(index.device)[index]

    def full_probs(self, probs: Tensor) -> Tensor:  # [..., V or K] -> [..., V]
        """Distributions over those logits' positions as distributions over the whole vocabulary
        (what the verifiers compare with the target's)."""
        if self.kept is None:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.kept.to(probs.device), probs)

    def keep(
        self,
        node_slots: Tensor,  # [N + 1] int64: pending slot of each tree node, -1 = not run (the root: -1)
        result: VerifyResult,
    ) -> None:
        """Commit the accepted nodes that were run, in path order, and drop the rest of the block.

        A node is run only after its parent, so the run nodes of the accepted path are a prefix of
        it and their slots increase along it; the rest of the path (and the bonus token) is fed at
        the next catch-up.
        """
        path_slots = node_slots[list(result.accepted_nodes)] if result.num_accepted else node_slots[:0]
        path_slots = path_slots[path_slots >= 0]
        n = path_slots.shape[0]
        if n == 0 or bool((path_slots == torch.arange(n)).all()):
            self.lm.commit(n)  # already in place: a chain prefix, no gather
        else:
            self.lm.commit(path_slots)
        self.pending = 0

    def keep_chain(self, num_accepted: int) -> None:
        """`keep` for a pending chain: its first drafts are accepted in place (no gather)."""
        self.lm.commit(min(num_accepted, self.pending))
        self.pending = 0


class OneModelDrafter:
    """What drafters that run one draft model share: its cache sized for the committed text plus one
    proposal's nodes (`max_nodes` pending slots at most), and its forward calls for the SWI cost model.
    Subclasses set `draft` (a `DraftModel`) and `max_nodes`."""

    draft: DraftModel
    max_nodes: int

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        self.draft.begin(max_len + self.max_nodes)

    def forward_calls(self) -> list[int]:
        """Draft forward passes since `begin`."""
        return [self.draft.calls]

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        pass  # learns nothing from the target's logits


class OneModelTreeDrafter(OneModelDrafter):
    """A one-model drafter whose proposals are trees: `propose` leaves `_node_slots` ([N + 1], each
    tree node's slot in the draft's pending block, -1 = not run), and `observe` commits the accepted
    nodes that were run."""

    _node_slots: Tensor | None = None

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        if self._node_slots is not None:
            self.draft.keep(self._node_slots, result)
            self._node_slots = None
