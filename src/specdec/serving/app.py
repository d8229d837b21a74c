"""`specdec serve`'s FastAPI app: the routes, the server's defaults and limits (`ServerConfig`),
and the preparation of a request into an engine job.

    specdec serve --target smollm2-135m-instruct --method pld --port 8000

Endpoints: POST /v1/completions and /v1/chat/completions (both with `stream: true` as server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health and
GET /metrics (Prometheus text, vLLM's `vllm:` metric names).

How a request flows:
  guards (ASGI)          the API key (when one is set), then the body-size limit: a larger body is
                         answered 413 before anything parses it (`serving.guards`);
  handler (event loop)   validate the body (`serving.protocol`); tokenize on a worker thread (a
                         long prompt never holds up the event loop); check the request's cost
                         (drafted tokens per step, max_tokens) against the server's caps, then
                         build the decoder and check that prompt + max_tokens fit the context:
                         every 400 is decided here, before any model work and before a stream starts;
  Engine (driver task)   hand the job to the continuous-batching engine (`engine.batch`), which
                         decodes up to --max-batch-size requests together on the engine thread;
                         between two steps release text, count metrics and abort jobs whose
                         client is gone or whose stop string appeared;
  handler / SSE stream   read the released text from the job's queue and answer.

Only the standard library and specdec are imported at module level, so `import specdec.serving.app`
works without the `server` extra; FastAPI, uvicorn, pydantic and prometheus_client are imported
when an app is created.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations
# (the request models, imported inside _build_app) as objects, which string annotations hide.
import importlib.util
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from specdec.core.options import OptionSpec, check_positive_int
from specdec.core.sampling import SamplingConfig
from specdec.core.store import profile_modes
from specdec.engine.batch import (
    DEFAULT_MAX_BATCH_SIZE, DEFAULT_PREFILL_CHUNK, DEFAULT_SPEC_DISABLE_BATCH_SIZE, BatchRequest,
)
from specdec.engine.build import SIZE_OPTIONS, describe_options
from specdec.engine.pipeline import Pipeline, check_text
from specdec.engine.text import TextAssembler
from specdec.methods import DEFAULT_METHOD
from specdec.methods.registry import all_methods, get_method
from specdec.serving import SERVER_EXTRA_HINT
from specdec.serving.engine import Engine, Job
from specdec.serving.guards import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DRAFT_TOKENS, DEFAULT_MAX_TOKENS_LIMIT
from specdec.serving.errors import APIError, validation_error_to_api_error
from specdec.serving.metrics import ServerMetrics, SpeculativeUsage

if TYPE_CHECKING:
    from fastapi import FastAPI

    from specdec.serving.protocol import GenerationRequest, SpeculativeOptions

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 1.0
"""What a request that leaves `temperature` out samples at: OpenAI's default."""
_SERVER_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def missing_server_dependencies() -> list[str]:
    """The pip names of the `server` extra's packages that are not installed."""
    return [pip for module, pip in _SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def _require_server_dependencies() -> None:
    missing = missing_server_dependencies()
    if missing:
        raise ImportError(f"the server needs {', '.join(missing)}, which is not installed: {SERVER_EXTRA_HINT}")


@dataclass
class ServerConfig:
    """What a request gets when it does not say otherwise, and the server's limits."""

    default_method: str
    default_opts: dict[str, Any]
    """Method options (as `Method.make_options` takes them); a request gets those its method has."""
    model_name: str
    gamma: int | None = None
    """The `gamma` option of methods that have one (sps, pld, maxgram) when a request leaves it out;
    None: each method's own default."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=DEFAULT_TEMPERATURE))
    """temperature, top_p and top_k for requests that leave them out (a request's own values win)."""
    max_tokens: int = 128
    """max_tokens when a request leaves it out (cut to the room left in the context and to the limit)."""
    seed: int | None = None
    max_tokens_limit: int | None = DEFAULT_MAX_TOKENS_LIMIT
    """The most max_tokens a request may ask for (None: only the context bounds it)."""
    max_queue: int = 64
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS
    """The most tokens a request's method and options may draft per step (checked before building)."""
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    """Requests decoded together (continuous batching); more wait in the queue."""
    max_kv_tokens: int | None = None
    """The target's K/V slots the running requests may reserve (None: no budget beyond the batch)."""
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    """Prompt tokens filled per engine step, so a long prompt does not stall the others."""
    spec_disable_batch_size: int | None = DEFAULT_SPEC_DISABLE_BATCH_SIZE
    """Above this many running requests, steps draft nothing (None: never)."""

    def options_for(self, method: str) -> dict[str, Any]:
        return default_options_for(method, self.default_opts, self.gamma)


def default_options_for(method: str, default_opts: dict[str, Any], gamma: int | None = None) -> dict[str, Any]:
    """The server's default options that `method` has: a default set for one method never reaches
    another that lacks it (`--max-ngram` does not break a request for sps)."""
    names = get_method(method).options.names()
    opts = {name: value for name, value in default_opts.items() if name in names}
    if gamma is not None and "gamma" in names:
        opts["gamma"] = gamma
    return opts


def create_app(
    pipe: Pipeline,
    default_method: str = DEFAULT_METHOD,
    default_opts: dict[str, Any] | None = None,
    model_name: str = "specdec",
    *,
    gamma: int | None = None,
    default_sampling: SamplingConfig = SamplingConfig(temperature=DEFAULT_TEMPERATURE),
    default_max_tokens: int = 128,
    default_seed: int | None = None,
    max_tokens_limit: int | None = DEFAULT_MAX_TOKENS_LIMIT,
    max_queue: int = 64,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_kv_tokens: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    spec_disable_batch_size: int | None = DEFAULT_SPEC_DISABLE_BATCH_SIZE,
) -> "FastAPI":
    """A FastAPI app serving `pipe`; run it with uvicorn (`specdec serve` does).

    default_opts: method options for requests that leave them out, each applied to the methods
        that have it; every name must be an option of some method, and the default method must
        accept its share. They may name files (`tree=PROFILE.json`); requests may not.
    gamma: the draft length of methods with a `gamma` option when a request leaves it out (None:
        their default); a request's own `speculative.gamma` means what `specdec generate --gamma` does.
    default_sampling: what requests that leave temperature, top_p or top_k out get (default:
        OpenAI's temperature 1.0; SamplingConfig() makes them greedy).
    max_tokens_limit, max_draft_tokens, max_body_bytes: the caps on what one request may cost
        (None for max_tokens_limit: the context only); a request over one gets a 400 (413 for the
        body) naming it.
    api_key: when given, /v1/… requests need `Authorization: Bearer <api_key>` (401 otherwise).
    max_batch_size, max_kv_tokens, prefill_chunk, spec_disable_batch_size: the continuous-batching
        engine's limits (`engine.batch.BatchEngine`).
    """
    _require_server_dependencies()
    method = get_method(default_method)  # ValueError: unknown method
    if method.needs_draft_model and pipe.draft_lm is None:
        raise ValueError(f"method {default_method!r} needs a draft model (--draft)")
    if pipe.tokenizer is None:
        raise ValueError("the server needs a pipeline with a tokenizer (it answers text)")
    if gamma is not None:
        check_positive_int("gamma", gamma)
    for name, value in (("default max tokens", default_max_tokens), ("max queue", max_queue),
                        ("max draft tokens", max_draft_tokens), ("max body bytes", max_body_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_tokens_limit is not None and max_tokens_limit < 1:
        raise ValueError(f"max tokens limit must be a positive integer, got {max_tokens_limit!r}")
    if api_key is not None and not api_key:
        raise ValueError("the API key must not be empty")
    cfg = ServerConfig(
        default_method=default_method, default_opts=dict(default_opts or {}), model_name=model_name, gamma=gamma,
        sampling=default_sampling, max_tokens=default_max_tokens, seed=default_seed,
        max_tokens_limit=max_tokens_limit, max_queue=max_queue, max_draft_tokens=max_draft_tokens,
        max_batch_size=max_batch_size, max_kv_tokens=max_kv_tokens, prefill_chunk=prefill_chunk,
        spec_disable_batch_size=spec_disable_batch_size,
    )
    check_default_options(default_method, cfg.default_opts, gamma)
    check_default_cost(cfg, len(pipe.draft_lms))
    app = _build_app(pipe, cfg)
    # Added innermost first: the key is checked before the body is read.
    from specdec.serving.guards import BearerAuth, BodyLimit

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    return app


def check_default_cost(cfg: ServerConfig, num_drafts: int) -> None:
    """ValueError when the server's own default method and options draft more per step than its
    cap allows: every request that leaves them out would be refused."""
    options = get_method(cfg.default_method).make_options(cfg.options_for(cfg.default_method))
    drafted = options.draft_tokens_per_step(num_drafts)
    if drafted is not None and drafted > cfg.max_draft_tokens:
        raise ValueError(
            f"the default method {cfg.default_method} ({describe_options(options, SIZE_OPTIONS)}) drafts up to "
            f"{drafted} tokens per step, more than the max draft tokens ({cfg.max_draft_tokens}); raise it "
            "(--max-draft-tokens) or ask for fewer"
        )


def check_default_options(default_method: str, default_opts: dict[str, Any], gamma: int | None = None) -> None:
    """ValueError unless the server's default options can serve: every one is an option of some
    method whose parser takes its value, and the default method takes its share as a whole.

    Checked once, at start, so that a mistyped default is not a 400 on every request; a value
    only some methods take (`tree=dp`: sequoia, not auto) is left to the requests that pick one.
    """
    declared: dict[str, list[OptionSpec]] = {}
    for m in all_methods().values():
        for spec in m.options.specs():
            declared.setdefault(spec.name, []).append(spec)
    for name, value in default_opts.items():
        if name not in declared:
            raise ValueError(f"{name!r} is not an option of any method")
        if value is None:
            continue
        problems = []
        for spec in declared[name]:
            try:
                if spec.parse is not None:
                    spec.parse(value)
                break
            except (TypeError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
        else:
            raise ValueError(problems[0])
    get_method(default_method).make_options(default_options_for(default_method, default_opts, gamma))


def _build_app(pipe: Pipeline, cfg: ServerConfig) -> "FastAPI":
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from specdec.serving.protocol import ChatCompletionRequest, CompletionRequest

    metrics = ServerMetrics(cfg.model_name)
    batch = pipe.batch_engine(max_batch_size=cfg.max_batch_size, max_kv_tokens=cfg.max_kv_tokens,
                              prefill_chunk=cfg.prefill_chunk, spec_disable_batch_size=cfg.spec_disable_batch_size)
    engine = Engine(batch, metrics, cfg.max_queue)
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
        return {"status": "ok", "model": cfg.model_name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        # `auto` needs a tune profile for this pipeline: listed (with the decoding modes
        # the profiles cover) only when one exists, looked up now, as tune may run meanwhile.
        tuned = await run_in_threadpool(tuned_modes, pipe)
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": created, "owned_by": "specdec",
            "max_model_len": pipe.target_lm.context_length,
            "default_method": cfg.default_method,
            "methods": [name for name, m in all_methods().items()
                        if (pipe.draft_lm is not None or not m.needs_draft_model) and (name != "auto" or tuned)],
            "auto_modes": tuned,
        }]}

    def encode(text: str, param: str) -> list[int]:
        try:
            return pipe.encode(text, chat=False)
        except ValueError as exc:  # text the tokenizer cannot take (lone surrogates)
            raise APIError(f"{param}: {exc}", param=param, code="invalid_value") from None

    def render_chat(body: ChatCompletionRequest) -> list[int]:
        try:
            rendered = pipe.tokenizer.apply_chat_template(
                body.template_messages(), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja raises its own errors (e.g. roles a template refuses)
            raise APIError(f"messages: the chat template refused them ({exc})", param="messages") from exc
        try:
            check_text(rendered, "the messages")
        except ValueError as exc:
            raise APIError(str(exc), param="messages", code="invalid_value") from None
        # The rendered template already holds the special tokens (as Pipeline.encode does for --chat).
        return pipe.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        if isinstance(body.prompt, str):
            # Tokenizing a long prompt takes a while: off the event loop, so /health and the
            # streams in flight keep answering meanwhile.
            prompt_ids = await run_in_threadpool(encode, body.prompt, "prompt")
        else:
            prompt_ids = list(body.prompt)
            bad = [t for t in prompt_ids if not 0 <= t < pipe.target_lm.vocab_size]
            if bad:
                raise APIError(f"prompt: token id {bad[0]} is outside the vocabulary (0 … {pipe.target_lm.vocab_size - 1})",
                               param="prompt", code="invalid_value")
        job = await engine.prepare(lambda: prepare_job(pipe, cfg, body, prompt_ids, "prompt", arrival))
        return await _answer(request, job, body, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        if not pipe.has_chat_template():
            raise APIError("the served model's tokenizer has no chat template: use /v1/completions with a raw prompt",
                           param="messages")
        prompt_ids = await run_in_threadpool(render_chat, body)
        job = await engine.prepare(lambda: prepare_job(pipe, cfg, body, prompt_ids, "messages", arrival))
        return await _answer(request, job, body, chat=True)

    async def _answer(request: Request, job: Job, body: Any, chat: bool) -> JSONResponse | StreamingResponse:
        # A streamed answer notices a gone client itself (its generator is cancelled); a plain one is
        # watched, so that its request stops within a step or two.
        engine.submit(job, None if body.stream else request.is_disconnected)
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


def request_options(cfg: ServerConfig, method: str, spec: "SpeculativeOptions | None") -> dict[str, Any]:
    """The method options of a request: the server's defaults that `method` has, overridden by the
    request's `speculative` extras, which must all be options of `method`."""
    opts = cfg.options_for(method)
    extra = spec.method_options() if spec is not None else {}
    specs = {s.name: s for s in get_method(method).options.specs()}
    names = set(specs)
    unknown = sorted(set(extra) - names)
    if unknown:
        known = ", ".join(["method", "gamma", *sorted(names - {"gamma"})])
        raise APIError(f"speculative: unknown option {unknown[0]!r} for method {method!r}; known: {known}",
                       param=f"speculative.{unknown[0]}", code="invalid_value")
    for name, value in extra.items():
        # Only the operator names files on this machine. Refused before anything looks at the
        # value, with one message whatever it is, so that the answer says nothing about the disk.
        if specs[name].may_name_a_file(value):
            raise APIError(
                f"speculative.{name}: this server takes only {' or '.join(specs[name].symbols)} here; files are "
                f"chosen by the server's operator (`specdec serve --{name.replace('_', '-')} FILE`)",
                param=f"speculative.{name}", code="invalid_value",
            )
    opts.update(extra)
    return opts


def check_request_cost(pipe: Pipeline, cfg: ServerConfig, method: str, opts: dict[str, Any], gamma: int | None) -> None:
    """400 when the request's method and options would draft more tokens per step than the
    server's cap, decided from the options alone, before any drafter is built."""
    m = get_method(method)
    values = dict(opts)
    if gamma is not None and "gamma" in m.options.names():
        values["gamma"] = gamma  # for the others gamma caps the levels drafted: it only lowers the cost
    try:
        options = m.make_options(values)
    except (ValueError, TypeError) as exc:
        raise APIError(f"speculative: {exc}", param="speculative", code="invalid_value") from exc
    try:
        drafted = options.draft_tokens_per_step(len(pipe.draft_lms))
    except ValueError as exc:  # options that do not fit the loaded drafters (a k-matrix of the wrong size)
        raise APIError(f"speculative: {exc}", param="speculative", code="invalid_value") from exc
    if drafted is not None and drafted > cfg.max_draft_tokens:
        raise APIError(
            f"speculative: {describe_options(options, SIZE_OPTIONS)} would draft up to {drafted} tokens per step with "
            f"{method}, more than this server's limit of {cfg.max_draft_tokens} (--max-draft-tokens)",
            param="speculative", code="invalid_value",
        )


def tuned_modes(pipe: Pipeline) -> list[str]:
    """The decoding modes ("greedy", "sampling") for which a tune profile exists for this pipeline
    (what `auto` follows)."""
    key = pipe.profile_key(SamplingConfig())
    if key is None:
        return []
    return profile_modes(key)


def prepare_job(
    pipe: Pipeline, cfg: ServerConfig, body: "GenerationRequest", prompt_ids: list[int], prompt_param: str,
    arrival: float,
) -> Job:
    """Check everything about a request that can be checked before running it, and build its job."""
    if body.model is not None and body.model != cfg.model_name:
        raise APIError(f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                       status=404, param="model", code="model_not_found")
    spec = body.speculative
    method = (spec.method if spec is not None else None) or cfg.default_method
    opts = request_options(cfg, method, spec)
    # The server's gamma is a default of the `gamma` option (in `opts` only for methods that have
    # one); a request's own gamma means what `specdec generate --gamma` means.
    server_gamma = opts.pop("gamma", None)
    gamma = (spec.gamma if spec is not None else None) or server_gamma
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
    check_request_cost(pipe, cfg, method, opts, gamma)
    try:
        # Built only to validate the options' values and to size the context; the batch engine
        # builds the run's own decoder over its rows, seeded exactly as `specdec generate` seeds.
        probe = pipe.decoder(method, sampling, gamma, **opts)
    except (ValueError, TypeError) as exc:  # a bad option value, a missing draft, a drafter refusing its options
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
        raise APIError(f"max_tokens={requested} exceeds this server's limit of {cfg.max_tokens_limit} "
                       "(--max-tokens-limit)", param="max_tokens", code="invalid_value")
    elif requested > room:
        raise APIError(
            f"max_tokens={requested} does not fit: the prompt has {len(prompt_ids)} tokens and the model's context "
            f"{context}, which leaves room for {room}", param="max_tokens", code="context_length_exceeded",
        )
    else:
        max_tokens = requested
    seed = body.seed if body.seed is not None else cfg.seed
    request = BatchRequest(list(prompt_ids), max_tokens, method, opts, sampling, gamma, seed)
    text = TextAssembler(pipe.decode, body.stop or [], bool(getattr(pipe.tokenizer, "clean_up_tokenization_spaces", False)))
    return Job(request, text, len(prompt_ids), SpeculativeUsage(method), arrival)
