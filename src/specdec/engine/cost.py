"""The cost model behind SWI, the standardized walltime improvement of CS Drafting (docs/algorithms.md §8).

Wall-clock speedups depend on the machine (on this CPU a draft model costs ~0.4 of the target per
forward; on a GPU far less). CS Drafting therefore also reports a hardware-independent figure:

    cost(run) = Σ_models  (forward calls of the model) · c_model      (Max-Gram and prompt lookup: c = 0)
    SWI       = cost(AR) / cost(run) = new_tokens · c_target / cost(run)

with c_model proportional to the model's parameter count (the paper's `model_parameters` table,
`model.py::TIME_COST`). One forward call costs the same whatever its length: a review of ten
tokens counts like a single-token step. AR decoding makes one target call per token, so its SWI is
exactly 1.

How it is counted here (`SpeculativeDecoder`): target calls are the decoding iterations (the
prompt prefill is left out of both sides, AR and speculative, as it is the same for both); draft
calls are every forward pass a draft model makes, its first (prompt catch-up) pass included. A
drafter reports its calls through `forward_calls()`; drafters that do not are reported with
`swi = None`. Parameter counts come from `parameter_count` (the model's architecture, so a
quantized or prepacked copy counts like the original).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch

_COUNTS: "weakref.WeakKeyDictionary[Any, int | None]" = weakref.WeakKeyDictionary()


def parameter_count(lm: Any) -> int | None:
    """Parameters of a language model's architecture, or None when it cannot be known.

    A model may state it as `lm.num_parameters` (toy models in tests do). For a transformers
    model (`lm.model`) the architecture is rebuilt on the meta device from its config and counted
    as transformers counts it (tied embeddings once): the loaded copy may hold prepacked or int8
    weights whose storage says nothing about the architecture's size. Cached per model object.
    """
    stated = getattr(lm, "num_parameters", None)
    if isinstance(stated, int) and not isinstance(stated, bool):
        return stated
    try:
        return _COUNTS[lm]
    except (KeyError, TypeError):
        pass
    count: int | None = None
    model = getattr(lm, "model", None)
    config = getattr(model, "config", None)
    if model is not None and config is not None and hasattr(model, "num_parameters"):
        try:
            with torch.device("meta"):
                shadow = type(model)(config)
            count = int(shadow.num_parameters())
        except Exception:  # an unusual model class: fall back to counting what is loaded
            count = int(sum(p.numel() for p in model.parameters())) or None
    try:
        _COUNTS[lm] = count
    except TypeError:  # not weak-referenceable: just do not cache
        pass
    return count


def standardized_walltime_improvement(
    new_tokens: int,
    target_calls: int,
    draft_calls: Sequence[int],  # [M] forward calls of each draft model
    draft_cost_ratios: Sequence[float],  # [M] c_model / c_target (parameter count ratio; 0 = free)
) -> float:
    """SWI = new_tokens · c_target / (target_calls · c_target + Σ draft_calls_m · c_m).

    Expressed with cost ratios to the target (c_target = 1), which is the same number.
    """
    if len(draft_calls) != len(draft_cost_ratios):
        raise ValueError(f"{len(draft_calls)} draft call counts but {len(draft_cost_ratios)} cost ratios")
    if new_tokens < 0 or target_calls < 0 or any(c < 0 for c in draft_calls):
        raise ValueError("token and call counts must be >= 0")
    if any(not math.isfinite(r) or r < 0 for r in draft_cost_ratios):
        raise ValueError(f"cost ratios must be finite and >= 0, got {list(draft_cost_ratios)}")
    cost = target_calls + sum(calls * ratio for calls, ratio in zip(draft_calls, draft_cost_ratios))
    if cost <= 0:
        return 0.0 if new_tokens == 0 else math.inf
    return new_tokens / cost


def cost_ratios(target: Any, draft_models: Sequence[Any]) -> list[float] | None:
    """c_model / c_target for each draft model by parameter count; None if any count is unknown."""
    if not draft_models:
        return []
    target_params = parameter_count(target)
    if not target_params:
        return None
    ratios = []
    for lm in draft_models:
        params = parameter_count(lm)
        if params is None:
            return None
        ratios.append(params / target_params)
    return ratios
