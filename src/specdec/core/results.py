"""What a verification step decides, in the vocabulary every layer shares.

Of the drafted tokens, the verified path from the root is *accepted*; then exactly one more token
comes from the target: the *recovered* token after a rejection (drawn from the residual), or the
*bonus* token when the walk reached a node with no further candidate. Output tokens = accepted +
one recovered-or-bonus token, so each target call emits at least one (docs/algorithms.md §0).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VerifyResult:
    accepted_nodes: tuple[int, ...]
    """Tree nodes (>= 1; node 0 is the root) on the accepted path, the root's child first."""
    next_token: int
    """The recovered token (after a rejection) or the bonus token."""

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)

    def kept_nodes(self) -> list[int]:
        """The nodes whose K/V the target keeps: the root, then the accepted path."""
        return [0, *self.accepted_nodes]
