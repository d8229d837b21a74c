"""A request, validated into the one job the engine runs: every 400 is decided here, before any
model work and before a stream starts.

The request's method options are parsed once, into its method's `Options`; the cost they ask for
(drafted tokens per step) is checked against the server's cap before anything is built; the batch
engine then knows the drafter's block (a drafter is built once per setting to learn it) and the
request's own decoder is built when it is admitted. A request never makes the server tune: `auto`
without a tune profile for the request's decoding mode is a 400.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from specdec.core.options import MethodOptions, OptionSpec
from specdec.core.sampling import SamplingConfig
from specdec.core.store import ProfileProblem
from specdec.engine.batch import BatchEngine, BatchRequest
from specdec.engine.build import SIZE_OPTIONS, describe_options
from specdec.engine.text import TextAssembler
from specdec.methods.registry import get_method
from specdec.serving.config import ServerConfig
from specdec.serving.engine import Job
from specdec.serving.errors import APIError

if TYPE_CHECKING:
    from specdec.engine.pipeline import Pipeline
    from specdec.serving.protocol import GenerationRequest, SpeculativeOptions


def request_options(cfg: ServerConfig, method: str, spec: "SpeculativeOptions | None") -> MethodOptions:
    """The request's method options, parsed once: the server's defaults that `method` has,
    overridden by the request's `speculative` extras, which must all be options of `method` and
    never name files on this machine."""
    m = get_method(method)
    extra = spec.method_options() if spec is not None else {}
    specs = {s.name: s for s in m.options.specs()}
    unknown = sorted(set(extra) - set(specs))
    if unknown:
        known = ", ".join(["method", *sorted(specs)])
        raise APIError(f"speculative: unknown option {unknown[0]!r} for method {method!r}; known: {known}",
                       param=f"speculative.{unknown[0]}", code="invalid_value")
    for name, value in extra.items():
        check_json_type(specs[name], value)
        # Only the operator names files on this machine. Refused before anything looks at the
        # value, with one message whatever it is, so that the answer says nothing about the disk.
        if specs[name].may_name_a_file(value):
            raise APIError(
                f"speculative.{name}: this server takes only {' or '.join(specs[name].symbols)} here; files are "
                f"chosen by the server's operator (`specdec serve --{name.replace('_', '-')} FILE`)",
                param=f"speculative.{name}", code="invalid_value",
            )
    try:
        return m.make_options({**cfg.options_for(method), **extra})
    except (ValueError, TypeError) as exc:
        raise APIError(f"speculative: {exc}", param="speculative", code="invalid_value") from exc


def check_json_type(spec: OptionSpec, value: Any) -> None:
    """400 for a number or a flag sent as a string: the option parsers take text because the command
    line gives text, but a JSON request states its types, as it must for `max_tokens` (a string
    there is refused too)."""
    numeric = isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool)
    if isinstance(value, str) and (spec.flag or (numeric and not spec.symbols)):
        kind = "true or false" if spec.flag else "a JSON number"
        raise APIError(f"speculative.{spec.name}: must be {kind}, not the string {value!r}",
                       param=f"speculative.{spec.name}", code="invalid_value")


def check_cost(cfg: ServerConfig, method: str, options: MethodOptions, num_drafts: int) -> None:
    """400 when the options would draft more tokens per step than the server's cap, decided from
    the options alone, before any drafter is built."""
    try:
        drafted = options.draft_tokens_per_step(num_drafts)
    except ValueError as exc:  # options that do not fit the loaded drafters (a k-matrix of the wrong size)
        raise APIError(f"speculative: {exc}", param="speculative", code="invalid_value") from exc
    cap = cfg.limits.max_draft_tokens
    if drafted is not None and drafted > cap:
        raise APIError(
            f"speculative: {describe_options(options, SIZE_OPTIONS)} would draft up to {drafted} tokens per step with "
            f"{method}, more than this server's limit of {cap} (--max-draft-tokens)",
            param="speculative", code="invalid_value",
        )


def request_sampling(cfg: ServerConfig, body: "GenerationRequest") -> SamplingConfig:
    base = cfg.sampling
    top_k = body.top_k if body.top_k is not None else base.top_k
    try:
        return SamplingConfig(
            temperature=body.temperature if body.temperature is not None else base.temperature,
            top_k=max(top_k, 0),  # vLLM clients send -1 for "off"
            top_p=body.top_p if body.top_p is not None else base.top_p,
        )
    except ValueError as exc:
        raise APIError(str(exc), code="invalid_value") from exc


def block_size(batch: BatchEngine, request: BatchRequest) -> int:
    """The largest block the request's drafter has the target score (400 when it cannot be built)."""
    try:
        return batch.block_size(request)
    except ProfileProblem as exc:
        # The client is told what to do about it, never the server's files (the message names its path).
        mode = "greedy" if request.sampling.greedy else "sampling"
        how = f" (`{exc.command}`)" if exc.command else ""
        raise APIError(
            f"speculative: method {request.method!r} follows this machine's tune profile, and this server has none "
            f"usable for {mode} decoding; a request never starts a tune: ask for another method, or have the "
            f"operator tune it{how}", param="speculative.method", code="invalid_value",
        ) from None
    except (ValueError, TypeError) as exc:  # a missing draft, a drafter refusing its options
        raise APIError(f"speculative: {exc}", param="speculative", code="invalid_value") from exc


