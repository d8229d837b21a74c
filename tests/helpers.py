"""Checks shared by several test files."""

from __future__ import annotations

from typing import Any

import torch

from specdec.core.results import VerifyResult
from specdec.core.tree import TokenTree
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.registry import all_methods
from specdec.verify.walk import follow_matching_children

PROFILE = "profile"
"""In `every_method_example()`: the method decodes by a tune profile, which the test supplies."""


def noisy_copy(model: torch.nn.Module, noise: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """A draft for a tiny random model: a copy with Gaussian noise on every parameter, which agrees with
    it on most tokens and not on all, so that a test's drafts are both accepted and rejected."""
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return draft


def every_method_example(include_profile_methods: bool = True) -> list[tuple[str, Any]]:
    """(method, options) for every registered method and every option set it declares for these
    tests (`Method.examples`), in listing order; `PROFILE` for a method that runs from a tune
    profile (`auto`). A new method appears here, and in every test that uses this, by itself."""
    out: list[tuple[str, Any]] = []
    for name, method in all_methods().items():
        if method.examples is None:
            if include_profile_methods:
                out.append((name, PROFILE))
            continue
        out.extend((name, dict(opts)) for opts in method.examples)
    return out


def example_ids(pairs: list[tuple[str, Any]]) -> list[str]:
    """Test ids for `every_method_example()`: the method's name, numbered where it has several."""
    seen: dict[str, int] = {}
    ids = []
    for name, _ in pairs:
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return ids


def stream_checking_caches(
    dec: SpeculativeDecoder, target, drafts: list, prompt: list[int], max_new_tokens: int, seed: int = 0
) -> list[int]:
    """Decode with toy models (`MarkovLM`) and, after every iteration, check that the target's and
    each drafter's caches hold exactly committed tokens: nothing speculative survives a commit."""
    committed = list(prompt)
    for chunk in dec.stream(prompt, max_new_tokens, torch.Generator().manual_seed(seed)):
        committed += chunk
        if dec.last_stats.stopped_by:
            break  # the last iteration may skip drafting and feedback
        assert target._tokens == committed[:-1]
        for lm in drafts:
            assert lm._tokens == committed[: lm.kv_len]
            assert lm.kv_len >= len(committed) - len(chunk)  # caught up before drafting, then kept what held
    return committed


def chi_square_of_decoder(
    dec: SpeculativeDecoder, target, sampling, eos: int | None, n: int, seed: int, max_tree_tokens: int | None = None,
    detects_tv: float | None = None,
) -> float:
    """Decode 3 tokens after `PROMPT` n times and return the chi-square p-value of the outputs
    against the target's exact distribution over 3-token continuations (toy `MarkovLM` target).

    `detects_tv`: the total variation the caller says the test detects with power ≥ 0.99 (checked
    against `detectable_effect` before decoding)."""
    from collections import Counter

    from tests.engine.test_distribution import PROMPT, chi_square_pvalue, detectable_effect, exact_continuations

    expected = exact_continuations(target, sampling, eos)
    if detects_tv is not None:
        power = detectable_effect(n, expected)
        assert power.tv <= detects_tv, f"n = {n} detects only TV >= {power.tv:.3f}, not {detects_tv}"

    gen = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    accepted = 0
    for _ in range(n):
        out, stats = dec.generate(PROMPT, 3, gen)
        counts[tuple(out)] += 1
        accepted += stats.accepted_tokens
        assert 1 <= stats.target_calls <= stats.new_tokens
        assert max_tree_tokens is None or stats.tree_tokens <= max_tree_tokens
    assert accepted > 0.2 * n, "drafts were rarely accepted: the test would not exercise verification"
    return chi_square_pvalue(counts, expected, n)


def shared_uniform_match(tree: TokenTree, target_probs: torch.Tensor, generator=None) -> VerifyResult:
    """A planted bug: every row's draw by inverse CDF from one shared uniform (one random number per
    step instead of one per row), so a child's draw is correlated with its parent's."""
    u = torch.rand((), generator=generator, dtype=target_probs.dtype)
    picks = (target_probs.cumsum(-1) < u).sum(-1).clamp_max(target_probs.shape[-1] - 1)
    return follow_matching_children(tree, picks)


def check_greedy_on_repetitive_text(drafter, method: str, **options) -> Any:
    """Decode 40 tokens after a prompt that repeats itself, with `drafter` and with plain decoding,
    on a tiny Llama; asserts the outputs are equal (also through the pipeline as `method` with
    `options`) and returns the drafter's stats."""
    from specdec.engine.pipeline import Pipeline
    from tests.conftest import TINY_VOCAB, tiny_lm

    target = tiny_lm("llama", seed=0)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, TINY_VOCAB, (6,), generator=g).tolist()
    prompt = base + [7] + base + [9] + base
    ref, _ = SpeculativeDecoder(target).generate(prompt, 40)
    out, stats = SpeculativeDecoder(target, drafter).generate(prompt, 40)
    assert out == ref
    # Equal output alone would pass with every draft rejected: some drafts must have been kept, so
    # some target call emitted more than one token.
    assert stats.accepted_tokens > 0 and stats.target_calls < stats.new_tokens
    res = Pipeline.from_models(target, None).generate(prompt, method, 40, **options)
    assert res.token_ids == ref and res.stats.accepted_tokens == stats.accepted_tokens
    return stats
