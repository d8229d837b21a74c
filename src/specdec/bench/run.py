"""Running a benchmark: the plan of missing (prompt, temperature, repeat, method) rows, AR first in
each group, one untimed warm-up per method and temperature, each row appended to results.jsonl as
soon as it is measured, then summary.md and the plots.

With a batch size above 1 (`--batch-size`, recorded in the run's settings), the rows of one
(temperature, repeat, method) are generated together by `Pipeline.generate_batch`, that many
prompts at a time with continuous batching; each row then carries its own tokens and counters and
the shared steps' timings (the Hugging Face peers still run one prompt at a time)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specdec.bench.peers import HF_NEEDS_DRAFT, HFPeers, is_hf
from specdec.bench.plots import make_plots
from specdec.bench.prompts import BenchPrompt, prompt_seed
from specdec.bench.settings import BenchSettings, base_method, fingerprint, fmt_temp
from specdec.bench.store import (
    LOG, RESULTS, SUMMARY, RowKey, check_out_dir, load_results, lock_out_dir, read_fingerprint, row_key,
    set_aside_truncated, write_config,
)
from specdec.bench.summary import Summary, render_summary, summarize
from specdec.core.sampling import SamplingConfig
from specdec.methods.registry import get_method

if TYPE_CHECKING:
    from specdec.engine.pipeline import Pipeline


def default_encoder(pipe: "Pipeline") -> Callable[[str], list[int]]:
    """The first turn as a chat message when the target has a chat template, else raw text."""
    chat = pipe.has_chat_template()
    return lambda text: pipe.encode(text, chat=chat)


@dataclass
class BenchReport:
    out_dir: Path
    rows: list[dict[str, Any]]
    ran: int
    skipped: int
    summary: Summary
    summary_md: str
    plots: list[Path]
    interrupted: bool = False


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def run_bench(
    pipe: "Pipeline | None",
    prompts: Sequence[BenchPrompt],
    out_dir: str | os.PathLike[str],
    settings: BenchSettings,
    *,
    encode: Callable[[str], list[int]] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    plots: bool = True,
    command: str | None = None,
    draft_name: str | None = None,
) -> BenchReport:
    """Measure every missing (prompt, temperature, repeat, method) row, then write the summary.

    `encode` turns a prompt's first turn into token ids (default: the pipeline's tokenizer, chat
    template when it has one). `pipe` may be None when nothing is left to run (summary only).
    """
    out = Path(out_dir)
    results_path = out / RESULTS
    log_file = Path(log_path) if log_path is not None else out / LOG
    target_name = getattr(pipe, "target_name", None) if pipe is not None else None
    dtype = str(pipe.target_lm.dtype) if pipe is not None else None
    if pipe is not None:
        draft_name = draft_name or getattr(pipe, "draft_name", None)
    fp = fingerprint(settings, target_name, dtype)
    if pipe is not None:
        check_out_dir(out, fp, draft_name)
    out.mkdir(parents=True, exist_ok=True)
    session = time.strftime("%Y-%m-%dT%H:%M:%S")

    def log(msg: str) -> None:
        with log_file.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def warn(msg: str) -> None:
        print(f"specdec bench: warning: {msg}", file=sys.stderr)
        log(f"warning: {msg}")

    with lock_out_dir(out):
        loaded = load_results(results_path)
        set_aside_truncated(results_path, loaded, warn)
        if loaded.duplicates:
            warn(f"{RESULTS} has {loaded.duplicates} duplicate rows; the first of each is used")
        done: dict[RowKey, dict[str, Any]] = {row_key(r): r for r in loaded.rows}
        check_prompt_texts(prompts, loaded.rows)

        plan = [
            (p, t, r, m)
            for p in prompts
            for t in settings.temperatures
            for r in range(settings.repeats)
            for m in settings.methods
            if (p.id, m, t, r) not in done
        ]
        skipped = len(prompts) * len(settings.temperatures) * settings.repeats * len(settings.methods) - len(plan)
        ran = 0
        interrupted = False
        if plan and pipe is None:
            raise ValueError(f"{len(plan)} rows are still to run; a pipeline is needed")
        if pipe is not None:
            write_config(out, fp, draft_name, command, session)
        if plan:
            assert pipe is not None
            ran, interrupted = _run_plan(
                pipe, plan, prompts, settings, results_path, done, encode, log, progress, session, skipped
            )

        rows = list(done.values())
        summary = summarize(rows)
        md = render_summary(summary, command=command, out_dir=out, fingerprint_=read_fingerprint(out) or fp)
        tmp = out / (SUMMARY + ".tmp")
        tmp.write_text(md, encoding="utf-8")
        os.replace(tmp, out / SUMMARY)
        plot_paths: list[Path] = []
        if plots:
            try:
                plot_paths = make_plots(summary, out)
            except ImportError:
                warn("matplotlib is not installed, no plots (pip install 'specdec[bench]')")
        log(f"summary written: {out / SUMMARY} ({len(rows)} rows)")
    report = BenchReport(out, rows, ran, skipped, summary, md, plot_paths, interrupted)
    if interrupted:
        raise KeyboardInterrupt
    return report


def check_prompt_texts(prompts: Sequence[BenchPrompt], rows: Sequence[dict[str, Any]]) -> None:
    """ValueError (before any work) where the results hold rows of a prompt id run on another text:
    resumed, the old rows would stand beside new ones of the same id (an AR row of one text against
    a method's row of the other reads as a lossless violation). Rows of older versions, which did
    not record a digest, are not compared."""
    ran_on = {str(r["id"]): r["prompt_digest"] for r in rows if "prompt_digest" in r}
    changed = [p for p in prompts if p.id in ran_on and ran_on[p.id] != p.digest]
    if changed:
        names = ", ".join(f"{p.id!r} (line {p.line})" for p in changed[:5]) + (" …" if len(changed) > 5 else "")
        raise ValueError(
            f"the results here were run on another text of prompt {names}; rows of different texts cannot be "
            "compared: use another --out, or the texts they were run on to resume"
        )


Plan = list[tuple[BenchPrompt, float, int, str]]
"""The rows still to run: (prompt, temperature, repeat, method), in run order."""
Generated = tuple[list[int], dict[str, Any], "dict[str, Any] | None"]
"""(token ids, statistics, the hf-* peer's settings or None)."""


class _PlanRunner:
    """Runs a plan's rows: checks and encodes first (a prompt too long for the context fails now,
    not an hour in), warms up, then generates each row (or each batch of rows)."""

    def __init__(self, pipe: "Pipeline", plan: Plan, settings: BenchSettings,
                 encode: Callable[[str], list[int]] | None) -> None:
        self.pipe, self.plan, self.settings = pipe, plan, settings
        self.encode = encode or default_encoder(pipe)
        self.batch_size = int(settings.run_info.get("batch_size", 1))
        self.batched: dict[tuple[str, float, int, str], Generated] = {}
        methods = list(dict.fromkeys(m for _, _, _, m in plan))
        self.peers = HFPeers(pipe, settings.gamma, settings.opts.get("max_ngram", 3)) \
            if any(is_hf(m) for m in methods) else None
        for m in methods:
            if not is_hf(m) and get_method(base_method(m, settings.variants)).needs_draft_model and pipe.draft_lm is None:
                raise ValueError(f"method {m!r} needs a draft model (--draft)")
            if m in HF_NEEDS_DRAFT and pipe.draft_lm is None:
                raise ValueError(f"peer {m!r} needs a draft model (--draft)")
        self.ids_of = self._encode_all()

    def _encode_all(self) -> dict[str, list[int]]:
        pipe, settings = self.pipe, self.settings
        limit = min(
            int(getattr(pipe.target_lm, "context_length", 1 << 30)),
            int(getattr(pipe.draft_lm, "context_length", 1 << 30)) if pipe.draft_lm is not None else 1 << 30,
        )
        ids_of: dict[str, list[int]] = {}
        for p in {p.id: p for p, _, _, _ in self.plan}.values():
            ids = list(self.encode(p.text))
            if not ids:
                raise ValueError(f"prompt {p.id!r} (line {p.line}) encodes to no tokens")
            need = len(ids) + settings.max_new_tokens + settings.gamma + 1
            if need > limit:
                raise ValueError(
                    f"prompt {p.id!r} (line {p.line}) has {len(ids)} tokens; with {settings.max_new_tokens} new tokens "
                    f"and drafts it needs {need} > the context of {limit} tokens (lower --max-new-tokens or drop it)"
                )
            ids_of[p.id] = ids
        return ids_of

    def run_one(self, method: str, ids: list[int], max_new: int, sampling: SamplingConfig,
                seed: int | None) -> Generated:
        if is_hf(method):
            assert self.peers is not None
            return self.peers.generate(method, ids, max_new, sampling, seed)
        base = base_method(method, self.settings.variants)
        res = self.pipe.generate(ids, base, max_new, sampling=sampling, seed=seed,
                                 **self.settings.method_options(method))
        return res.token_ids, res.stats.to_dict(), None

    def run_batch(self, method: str, t: float, r: int) -> None:
        """Every planned prompt of (t, r, method) in one continuous batch, kept until written."""
        group = [p for p, tt, rr, m in self.plan if (tt, rr, m) == (t, r, method)]
        settings = self.settings
        results = self.pipe.generate_batch(
            [self.ids_of[p.id] for p in group], base_method(method, settings.variants), settings.max_new_tokens,
            sampling=settings.sampling(t), seed=[prompt_seed(p.id, r) if t > 0 else None for p in group],
            max_batch_size=self.batch_size, **settings.method_options(method),
        )
        for p, res in zip(group, results):
            self.batched[(p.id, t, r, method)] = (res.token_ids, res.stats.to_dict(), None)

    def generate(self, p: BenchPrompt, t: float, r: int, m: str) -> Generated:
        """One row's generation (from its batch when batching)."""
        if self.batch_size > 1 and not is_hf(m):
            if (p.id, t, r, m) not in self.batched:
                self.run_batch(m, t, r)
            return self.batched.pop((p.id, t, r, m))
        seed = prompt_seed(p.id, r) if t > 0 else None
        return self.run_one(m, self.ids_of[p.id], self.settings.max_new_tokens, self.settings.sampling(t), seed)

    def warm_up(self) -> None:
        """One short untimed generation per method and temperature still to run."""
        warm_ids = self.ids_of[self.plan[0][0].id][:16]
        for m, t in dict.fromkeys((m, t) for _, t, _, m in self.plan):
            self.run_one(m, warm_ids, self.settings.warmup_tokens, self.settings.sampling(t), 0 if t > 0 else None)

    def auto_choice(self, method: str, sampling: SamplingConfig, seed: int | None) -> str | None:
        """What `auto` (or a variant of it) follows for this sampling: its profile's winner, and whether
        it ran through the per-step planner (`Pipeline.auto_plan`), for the summary."""
        from specdec.core.store import ProfileProblem, find_profile
        from specdec.methods.auto import planned_label

        try:
            label = str(find_profile(self.pipe.profile_key(sampling))["winner"]["label"])
        except (ProfileProblem, KeyError, TypeError):
            return None
        planned = self.pipe.auto_plan(sampling, seed, **self.settings.method_options(method))
        return label if planned is None else planned_label(planned, label)

    def row(self, p: BenchPrompt, t: float, r: int, m: str, done: dict[RowKey, dict[str, Any]],
            session: str) -> dict[str, Any]:
        """The row of (p, t, r, m), generated now, compared with its AR row when greedy."""
        tokens, stats, hf_settings = self.generate(p, t, r, m)
        ar = done.get((p.id, "ar", t, r))
        equal = None
        if t == 0:
            equal = True if m == "ar" else (None if ar is None else tokens == ar["token_ids"])
        row: dict[str, Any] = {
            "id": p.id, "prompt_digest": p.digest, "task": p.task, "method": m, "temperature": t, "repeat": r,
            "seed": prompt_seed(p.id, r) if t > 0 else None, "output_equals_ar": equal,
            "text": self.pipe.decode(tokens), "token_ids": tokens, "stats": stats,
        }
        if hf_settings is not None:
            row["hf_settings"] = hf_settings
        if base_method(m, self.settings.variants) == "auto":
            row["auto_choice"] = self.auto_choice(m, self.settings.sampling(t), row["seed"])
        row["session"] = session
        return row


def _run_plan(
    pipe: "Pipeline",
    plan: Plan,
    prompts: Sequence[BenchPrompt],
    settings: BenchSettings,
    results_path: Path,
    done: dict[RowKey, dict[str, Any]],
    encode: Callable[[str], list[int]] | None,
    log: Callable[[str], None],
    progress: bool,
    session: str,
    skipped: int,
) -> tuple[int, bool]:
    """Run the plan's rows in order, appending each to `results_path` and `done`: (rows run, interrupted)."""
    from tqdm.auto import tqdm

    runner = _PlanRunner(pipe, plan, settings, encode)
    runner.warm_up()
    n_prompts = len({p.id for p, _, _, _ in plan})
    log(
        f"start: {len(plan)} rows to run ({skipped} already in {results_path.name}), {n_prompts} prompts, "
        f"methods {','.join(settings.methods)}, temperatures {','.join(map(fmt_temp, settings.temperatures))}, "
        f"{settings.max_new_tokens} new tokens, {settings.repeats} repeat(s)"
    )
    # A bar redraws one line with carriage returns: on a terminal. Elsewhere (a log, CI) each row's
    # log line goes to stderr instead.
    on_terminal = sys.stderr.isatty()
    bar = tqdm(total=len(plan), desc="bench", unit="row", file=sys.stderr, disable=not (progress and on_terminal),
               dynamic_ncols=True)
    ran = 0
    t_start = time.perf_counter()
    try:
        with results_path.open("a", encoding="utf-8") as f:
            for p, t, r, m in plan:
                bar.set_postfix_str(f"{p.id} {m} T={fmt_temp(t)}", refresh=False)
                row = runner.row(p, t, r, m, done, session)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[(p.id, m, t, r)] = row
                ran += 1
                bar.update(1)
                elapsed = time.perf_counter() - t_start
                eta = elapsed / ran * (len(plan) - ran)
                equal = row["output_equals_ar"]
                verdict = "" if equal is None or m == "ar" else (", equal to AR" if equal else ", DIFFERS FROM AR")
                line = (f"[{skipped + ran}/{skipped + len(plan)}] {p.id} {m} T={fmt_temp(t)} r={r}: "
                        f"{row['stats']['new_tokens']} tokens, {row['stats']['tokens_per_s']:.2f} tokens/s{verdict} | "
                        f"elapsed {_fmt_duration(elapsed)}, ETA {_fmt_duration(eta)}")
                log(line)
                if progress and not on_terminal:
                    print(f"bench {line}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        log(f"interrupted after {ran} rows; re-run the same command to resume")
        return ran, True
    finally:
        bar.close()
    log(f"done: {ran} rows in {_fmt_duration(time.perf_counter() - t_start)}")
    return ran, False
