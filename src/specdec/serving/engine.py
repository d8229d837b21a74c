"""The server's engine: continuous batching (`engine.batch.BatchEngine`), every model call on one
engine thread.

A `Job` is a validated request on its way through the engine. `Engine` hands jobs to the batch
engine and runs its steps back to back on the engine thread while any job is left; between two
steps, on the event loop, it releases each job's text, counts metrics, and turns disconnected
clients and completed stop strings into aborts, so a request that ends frees its rows before the
next step. Requests beyond the batch (`--max-batch-size`) or the KV budget wait in the batch
engine's queue; beyond `--max-queue` waiting requests the server answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from specdec.engine.batch import BatchEngine, BatchRequest, StepEvent, StepInfo
from specdec.engine.stats import DecodeStats
from specdec.engine.text import TextAssembler
from specdec.serving.batch_metrics import BatchMetrics
from specdec.serving.errors import APIError
from specdec.serving.metrics import ServerMetrics, speculative_usage

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
"""How often a non-streamed request checks whether its client is still there."""


@dataclass
class Job:
    """One validated request on its way through the engine."""

    request: BatchRequest
    text: TextAssembler
    prompt_tokens: int
    arrival: float
    """time.perf_counter() when the request came in (latency and queue-time metrics start here)."""
    released: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    """Text as it is released; None once the job has finished (then `finish_reason` is set)."""
    finish_reason: str | None = None
    """stop | length | abort (client gone) | error."""
    error: BaseException | None = None
    client_gone: bool = False
    """Set by the answering side when it stops reading; the engine aborts the job before its next step."""
    request_id: int | None = None
    """The batch engine's id, once submitted."""
    counted: DecodeStats = field(default_factory=DecodeStats)
    """The request's statistics as the metrics last counted them."""
    started: bool = False
    """Admitted by the batch engine (its queue time is counted)."""
    stats: DecodeStats | None = None
    """The request's decoding statistics, as of its last step."""
    cached_tokens: int = 0
    """Prompt tokens whose K/V the prefix cache supplied."""

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
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "speculative": speculative_usage(self.request.method, self.stats, self.text.completion_tokens),
        }


