"""What the server counts: Prometheus metrics for the whole server (`ServerMetrics`) and the
speculative usage of one request (`speculative_usage`, the `usage.speculative` of its answer), both
read from the requests' `DecodeStats`.

prometheus_client is imported when a `ServerMetrics` is created (it comes with the `server` extra).
"""

from __future__ import annotations

from typing import Any

from specdec.engine.stats import DecodeStats


class ServerMetrics:
    """Prometheus metrics on the app's own registry (several apps in one process never clash).

    Every name is vLLM's, `vllm:` prefix included (`vllm:spec_decode_num_drafts`, …; counters
    exposed with the `_total` suffix, as vLLM's are), with its `model_name` label, so dashboards
    built for vLLM read them unchanged.
    """

    PREFIX = "vllm:"

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
    RATE_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0)

    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, by_model, pre = self.registry, ["model_name"], self.PREFIX

        def counter(name: str, doc: str) -> Any:
            return Counter(pre + name, doc, by_model, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(pre + name, doc, by_model, buckets=buckets, registry=reg).labels(model_name)

        self.num_drafts = counter("spec_decode_num_drafts", "Target calls that verified at least one drafted token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Drafted tokens scored by the target.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Drafted tokens the target accepted.")
        self._accepted_per_pos = Counter(
            pre + "spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by draft position (tree depth for token trees), 0-based.",
            ["model_name", "position"], registry=reg,
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of the requests the engine ran.")
        self.generation_tokens = counter("generation_tokens", "Completion tokens returned (usage.completion_tokens).")
        self._finished = Counter(
            pre + "request_success", "Finished requests by finish reason (stop, length, abort = client gone, error).",
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
        # Not a vLLM metric: ours, so under our own prefix.
        self.tokens_per_s = Histogram(
            "specdec:request_tokens_per_second", "Completion tokens per second of engine time, per finished request.",
            by_model, buckets=self.RATE_BUCKETS, registry=reg,
        ).labels(model_name)
        self.running = Gauge(pre + "num_requests_running", "Requests the batch engine is decoding (or filling).", by_model,
                             registry=reg).labels(model_name)
        self.waiting = Gauge(pre + "num_requests_waiting", "Requests queued for the engine.", by_model,
                             registry=reg).labels(model_name)

    def accepted_at(self, position: int) -> Any:
        return self._accepted_per_pos.labels(self.model_name, str(position))

    def count_steps(self, before: DecodeStats, now: DecodeStats) -> None:
        """Add what a request's steps did between two snapshots of its statistics."""
        self.num_drafts.inc(now.drafted_calls - before.drafted_calls)
        self.num_draft_tokens.inc(now.draft_tokens - before.draft_tokens)
        self.num_accepted_tokens.inc(now.accepted_tokens - before.accepted_tokens)
        for pos, count in enumerate(now.accepted_by_position):
            done = before.accepted_by_position[pos] if pos < len(before.accepted_by_position) else 0
            if count > done:
                self.accepted_at(pos).inc(count - done)

    def finished(self, reason: str) -> Any:
        return self._finished.labels(self.model_name, reason)


def speculative_usage(method: str, stats: DecodeStats | None, completion_tokens: int) -> dict[str, Any]:
    """The `usage.speculative` of an answer: the request's own decoding statistics (`DecodeStats`,
    the one count of its steps), and its completion tokens per second of engine time."""
    stats = stats or DecodeStats()
    return {
        "method": method,
        "target_calls": stats.target_calls,
        "num_drafts": stats.drafted_calls,
        "num_draft_tokens": stats.draft_tokens,
        "num_accepted_tokens": stats.accepted_tokens,
        "num_accepted_tokens_per_pos": list(stats.accepted_by_position),
        "acceptance_rate": stats.accepted_tokens / stats.draft_tokens if stats.draft_tokens else 0.0,
        "tokens_per_call": stats.tokens_per_call,
        "tokens_per_s": completion_tokens / stats.wall_s if stats.wall_s > 0 else 0.0,
    }
