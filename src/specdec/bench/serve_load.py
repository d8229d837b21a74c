"""A load generator for `specdec serve`: N concurrent clients (the official `openai` client) send
the benchmark prompts, for each concurrency level and each method, and the run reports aggregate
completion tokens per second and latency percentiles, with plots.

    specdec bench-serve --url http://127.0.0.1:8000 --prompts PROMPTS.jsonl --concurrency 1,2,4,8,16 \\
        --methods ar,sps --max-tokens 128 --out runs/serve

Each method is a request's `speculative.method`, so one server (started with a draft model) serves
every row; the server's own batching does the rest. At each level, `concurrency` client threads
take prompts in turn until `requests` answers are in (at least one round of the prompt set); the
level's throughput is the completion tokens of all its answers over its wall time. Streamed
answers give the time to the first token; latency is arrival to the last token, as a client sees it.
The `openai` package (test extra) and matplotlib (bench extra) are imported only when used.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specdec.bench.prompts import BenchPrompt

RESULTS = "serve-results.jsonl"
SUMMARY = "serve-summary.md"
SCENARIOS = "serve-scenarios.jsonl"


@dataclass
class LevelSummary:
    method: str
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    p50_latency_s: float
    p95_latency_s: float
    mean_ttft_s: float
    p50_ttft_s: float = float("nan")
    p95_ttft_s: float = float("nan")
    prompt_tokens: int = 0
    cached_tokens: int = 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0…1) with linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _openai() -> Any:
    try:
        import openai
    except ImportError:
        raise ValueError("bench-serve needs the openai client: pip install openai") from None
    return openai


@dataclass(frozen=True)
class Endpoint:
    """The server under load: its URL and the API key it wants (None: it wants none)."""

    url: str
    api_key: str | None = None

    def client(self, timeout: float = 600.0) -> Any:
        return _openai().OpenAI(base_url=self.url.rstrip("/") + "/v1", api_key=self.api_key or "unused",
                                max_retries=0, timeout=timeout)

    def served_model(self) -> str:
        """The model the server names; ValueError, in one line, when it cannot be reached or refuses the key."""
        openai = _openai()
        try:
            models = self.client(30.0).models.list().data
        except openai.AuthenticationError:
            raise ValueError(f"the server at {self.url} refused the API key: pass --api-key "
                             "(or set SPECDEC_API_KEY)") from None
        except openai.APIConnectionError:
            raise ValueError(f"cannot reach a server at {self.url}: start `specdec serve` or check --url") from None
        except openai.APIStatusError as exc:
            raise ValueError(f"the server at {self.url} answered GET /v1/models with {exc.status_code}: {exc.message}"
                             ) from None
        if not models:
            raise ValueError(f"the server at {self.url} serves no model (GET /v1/models is empty)")
        return models[0].id


@dataclass
class Answer:
    """One streamed answer as a client sees it."""

    completion_tokens: int
    latency_s: float
    ttft_s: float
    finish_reason: str | None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the server's prefix cache supplied (usage.prompt_tokens_details.cached_tokens)."""
    arrivals: list[float] = field(default_factory=list, repr=False)
    """time.perf_counter() of every chunk that carried text."""


@dataclass
class RequestResult(Answer):
    """One request of a load level: its answer, and which level, method and prompt it belonged to."""

    method: str = ""
    concurrency: int = 0
    prompt_id: str = ""

    def record(self) -> dict:
        """The JSON row of serve-results.jsonl (the chunk arrival times stay out)."""
        row = asdict(self)
        del row["arrivals"]
        return row


