"""The summary: per (method, temperature) speedups over AR as geometric means of per-prompt ratios,
tokens and accepted drafts per target call, acceptance by position, SWI and greedy mismatches, and
summary.md's Markdown (also printed, tables only, to the terminal)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specdec.bench.peers import HF_BASELINE, HF_PEERS, is_hf
from specdec.bench.settings import fmt_temp
from specdec.bench.store import row_key
from specdec.methods.registry import all_methods

MISSING = "—"


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the positive finite values (NaN when there are none)."""
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


@dataclass
class MethodSummary:
    method: str
    temperature: float
    n: int
    tokens_per_s: float
    speedup: dict[str, float]
    """Task category (and "all") -> geometric mean of per-prompt tokens/s ratios over our AR."""
    speedup_vs_hf: dict[str, float]
    """For hf-* peers: the same against hf-ar."""
    decode_speedup: dict[str, float]
    """The same over decode-only tokens/s (`decode_tokens_per_s`: prefill and first step left out)."""
    after_prefill_speedup: dict[str, float]
    """The same over every new token after the target's prefill (`after_prefill_tokens_per_s`)."""
    tokens_per_call: float | None
    accepted_per_call: float | None
    acceptance_by_position: list[float]
    swi: float | None
    mismatches: int | None
    compared: int
    auto_choices: dict[str, int] = field(default_factory=dict)
    """For `auto`: what it followed (the tuned winner's label) and on how many rows."""


@dataclass
class Summary:
    temperatures: list[float]
    tasks: list[str]
    methods: list[str]
    table: dict[tuple[str, float], MethodSummary]
    prompts_per_task: dict[str, int]
    n_rows: int
    cross_session_pairs: int = 0

    def greedy_mismatches(self, hf: bool = False) -> int:
        return sum(
            s.mismatches or 0 for (m, t), s in self.table.items() if t == 0 and is_hf(m) == hf
        )


def _method_order(methods: Iterable[str]) -> list[str]:
    # Registered methods in listing order, then variant labels by name, then the peers.
    registered = all_methods()
    present = set(methods)
    order = [m for m in registered if m in present]
    order += sorted(m for m in present if m not in registered and not is_hf(m))
    order += [m for m in HF_PEERS if m in present]
    return order


def _ratio(row: dict[str, Any], base: dict[str, Any] | None, field: str = "tokens_per_s") -> float | None:
    if base is None:
        return None
    a, b = row["stats"].get(field), base["stats"].get(field)
    if not a or not b:
        return None
    return a / b


