"""`specdec serve`: the OpenAI-compatible HTTP server (`specdec.serving`) on the loaded models.

The decoding flags are the defaults of requests that leave them out; the server extra (FastAPI,
uvicorn, prometheus_client) is needed only when the command runs, never to list it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from specdec.cli.common import (
    add_method_args, add_model_args, add_sampling_args, check_target, drafts_of, given_options, load_pipeline,
    resolve_method, sampling_of,
)

from specdec.engine.limits import (
    DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_FILL_MS, DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB,
    DEFAULT_SPEC_DISABLE_BATCH_SIZE, PROFILE_FIELD,
)
from specdec.serving import SERVER_EXTRA_HINT
from specdec.serving.guards import (
    BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_DRAFT_TOKENS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS_LIMIT,
    OPEN_PATHS,
)

if TYPE_CHECKING:
    from specdec.core.sampling import SamplingConfig
    from specdec.engine.pipeline import Pipeline
    from specdec.serving.config import ServerConfig

API_KEY_ENV = "SPECDEC_API_KEY"
# The app (and with it torch) is imported when the command runs: listing the command or reporting
# a flag mistake needs neither.

DESCRIPTION = (
    "Serve the target with speculative decoding over an OpenAI-compatible API: POST /v1/completions, "
    "POST /v1/chat/completions (stream: true for server-sent events), GET /v1/models, GET /health, "
    "GET /metrics. The decoding flags (--method, --max-new-tokens, --temperature, --top-p, --top-k, --seed and "
    "the method options: --gamma, --budget, …) are the defaults for requests that leave them out; a request may "
    "pick another method and its options with {\"speculative\": {\"method\": ..., \"gamma\": ...}}, and gets "
    "the default options its method has (files such as --tree PROFILE.json are named by the operator only). "
    "A request never starts a tune: with --method auto the server tunes the modes it offers at start. Up to --max-batch-size requests decode "
    "together (continuous batching: drafts and verification batched across requests; new ones join between "
    "steps, long prompts are filled in chunks); more wait in arrival order, and beyond --max-queue waiting ones "
    "the server answers 503. Beyond this machine (--host other than loopback) the server needs --api-key or "
    f"${API_KEY_ENV} (or --allow-unauthenticated). Needs the server extra: {SERVER_EXTRA_HINT}."
)


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from specdec.methods.registry import get_method
    from specdec.serving import app as serving_app
    from specdec.serving.network import check_port_free, is_loopback

    # Looked up on the module at call time (tests stand in for a missing extra).
    missing = serving_app.missing_server_dependencies()
    if missing:
        # cli.main prints ValueErrors as a one-line error with exit status 2.
        raise ValueError(f"specdec serve needs {', '.join(missing)}, which is not installed: {SERVER_EXTRA_HINT}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0 … 65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.api_key == "":
        raise ValueError("--api-key must not be empty")
    if api_key is None and not args.allow_unauthenticated and not is_loopback(args.host):
        raise ValueError(
            f"--host {args.host} lets other machines reach the server: give --api-key KEY (or set ${API_KEY_ENV}) "
            "so that requests need 'Authorization: Bearer KEY', or --allow-unauthenticated to serve anyone"
        )
    # A taken port is found now, not after the models have loaded.
    check_port_free(args.host, args.port)
    check_target(args)
    args.method = resolve_method(args)
    sampling = sampling_of(args)
    # The defaults and limits, checked now, before the models load (every option flag is a default
    # for the methods that have it, not only --method's).
    cfg = serving_app.server_config(
        args.method, given_options(args), args.model_name or args.target, default_sampling=sampling,
        default_max_tokens=args.max_new_tokens, default_seed=args.seed, api_key=api_key,
        max_tokens_limit=args.max_tokens_limit, max_draft_tokens=args.max_draft_tokens,
        max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout, max_queue=args.max_queue,
        max_batch_size=args.max_batch_size,
        prefill_chunk=args.prefill_chunk, adaptive=args.speculation == "adaptive",
        max_fill_ms=None if args.max_fill_ms == "none" else _number("--max-fill-ms", args.max_fill_ms),
        prefix_cache_mb=args.prefix_cache_mb,
    )
    method = get_method(args.method)
    cfg.check(max(len(drafts_of(args)), 1))  # what it drafts is known from the flags: too much is refused now
    # A --draft given with a draft-free default method is still loaded: requests may switch to sps.
    pipe = load_pipeline(args, method.loads_draft_model or args.draft is not None,
                         optional_draft=not method.needs_draft_model)
    tune_offered_modes(pipe, cfg)
    cfg.batch = replace(cfg.batch, max_kv_tokens=kv_budget(args.max_kv_tokens, pipe),
                        spec_disable_batch_size=spec_disable_batch_size(args.spec_disable_batch_size, pipe, sampling))
    kv, off = cfg.batch.max_kv_tokens, cfg.batch.spec_disable_batch_size
    print(f"batching: up to {cfg.batch.max_batch_size} requests, KV budget "
          f"{'unbounded' if kv is None else f'{kv} tokens'}, drafts off above "
          f"{'never' if off is None else f'{off} running requests'}, speculation {args.speculation}, "
          f"prefix cache {cfg.batch.prefix_cache_mb:g} MB", file=sys.stderr)
    app = serving_app.create_app(pipe, config=cfg)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def tune_offered_modes(pipe: "Pipeline", cfg: "ServerConfig") -> None:
    """With `auto` as the default (following this machine's profiles), tune the modes the server
    offers now, once per machine and setting — greedy, and sampling at the default temperature —
    so that no request ever waits for a tune (a request never starts one)."""
    from specdec.core.sampling import SamplingConfig

    if cfg.default_method != "auto" or cfg.options_for("auto").get("tree") not in (None, "auto", "dp"):
        return  # another method, or auto following the operator's profile file
    s = cfg.sampling
    for temperature in (0.0, s.temperature or 0.7):
        pipe.decoder("auto", SamplingConfig(temperature=temperature, top_k=s.top_k, top_p=s.top_p))


def _number(flag: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{flag} must be a number or none, got {value!r}") from None


KV_MEMORY_FRACTION = 0.5
"""--max-kv-tokens auto: the K/V of the running requests may fill this share of the memory free at start."""


def kv_budget(value: str, pipe: "Pipeline") -> int | None:
    """--max-kv-tokens: a number of target K/V slots, `auto` (a share of free memory) or `none`."""
    from specdec.core.options import check_positive_int
    from specdec.engine.batch import kv_budget_for_memory

    if value == "none":
        return None
    if value == "auto":
        return kv_budget_for_memory(pipe.target_lm, pipe.draft_lms, KV_MEMORY_FRACTION)
    try:
        return check_positive_int("--max-kv-tokens", int(value))
    except ValueError:
        raise ValueError(f"--max-kv-tokens must be a positive integer, auto or none, got {value!r}") from None


def spec_disable_batch_size(value: str, pipe: "Pipeline", sampling: "SamplingConfig") -> int | None:
    """--spec-disable-batch-size: a number, `never`, or `auto`: the tune profile's field for this setting
    when it has one, else the default."""
    from specdec.core.store import find_profile

    if value == "never":
        return None
    if value != "auto":
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError(f"--spec-disable-batch-size must be an integer >= 0, auto or never, got {value!r}")
        return n
    key = pipe.profile_key(sampling)
    try:
        profile = find_profile(key) if key is not None else {}
    except ValueError:  # no profile for this setting: the default
        profile = {}
    field = profile.get(PROFILE_FIELD)
    return int(field) if isinstance(field, int) and not isinstance(field, bool) else DEFAULT_SPEC_DISABLE_BATCH_SIZE


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="max_tokens of requests that leave it out (default 128; at most --max-tokens-limit)")
    add_sampling_args(p, temperature=1.0, temperature_help=(
        "temperature of requests that leave it out (default 1.0, OpenAI's; 0 makes them greedy); a request's own "
        "temperature always wins"))
    add_method_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send and /v1/models lists (default: --target)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route (default: ${API_KEY_ENV}, else none; "
                   f"{' and '.join(OPEN_PATHS)} stay open)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help=f"refuse requests asking for more than this many new tokens (default {DEFAULT_MAX_TOKENS_LIMIT}; "
                   "the context may bound them further)")
    p.add_argument("--max-draft-tokens", type=int, default=DEFAULT_MAX_DRAFT_TOKENS,
                   help="refuse requests whose method options draft more tokens per step (gamma, budget, the "
                   f"expansion's tree, the k-matrix's chain; default {DEFAULT_MAX_DRAFT_TOKENS})")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"answer larger request bodies 413 before reading them (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT_S, metavar="SECONDS",
                   help=f"answer 408 to a request whose body has not arrived whole within this (default "
                   f"{BODY_TIMEOUT_S:g})")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for the engine; more are answered 503 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help=f"requests decoded together (continuous batching; default {DEFAULT_MAX_BATCH_SIZE})")
    p.add_argument("--max-kv-tokens", default="auto", metavar="N|auto|none",
                   help="target K/V slots the running requests may reserve (rows x longest request); requests "
                   f"beyond it wait. auto (default): {KV_MEMORY_FRACTION * 100:.0f}%% of the memory free at start")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help=f"prompt tokens filled per engine step, so a long prompt does not stall the others "
                   f"(default {DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--spec-disable-batch-size", default="auto", metavar="N|auto|never",
                   help="draft nothing in steps with more than N requests running (vLLM's disable-by-batch-size; "
                   f"output unchanged, speed only). auto (default): the tune profile's {PROFILE_FIELD} for this "
                   f"setting, else {DEFAULT_SPEC_DISABLE_BATCH_SIZE}")
    p.add_argument("--speculation", choices=["adaptive", "fixed"], default="adaptive",
                   help="adaptive (default): each step gives each request the draft tokens that the measured pass "
                   "times and its recent acceptance say pay, down to none, so the server is never slower than plain "
                   "decoding; fixed: every request drafts its method's full depth (output unchanged either way)")
    p.add_argument("--max-fill-ms", default=str(int(DEFAULT_MAX_FILL_MS)), metavar="MS|none",
                   help="while requests are decoding, fill about this many milliseconds of new prompts per step "
                   f"(measured), so a long prompt delays their next token by about that much (default "
                   f"{DEFAULT_MAX_FILL_MS:g}; none: --prefill-chunk tokens)")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB,
                   help="memory for the K/V of prompt prefixes reused across requests (system prompts, earlier "
                   f"turns; native weights; exact: the same bits as computing them; default {DEFAULT_PREFIX_CACHE_MB}, "
                   "0 = off)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
