"""`csd`: Cascade Speculative Drafting (CS Drafting; Chen et al. 2023; docs/algorithms.md §8).

A ladder of drafters ordered by cost — draft models d1 > d2 > … and Max-Gram (free) at the
bottom — builds the chain the target verifies. No neural drafter generates token by token: each
one *reviews* what the cheaper levels below it proposed, in ONE forward pass over the whole
chunk, keeps the prefix it agrees with and adds its own token at the first disagreement (or after
the last draft). A review therefore yields at least one token for one forward pass, like an
autoregressive step, and more whenever the cheaper level guessed right.

- **Vertical cascade**: level j reviews the output of levels j+1, j+2, … (recursively).
- **Horizontal cascade**: the first tokens of a chunk come from the most expensive level
  available, later ones from cheaper levels, as the quotas say.
- **k-matrix** K (m × m for m levels, largest first, Max-Gram last): row 0 holds the quotas of
  the chain the *target* verifies — level j drafts (through its own cascade) until
  K[0][0] + … + K[0][j] tokens exist. Row r ≥ 1 holds the quotas used when level r-1 is the
  reviewer and levels r, r+1, … draft for it. Entries below the diagonal are unused (0).
  The cheapest level proposes exactly what its quota still needs (Max-Gram for free; a neural
  bottom level, with `--no-maxgram`, autoregressively). The chain sent to the target is at most
  sum(K[0]) tokens (`--gamma` is refused).
- **Lenience** l ≥ 1 (reference code `model.py::review`): a reviewer below the target also keeps
  a draft x that is not its argmax when P_reviewer(x) > q(x) / l, where q(x) is the probability
  the level that proposed x gave it (1 for Max-Gram, so the bar is 1/l). P is the reviewer's
  softmax at temperature 1, as in the paper. Lenience only lets cheaper drafts travel further up.

The target's review is always exact and is done by the decoder, never here: the chain is
deterministic and its proposal distribution is unknown once lenience is used, so the target
verifies it greedily at T = 0 (output = AR greedy, for any lenience and k-matrix) and by
sample-and-match at T > 0 (output distribution = the target's). Lenience applied *at the
target* would emit tokens the target would not have chosen (§6, §9.11); it is not offered.
"""

from __future__ import annotations

import json
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from specdec.core.options import MethodOptions, choice, flag, number_at_least, option
from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.drafting.base import Proposal, finished
from specdec.drafting.bigram import BigramTable
from specdec.drafting.ngram import maxgram_continuation
from specdec.methods.base import Method, MethodContext, TuningSpace
from specdec.methods.maxgram import FILL_HELP, FILLS, context_bigram
from specdec.methods.registry import register
from specdec.models.base import LanguageModel
from specdec.models.batch import ModelCall
from specdec.verify.match import verify_sample_and_match

LONG_CATCH_UP = 32
"""Context a level's cache lacks beyond this many tokens (the prompt, text decoded without drafts)
runs as a fill of its own before the review: a batch engine may spread a fill over several steps."""

Drafting = Generator[ModelCall, Tensor, tuple[Tensor, Tensor]]
"""Part of a proposal (`drafting.base.Proposal`): yields draft-model calls, returns (text, confidences)."""


# ---- the review primitive -------------------------------------------------------------------
def review_accepts(
    draft_tokens: Tensor,  # [n] int64 tokens proposed by the level below
    draft_conf: Tensor,  # [n] probability the proposing level gave each of its tokens (1 for Max-Gram)
    reviewer_probs: Tensor,  # [n, V] the reviewer's distribution at each draft's position
    lenience: float,
) -> int:
    """How many leading drafts the reviewer keeps: its argmax, or with lenience l > 1 any token
    with P_reviewer(x) > draft_conf / l. One tensor op and one host sync."""
    n = draft_tokens.shape[0]
    if n == 0:
        return 0
    draft_tokens = draft_tokens.to(reviewer_probs.device)
    rows = torch.arange(n, device=reviewer_probs.device)
    keep = draft_tokens == reviewer_probs.argmax(-1)
    if lenience > 1:
        reviewer_p = reviewer_probs[rows, draft_tokens]
        keep = keep | (reviewer_p > draft_conf.to(reviewer_probs.device, reviewer_probs.dtype) / lenience)
    return int(keep.long().cumprod(0).sum().item())


