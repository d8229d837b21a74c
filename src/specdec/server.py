"""`specdec serve`: an OpenAI-compatible HTTP server over one speculative-decoding engine.

    specdec serve --target smollm2-135m-instruct --method pld --port 8000

Endpoints: POST /v1/completions and /v1/chat/completions (both with `stream: true` as server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health and
GET /metrics (Prometheus text, vLLM's `spec_decode_*` counter names).

How a request flows:
  handler (event loop)   validate the body (openai_protocol), tokenize, build the decoder and
                         check that prompt + max_tokens fit the context: every 400 is decided
                         here, before any model work and before a stream starts;
  Engine._serve (task)   wait for the engine (FIFO: one request at a time, the model has one KV
                         cache), then run the decoder step by step on the engine thread; between
                         two steps release text, count metrics and stop when the client is gone;
  handler / SSE stream   read the released text from the job's queue and answer.

Only the standard library and specdec are imported at module level, so `specdec --help` and
`import specdec.server` work without the `server` extra; FastAPI, uvicorn, pydantic and
prometheus_client are imported when an app is created.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations
# (the request models, imported inside _build_app) as objects, which string annotations hide.
import argparse
import asyncio
import importlib.util
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specdec.decoder import DecodeStats, SpeculativeDecoder
from specdec.pipeline import METHODS, Pipeline
from specdec.sampling import SamplingConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from specdec.openai_protocol import _GenerationRequest

log = logging.getLogger(__name__)

SERVER_EXTRA_HINT = "pip install 'specdec[server]'"
_SERVER_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def missing_server_dependencies() -> list[str]:
    """The pip names of the `server` extra's packages that are not installed."""
    return [pip for module, pip in _SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def _require_server_dependencies() -> None:
    missing = missing_server_dependencies()
    if missing:
        raise ImportError(f"the server needs {', '.join(missing)}, which is not installed: {SERVER_EXTRA_HINT}")


# ---- errors --------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# pydantic puts the member type of a union into an error's location ("prompt", "list[int]", 0);
# these are not field names and stay out of `param`.
_UNION_TAGS = {"str", "int", "float", "bool", "list[int]", "list[str]", "list[TextPart]", "dict[str,float]"}


def validation_error_to_api_error(errors: list[dict[str, Any]]) -> APIError:
    """The first of FastAPI's validation errors as an OpenAI-style 400 (OpenAI answers 400, not 422)."""
    if not errors:
        return APIError("invalid request")
    err = errors[0]
    loc = [part for part in err.get("loc", ()) if part != "body" and str(part).replace(" ", "") not in _UNION_TAGS]
    param = ".".join(str(p) for p in loc) or None
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(f"the request body is not valid JSON ({detail})" if detail else "the request body is not valid JSON")
    if kind == "extra_forbidden":
        return APIError(f"unsupported parameter {param!r}: this server does not implement it", param=param,
                        code="unsupported_parameter")
    if kind == "missing":
        if param is None:
            return APIError("the request body is missing: send a JSON object")
        return APIError(f"missing required parameter {param!r}", param=param, code="missing_required_parameter")
    if param is None:
        return APIError(f"the request body must be a JSON object ({msg})")
    return APIError(f"{param}: {msg}", param=param, code="invalid_value")


# ---- text ----------------------------------------------------------------------------------
class TextAssembler:
    """Turns committed token chunks into released text, cutting at the first stop string.

    Text is released only once it cannot change any more: a trailing U+FFFD (a multi-byte
    character whose bytes have not all arrived), a tail that could be the start of a stop string,
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
        """Everything not yet released (the generation ended without a stop string)."""
        return self._release(self.decode(self.ids))

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


# ---- metrics -------------------------------------------------------------------------------
class ServerMetrics:
    """Prometheus metrics on the app's own registry (several apps in one process never clash).

    The speculative counters carry vLLM's names (`spec_decode_num_drafts`, …; exposed with the
    `_total` suffix, as vLLM's are) so dashboards built for vLLM read them.
    """

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
    RATE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)

    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, by_model = self.registry, ["model_name"]

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, by_model, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, by_model, buckets=buckets, registry=reg).labels(model_name)

        self.num_drafts = counter("spec_decode_num_drafts", "Target calls that verified at least one drafted token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Drafted tokens scored by the target.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Drafted tokens the target accepted.")
        self._accepted_per_pos = Counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by draft position (tree depth for token trees), 0-based.",
            ["model_name", "position"], registry=reg,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests the engine ran.")
        self.generation_tokens = counter("generation_tokens", "Completion tokens returned (usage.completion_tokens).")
        self._finished = Counter(
            "request_success", "Finished requests by finish reason (stop, length, abort = client gone, error).",
            ["model_name", "finished_reason"], registry=reg,
        )
        self.e2e_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to last token, queueing included.", self.LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time waiting for the engine.", self.LATENCY_BUCKETS
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to the first committed tokens.", self.LATENCY_BUCKETS
        )
        self.tokens_per_s = histogram(
            "request_tokens_per_second", "Completion tokens per second of engine time, per finished request.",
            self.RATE_BUCKETS,
        )
        self.running = Gauge("num_requests_running", "Requests on the engine (0 or 1).", by_model, registry=reg).labels(model_name)
        self.waiting = Gauge("num_requests_waiting", "Requests queued for the engine.", by_model, registry=reg).labels(model_name)

    def accepted_at(self, position: int) -> Any:
        return self._accepted_per_pos.labels(self.model_name, str(position))

    def finished(self, reason: str) -> Any:
        return self._finished.labels(self.model_name, reason)


# ---- engine --------------------------------------------------------------------------------
@dataclass
class SpeculativeUsage:
    """What the engine did for one request, in the `usage.speculative` of its response."""

    method: str
    target_calls: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    tokens_per_call: float = 0.0
    tokens_per_s: float = 0.0

    def count_step(self, before: tuple[int, int, int], stats: DecodeStats) -> tuple[int, int]:
        """Add one decoding step (stats now vs `before`); (drafted, accepted) tokens of the step."""
        calls, drafted, accepted = (
            stats.target_calls - before[0], stats.draft_tokens - before[1], stats.accepted_tokens - before[2]
        )
        self.target_calls += calls
        self.num_drafts += drafted > 0
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        # Accepted drafts are a prefix of the chain (a root-to-node path of the tree), so a step
        # that accepted k tokens accepted positions 0 … k-1.
        while len(self.num_accepted_tokens_per_pos) < accepted:
            self.num_accepted_tokens_per_pos.append(0)
        for pos in range(accepted):
            self.num_accepted_tokens_per_pos[pos] += 1
        return drafted, accepted

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_calls": self.target_calls,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
            "acceptance_rate": self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0,
            "tokens_per_call": self.tokens_per_call,
            "tokens_per_s": self.tokens_per_s,
        }


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


# ---- the app -------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    """What a request gets when it does not say otherwise, and the server's limits."""

    default_method: str
    default_opts: dict[str, Any]
    model_name: str
    gamma: int = 4
    sampling: SamplingConfig = SamplingConfig()
    max_tokens: int = 128
    """max_tokens when a request leaves it out (cut to the room left in the context)."""
    seed: int | None = None
    max_tokens_limit: int | None = None
    """The most max_tokens a request may ask for (None: only the context bounds it)."""
    max_queue: int = 64
    method_option_names: frozenset[str] = frozenset()
    """Per-method option names a request's `speculative` field may set (besides method, gamma)."""


def _known_method_options() -> frozenset[str]:
    # The CLI's list of per-method option flags is the one registry of option names.
    from specdec.cli import METHOD_OPTION_ARGS

    # `offload` changes the loaded target for every later request: a server-level flag only.
    return frozenset(METHOD_OPTION_ARGS) - {"offload"}


def create_app(
    pipe: Pipeline,
    default_method: str = "sps",
    default_opts: dict[str, Any] | None = None,
    model_name: str = "specdec",
    *,
    gamma: int = 4,
    default_sampling: SamplingConfig = SamplingConfig(),
    default_max_tokens: int = 128,
    default_seed: int | None = None,
    max_tokens_limit: int | None = None,
    max_queue: int = 64,
) -> "FastAPI":
    """A FastAPI app serving `pipe`; run it with uvicorn (`specdec serve` does)."""
    _require_server_dependencies()
    if default_method not in METHODS:
        raise ValueError(f"unknown method {default_method!r}; choose one of: {', '.join(METHODS)}")
    if METHODS[default_method].needs_draft_model and pipe.draft_lm is None:
        raise ValueError(f"method {default_method!r} needs a draft model (--draft)")
    if pipe.tokenizer is None:
        raise ValueError("the server needs a pipeline with a tokenizer (it answers text)")
    for name, value in (("gamma", gamma), ("default max tokens", default_max_tokens), ("max queue", max_queue)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_tokens_limit is not None and max_tokens_limit < 1:
        raise ValueError(f"max tokens limit must be a positive integer, got {max_tokens_limit!r}")
    cfg = ServerConfig(
        default_method=default_method, default_opts=dict(default_opts or {}), model_name=model_name, gamma=gamma,
        sampling=default_sampling, max_tokens=default_max_tokens, seed=default_seed,
        max_tokens_limit=max_tokens_limit, max_queue=max_queue, method_option_names=_known_method_options(),
    )
    return _build_app(pipe, cfg)


def _build_app(pipe: Pipeline, cfg: ServerConfig) -> "FastAPI":
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from specdec.openai_protocol import ChatCompletionRequest, CompletionRequest

    metrics = ServerMetrics(cfg.model_name)
    engine = Engine(metrics, cfg.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="specdec", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error_to_api_error(list(exc.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Anything unexpected (an engine failure): still OpenAI's error shape, and logged.
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        err = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        err = APIError(str(exc.detail), status=exc.status_code, kind=kind)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": cfg.model_name, "running": int(engine.running), "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": created, "owned_by": "specdec",
            "max_model_len": pipe.target_lm.context_length,
            "default_method": cfg.default_method,
            "methods": [m for m, info in METHODS.items() if pipe.draft_lm is not None or not info.needs_draft_model],
        }]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        if isinstance(body.prompt, str):
            prompt_ids = pipe.encode(body.prompt, chat=False)
        else:
            prompt_ids = list(body.prompt)
            bad = [t for t in prompt_ids if not 0 <= t < pipe.target_lm.vocab_size]
            if bad:
                raise APIError(f"prompt: token id {bad[0]} is outside the vocabulary (0 … {pipe.target_lm.vocab_size - 1})",
                               param="prompt", code="invalid_value")
        job = await engine.prepare(lambda: _prepare(pipe, cfg, body, prompt_ids, "prompt", arrival))
        return await _answer(request, job, body, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        if not pipe.has_chat_template():
            raise APIError("the served model's tokenizer has no chat template: use /v1/completions with a raw prompt",
                           param="messages")
        try:
            rendered = pipe.tokenizer.apply_chat_template(
                body.template_messages(), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises its own errors (e.g. roles a template refuses)
            raise APIError(f"messages: the chat template refused them ({exc})", param="messages") from exc
        # The rendered template already holds the special tokens (as Pipeline.encode does for --chat).
        prompt_ids = pipe.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        job = await engine.prepare(lambda: _prepare(pipe, cfg, body, prompt_ids, "messages", arrival))
        return await _answer(request, job, body, chat=True)

    async def _answer(request: Request, job: Job, body: Any, chat: bool) -> JSONResponse | StreamingResponse:
        engine.submit(job, request.is_disconnected)
        answer_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(job, answer_id, chat, include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            text = "".join([delta async for delta in job.text_deltas()])
        finally:
            job.client_gone = True  # no-op when finished; stops the engine if this handler was cancelled
        choice: dict[str, Any] = {"index": 0, "finish_reason": job.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({
            "id": answer_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": cfg.model_name, "choices": [choice], "usage": job.usage_dict(),
        })

    async def _sse(job: Job, answer_id: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created_at = int(time.time())

        def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            payload: dict[str, Any] = {
                "id": answer_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created_at, "model": cfg.model_name, "choices": choices,
            }
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def choice(text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

        try:
            if chat:
                yield event([choice(None, None, role=True)])
            try:
                async for delta in job.text_deltas():
                    yield event([choice(delta, None)])
            except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
                err = APIError(f"generation failed: {type(exc).__name__}: {exc}", status=500, kind="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield event([choice(None if chat else "", job.finish_reason)])
            if include_usage:
                yield event([], job.usage_dict())
            yield "data: [DONE]\n\n"
        finally:
            # Cancelled (client gone) or done: either way the engine may stop this job now.
            job.client_gone = True

    return app


def _prepare(
    pipe: Pipeline, cfg: ServerConfig, body: "_GenerationRequest", prompt_ids: list[int], prompt_param: str,
    arrival: float,
) -> Job:
    """Check everything about a request that can be checked before running it, and build its job."""
    if body.model is not None and body.model != cfg.model_name:
        raise APIError(f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                       status=404, param="model", code="model_not_found")
    spec = body.speculative
    method = (spec.method if spec is not None else None) or cfg.default_method
    gamma = (spec.gamma if spec is not None else None) or cfg.gamma
    opts = dict(cfg.default_opts)
    if spec is not None:
        extra = spec.method_options()
        unknown = sorted(set(extra) - cfg.method_option_names)
        if unknown:
            known = ", ".join(["method", "gamma", *sorted(cfg.method_option_names)])
            raise APIError(f"speculative: unknown option {unknown[0]!r}; known: {known}",
                           param=f"speculative.{unknown[0]}", code="invalid_value")
        opts.update(extra)
    if not prompt_ids:
        raise APIError(f"{prompt_param}: the prompt is empty (it has no tokens)", param=prompt_param, code="invalid_value")

    base = cfg.sampling
    top_k = body.top_k if body.top_k is not None else base.top_k
    try:
        sampling = SamplingConfig(
            temperature=body.temperature if body.temperature is not None else base.temperature,
            top_k=max(top_k, 0),  # vLLM clients send -1 for "off"
            top_p=body.top_p if body.top_p is not None else base.top_p,
        )
    except ValueError as exc:
        raise APIError(str(exc), code="invalid_value") from exc
    try:
        # Built only to validate the method and its options and to size the context; the run
        # gets its own decoder from Pipeline.stream, seeded exactly as `specdec generate` seeds.
        probe = pipe.decoder(method, sampling, gamma, **opts)
    except (ValueError, TypeError) as exc:  # unknown method, missing draft, a drafter refusing its options
        raise APIError(f"speculative: {exc}", param="speculative", code="invalid_value") from exc

    context = probe.target.context_length
    try:
        room = context - probe.check_fits(len(prompt_ids), 1) + 1  # new tokens that fit beside the prompt
    except ValueError:
        raise APIError(
            f"{prompt_param}: the prompt has {len(prompt_ids)} tokens, which leaves no room for a completion in the "
            f"model's context of {context} tokens", param=prompt_param, code="context_length_exceeded",
        ) from None
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if requested is None:
        # Left out: the server's default, cut to what still fits the context.
        max_tokens = min(cfg.max_tokens, room, cfg.max_tokens_limit or room)
    elif cfg.max_tokens_limit is not None and requested > cfg.max_tokens_limit:
        raise APIError(f"max_tokens={requested} exceeds this server's limit of {cfg.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    elif requested > room:
        raise APIError(
            f"max_tokens={requested} does not fit: the prompt has {len(prompt_ids)} tokens and the model's context "
            f"{context}, which leaves room for {room}", param="max_tokens", code="context_length_exceeded",
        )
    else:
        max_tokens = requested
    seed = body.seed if body.seed is not None else cfg.seed
    decoder, chunks = pipe.stream(prompt_ids, method, max_tokens, sampling, gamma=gamma, seed=seed, **opts)
    text = TextAssembler(pipe.decode, body.stop or [], bool(getattr(pipe.tokenizer, "clean_up_tokenization_spaces", False)))
    return Job(decoder, chunks, text, len(prompt_ids), SpeculativeUsage(method), arrival)


# ---- command line --------------------------------------------------------------------------
def add_serve_parser(
    sub: Any,
    add_model_args: Callable[[argparse.ArgumentParser], None],
    add_decode_args: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    """Register `specdec serve` on the CLI's subparsers (model and decode flags are the CLI's own)."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (completions, chat, streaming, Prometheus metrics)",
        description="Serve the target with speculative decoding over an OpenAI-compatible API: POST /v1/completions, "
        "POST /v1/chat/completions (stream: true for server-sent events), GET /v1/models, GET /health, "
        "GET /metrics. The decoding flags (--method, --gamma, --max-new-tokens, --temperature, --top-p, --top-k, "
        "--seed and the method options) are the defaults for requests that leave them out; a request may pick "
        "another method with {\"speculative\": {\"method\": ...}}. Requests are served one at a time, in "
        f"arrival order. Needs the server extra: {SERVER_EXTRA_HINT}.",
    )
    add_model_args(p)
    add_decode_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists (default: --target)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="refuse requests asking for more than this many new tokens (default: only the context bounds it)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the engine; more are answered 503 (default 64)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    missing = missing_server_dependencies()
    if missing:
        # cli.main prints ValueErrors as a one-line error with exit status 2.
        raise ValueError(f"specdec serve needs {', '.join(missing)}, which is not installed: {SERVER_EXTRA_HINT}")
    from specdec.cli import _load, _method_opts, _sampling

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0 … 65535, got {args.port}")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    sampling = _sampling(args)
    # A --draft given with a draft-free default method is still loaded: requests may switch to sps.
    pipe = _load(args, METHODS[args.method].needs_draft_model or args.draft is not None)
    app = create_app(
        pipe, args.method, _method_opts(args), args.model_name or args.target, gamma=args.gamma,
        default_sampling=sampling, default_max_tokens=args.max_new_tokens, default_seed=args.seed,
        max_tokens_limit=args.max_tokens_limit, max_queue=args.max_queue,
    )
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