def stream_answer(client: Any, model: str, text: str, method: str, max_tokens: int, temperature: float,
                  chat: bool, on_text: Callable[[], None] | None = None) -> Answer:
    """Stream one answer, timing every chunk that carries text (`on_text` is called at each)."""
    extra = {"speculative": {"method": method}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    finish = None
    usage = None
    kwargs = dict(model=model, max_tokens=max_tokens, temperature=temperature, stream=True,
                  stream_options={"include_usage": True}, extra_body=extra)
    if chat:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": text}], **kwargs)
    else:
        stream = client.completions.create(prompt=text, **kwargs)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if (choice.delta.content if chat else choice.text):
                arrivals.append(time.perf_counter())
                if on_text is not None:
                    on_text()
            finish = choice.finish_reason or finish
    latency = time.perf_counter() - t0
    tokens = int(usage.completion_tokens) if usage is not None else 0
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    if cached is None and isinstance(details, dict):
        cached = details.get("cached_tokens")
    return Answer(tokens, latency, arrivals[0] - t0 if arrivals else latency, finish,
                  int(usage.prompt_tokens) if usage is not None else 0, int(cached or 0), arrivals)


def one_request(client: Any, model: str, prompt: BenchPrompt, method: str, max_tokens: int, temperature: float,
                chat: bool) -> Answer:
    """Stream one answer to a benchmark prompt."""
    return stream_answer(client, model, prompt.text, method, max_tokens, temperature, chat)


def run_level(
    server: Endpoint, model: str, prompts: Sequence[BenchPrompt], method: str, concurrency: int, requests: int,
    max_tokens: int, temperature: float, chat: bool, timeout: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """`concurrency` clients, `requests` answers in all (prompts taken in turn): results and wall time."""
    lock = threading.Lock()
    next_index = [0]
    results: list[RequestResult] = []

    def worker() -> None:
        client = server.client(timeout)
        while True:
            with lock:
                i = next_index[0]
                if i >= requests:
                    return
                next_index[0] += 1
            prompt = prompts[i % len(prompts)]
            a = one_request(client, model, prompt, method, max_tokens, temperature, chat)
            with lock:
                results.append(RequestResult(**vars(a), method=method, concurrency=concurrency, prompt_id=prompt.id))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return results, time.perf_counter() - t0


def summarize_level(results: Sequence[RequestResult], wall_s: float) -> LevelSummary:
    tokens = sum(r.completion_tokens for r in results)
    latencies = [r.latency_s for r in results]
    ttfts = [r.ttft_s for r in results]
    return LevelSummary(
        results[0].method, results[0].concurrency, len(results), tokens, wall_s,
        tokens / wall_s if wall_s > 0 else 0.0, percentile(latencies, 0.5), percentile(latencies, 0.95),
        statistics.fmean(ttfts), percentile(ttfts, 0.5), percentile(ttfts, 0.95),
        sum(r.prompt_tokens for r in results), sum(r.cached_tokens for r in results),
    )


def crossover(levels: Sequence[LevelSummary], baseline: str = "ar") -> dict[str, int | None]:
    """Per speculative method: the smallest concurrency at which the baseline's throughput is at
    least its own (where speculation stops paying; None = never within the levels run)."""
    by = {(s.method, s.concurrency): s for s in levels}
    out: dict[str, int | None] = {}
    for method in dict.fromkeys(s.method for s in levels):
        if method == baseline:
            continue
        out[method] = next((c for c in sorted({s.concurrency for s in levels})
                            if (baseline, c) in by and (method, c) in by
                            and by[(baseline, c)].tokens_per_s >= by[(method, c)].tokens_per_s), None)
    return out


def render(levels: Sequence[LevelSummary], command: str | None = None) -> str:
    lines = ["# specdec serve under load", ""]
    if command:
        lines += ["```", command, "```", ""]
    base = {s.concurrency: s.tokens_per_s for s in levels if s.method == "ar"}
    one = {s.method: s.tokens_per_s for s in levels if s.concurrency == min(x.concurrency for x in levels)}
    lines += ["| method | clients | requests | tokens | tokens/s | vs AR | vs its lowest level | p50 latency s | "
              "p95 latency s | mean TTFT s | p50 TTFT s | p95 TTFT s | prefix hits |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in levels:
        vs_ar = f"{s.tokens_per_s / base[s.concurrency]:.2f}×" if base.get(s.concurrency) else "—"
        vs_one = f"{s.tokens_per_s / one[s.method]:.2f}×" if one.get(s.method) else "—"
        lines.append(f"| {s.method} | {s.concurrency} | {s.requests} | {s.completion_tokens} | {s.tokens_per_s:.2f} | "
                     f"{vs_ar} | {vs_one} | {s.p50_latency_s:.2f} | {s.p95_latency_s:.2f} | {s.mean_ttft_s:.2f} | "
                     f"{s.p50_ttft_s:.2f} | {s.p95_ttft_s:.2f} | {_hits(s)} |")
    cross = crossover(levels)
    if cross:
        lines += ["", "Crossover (smallest number of clients where AR's throughput reaches the method's; "
                  "a value for `specdec serve --spec-disable-batch-size`, one below it):", ""]
        lines += [f"- {m}: {c if c is not None else 'not reached'}" for m, c in cross.items()]
    return "\n".join(lines) + "\n"


# ---- scenarios: a long prompt beside a running stream, a shared prefix --------------------------
STREAM_PROMPT = "Write a long, detailed tutorial on Python's itertools module, with an example for every function."


def long_text(approx_tokens: int, tag: str) -> str:
    """Filler text of about `approx_tokens` tokens (~16 per line for BPE tokenizers), unique per `tag`.
    The tag opens the text once: a tag on every line (a 19-digit time, one token per digit for Qwen)
    doubled the length."""
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(max(approx_tokens // 16, 1))]
    return "\n".join([tag, *lines])


@dataclass
class StallResult:
    method: str
    long_prompt_tokens: int
    long_ttft_s: float
    gaps_s: list[float]
    """The running stream's gaps between text chunks from the long prompt's arrival to its first token."""

    def gap(self, q: float) -> float:
        return percentile(self.gaps_s, q)


def stall_scenario(server: Endpoint, model: str, method: str, long_tokens: int, temperature: float, chat: bool,
                   stream_tokens: int = 512) -> StallResult:
    """One stream decodes; once its text flows, a prompt of ~`long_tokens` tokens arrives: the stream's
    gaps while that prompt is filled (until its first token)."""
    first = threading.Event()
    box: dict[str, Answer] = {}

    def run_stream() -> None:
        box["stream"] = stream_answer(server.client(), model, STREAM_PROMPT, method, stream_tokens,
                                      temperature, chat, on_text=first.set)

    thread = threading.Thread(target=run_stream)
    thread.start()
    first.wait(600)
    sent = time.perf_counter()
    long = stream_answer(server.client(), model, long_text(long_tokens, f"stall {time.time_ns()}"),
                         method, 4, temperature, chat)
    answered = sent + long.ttft_s
    thread.join()
    arrivals = box["stream"].arrivals
    before = [a for a in arrivals if a < sent][-1:]
    during = [a for a in arrivals if sent <= a <= answered]
    after = [a for a in arrivals if a > answered][:1]
    marks = before + during + after
    return StallResult(method, long.prompt_tokens, long.ttft_s, [b - a for a, b in zip(marks, marks[1:])])


@dataclass
class PrefixResult:
    method: str
    prompt_tokens: int
    first_ttft_s: float
    second_ttft_s: float
    second_cached_tokens: int


def prefix_scenario(server: Endpoint, model: str, method: str, prefix_tokens: int, temperature: float,
                    chat: bool) -> PrefixResult:
    """Two requests sharing a ~`prefix_tokens`-token prefix, one after the other: their times to first token."""
    client = server.client()
    shared = long_text(prefix_tokens, f"prefix {time.time_ns()}")
    one = stream_answer(client, model, shared + "\nWhich animal jumps?", method, 4, temperature, chat)
    two = stream_answer(client, model, shared + "\nWhich animal is lazy?", method, 4, temperature, chat)
    return PrefixResult(method, two.prompt_tokens, one.ttft_s, two.ttft_s, two.cached_tokens)


def render_scenarios(stalls: Sequence[StallResult], prefixes: Sequence[PrefixResult]) -> str:
    lines: list[str] = []
    if stalls:
        lines += ["", "## A long prompt arrives beside a running stream", "",
                  "The stream's gaps between text chunks while the long prompt is filled (until its first token).", "",
                  "| method | long prompt tokens | its TTFT s | gaps | p50 gap s | p95 gap s | max gap s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.method} | {r.long_prompt_tokens} | {r.long_ttft_s:.2f} | {len(r.gaps_s)} | {r.gap(0.5):.2f} | "
                  f"{r.gap(0.95):.2f} | {max(r.gaps_s, default=float('nan')):.2f} |" for r in stalls]
    if prefixes:
        lines += ["", "## Two requests sharing a prefix", "",
                  "| method | prompt tokens | first TTFT s | second TTFT s | second / first | cached tokens |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.method} | {r.prompt_tokens} | {r.first_ttft_s:.2f} | {r.second_ttft_s:.2f} | "
                  f"{r.second_ttft_s / r.first_ttft_s:.2f} | {r.second_cached_tokens} |" for r in prefixes]
    return "\n".join(lines) + ("\n" if lines else "")


def _hits(s: LevelSummary) -> str:
    """Prompt tokens the prefix cache supplied, of all prompt tokens sent."""
    if not s.prompt_tokens:
        return "—"
    return f"{s.cached_tokens}/{s.prompt_tokens} ({100 * s.cached_tokens / s.prompt_tokens:.0f}%)"


def make_serve_plots(levels: Sequence[LevelSummary], out_dir: Path) -> list[Path]:
    """throughput.png (tokens/s by clients), latency.png and ttft.png (p50/p95 by clients); ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(s.method for s in levels))

    def by_clients(path: Path, ylabel: str, title: str, draw: Callable[[Any], None]) -> Path:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        draw(ax)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def throughput(ax: Any) -> None:
        for m in methods:
            pts = sorted((s.concurrency, s.tokens_per_s) for s in levels if s.method == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)

    def percentiles(p50: str, p95: str) -> Callable[[Any], None]:
        """Plot each method's p50 (solid) and p95 (dashed) of the `LevelSummary` fields named."""
        def plot(ax: Any) -> None:
            for i, m in enumerate(methods):
                pts = sorted((s.concurrency, getattr(s, p50), getattr(s, p95)) for s in levels if s.method == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{m} p50")
                ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="^", linestyle="--", color=f"C{i}",
                        label=f"{m} p95")
        return plot

    latency = percentiles("p50_latency_s", "p95_latency_s")
    ttft = percentiles("p50_ttft_s", "p95_ttft_s")

    return [by_clients(out_dir / "throughput.png", "completion tokens / s (all clients)",
                       "specdec serve: aggregate throughput", throughput),
            by_clients(out_dir / "latency.png", "request latency (s)", "specdec serve: latency", latency),
            by_clients(out_dir / "ttft.png", "time to first token (s)", "specdec serve: time to first token", ttft)]


def run_scenarios(server: Endpoint, model: str, methods: Sequence[str], temperature: float, chat: bool,
                  stall_tokens: int, prefix_tokens: int,
                  log: Callable[[str], None]) -> tuple[list[StallResult], list[PrefixResult]]:
    """Per method, the long-prompt scenario (`stall_tokens` > 0) and the shared-prefix one (`prefix_tokens` > 0)."""
    stalls: list[StallResult] = []
    prefixes: list[PrefixResult] = []
    for m in methods:
        if stall_tokens:
            r = stall_scenario(server, model, m, stall_tokens, temperature, chat)
            stalls.append(r)
            log(f"{m}: a {r.long_prompt_tokens}-token prompt beside a stream: its TTFT {r.long_ttft_s:.2f} s, "
                f"the stream's p95 gap {r.gap(0.95):.2f} s")
        if prefix_tokens:
            p = prefix_scenario(server, model, m, prefix_tokens, temperature, chat)
            prefixes.append(p)
            log(f"{m}: shared prefix, TTFT {p.first_ttft_s:.2f} s then {p.second_ttft_s:.2f} s "
                f"({p.second_cached_tokens} of {p.prompt_tokens} prompt tokens cached)")
    return stalls, prefixes


def run_serve_bench(
    server: Endpoint,
    prompts: Sequence[BenchPrompt],
    out_dir: str | Path,
    *,
    concurrency: Sequence[int] = (1, 2, 4, 8, 16),
    methods: Sequence[str] = ("ar", "sps"),
    requests: int | None = None,
    max_tokens: int = 128,
    temperature: float = 0.0,
    chat: bool = True,
    model: str | None = None,
    warmup: bool = True,
    plots: bool = True,
    command: str | None = None,
    log: Callable[[str], None] = print,
    stall_tokens: int = 0,
    prefix_tokens: int = 0,
) -> tuple[list[LevelSummary], list[Path]]:
    """Every (method, concurrency) level against `server`; writes the per-request
    rows, the summary table and the plots into `out_dir`. With `stall_tokens` / `prefix_tokens`, each
    method also runs the long-prompt and the shared-prefix scenarios (`stall_scenario`, `prefix_scenario`)."""
    if not prompts:
        raise ValueError("no prompts to send")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model or server.served_model()
    client = server.client()
    if warmup:  # the first request of a method pays one-off costs (allocations, tables)
        for m in methods:
            one_request(client, model, prompts[0], m, min(8, max_tokens), temperature, chat)
    levels: list[LevelSummary] = []
    with (out / RESULTS).open("w", encoding="utf-8") as f:
        for c in concurrency:
            for m in methods:
                n = requests if requests is not None else max(len(prompts), 2 * c)
                rows, wall = run_level(server, model, prompts, m, c, n, max_tokens, temperature, chat)
                for r in rows:
                    f.write(json.dumps(r.record()) + "\n")
                s = summarize_level(rows, wall)
                levels.append(s)
                log(f"{m} x{c}: {s.requests} requests, {s.completion_tokens} tokens in {s.wall_s:.1f} s = "
                    f"{s.tokens_per_s:.2f} tokens/s, p50 {s.p50_latency_s:.2f} s, p95 {s.p95_latency_s:.2f} s")
    stalls, prefixes = run_scenarios(server, model, methods, temperature, chat, stall_tokens, prefix_tokens, log)
    with (out / SCENARIOS).open("w", encoding="utf-8") as f:
        for row in [*stalls, *prefixes]:
            f.write(json.dumps({"scenario": type(row).__name__, **asdict(row)}) + "\n")
    (out / SUMMARY).write_text(render(levels, command) + render_scenarios(stalls, prefixes), encoding="utf-8")
    paths: list[Path] = []
    if plots:
        try:
            paths = make_serve_plots(levels, out)
        except ImportError:
            log("matplotlib is not installed, no plots (pip install 'specdec[bench]')")
    return levels, paths