def max_tokens_of(cfg: ServerConfig, body: "GenerationRequest", prompt_len: int, room: int, context: int,
                  block: int) -> int:
    """The request's max_tokens: as asked (400 above the limit or the room in the context), or the
    server's default (within the limit, `ServerConfig.check`) cut to the room in the context."""
    requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
    limit = cfg.limits.max_tokens_limit
    if requested is None:
        return min(cfg.max_tokens, room, limit or room)
    if limit is not None and requested > limit:
        raise APIError(f"max_tokens={requested} exceeds this server's limit of {limit} (--max-tokens-limit)",
                       param="max_tokens", code="invalid_value")
    if requested > room:
        raise APIError(
            f"max_tokens={requested} does not fit: the prompt has {prompt_len} tokens and the model's context "
            f"{context}, which leaves room for {room}" + (f" ({block} kept for a step's block: the pending token and the "
                                                         "drafts)" if block > 1 else ""),
            param="max_tokens", code="context_length_exceeded",
        )
    return requested


def prepare_job(
    pipe: "Pipeline", cfg: ServerConfig, batch: BatchEngine, body: "GenerationRequest", prompt_ids: list[int],
    prompt_param: str, arrival: float,
) -> Job:
    """Check everything about a request that can be checked before running it, and build its job
    (on the engine thread: the batch engine's drafter sizes are learned there)."""
    if body.model is not None and body.model != cfg.model_name:
        raise APIError(f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                       status=404, param="model", code="model_not_found")
    if not prompt_ids:
        raise APIError(f"{prompt_param}: the prompt is empty (it has no tokens)", param=prompt_param, code="invalid_value")
    spec = body.speculative
    method = (spec.method if spec is not None else None) or cfg.default_method
    if get_method(method).needs_draft_model and not pipe.draft_lms:
        raise APIError(f"speculative: method {method!r} needs a draft model, and this server has none loaded",
                       param="speculative.method", code="invalid_value")
    options = request_options(cfg, method, spec)
    check_cost(cfg, method, options, len(pipe.draft_lms))
    seed = body.seed if body.seed is not None else cfg.seed
    request = BatchRequest(list(prompt_ids), 1, method, options, request_sampling(cfg, body), seed)
    context = pipe.target_lm.context_length
    block = block_size(batch, request)
    room = context - len(prompt_ids) - block  # new tokens that fit beside the prompt
    if room < 1:
        kept = f" ({block} of them kept for a step's block: the pending token and {method}'s drafts)" if block > 1 else ""
        raise APIError(
            f"{prompt_param}: the prompt has {len(prompt_ids)} tokens, which leaves no room for a completion in the "
            f"model's context of {context} tokens{kept}", param=prompt_param, code="context_length_exceeded",
        )
    request = BatchRequest(request.prompt_ids, max_tokens_of(cfg, body, len(prompt_ids), room, context, block),
                           method, options, request.sampling, seed)
    try:
        batch.check(request)  # the KV budget
    except ValueError as exc:
        raise APIError(str(exc), param="max_tokens", code="context_length_exceeded") from exc
    cleans = bool(getattr(pipe.tokenizer, "clean_up_tokenization_spaces", False))
    return Job(request, TextAssembler(pipe.decode, body.stop or [], cleans), len(prompt_ids), arrival)
