"""Which exact rule verifies a proposal, from how it was drafted."""

from __future__ import annotations

from specdec.core.sampling import SamplingConfig
from specdec.verify.base import Verifier
from specdec.verify.greedy import verify_greedy
from specdec.verify.match import verify_sample_and_match
from specdec.verify.mss import verify_mss


def default_verifier(sampling: SamplingConfig, has_draft_probs: bool) -> Verifier:
    """Greedy at T = 0; MSS (classic speculative sampling on a chain) for drafts drawn from their
    reported distributions; sample-and-match for deterministic proposals."""
    if sampling.greedy:
        return verify_greedy
    return verify_mss if has_draft_probs else verify_sample_and_match