def _common_prefix(a: Tensor, b: Tensor) -> int:  # a: [A], b: [B] int64
    m = min(a.shape[0], b.shape[0])
    if m == 0:
        return 0
    same = a[:m] == b[:m]
    return int(same.long().cumprod(0).sum().item())


# ---- levels ---------------------------------------------------------------------------------
class _ModelLevel:
    """A draft model of the cascade with its own KV cache.

    The cache always holds a prefix of some earlier text, recorded in `cached`; before each pass
    the longest part of it that still agrees with the current text is kept and the rest cropped
    (drafts that a level above rejected), so every token is run through the model once unless it
    changed.
    """

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.cached = torch.empty(0, dtype=torch.long)  # [kv_len] tokens whose K/V the cache holds
        self.calls = 0

    def begin(self, max_len: int) -> None:
        self.lm.reset(max_len)
        self.cached = self.cached[:0]
        self.calls = 0

    def _reuse(self, seq: Tensor, limit: int) -> int:  # seq: [L]
        """Crop the cache to its agreement with `seq`, at most `limit` tokens; return its length."""
        keep = min(_common_prefix(self.cached, seq), limit)
        if self.lm.kv_len > keep:
            self.lm.crop(keep)
            self.cached = self.cached[:keep]
        return keep

    def sync(self, committed: Tensor) -> None:  # committed: [L]
        """Drop cached drafts the target did not commit (the cache never holds uncommitted tokens)."""
        self._reuse(committed, committed.shape[0])

    def review(self, seq: Tensor, conf: Tensor, start: int, base: int, lenience: float) -> Drafting:
        """One forward pass over seq[start:] (the drafts of the levels below, after whatever of the
        context is not cached yet): keep the drafts it accepts, then append its own token.

        seq: [L] the text, drafts from `start`; conf: [L - base] confidence of each token drafted
        since `base` (the committed length). Returns the new text and confidences.
        """
        # The pass must include seq[start - 1]: its logits give the distribution of the first draft.
        keep = self._reuse(seq, start - 1)
        if start - 1 - keep > LONG_CATCH_UP:
            yield ModelCall(self.lm, seq[keep : start - 1], fill=True)
            self.calls += 1
            keep = start - 1
            self.cached = seq[:keep]
        logits = yield ModelCall(self.lm, seq[keep:])  # [L - keep, V]
        self.calls += 1
        probs = torch.softmax(logits[start - 1 - keep :].float(), dim=-1)  # [n + 1, V]: row i predicts seq[start + i]
        drafts = seq[start:]
        n_acc = review_accepts(drafts, conf[start - base :], probs[:-1], lenience)
        own = probs[n_acc].argmax(-1).view(1).cpu()  # correction after a rejection, or the token after all drafts
        # The context and the accepted drafts are cached for good; the own token is not run yet.
        self.lm.commit(start + n_acc - keep)
        self.cached = seq[: start + n_acc]
        new_tokens = torch.cat([drafts[:n_acc], own])
        new_conf = probs[torch.arange(n_acc + 1, device=probs.device), new_tokens.to(probs.device)].cpu()
        return torch.cat([seq[: start + n_acc], own]), torch.cat([conf[: start - base], new_conf])

    def propose(self, seq: Tensor, conf: Tensor, need: int) -> Drafting:  # seq: [L]; conf: [L - base]
        """The bottom level when there is no Max-Gram: `need` greedy tokens, one pass each."""
        keep = self._reuse(seq, seq.shape[0] - 1)
        logits = (yield ModelCall(self.lm, seq[keep:], fill=True))[-1]  # [V]
        self.calls += 1
        self.cached = seq
        tokens: list[Tensor] = []
        confs: list[Tensor] = []
        for i in range(need):  # autoregressive by nature: each token conditions the next pass
            probs = torch.softmax(logits.float(), dim=-1)
            token = probs.argmax(-1).view(1)
            tokens.append(token.cpu())
            confs.append(probs[token].cpu())
            if i < need - 1:  # the last token is cached only if a level above keeps it
                logits = (yield ModelCall(self.lm, token, fill=True))[-1]
                self.calls += 1
                self.cached = torch.cat([self.cached, token.cpu()])
        return torch.cat([seq, *tokens]), torch.cat([conf, *confs])


