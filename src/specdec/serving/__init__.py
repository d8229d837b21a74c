"""`specdec serve`: an OpenAI-compatible HTTP server over one speculative-decoding engine.

protocol (request bodies), errors (OpenAI-style error answers), guards (the caps, the API key, the
body size), config (the defaults and limits), prepare (a request validated into one job), metrics
(Prometheus counters and per-request usage), engine (the batch engine driven from one thread),
routes (one small function per route) and app (`create_app`). Only the standard library and specdec
are imported at module level by `app`: FastAPI, uvicorn, pydantic and prometheus_client are imported
when an app is created, so `import specdec.serving.app` works without the `server` extra.
"""

SERVER_EXTRA_HINT = "pip install 'specdec[server]'"
"""How to install what `specdec serve` needs (FastAPI, uvicorn, prometheus_client)."""
