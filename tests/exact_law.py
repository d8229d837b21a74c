"""The exact output law of the real verifiers: every random outcome enumerated with its probability.

A verifier draws its randomness in two ways only (docs/algorithms.md §2.3, §3.8): uniforms that it
compares with acceptance probabilities (`torch.rand(k) < accept`), and categorical draws
(`sample(probs, generator)`, or `pick(probs, u)` on uniforms drawn for it). `exact_law` replaces
them with scripted choices and calls the
verifier once per combination of choices (a depth-first search over the choice points the calls
meet), weighting each call by the probabilities the verifier itself attached to its choices:
a or 1 − a for a uniform compared with a, probs[token] for a draw. So the law is that of the
real function: the thresholds, residuals and rows it draws from are its own, and a wrong one in
the code is a wrong law here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor

from specdec.core.tree import TokenTree

# Every module of specdec.verify that draws with `sample` (bound by name at import).
VERIFY_MODULES = ("specdec.verify.chain", "specdec.verify.match", "specdec.verify.swor", "specdec.verify.walk")


class _Script:
    """One run's choices: replays `path`, extends it with first options, records each point's arity."""

    def __init__(self, path: list[int]) -> None:
        self.path = path
        self.arity: list[int] = []
        self.weight = 1.0

    def choose(self, weights: list[float]) -> int:
        options = [i for i, w in enumerate(weights) if w > 0]
        if not options:
            raise AssertionError("a random choice with no possible outcome (all probabilities 0)")
        pos = len(self.arity)
        if pos == len(self.path):
            self.path.append(0)
        self.arity.append(len(options))
        pick = options[self.path[pos]]
        self.weight *= weights[pick]
        return pick


class _Uniforms:
    """What `torch.rand(k)` returns under the script: `u < a` picks u_i < a_i with probability a_i."""

    def __init__(self, script: _Script, n: int) -> None:
        self.script, self.n, self.result = script, n, None

    def __lt__(self, accept: Tensor) -> Tensor:  # accept: [k] thresholds
        if self.result is not None:
            raise AssertionError("the same uniforms were compared twice")
        a = accept.detach().double().clamp(0.0, 1.0).expand(self.n).tolist()
        self.result = torch.tensor([self.script.choose([ai, 1.0 - ai]) == 0 for ai in a], device=accept.device)
        return self.result

    def __gt__(self, other):  # reflected `accept > u` is not how the verifiers compare
        raise AssertionError("compare uniforms as `u < accept`")


@contextmanager
def scripted_randomness(script: _Script, modules: tuple[str, ...] = VERIFY_MODULES):
    def fake_sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:  # probs: [..., V]
        rows = probs.detach().double().reshape(-1, probs.shape[-1])
        picks = [script.choose(row.tolist()) for row in rows]
        return torch.tensor(picks, dtype=torch.long, device=probs.device).reshape(probs.shape[:-1])

    def fake_pick(probs: Tensor, u: Tensor) -> Tensor:  # probs [R, V], u [R] (`fake_uniforms`'): a draw per row
        return fake_sample(probs)

    def fake_uniforms(n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        return torch.zeros(n, dtype=torch.float64, device=device)  # read only by `pick`, which draws by script

    def fake_rand(*size, generator=None, device=None, dtype=None, **kw) -> _Uniforms:
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return _Uniforms(script, int(torch.Size(shape).numel()))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", fake_rand)
        for name in modules:
            module = importlib.import_module(name)
            if hasattr(module, "sample"):
                mp.setattr(module, "sample", fake_sample)
            if hasattr(module, "pick"):  # a draw made where a walk needs it: one uniform, then `pick`
                mp.setattr(module, "pick", fake_pick)
                mp.setattr(module, "uniforms", fake_uniforms)
        yield


def exact_law(run: Callable[[], Hashable], modules: tuple[str, ...] = VERIFY_MODULES) -> dict[Hashable, float]:
    """{outcome: probability} of `run()` over every combination of its scripted random choices."""
    law: dict[Hashable, float] = {}
    path: list[int] = []
    while True:
        script = _Script(path)
        with scripted_randomness(script, modules):
            outcome = run()
        law[outcome] = law.get(outcome, 0.0) + script.weight
        # Next path: advance the deepest choice point that has an option left, drop what follows it.
        arity = script.arity
        path = path[: len(arity)]
        while path and path[-1] + 1 >= arity[len(path) - 1]:
            path.pop()
        if not path:
            return law
        path[-1] += 1


class Conditionals:
    """A random next-token distribution for every prefix, drawn once and remembered (a toy model).

    `zero` tokens get probability 0 everywhere (support mismatch), `sharp` scales the logits
    (near one-hot when large).
    """

    def __init__(self, vocab: int, seed: int, zero: tuple[int, ...] = (), sharp: float = 1.0) -> None:
        self.vocab, self.zero, self.sharp = vocab, tuple(zero), sharp
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: dict[tuple[int, ...], Tensor] = {}

    def __call__(self, prefix: tuple[int, ...]) -> Tensor:  # [V] float64
        if prefix not in self.rows:
            logits = torch.randn(self.vocab, generator=self.gen, dtype=torch.float64) * self.sharp
            logits[list(self.zero)] = float("-inf")
            self.rows[prefix] = torch.softmax(logits, -1)
        return self.rows[prefix]


def emitted(tree: TokenTree, res) -> tuple[int, ...]:
    """The tokens one verification emits: the accepted path's tokens, then the next token."""
    return tuple(int(tree.tokens[n]) for n in res.accepted_nodes) + (res.next_token,)


def verifier_law(verifier, tree: TokenTree, target_probs: Tensor) -> dict[tuple[int, ...], float]:
    """Exact law of the tokens `verifier(tree, target_probs)` emits (target_probs: [N + 1, V])."""
    return exact_law(lambda: emitted(tree, verifier(tree, target_probs, None)))


def tree_target_probs(tree: TokenTree, target: Callable[[tuple[int, ...]], Tensor]) -> Tensor:  # [N + 1, V]
    """Row i: the target's distribution after node i's path (the root's row first)."""
    return torch.stack([target(tuple(int(tree.tokens[n]) for n in tree.path(i))) for i in range(tree.num_nodes)])


def sequence_law(target: Callable[[tuple[int, ...]], Tensor], length: int) -> dict[tuple[int, ...], float]:
    """The target's own law of its next `length` tokens (what plain sampling gives)."""
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        law = {seq + (y,): prob * float(target(seq)[y]) for seq, prob in law.items()
               for y in range(target(seq).numel()) if float(target(seq)[y]) > 0}
    return law


def speculative_law(proposals, verifier, target: Callable[[tuple[int, ...]], Tensor],
                    length: int) -> dict[tuple[int, ...], float]:
    """Exact law of the next `length` tokens when one target call verifies a proposal drawn from
    `proposals` ((probability, TokenTree) pairs: the drafter's law) with the real `verifier`, and
    any tokens still missing come from plain target sampling (the next calls, exact by induction)."""
    law: dict[tuple[int, ...], float] = {}
    for prob, tree in proposals:
        for out, p_out in verifier_law(verifier, tree, tree_target_probs(tree, target)).items():
            rest = sequence_law(lambda s: target(out + s), max(0, length - len(out)))
            for tail, p_tail in rest.items():
                seq = (out + tail)[:length]
                law[seq] = law.get(seq, 0.0) + prob * p_out * p_tail
    return law


def law_tv(a: dict, b: dict) -> float:
    """Total-variation distance between two laws given as {outcome: probability}."""
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))