class _MaxGramLevel:
    """Max-Gram at the bottom of the cascade: free, one-hot (its confidence in a token is 1)."""

    def __init__(self, bigram: BigramTable | None) -> None:
        self.bigram = bigram
        self._next_token: list[int] | None = None

    def begin(self, prompt_ids: Tensor) -> None:
        self._next_token = self.bigram.with_prompt(prompt_ids).next_token.tolist() if self.bigram else None

    def propose(self, seq: Tensor, conf: Tensor, need: int) -> tuple[Tensor, Tensor]:  # seq: [L]; conf: [L - base]
        tokens = maxgram_continuation(seq, need, self._next_token)
        return torch.cat([seq, tokens]), torch.cat([conf, torch.ones(tokens.shape[0], dtype=conf.dtype)])


# ---- k-matrix -------------------------------------------------------------------------------
def default_k_matrix(num_models: int, maxgram: bool = True) -> list[list[int]]:
    """Quotas for `num_models` draft models (largest first) and optionally Max-Gram.

    Row 0 (the target's chain): 4 tokens through the largest drafter, then 2 more through each
    cheaper level. Below: 2 per neural level; Max-Gram proposes 6 when it drafts alone for a
    reviewer and tops up 4 after a cheaper neural level; a neural bottom level (no Max-Gram)
    drafts 3 autoregressively. For one draft model + Max-Gram: [[4, 2], [0, 6]].
    """
    m = num_models + int(maxgram)
    if m < 1:
        raise ValueError("a cascade needs at least one level (a draft model or Max-Gram)")
    k = [[0] * m for _ in range(m)]
    for r in range(m):
        for j in range(r, m):
            is_maxgram = maxgram and j == m - 1
            alone = j == r == m - 1
            if r == 0:
                k[r][j] = 4 if j == 0 else 2
            elif is_maxgram:
                k[r][j] = 6 if alone else 4
            else:
                k[r][j] = 3 if alone else 2
    return k


def k_matrix_rows(value: Any) -> tuple[tuple[int, ...], ...]:
    """The rows of a k-matrix given as "4,2;0,6" (rows split by ';'), JSON "[[4,2],[0,6]]" or nested lists."""
    rows: Any = value
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.startswith("["):
                rows = json.loads(text)
            else:
                rows = [[int(x) for x in row.replace(" ", "").split(",") if x] for row in text.split(";") if row.strip()]
        except ValueError:
            raise ValueError(f"k-matrix must look like 4,2;0,6 (rows split by ';') or [[4,2],[0,6]], got {value!r}") from None
    if isinstance(rows, Tensor):
        rows = rows.tolist()
    try:
        k = tuple(tuple(v for v in row) for row in rows)
    except TypeError:
        raise ValueError(f"k-matrix must be a list of rows, got {value!r}") from None
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for row in k for v in row):
        raise ValueError(f"k-matrix entries must be integers >= 0, got {[list(r) for r in k]}")
    return k


def parse_k_matrix(value: Any, levels: int) -> list[list[int]]:
    """A k-matrix for `levels` cascade levels (any form `k_matrix_rows` reads), validated."""
    k = [list(row) for row in k_matrix_rows(value)]
    if len(k) != levels or any(len(row) != levels for row in k):
        raise ValueError(
            f"k-matrix must be {levels}x{levels} (one row and column per cascade level: the draft models, "
            f"largest first, then Max-Gram unless disabled), got {k}"
        )
    if any(k[r][j] for r in range(levels) for j in range(r)):
        raise ValueError(f"k-matrix entries below the diagonal are unused and must be 0, got {k}")
    if sum(k[0]) < 1:
        raise ValueError(f"row 0 of the k-matrix (the tokens the target verifies) must sum to >= 1, got {k[0]}")
    return k


