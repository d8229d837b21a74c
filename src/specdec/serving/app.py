"""`specdec serve`'s FastAPI app: `create_app` puts the pieces together.

    specdec serve --target smollm2-135m-instruct --method pld --port 8000

Endpoints: POST /v1/completions and /v1/chat/completions (both with `stream: true` as server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health and
GET /metrics (Prometheus text, vLLM's `vllm:` metric names).

How a request flows:
  guards (ASGI)          the API key (when one is set), then the body-size limit: a larger body is
                         answered 413 before anything parses it (`serving.guards`);
  route (event loop)     validate the body (`serving.protocol`); tokenize on a worker thread (a
                         long prompt never holds up the event loop) (`serving.routes`);
  prepare (engine thread) parse the request's options once into its method's `Options`, check its
                         cost against the caps and that prompt + max_tokens fit the context: every
                         400 is decided here, before any model work and before a stream starts
                         (`serving.prepare`);
  Engine (driver task)   hand the job to the continuous-batching engine (`engine.batch`), which
                         builds the request's decoder once, when it is admitted, and decodes up to
                         --max-batch-size requests together on the engine thread; between two steps
                         release text, count metrics and abort jobs whose client is gone or whose
                         stop string appeared (`serving.engine`);
  route / SSE stream     read the released text from the job's queue and answer.

Only the standard library and specdec are imported at module level, so `import specdec.serving.app`
works without the `server` extra; FastAPI, uvicorn, pydantic and prometheus_client are imported
when an app is created.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from specdec.core.sampling import SamplingConfig
from specdec.engine.limits import BatchLimits
from specdec.engine.pipeline import Pipeline
from specdec.methods import DEFAULT_METHOD
from specdec.methods.registry import get_method
from specdec.serving import SERVER_EXTRA_HINT
from specdec.serving.config import DEFAULT_TEMPERATURE, SERVER_BATCH_DEFAULTS, ServerConfig
from specdec.serving.engine import Engine
from specdec.serving.guards import ServerLimits
from specdec.serving.metrics import ServerMetrics

if TYPE_CHECKING:
    from fastapi import FastAPI

_SERVER_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def missing_server_dependencies() -> list[str]:
    """The pip names of the `server` extra's packages that are not installed."""
    return [pip for module, pip in _SERVER_MODULES.items() if importlib.util.find_spec(module) is None]


def server_config(
    default_method: str = DEFAULT_METHOD,
    default_opts: dict[str, Any] | None = None,
    model_name: str = "specdec",
    *,
    default_sampling: SamplingConfig = SamplingConfig(temperature=DEFAULT_TEMPERATURE),
    default_max_tokens: int = 128,
    default_seed: int | None = None,
    api_key: str | None = None,
    **limits: Any,
) -> ServerConfig:
    """A `ServerConfig` from `create_app`'s keywords; `limits` are `ServerLimits`' and
    `BatchLimits`' fields (ValueError naming the flag of a bad one)."""
    server = {k: limits.pop(k) for k in list(limits) if k in ServerLimits.__dataclass_fields__}
    batch = {k: limits.pop(k) for k in list(limits) if k in BatchLimits.__dataclass_fields__}
    batch = {**SERVER_BATCH_DEFAULTS, **batch}
    if limits:
        raise TypeError(f"unknown server limit {sorted(limits)[0]!r}")
    cfg = ServerConfig(model_name, default_method, dict(default_opts or {}), default_sampling, default_max_tokens,
                       default_seed, ServerLimits(**server), BatchLimits(**batch), api_key)
    cfg.check()
    return cfg


def create_app(
    pipe: Pipeline,
    default_method: str = DEFAULT_METHOD,
    default_opts: dict[str, Any] | None = None,
    model_name: str = "specdec",
    *,
    config: ServerConfig | None = None,
    **settings: Any,
) -> "FastAPI":
    """A FastAPI app serving `pipe`; run it with uvicorn (`specdec serve` does).

    default_method, default_opts: what requests that leave them out get. Each default option
        applies to the methods that have it, and every one must be an option of some method; they
        may name files (`tree=PROFILE.json`); requests may not.
    config: everything at once (`ServerConfig`); else `settings` are `server_config`'s keywords:
        default_sampling (default: OpenAI's temperature 1.0; SamplingConfig() makes requests
        greedy), default_max_tokens, default_seed, api_key (then every route but /health and
        /metrics needs `Authorization: Bearer <api_key>`), the caps on what one request may cost
        (`ServerLimits`: max_tokens_limit, max_draft_tokens, max_body_bytes, max_queue; a request
        over one gets a 400, 413 for the body, 503 for the queue) and the continuous-batching
        engine's limits (`BatchLimits`: max_batch_size, max_kv_tokens, prefill_chunk,
        spec_disable_batch_size).

    A request never makes the server tune: `auto` (the default method) serves the decoding modes
    this machine has tune profiles for (`specdec serve` tunes the modes it offers at start), and
    answers a 400 for the others.
    """
    missing = missing_server_dependencies()
    if missing:
        raise ImportError(f"the server needs {', '.join(missing)}, which is not installed: {SERVER_EXTRA_HINT}")
    cfg = config if config is not None else server_config(default_method, default_opts, model_name, **settings)
    method = get_method(cfg.default_method)
    if method.needs_draft_model and pipe.draft_lm is None:
        raise ValueError(f"method {cfg.default_method!r} needs a draft model (--draft)")
    if pipe.tokenizer is None:
        raise ValueError("the server needs a pipeline with a tokenizer (it answers text)")
    cfg.check(len(pipe.draft_lms))
    return build_app(pipe, cfg)


def build_app(pipe: Pipeline, cfg: ServerConfig) -> "FastAPI":
    """The app: its state, its routes (`serving.routes`) and its guards (`serving.guards`)."""
    from fastapi import FastAPI

    from specdec.serving.guards import BearerAuth, BodyLimit
    from specdec.serving.routes import add_routes

    metrics = ServerMetrics(cfg.model_name)
    b = cfg.batch
    batch = pipe.batch_engine(max_batch_size=b.max_batch_size, max_kv_tokens=b.max_kv_tokens,
                              prefill_chunk=b.prefill_chunk, spec_disable_batch_size=b.spec_disable_batch_size,
                              adaptive=b.adaptive, max_fill_ms=b.max_fill_ms, prefix_cache_mb=b.prefix_cache_mb)
    batch.calibrate()  # pass times by size, now rather than in a request's first step
    engine = Engine(batch, metrics, cfg.limits.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()

    app = FastAPI(title="specdec", version="0.1.0", lifespan=lifespan)
    app.state.pipe, app.state.config, app.state.engine, app.state.metrics = pipe, cfg, engine, metrics
    app.state.created = int(time.time())
    add_routes(app)
    # Added innermost first: the key is checked before the body is read.
    app.add_middleware(BodyLimit, max_bytes=cfg.limits.max_body_bytes, timeout_s=cfg.limits.body_timeout_s)
    if cfg.api_key is not None:
        app.add_middleware(BearerAuth, api_key=cfg.api_key)
    return app
