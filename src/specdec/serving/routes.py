"""The server's routes, one small function each, and its error answers (OpenAI's error shape).

A route reads what it serves from `request.app.state` (`create_app` sets it): `pipe`, `config`,
`engine`, `metrics` and `created`. Imported by `create_app` only, so FastAPI is imported with it.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter annotations (the
# request models) as objects.
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from specdec.core.sampling import SamplingConfig
from specdec.core.store import profile_modes
from specdec.engine.decoder import prompt_tensor
from specdec.engine.pipeline import Pipeline, check_text
from specdec.methods.registry import all_methods
from specdec.serving.engine import Job
from specdec.serving.errors import APIError, validation_error_to_api_error
from specdec.serving.prepare import prepare_job
from specdec.serving.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


# ---- errors ----------------------------------------------------------------------------------------
async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = validation_error_to_api_error(list(exc.errors()), request.headers.get("content-type", ""))
    return JSONResponse(err.body(), status_code=err.status)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Anything unexpected (an engine failure): still OpenAI's error shape, and logged.
    log.error("request failed: %s: %s", type(exc).__name__, exc)
    err = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error")
    return JSONResponse(err.body(), status_code=500)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    err = APIError(str(exc.detail), status=exc.status_code, kind=kind)
    return JSONResponse(err.body(), status_code=exc.status_code)


# ---- what the server is ----------------------------------------------------------------------------
async def health(request: Request) -> dict[str, Any]:
    state = request.app.state
    return {"status": "ok", "model": state.config.model_name, "running": state.engine.running,
            "waiting": state.engine.waiting}


async def prometheus_metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def tuned_modes(pipe: Pipeline) -> list[str]:
    """The decoding modes ("greedy", "sampling") for which a tune profile exists for this pipeline
    (what `auto` follows)."""
    key = pipe.profile_key(SamplingConfig())
    return [] if key is None else profile_modes(key)


async def models(request: Request) -> dict[str, Any]:
    state = request.app.state
    pipe, cfg = state.pipe, state.config
    # `auto` needs a tune profile for this pipeline: listed (with the decoding modes the profiles
    # cover) only when one exists, looked up now, as tune may run meanwhile.
    tuned = await run_in_threadpool(tuned_modes, pipe)
    return {"object": "list", "data": [{
        "id": cfg.model_name, "object": "model", "created": state.created, "owned_by": "specdec",
        "max_model_len": pipe.target_lm.context_length,
        "default_method": cfg.default_method,
        "methods": [name for name, m in all_methods().items()
                    if (pipe.draft_lm is not None or not m.needs_draft_model) and (name != "auto" or tuned)],
        "auto_modes": tuned,
    }]}


# ---- prompts ---------------------------------------------------------------------------------------
def encode(pipe: Pipeline, text: str, param: str) -> list[int]:
    try:
        return pipe.encode(text, chat=False)
    except ValueError as exc:  # empty, or text the tokenizer cannot take (lone surrogates); it names the prompt
        raise APIError(str(exc), param=param, code="invalid_value") from None


def render_chat(pipe: Pipeline, body: ChatCompletionRequest) -> list[int]:
    for i, message in enumerate(body.messages):  # a message may be empty (OpenAI's are), never unencodable
        text = message.text()
        if text:
            try:
                check_text(text, f"messages[{i}].content")
            except ValueError as exc:
                raise APIError(str(exc), param=f"messages[{i}].content", code="invalid_value") from None
    try:
        rendered = pipe.tokenizer.apply_chat_template(body.template_messages(), add_generation_prompt=True,
                                                      tokenize=False)
    except Exception as exc:  # jinja raises its own errors (e.g. roles a template refuses)
        raise APIError(f"messages: the chat template refused them ({exc})", param="messages") from exc
    try:
        check_text(rendered, "the rendered chat")
    except ValueError as exc:
        raise APIError(str(exc), param="messages", code="invalid_value") from None
    # The rendered template already holds the special tokens (as Pipeline.encode does for --chat).
    return pipe.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def token_prompt(pipe: Pipeline, ids: list[int]) -> list[int]:
    try:
        return prompt_tensor(ids, pipe.target_lm.vocab_size).tolist()
    except ValueError as exc:
        raise APIError(str(exc), param="prompt", code="invalid_value") from None


# ---- generation ------------------------------------------------------------------------------------
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.perf_counter()
    pipe = request.app.state.pipe
    if isinstance(body.prompt, str):
        # Tokenizing a long prompt takes a while: off the event loop, so /health and the streams in
        # flight keep answering meanwhile.
        prompt_ids = await run_in_threadpool(encode, pipe, body.prompt, "prompt")
    else:
        prompt_ids = token_prompt(pipe, body.prompt)
    return await generate(request, body, prompt_ids, "prompt", arrival, chat=False)


async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    arrival = time.perf_counter()
    pipe = request.app.state.pipe
    if not pipe.has_chat_template():
        raise APIError("the served model's tokenizer has no chat template: use /v1/completions with a raw prompt",
                       param="messages")
    prompt_ids = await run_in_threadpool(render_chat, pipe, body)
    return await generate(request, body, prompt_ids, "messages", arrival, chat=True)


async def generate(request: Request, body: Any, prompt_ids: list[int], prompt_param: str, arrival: float,
                   chat: bool) -> JSONResponse | StreamingResponse:
    """Validate the request into a job (on the engine thread), hand it over, answer."""
    state = request.app.state
    engine = state.engine
    job = await engine.prepare(lambda batch: prepare_job(state.pipe, state.config, batch, body, prompt_ids,
                                                         prompt_param, arrival))
    # A streamed answer notices a gone client itself (its generator is cancelled); a plain one is
    # watched, so that its request stops within a step or two.
    engine.submit(job, None if body.stream else request.is_disconnected)
    answer_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(sse(job, answer_id, state.config.model_name, chat, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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
        "model": state.config.model_name, "choices": [choice], "usage": job.usage_dict(),
    })


def sse_choice(chat: bool, text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
    """One choice of a streamed chunk, in OpenAI's chat or completion format."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}


async def sse(job: Job, answer_id: str, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The job's text as server-sent events, ending with `data: [DONE]`."""
    created_at = int(time.time())

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {"id": answer_id, "object": "chat.completion.chunk" if chat else "text_completion",
                                   "created": created_at, "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if chat:
            yield event([sse_choice(chat, None, None, role=True)])
        try:
            async for delta in job.text_deltas():
                yield event([sse_choice(chat, delta, None)])
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
            err = APIError(f"generation failed: {type(exc).__name__}: {exc}", status=500, kind="server_error")
            yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield event([sse_choice(chat, None if chat else "", job.finish_reason)])
        if include_usage:
            yield event([], job.usage_dict())
        yield "data: [DONE]\n\n"
    finally:
        # Cancelled (client gone) or done: either way the engine may stop this job now.
        job.client_gone = True


def add_routes(app: FastAPI) -> None:
    """Every route and error handler of the server."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