def fill_growth(k_matrix: Sequence[Sequence[int]], r: int = 0) -> int:
    """Most tokens levels r, r+1, … can add past the committed text in one proposal (each level's
    loop overshoots its quota by at most one call): the most one step drafts, for r = 0."""
    levels = len(k_matrix)
    memo: dict[int, int] = {}

    def fill(r: int) -> int:
        if r not in memo:
            quota, most = 0, 0
            for j in range(r, levels):
                quota += k_matrix[r][j]
                if quota > 0:
                    call = quota if j == levels - 1 else fill(j + 1) + 1
                    most = max(most, quota - 1 + call)
            memo[r] = most
        return memo[r]

    return fill(r)


# ---- the drafter ----------------------------------------------------------------------------
class CascadeDrafter:
    """CS Drafting as a chain drafter: vertical and horizontal cascades of reviews (module docstring).

    models: draft models, largest (most expensive) first, all with the target's vocabulary.
    maxgram: put Max-Gram at the bottom (filling from `bigram`, or copying from the context only
        when `bigram` is None).
    k_matrix: m × m quotas for m = len(models) + maxgram levels (default: `default_k_matrix`).
    lenience: l >= 1 for the reviews *below* the target (1 = every review exact).
    """

    verifier = staticmethod(verify_sample_and_match)
    """Deterministic chain: greedy verification at T = 0, sample-and-match at T > 0 (never lenient)."""

    def __init__(
        self,
        models: Sequence[LanguageModel],
        k_matrix: Any = None,
        lenience: float = 1.0,
        maxgram: bool = True,
        bigram: BigramTable | None = None,
    ) -> None:
        models = list(models)
        if not models and not maxgram:
            raise ValueError("a cascade needs at least one level: give a draft model or keep Max-Gram")
        vocab = {lm.vocab_size for lm in models}
        if len(vocab) > 1:
            raise ValueError(f"the cascade's draft models have different vocabularies ({sorted(vocab)} logits)")
        if bigram is not None and models and bigram.vocab_size != models[0].vocab_size:
            bigram = bigram.resized(models[0].vocab_size)
        if not isinstance(lenience, (int, float)) or isinstance(lenience, bool) or not math.isfinite(lenience) or lenience < 1:
            raise ValueError(f"lenience must be a finite number >= 1 (1 = exact reviews), got {lenience!r}")
        self.levels: list[_ModelLevel | _MaxGramLevel] = [_ModelLevel(lm) for lm in models]
        if maxgram:
            self.levels.append(_MaxGramLevel(bigram))
        m = len(self.levels)
        self.k_matrix = default_k_matrix(len(models), maxgram) if k_matrix is None else parse_k_matrix(k_matrix, m)
        self.lenience = float(lenience)
        self.draft_models = models
        """The neural levels, largest first (their forward calls enter SWI; Max-Gram is free)."""
        self.max_depth = self.max_nodes = sum(self.k_matrix[0])
        """Longest chain sent to the target: the decoder sizes its blocks and statistics by it."""
        self.last_conf = torch.empty(0)
        """[γ'] probability the level that last proposed or reviewed each token of the last chain gave it."""
        self._base = 0

    def begin(self, prompt_ids: Tensor, max_len: int) -> None:
        # How far past the committed text a proposal's working text can reach.
        room = max_len + fill_growth(self.k_matrix) + 1
        for level in self.levels:
            if isinstance(level, _ModelLevel):
                level.begin(room)
            else:
                level.begin(prompt_ids)

    def propose(self, committed_ids: Tensor, max_depth: int, generator: torch.Generator | None) -> Proposal:
        # The chain is deterministic: nothing here draws from `generator`.
        cap = min(max_depth, self.max_depth)
        if cap <= 0:
            return (yield from finished(TokenTree.chain(int(committed_ids[-1]), committed_ids.new_empty(0))))
        committed = committed_ids.cpu()
        self._base = committed.shape[0]
        seq, conf = yield from self._fill(0, committed, torch.empty(0), cap)
        self.last_conf = conf[:cap]
        return TokenTree.chain(int(committed_ids[-1]), seq[self._base : self._base + cap])

    def _fill(self, r: int, seq: Tensor, conf: Tensor, cap: int | None = None) -> Drafting:
        """Levels r, r+1, … draft after `seq` until row r's quotas are met (horizontal cascade).

        seq: [L] committed tokens and this proposal's drafts so far; conf: [L - base] the
        confidence of each draft (what lenience compares against). Returns both, extended.
        """
        start = seq.shape[0]
        quota = 0
        for j in range(r, len(self.levels)):
            quota += self.k_matrix[r][j]
            target = quota if cap is None else min(quota, cap)
            while seq.shape[0] - start < target:
                before = seq.shape[0]
                seq, conf = yield from self._call(j, seq, conf, target - (before - start))
                if seq.shape[0] == before:  # Max-Gram found nothing to copy and no bigram to follow
                    break
        return seq, conf

    def _call(self, j: int, seq: Tensor, conf: Tensor, need: int) -> Drafting:  # as `_fill`
        """Level j's contribution: the bottom level proposes; any other reviews the levels below it
        (vertical cascade), with their quotas from row j + 1."""
        level = self.levels[j]
        if j == len(self.levels) - 1:
            if isinstance(level, _MaxGramLevel):
                return level.propose(seq, conf, need)
            return (yield from level.propose(seq, conf, need))
        assert isinstance(level, _ModelLevel)
        start = seq.shape[0]
        seq, conf = yield from self._fill(j + 1, seq, conf)
        return (yield from level.review(seq, conf, start, self._base, self.lenience))

    def observe(self, committed_ids: Tensor, result: VerifyResult) -> None:
        committed = committed_ids.cpu()
        for level in self.levels:
            if isinstance(level, _ModelLevel):
                level.sync(committed)

    def observe_target(self, tree: TokenTree, target_logits: Tensor) -> None:
        pass  # learns nothing from the target's logits

    def forward_calls(self) -> list[int]:
        """Forward passes of each draft model since `begin` (for SWI)."""
        return [level.calls for level in self.levels if isinstance(level, _ModelLevel)]


