"""The server's engine: one request at a time, every model call on one engine thread.

A `Job` is a validated request on its way through the engine; `Engine` queues jobs in arrival
order, runs each decoder step by step on its thread and, between two steps, releases text,
counts metrics and stops when the client is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.text import TextAssembler
from specdec.serving.errors import APIError
from specdec.serving.metrics import ServerMetrics, SpeculativeUsage

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One validated request on its way through the engine."""

    decoder: SpeculativeDecoder
    chunks: Iterator[list[int]]
    """`Pipeline.stream`'s token chunks; only ever advanced on the engine thread."""
    text: TextAssembler
    prompt_tokens: int
    usage: SpeculativeUsage
    arrival: float
    """time.perf_counter() when the request came in (latency and queue-time metrics start here)."""
    released: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    """Text as it is released; None once the job has finished (then `finish_reason` is set)."""
    finish_reason: str | None = None
    """stop | length | abort (client gone) | error."""
    error: BaseException | None = None
    client_gone: bool = False
    """Set by the answering side when it stops reading; the engine stops at its next step."""

    async def text_deltas(self) -> AsyncIterator[str]:
        """The released text until the job finishes; re-raises an engine error."""
        while (delta := await self.released.get()) is not None:
            yield delta
        if self.error is not None:
            raise self.error

    def usage_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.text.completion_tokens,
            "total_tokens": self.prompt_tokens + self.text.completion_tokens,
            "speculative": self.usage.to_dict(),
        }


class Engine:
    """One decoder at a time, every model call on one engine thread.

    Requests take turns through a FIFO lock (the target has one KV cache; batching several
    requests into one verification pass is not done yet). Each decoding step is a call on the
    single-thread executor; between steps the engine releases text, counts metrics and stops
    when the client has disconnected, so an abandoned request frees the engine after at most one
    more step.
    """

    def __init__(self, metrics: ServerMetrics, max_queue: int) -> None:
        self.metrics, self.max_queue = metrics, max_queue
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdec-engine")
        self._turn: asyncio.Lock | None = None  # created on the server's event loop
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
        self.waiting = 0
        """Requests submitted and not yet on the engine."""
        self.running = False

    async def prepare(self, build: Callable[[], Job]) -> Job:
        """Run `build` (validation, drafter construction) on the engine thread, between two steps of
        whatever runs: a method's drafter factory may touch the models, which only that thread uses."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, build)

    def submit(self, job: Job, client_disconnected: Callable[[], Awaitable[bool]]) -> None:
        """Queue the job (its text arrives on `job.released`); 503 when the queue is full."""
        if self.waiting >= self.max_queue:
            raise APIError(
                f"the server is busy: {self.waiting} requests are already waiting (--max-queue {self.max_queue}); "
                "retry later", status=503, code="server_overloaded", kind="server_error",
            )
        if self._turn is None:
            self._turn = asyncio.Lock()
        # Counted as waiting from now, not from when its task first runs, so that requests arriving
        # together all see each other.
        self.waiting += 1
        self.metrics.waiting.inc()
        task = asyncio.get_running_loop().create_task(self._serve(job, client_disconnected))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _serve(self, job: Job, client_disconnected: Callable[[], Awaitable[bool]]) -> None:
        assert self._turn is not None
        queued = True
        try:
            async with self._turn:
                self.waiting -= 1
                self.metrics.waiting.dec()
                queued = False
                self.metrics.queue_time.observe(time.perf_counter() - job.arrival)
                self.running = True
                try:
                    await self._run(job, client_disconnected)
                finally:
                    self.running = False
        except BaseException as exc:  # noqa: BLE001 - handed to the answering side, which reports it
            job.error, job.finish_reason = exc, "error"
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("request failed in the engine")
        finally:
            if queued:
                self.waiting -= 1
                self.metrics.waiting.dec()
            self.metrics.finished(job.finish_reason or "error").inc()
            job.released.put_nowait(None)

    async def _run(self, job: Job, client_disconnected: Callable[[], Awaitable[bool]]) -> None:
        m, loop = self.metrics, asyncio.get_running_loop()
        if job.client_gone or await client_disconnected():
            job.finish_reason = "abort"
            return
        m.running.inc()
        m.prompt_tokens.inc(job.prompt_tokens)
        counted = (0, 0, 0)  # (target_calls, draft_tokens, accepted_tokens) already in the metrics
        first = True
        try:
            while True:
                chunk = await loop.run_in_executor(self._thread, next, job.chunks, None)
                if chunk is None:
                    stats = job.decoder.last_stats
                    job.finish_reason = "length" if stats is not None and stats.stopped_by == "length" else "stop"
                    self._release(job, job.text.flush())
                    break
                if first:
                    m.time_to_first_token.observe(time.perf_counter() - job.arrival)
                    first = False
                stats = job.decoder.last_stats
                assert stats is not None  # set by the decoder's first step
                drafted, accepted = job.usage.count_step(counted, stats)
                counted = (stats.target_calls, stats.draft_tokens, stats.accepted_tokens)
                m.num_drafts.inc(drafted > 0)
                m.num_draft_tokens.inc(drafted)
                m.num_accepted_tokens.inc(accepted)
                for pos in range(accepted):
                    m.accepted_at(pos).inc()
                delta, hit_stop = job.text.push(chunk)
                self._release(job, delta)
                if hit_stop:
                    job.finish_reason = "stop"
                    break
                if job.client_gone or await client_disconnected():
                    job.finish_reason = "abort"
                    break
        finally:
            # Closing the decoder's generator must also happen on the engine thread, after any
            # step still running there (a cancelled await does not stop the step itself).
            self._thread.submit(job.chunks.close)
            m.running.dec()
            stats = job.decoder.last_stats
            if stats is not None:
                job.usage.tokens_per_call = stats.tokens_per_call
                job.usage.tokens_per_s = job.text.completion_tokens / stats.wall_s if stats.wall_s > 0 else 0.0
            m.generation_tokens.inc(job.text.completion_tokens)
            if job.finish_reason in ("stop", "length"):
                m.e2e_latency.observe(time.perf_counter() - job.arrival)
                m.tokens_per_s.observe(job.usage.tokens_per_s)

    @staticmethod
    def _release(job: Job, delta: str) -> None:
        if delta:
            job.released.put_nowait(delta)
