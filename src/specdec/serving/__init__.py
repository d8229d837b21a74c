"""`specdec serve`: an OpenAI-compatible HTTP server over one speculative-decoding engine.

protocol (request bodies), errors (OpenAI-style error answers), metrics (Prometheus counters and
per-request usage), engine (one request at a time on one model thread) and app (the FastAPI app
and request preparation). Only the standard library and specdec are imported at module level:
FastAPI, uvicorn, pydantic and prometheus_client are imported when an app is created, so
`import specdec.serving.app` works without the `server` extra.
"""

SERVER_EXTRA_HINT = "pip install 'specdec[server]'"
"""How to install what `specdec serve` needs (FastAPI, uvicorn, prometheus_client)."""
