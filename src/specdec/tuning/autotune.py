"""`auto`'s first use on a new machine or model pair: the quick tune of a loaded pipeline, saved
under its key. Importing this module registers it as the pipeline's tuner; `engine.pipeline`
imports it (by name, `TUNER_ENTRY`) the first time a tuner is asked for.

A tune writes a marker next to its profile while it runs and removes it when it finishes, so a
tune that was interrupted is reported (and run again) at the next use.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from specdec.core.sampling import SamplingConfig
from specdec.core.store import begin_tune, end_tune, save_profile
from specdec.engine.pipeline import register_tuner
from specdec.tuning.choice import TUNE_PROMPTS
from specdec.tuning.quick import QuickSettings, quick_tune, summary_line

if TYPE_CHECKING:
    from specdec.engine.pipeline import Pipeline


def cached_bigram(pipe: "Pipeline") -> list[int] | None:
    """Max-Gram's fill table when one is already cached for the target's tokenizer (never built here:
    building takes a while; without it Max-Gram candidates copy from the context only)."""
    if pipe.tokenizer is None:
        return None
    from specdec.drafting.bigram import table_for_tokenizer, table_path

    try:
        if not table_path(pipe.tokenizer).exists():
            return None
        return table_for_tokenizer(pipe.tokenizer, pipe.target_lm.vocab_size).next_token.tolist()
    except (OSError, ValueError):
        return None


def tune_prompts(pipe: "Pipeline", texts: list[str] | None = None) -> list[list[int]]:
    """The prompts' token ids, as chat messages when the target has a chat template."""
    texts = list(texts or TUNE_PROMPTS)
    if pipe.tokenizer is None:  # models built by hand: deterministic stand-in prompts
        vocab = pipe.target_lm.vocab_size
        return [[(7 * i + 3 * j + 1) % vocab for j in range(12)] for i in range(len(texts))]
    return [pipe.encode(t) for t in texts]


DEFAULT_SETTINGS = QuickSettings()
"""What auto's first use measures (tests put smaller settings here)."""


def tune_pipeline(
    pipe: "Pipeline",
    sampling: SamplingConfig,
    reason: str = "",
    *,
    settings: QuickSettings | None = None,
    prompts: list[list[int]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quick-tune `pipe` for `sampling`'s mode, save the profile and print one line on what won."""
    settings = settings or DEFAULT_SETTINGS
    key = pipe.profile_key(sampling)
    if key is None:
        raise ValueError("auto is tuned for one draft model at a time; give a single --draft (or a --method)")
    if reason:
        print(f"auto: {reason.split('; run `')[0]}; tuning this machine for it (once) …", file=sys.stderr)
    begin_tune(key)  # left behind by an interruption (Ctrl-C, a kill): noticed at the next use
    try:
        profile = quick_tune(pipe.target_lm, pipe.draft_lm, prompts or tune_prompts(pipe), sampling, key,
                             settings=settings, eos_token_ids=pipe.eos_token_ids, tokenizer=pipe.tokenizer,
                             bigram=cached_bigram(pipe),
                             progress=progress)
        path = save_profile(profile)
    except Exception:
        end_tune(key)  # a failure, not an interruption: reported as it is
        raise
    end_tune(key)
    print(summary_line(profile) + f" — saved {path}", file=sys.stderr)
    return profile


register_tuner(tune_pipeline)