K_MATRIX_HELP = ("per-level quotas, rows split by ';' (levels: the --draft models largest first, then Max-Gram), "
                 "e.g. 4,2;0,6; row 0 sums to the tokens the target verifies (default derived from the number of "
                 "drafters)")


@dataclass(frozen=True)
class Options(MethodOptions):
    k_matrix: tuple[tuple[int, ...], ...] | None = option(None, K_MATRIX_HELP, k_matrix_rows, metavar="ROWS")
    lenience: float = option(1.0, "lenience L >= 1 for reviews below the target only (the target's review is always "
                             "exact)", number_at_least(1.0))
    no_maxgram: bool = option(False, "drop the Max-Gram bottom level", flag, flag=True)
    maxgram_fill: str = option("bigram", FILL_HELP, choice(*FILLS), choices=FILLS)

    def draft_tokens_per_step(self, num_drafts: int = 1) -> int:
        # Every level's quotas count, not only row 0's: a review below the target checks the
        # whole chunk the levels under it drafted (row r + 1's quotas).
        levels = num_drafts + (not self.no_maxgram)
        k = default_k_matrix(num_drafts, not self.no_maxgram) if self.k_matrix is None else \
            parse_k_matrix(self.k_matrix, levels)
        return fill_growth(k)


def build(ctx: MethodContext, opts: Options) -> CascadeDrafter:
    bigram = None if opts.no_maxgram else context_bigram(ctx, opts.maxgram_fill)
    return CascadeDrafter(ctx.drafts, opts.k_matrix, opts.lenience, maxgram=not opts.no_maxgram, bigram=bigram)


TUNING = TuningSpace("cascade", lambda setting: [
    {"k_matrix": k, "maxgram_fill": "bigram" if setting.bigram_cached else "none"}
    for k in (((4, 2), (0, 6)), ((2, 2), (0, 4)), ((6, 2), (0, 6)), ((3, 3), (0, 6)))
])
"""One draft model over Max-Gram (the cascade the tune can replay), lenience 1."""

METHOD = register(Method(
    "csd",
    "Cascade Speculative Drafting: --draft models (largest first) + Max-Gram review each other's drafts "
    "(--k-matrix, --lenience below the target, --no-maxgram)",
    Options, build, needs_draft_model=True, list_rank=40, tuning=TUNING,
    examples=({"maxgram_fill": "none"}, {"maxgram_fill": "none", "lenience": 2.0}),
))
