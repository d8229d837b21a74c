"""Incremental detokenization: committed token chunks in, text that can no longer change out.

Shared by the command line's streaming output and the server's streamed and non-streamed answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class TextAssembler:
    """Turns committed token chunks into released text, cutting at the first stop string.

    Text is released only once it cannot change any more: a trailing U+FFFD (a multi-byte
    character whose bytes have not all arrived, never released), a tail that could be the start of a stop string,
    and, for tokenizers that clean up spaces, a tail that the clean-up could still rewrite are
    held back. A streamed answer is the concatenation of the releases and a non-streamed one their
    sum, so the two are the same text by construction.
    """

    # What `clean_up_tokenization_spaces` rewrites (transformers' clean_up_tokenization): each
    # pattern's leading space disappears once the rest of it arrives.
    CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], cleans_up_spaces: bool = False) -> None:
        self.decode, self.stops = decode, list(stops)
        self._held_patterns = self.stops + list(self.CLEANUP_PATTERNS if cleans_up_spaces else ())
        self.ids: list[int] = []
        self.released = ""
        self.completion_tokens = 0
        """Tokens the completion counts: all of them, or up to the one that completed a stop string."""

    def push(self, chunk: list[int]) -> tuple[str, bool]:
        """(newly released text, whether a stop string ended the completion)."""
        start = len(self.ids)
        self.ids.extend(chunk)
        text = self.decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.completion_tokens = self._tokens_through_stop(start)
            return self._release(text[:cut]), True
        self.completion_tokens = len(self.ids)
        stable = len(text.rstrip("\ufffd"))
        stable -= self._held_tail_len(text[:stable])
        return self._release(text[:stable]), False

    def flush(self) -> str:
        """Everything not yet released (the generation ended without a stop string), but the bytes of
        a last character that never completed: a generation cut by its length can end inside a
        multi-byte character, and half a character is no text (it would show as U+FFFD)."""
        return self._release(self.decode(self.ids).rstrip("\ufffd"))

    def _release(self, text: str) -> str:
        # With the tail held back as above, decoding more tokens only appends text, so what was
        # released is a prefix of `text`.
        if not text.startswith(self.released):
            log.warning("detokenized text changed before the released part; releasing only what follows it")
        delta = text[len(self.released):]
        self.released += delta
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_tail_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string (or clean-up pattern)."""
        best = 0
        for pattern in self._held_patterns:
            for k in range(min(len(pattern) - 1, len(text)), best, -1):
                if text.endswith(pattern[:k]):
                    best = k
                    break
        return best

    def _tokens_through_stop(self, start: int) -> int:
        # The stop string completed inside the last chunk (earlier releases had none).
        for n in range(start + 1, len(self.ids) + 1):
            if self._first_stop(self.decode(self.ids[:n])) is not None:
                return n
        return len(self.ids)