class Engine:
    """Continuous batching behind the HTTP handlers: one driver task, steps on one engine thread."""

    def __init__(self, batch: BatchEngine, metrics: ServerMetrics, max_queue: int) -> None:
        self.batch, self.metrics, self.max_queue = batch, metrics, max_queue
        self.batch_metrics = BatchMetrics(metrics)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdec-engine")
        self._new: list[Job] = []  # submitted, not yet handed to the batch engine
        self._jobs: dict[int, Job] = {}  # handed over, by request id
        self._wake: asyncio.Event | None = None  # created on the server's event loop
        self._driver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # asyncio keeps only weak references to tasks
        self.running = 0
        """Requests the batch engine is decoding (or filling), as of the last step."""

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet running."""
        return len(self._new) + sum(not job.started for job in self._jobs.values())

    async def prepare(self, build: Callable[[BatchEngine], Job]) -> Job:
        """Run `build` (a request's validation against the batch engine: its drafter's size, the
        context, the KV budget) on the engine thread, between two steps."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, build, self.batch)

    def submit(self, job: Job, client_disconnected: Callable[[], Awaitable[bool]] | None = None) -> None:
        """Queue the job (its text arrives on `job.released`); 503 when the queue is full.

        client_disconnected: polled while the job runs (non-streamed answers; a streamed answer
        notices a gone client itself and sets `job.client_gone`).
        """
        if self.waiting >= self.max_queue:
            raise APIError(
                f"the server is busy: {self.waiting} requests are already waiting (--max-queue {self.max_queue}); "
                "retry later", status=503, code="server_overloaded", kind="server_error",
            )
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        self._new.append(job)
        self.metrics.waiting.set(self.waiting)
        self._wake.set()
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        if client_disconnected is not None:
            self._spawn(self._watch(job, client_disconnected))

    def shutdown(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, job: Job, client_disconnected: Callable[[], Awaitable[bool]]) -> None:
        while job.finish_reason is None and not job.client_gone:
            if await client_disconnected():
                job.client_gone = True
                self._wake_up()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # ---- the driver ------------------------------------------------------------------------------
    async def _drive(self) -> None:
        """Step while there is work; sleep until a job arrives otherwise."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._drop_gone_clients()
            if not self._new and not self._jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            new, self._new = self._new, []
            try:
                submitted, events = await loop.run_in_executor(self._thread, self._step, new)
            except Exception as exc:  # noqa: BLE001 - the engine itself failed: every job fails
                log.exception("the batch engine failed")
                for job in [*new, *self._jobs.values()]:
                    self._finish(job, "error", exc)
                self._jobs.clear()
                continue
            for job, rid, error in submitted:
                if error is not None:
                    self._finish(job, "error", error)
                else:
                    job.request_id = rid
                    self._jobs[rid] = job
            info = self.batch.last_step
            self._count_step(info)
            for event in events:
                self._dispatch(event)
            if self._jobs and not self.batch.has_work():  # never expected: fail them rather than spin
                lost = RuntimeError("the batch engine dropped the request")
                for job in list(self._jobs.values()):
                    self._finish(job, "error", lost)

    def _step(self, new: list[Job]) -> tuple[list[tuple[Job, int | None, BaseException | None]], list[StepEvent]]:
        """On the engine thread: hand over new jobs, abort gone ones, run one step."""
        submitted: list[tuple[Job, int | None, BaseException | None]] = []
        for job in new:
            try:
                submitted.append((job, self.batch.submit(job.request), None))
            except Exception as exc:  # noqa: BLE001 - reported on that job only
                submitted.append((job, None, exc))
        for job, rid, _ in submitted:
            if rid is not None and job.client_gone:
                self.batch.abort(rid)
        events = self.batch.step() if self.batch.has_work() else []
        return submitted, events

    def _drop_gone_clients(self) -> None:
        for job in [j for j in self._new if j.client_gone]:
            self._new.remove(job)
            self._finish(job, "abort")
        for rid, job in self._jobs.items():
            if job.client_gone:
                self.batch.abort(rid)  # applied at the start of the next step

    def _count_step(self, info: StepInfo) -> None:
        m = self.metrics
        started = [job for job in self._jobs.values() if not job.started and job.request_id in info.admitted]
        for job in started:
            job.started = True
            m.queue_time.observe(time.perf_counter() - job.arrival)
            m.prompt_tokens.inc(job.prompt_tokens)
        self.running = self.batch.num_running  # after the step: finished requests have left
        m.running.set(self.running)
        m.waiting.set(self.waiting)
        self.batch_metrics.step(info, self.batch)

    def _dispatch(self, event: StepEvent) -> None:
        job = self._jobs.get(event.request_id)
        if job is None or job.finish_reason is not None:
            return
        m = self.metrics
        stats = event.stats
        if stats is not None:
            job.stats = stats
        job.cached_tokens = max(job.cached_tokens, event.cached_tokens)
        if stats is not None and stats.target_calls > job.counted.target_calls:
            m.count_steps(job.counted, stats)
            job.counted = replace(stats)
        if event.tokens:
            if not job.text.ids:
                m.time_to_first_token.observe(time.perf_counter() - job.arrival)
            delta, hit_stop = job.text.push(event.tokens)
            self._release(job, delta)
            if hit_stop:
                self.batch.abort(event.request_id)
                self._finish(job, "stop")
                return
        if event.finished:
            reason = {"eos": "stop", "length": "length", "abort": "abort", "error": "error"}[event.finished]
            if reason in ("stop", "length"):
                self._release(job, job.text.flush())
            self._finish(job, reason, event.error)

    def _finish(self, job: Job, reason: str, error: BaseException | None = None) -> None:
        if job.finish_reason is not None:
            return
        m = self.metrics
        job.finish_reason, job.error = reason, error
        if error is not None:
            log.error("request failed in the engine: %s: %s", type(error).__name__, error)
        if job.request_id is not None:
            self._jobs.pop(job.request_id, None)
        m.generation_tokens.inc(job.text.completion_tokens)
        if reason in ("stop", "length"):
            m.e2e_latency.observe(time.perf_counter() - job.arrival)
            m.tokens_per_s.observe(job.usage_dict()["speculative"]["tokens_per_s"])
        m.finished(reason).inc()
        m.waiting.set(self.waiting)
        job.released.put_nowait(None)

    @staticmethod
    def _release(job: Job, delta: str) -> None:
        if delta:
            job.released.put_nowait(delta)
