"""The continuous-batching metrics, with vLLM's names where vLLM has one: how many sequences each
engine step scored together, how many tokens it processed, how full the KV budget is, and how often
speculation was off because the batch was large.

They live on the `ServerMetrics` registry (label `model_name`), beside the per-request counters.
"""

from __future__ import annotations

from typing import Any

from specdec.engine.batch import BatchEngine, StepInfo
from specdec.serving.metrics import ServerMetrics


class BatchMetrics:
    BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
    TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

    def __init__(self, metrics: ServerMetrics) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        reg, name, by_model = metrics.registry, metrics.model_name, ["model_name"]

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(metric, doc, by_model, buckets=buckets, registry=reg).labels(name)

        self.batch_size = histogram(
            "vllm:iteration_batch_size", "Sequences whose drafts one engine step's target pass scored together.",
            self.BATCH_BUCKETS,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Tokens the target processed in one engine step: prompt fill plus the scored blocks (root and drafts).",
            self.TOKEN_BUCKETS,
        )
        self.kv_usage = Gauge(
            "vllm:kv_cache_usage_perc", "Fraction of the KV budget (--max-kv-tokens) the running requests reserve.",
            by_model, registry=reg,
        ).labels(name)
        self.undrafted = Counter(
            "vllm:spec_decode_disabled_iterations",
            "Engine steps that drafted nothing: more requests ran than --spec-disable-batch-size, or the "
            "measured costs made plain decoding the faster choice for every request (--speculation adaptive).",
            by_model, registry=reg,
        ).labels(name)
        self.free_tokens = Counter(
            "specdec:free_draft_tokens",
            "Tokens of free trees (the text's own continuations, no draft model) proposed for requests the "
            "planner gave no model draft (--speculation adaptive).", by_model, registry=reg,
        ).labels(name)
        self.prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", by_model, registry=reg,
        ).labels(name)
        self.prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens whose K/V the prefix cache supplied.", by_model, registry=reg,
        ).labels(name)

    def step(self, info: StepInfo, batch: BatchEngine) -> None:
        if info.batch_size:
            self.batch_size.observe(info.batch_size)
            if not info.drafting or (info.depths and not any(info.depths) and not info.free_nodes):
                self.undrafted.inc()
            if info.free_nodes:
                self.free_tokens.inc(info.free_nodes)
        if info.target_tokens + info.fill_tokens:
            self.iteration_tokens.observe(info.target_tokens + info.fill_tokens)
        if info.prefix_query_tokens:
            self.prefix_queries.inc(info.prefix_query_tokens)
            self.prefix_hits.inc(info.prefix_hit_tokens)
        if batch.max_kv_tokens:
            self.kv_usage.set(batch.kv_slots_in_use() / batch.max_kv_tokens)