def summarize(rows: Sequence[dict[str, Any]]) -> Summary:
    """Aggregate result rows per (method, temperature); speedups are geometric means of per-row
    ratios against the baseline row of the same prompt, temperature and repeat."""
    index = {row_key(r): r for r in rows}
    temps = sorted({float(r["temperature"]) for r in rows})
    tasks = sorted({r["task"] for r in rows})
    methods = _method_order(r["method"] for r in rows)
    prompts_per_task = dict(sorted(Counter(task for _, task in {(r["id"], r["task"]) for r in rows}).items()))
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], float(r["temperature"]))].append(r)
    table: dict[tuple[str, float], MethodSummary] = {}
    cross = 0
    for (m, t), group in groups.items():
        ratios: dict[str, list[float]] = defaultdict(list)
        hf_ratios: dict[str, list[float]] = defaultdict(list)
        decode_ratios: dict[str, list[float]] = defaultdict(list)
        after_ratios: dict[str, list[float]] = defaultdict(list)
        for r in group:
            key = (str(r["id"]), m, t, int(r["repeat"]))
            ar = index.get((key[0], "ar", t, key[3]))
            q = _ratio(r, ar)
            if q is not None:
                ratios[r["task"]].append(q)
                ratios["all"].append(q)
                if m != "ar" and ar is not None and r.get("session") != ar.get("session"):
                    cross += 1
            for field_, into in (("decode_tokens_per_s", decode_ratios), ("after_prefill_tokens_per_s", after_ratios)):
                q = _ratio(r, ar, field_)
                if q is not None:
                    into[r["task"]].append(q)
                    into["all"].append(q)
            if is_hf(m):
                q = _ratio(r, index.get((key[0], HF_BASELINE, t, key[3])))
                if q is not None:
                    hf_ratios[r["task"]].append(q)
                    hf_ratios["all"].append(q)
        stats = [r["stats"] for r in group]
        calls = [s for s in stats if s.get("target_calls")]
        tpc = sum(s["new_tokens"] for s in calls) / sum(s["target_calls"] for s in calls) if calls else None
        drafted = sum(s.get("draft_tokens") or 0 for s in calls)
        apc = sum(s.get("accepted_tokens") or 0 for s in calls) / sum(s["target_calls"] for s in calls) if drafted else None
        positions: list[list[float]] = []
        for s in stats:
            for i, a in enumerate(s.get("accepted_per_position") or []):
                while len(positions) <= i:
                    positions.append([])
                positions[i].append(float(a))
        swis = [float(s["swi"]) for s in stats if isinstance(s.get("swi"), (int, float))]
        compared = [r for r in group if r.get("output_equals_ar") is not None] if t == 0 and m != "ar" else []
        tps = [s["tokens_per_s"] for s in stats if s.get("tokens_per_s")]
        table[(m, t)] = MethodSummary(
            method=m,
            temperature=t,
            n=len(group),
            tokens_per_s=sum(tps) / len(tps) if tps else float("nan"),
            speedup={k: geomean(v) for k, v in ratios.items()},
            speedup_vs_hf={k: geomean(v) for k, v in hf_ratios.items()},
            decode_speedup={k: geomean(v) for k, v in decode_ratios.items()},
            after_prefill_speedup={k: geomean(v) for k, v in after_ratios.items()},
            tokens_per_call=tpc,
            accepted_per_call=apc,
            acceptance_by_position=[sum(p) / len(p) for p in positions],
            swi=sum(swis) / len(swis) if swis else None,
            mismatches=sum(1 for r in compared if r["output_equals_ar"] is False) if compared else None,
            compared=len(compared),
            auto_choices=dict(Counter(r["auto_choice"] for r in group if r.get("auto_choice"))),
        )
    return Summary(temps, tasks, methods, table, prompts_per_task, len(rows), cross)


def _x(v: float | None) -> str:
    return MISSING if v is None or not math.isfinite(v) else f"{v:.2f}×"


def _f(v: float | None) -> str:
    return MISSING if v is None or not math.isfinite(v) else f"{v:.2f}"


