"""What bounds a request: the server's caps (`ServerLimits`, checked here, once), and what a request
passes before any route sees it (the API key, then the body-size limit).

The two gates are plain ASGI middlewares (nothing to import beyond the standard library) that
answer in OpenAI's error shape. The body limit reads the body itself, up to the limit, before the
app gets it: a larger body is answered 413 without ever being parsed or tokenized.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_DRAFT_TOKENS = 64
"""Most tokens a request may have drafted per step (`--max-draft-tokens`): room for every method's
defaults (sps 4, specinfer 20, specexec 32, sequoia 16, csd 15 with one draft model), and small
enough that the work before the first token (Sequoia's DP, a tree pass) stays short."""
DEFAULT_MAX_TOKENS_LIMIT = 4096
"""Most new tokens a request may ask for (`--max-tokens-limit`); the context may bound it further."""
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body (`--max-body-bytes`): a 128k-token context of JSON text fits several times."""

DEFAULT_MAX_QUEUE = 64
"""Requests that may wait for the engine (`--max-queue`); more are answered 503."""
BODY_TIMEOUT_S = 30.0
"""Longest wait for a request's whole body (`--body-timeout`): a client that stalls mid-body (or
trickles it) gets a 408 rather than holding a connection and its buffer open."""


@dataclass(frozen=True)
class ServerLimits:
    """The caps on what one request may cost and on how many may wait, checked once, here (named
    by their command-line flags: `specdec serve` builds this before any model loads)."""

    max_tokens_limit: int | None = DEFAULT_MAX_TOKENS_LIMIT
    """The most max_tokens a request may ask for (None: only the context bounds it)."""
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS
    """The most tokens a request's method and options may draft per step (checked before building)."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_queue: int = DEFAULT_MAX_QUEUE
    body_timeout_s: float = BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        timeout = self.body_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"--body-timeout must be a positive number of seconds, got {timeout!r}")
        for flag, value in (("--max-tokens-limit", self.max_tokens_limit),
                            ("--max-draft-tokens", self.max_draft_tokens),
                            ("--max-body-bytes", self.max_body_bytes), ("--max-queue", self.max_queue)):
            if value is None and flag == "--max-tokens-limit":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")


DRAIN_BYTES = 1 << 30
"""A body over the limit is still read, and thrown away, up to this many bytes (and for at most
`BODY_TIMEOUT_S`), so that the client, which is still sending, reads the 413 instead of a reset
connection; past that the server answers and closes the connection. A declared length over this is
answered at once."""


async def send_error(send: Send, status: int, message: str, code: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """An OpenAI-style error answer, straight on the ASGI channel."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    # Rendered as Starlette's JSONResponse renders the app's other errors, byte for byte alike.
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}},
                      ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers,
    ]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a 413, before the app reads them.

    The body is gathered here (at most `max_bytes` of it) and handed on whole; later receives
    (the app asking whether the client is still there) go to the server as before.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"content-length", b"")
        declared = int(header) if header.isdigit() else None
        if declared is not None and declared > DRAIN_BYTES:  # never drained: answer now
            await self._too_large(send, declared)
            return
        body, received = bytearray(), [0]  # the count outlives a `_gather` cut off by the timeout
        try:
            complete = await asyncio.wait_for(self._gather(receive, body, received), self.timeout_s)
        except asyncio.TimeoutError:
            if max(declared or 0, received[0]) > self.max_bytes:
                await self._too_large(send, declared)
            else:
                await send_error(send, 408, f"the request body did not arrive within {self.timeout_s:g} s",
                                 "request_timeout", [(b"connection", b"close")])
            return
        if not complete:
            return  # the client left before sending its whole body: nobody to answer
        if max(declared or 0, received[0]) > self.max_bytes:
            await self._too_large(send, declared)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _gather(self, receive: Receive, body: bytearray, received: list[int]) -> bool:
        """Read the body into `body` (its first `max_bytes`), counting every byte in `received[0]`;
        False when the client left before the end."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            received[0] += len(chunk)
            if received[0] <= self.max_bytes:
                body += chunk
            if not message.get("more_body", False) or received[0] > DRAIN_BYTES:
                return True

    async def _too_large(self, send: Send, declared: int | None) -> None:
        size = f"has {declared} bytes, more" if declared is not None else "is larger"
        await send_error(send, 413, f"the request body {size} than this server's limit of {self.max_bytes} bytes "
                         "(--max-body-bytes)", "request_too_large", [(b"connection", b"close")])

OPEN_PATHS = ("/health", "/metrics")
"""What answers without the API key: load balancers and Prometheus call these."""


class BearerAuth:
    """Require `Authorization: Bearer <api_key>` on every route but `OPEN_PATHS` (the API, and its
    /docs and /openapi.json too). The scheme is case-insensitive (RFC 7235: `bearer KEY` is the
    same credential); the key is not."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...] = OPEN_PATHS) -> None:
        if not api_key:
            raise ValueError("the API key must not be empty")
        self.app, self.open_paths = app, open_paths
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.strip().partition(b" ")
            # Constant-time comparison: the time taken says nothing about how much of the key matched.
            ok = hmac.compare_digest(token.strip(), self._expected) and scheme.lower() == b"bearer"
            if not ok:
                message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not given
                           else "incorrect API key")
                await send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)
