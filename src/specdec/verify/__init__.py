"""Verifiers: pure tensor functions that decide which drafted tokens the target keeps.

Every verifier has one signature (`base.Verifier`): a `TokenTree`, the target's processed
distributions at its nodes, a generator; it returns a `VerifyResult`. Each rule is exact only
with its matching draft sampler (docs/algorithms.md §3):

- `greedy.verify_greedy`: temperature 0, any proposal; equals AR greedy token for token.
- `chain.verify_speculative_sampling`: a chain whose drafts were drawn from `draft_probs`
  (Leviathan/Chen).
- `mss.verify_mss`: children drawn i.i.d. from their drafters' distributions (SpecInfer); on a
  chain it is classic speculative sampling, done by the chain kernel.
- `swor.verify_swor`: children drawn without replacement, in sampling order (Sequoia).
- `match.verify_sample_and_match`: deterministic children (top-k, best-first, n-gram copies).
"""