def render_summary(
    summary: Summary,
    command: str | None = None,
    out_dir: Path | None = None,
    fingerprint_: dict[str, Any] | None = None,
    max_positions: int = 6,
) -> str:
    lines = ["# specdec bench", ""]
    if command:
        lines += ["```", command, "```", ""]
    if fingerprint_:
        fp = fingerprint_
        opts = ", ".join(f"{k}={v}" for k, v in (fp.get("opts") or {}).items())
        lines.append(
            f"Target `{fp.get('target')}` ({fp.get('dtype')}), {fp.get('max_new_tokens')} new tokens, gamma "
            f"{fp.get('gamma')}, top-k {fp.get('top_k')}, top-p {fp.get('top_p')}" + (f", options: {opts}" if opts else "")
            + "."
        )
    per_task = ", ".join(f"{t} {n}" for t, n in summary.prompts_per_task.items())
    lines += [
        f"{summary.n_rows} rows; prompts per task: {per_task or 'none'}. Multi-turn prompts send their first turn only.",
        "",
        "**Speedup** = geometric mean over prompts (and repeats) of tokens/s of the method ÷ tokens/s of our AR on the "
        "same prompt, temperature and repeat, measured back to back (end to end: prefill included); **decode** = the same "
        "over decoding alone (tokens after the first step ÷ the time after it), which long-prompt, short-answer "
        "prompts need; **after prefill** = every new token ÷ the time after the target's prompt pass (the draft's "
        "prompt and the first step counted: on short answers fairer between methods than **decode**, which leaves "
        "out the first step's tokens too). **tok/call** = new tokens per target call; "
        "**acc/call** = accepted draft tokens per target call; **acceptance by position** = mean over prompts of the "
        "acceptance rate at draft position 1, 2, … (a prompt that never proposed a position does not count "
        "there); **SWI** where the method reports it; **≠AR** = greedy outputs "
        "that differ from our AR (must be 0 for our methods; for hf-* it only reflects transformers' own kernels).",
        "",
    ]
    if summary.cross_session_pairs:
        lines += [
            f"Note: {summary.cross_session_pairs} ratios pair a row with an AR row measured in another session "
            "(resumed or extended run), so machine drift does not cancel for them.",
            "",
        ]
    cols = summary.tasks + ["all"]
    for t in summary.temperatures:
        lines += [f"## T = {fmt_temp(t)}" + (" (greedy)" if t == 0 else " (sampling)"), ""]
        head = ["method", "n", "tok/s"] + cols + ["decode", "after prefill", "tok/call", "acc/call",
                                                   "acceptance by position", "SWI",
                                                   "≠AR"]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for m in summary.methods:
            s = summary.table.get((m, t))
            if s is None:
                continue
            apos = " ".join(f"{a:.2f}" for a in s.acceptance_by_position[:max_positions]) or MISSING
            mism = f"{s.mismatches}/{s.compared}" if s.mismatches is not None and s.compared else MISSING
            if s.mismatches and not is_hf(m):
                mism = f"**{mism}**"
            cells = [f"`{m}`", str(s.n), _f(s.tokens_per_s)] + [_x(s.speedup.get(c)) for c in cols]
            cells += [_x(s.decode_speedup.get("all")), _x(s.after_prefill_speedup.get("all"))]
            cells += [_f(s.tokens_per_call), _f(s.accepted_per_call), apos, _f(s.swi), mism]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for m in summary.methods:
            s = summary.table.get((m, t))
            if s is not None and s.auto_choices:
                chosen = "; ".join(f"`{label}` ({n} rows)" for label, n in sorted(s.auto_choices.items()))
                lines += [f"`{m}` ran as: {chosen}.", ""]
        hf_rows = [m for m in summary.methods if is_hf(m) and m != HF_BASELINE and (m, t) in summary.table]
        if hf_rows and (HF_BASELINE, t) in summary.table:
            lines += [f"Hugging Face peers against `{HF_BASELINE}` (their own AR), T = {fmt_temp(t)}:", ""]
            lines += ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for m in hf_rows:
                s = summary.table[(m, t)]
                lines.append(f"| `{m}` | " + " | ".join(_x(s.speedup_vs_hf.get(c)) for c in cols) + " |")
            lines.append("")
    bad = summary.greedy_mismatches()
    if bad:
        lines += [f"**{bad} greedy outputs differ from AR: a lossless method must reproduce AR exactly.**", ""]
    if out_dir is not None:
        pngs = sorted(p.name for p in out_dir.glob("*.png"))
        if pngs:
            lines += ["Plots: " + ", ".join(f"[{n}]({n})" for n in pngs), ""]
    used_hf = [m for m in summary.methods if is_hf(m)]
    if used_hf:
        lines += ["Peers: " + "; ".join(f"`{m}`: {HF_PEERS[m]}" for m in used_hf) + ".", ""]
    return "\n".join(lines)


def render_tables(summary: Summary) -> str:
    """The summary's tables without the preamble, for the terminal."""
    md = render_summary(summary)
    start = md.find("## T =")
    return md[start:] if start >= 0 else md
