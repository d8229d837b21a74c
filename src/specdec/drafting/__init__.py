"""Drafting: the `Drafter` protocol, the bookkeeping every model drafter shares (`DraftModel`),
model-free proposals (prompt lookup, Max-Gram and its bigram table), and Sequoia's tree DP."""
