"""`specdec bench`: every method, and Hugging Face's own `generate` as peers, on a prompt file.

    from specdec import Pipeline
    from specdec.bench import BenchSettings, load_prompts, run_bench, select_prompts

    pipe = Pipeline("smollm2-135m-instruct", draft="smollm2-135m-instruct")
    prompts = select_prompts(load_prompts("prompts-dev.jsonl"), per_task=2)
    report = run_bench(pipe, prompts, "out/", BenchSettings(methods=["ar", "sps", "pld"]))

What it writes to the output directory:

- `results.jsonl`: one row per (prompt, method, temperature, repeat), appended and flushed as soon
  as it is measured: the `--json` object of `specdec generate` (`text`, `token_ids`, `stats`) plus
  `id`, `task`, `method`, `temperature`, `repeat`, `seed` and `output_equals_ar` (T = 0 rows).
- `summary.md`: speedup over AR per method and task category, tokens and accepted drafts per target
  call, acceptance by draft position, SWI where a method reports it, greedy mismatches against AR.
- `speedup_T{t}.png`, `acceptance_by_position.png` (needs matplotlib: `pip install 'specdec[bench]'`).
- `config.json` (the settings rows must share to be compared), `bench.log` (one line per row).

For each prompt, temperature and repeat, AR runs first and then every other method, so a method and
its baseline are measured minutes apart and slow drift of the machine cancels in their ratio.
Re-running with the same output directory skips the rows already there (resume after a crash or an
interrupt); a lock file keeps two runs from writing the same directory.

Methods come from `specdec.pipeline.METHODS` at call time, so a method added there shows up here
with no change; options this module does not know go to `Pipeline.generate` as `**opts`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from specdec.decoder import DecodeStats
from specdec.pipeline import METHODS
from specdec.sampling import SamplingConfig

if TYPE_CHECKING:
    from specdec.pipeline import Pipeline

RESULTS = "results.jsonl"
SUMMARY = "summary.md"
CONFIG = "config.json"
LOG = "bench.log"
LOCK = ".lock"

# Hugging Face `generate` as peers: name -> what it runs.
HF_PEERS: dict[str, str] = {
    "hf-ar": "transformers `generate`, plain greedy/sampling",
    "hf-assisted": "transformers assisted generation with the draft model, HF's default assistant settings",
    "hf-assisted-tuned": "transformers assisted generation, num_assistant_tokens = gamma, schedule constant",
    "hf-pld": "transformers prompt lookup: prompt_lookup_num_tokens = gamma, max_matching_ngram_size = max_ngram",
}
HF_NEEDS_DRAFT = frozenset({"hf-assisted", "hf-assisted-tuned"})
HF_BASELINE = "hf-ar"
# Keyword arguments of Pipeline.generate that per-method options must not shadow.
RESERVED_OPTS = frozenset({"prompt", "method", "max_new_tokens", "sampling", "gamma", "seed", "chat"})
MISSING = "—"


def parse_variants(items: Iterable[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """`--variant "LABEL=METHOD KEY=VALUE ..."` strings as {label: (method, options)}.

    A variant is one of our methods with its own options (e.g. several SpecInfer tree shapes in one
    run, each measured against the same AR rows); its label is used like a method name in
    `--methods`, in results.jsonl and in the summary.
    """
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for item in items:
        head, _, rest = item.strip().partition(" ")
        label, sep, method = head.partition("=")
        label, method = label.strip(), method.strip()
        if not sep or not label or not method:
            raise ValueError(f"--variant {item!r}: expected 'LABEL=METHOD KEY=VALUE ...' (e.g. 'si-221=specinfer expansion=2,2,1')")
        if method not in METHODS or method == "ar":
            raise ValueError(f"--variant {item!r}: {method!r} is not a speculative method; choose from: "
                             f"{', '.join(m for m in METHODS if m != 'ar')}")
        if label in METHODS or label in HF_PEERS or label == "hf" or label in variants:
            raise ValueError(f"--variant {item!r}: label {label!r} is already a method or variant name")
        opts = parse_opts(rest.split())
        clash = sorted(RESERVED_OPTS & set(opts))
        if clash:
            raise ValueError(f"--variant {item!r}: option{'s' if len(clash) > 1 else ''} {', '.join(clash)} cannot be set here")
        variants[label] = (method, opts)
    return variants


def all_methods() -> list[str]:
    """Every name `--methods` accepts: the pipeline's methods (looked up now) and the HF peers."""
    return list(METHODS) + list(HF_PEERS)


def is_hf(method: str) -> bool:
    return method in HF_PEERS


def parse_methods(
    spec: str | Sequence[str], variants: dict[str, tuple[str, dict[str, Any]]] | None = None
) -> list[str]:
    """Validated method names in run order: `ar` first (always run, it is the baseline), then the
    pipeline's methods and variant labels as given, then `hf-ar` (added when any peer is asked
    for) and the other peers. `hf` stands for all the peers."""
    variants = variants or {}
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    expanded: list[str] = []
    for n in names:
        expanded.extend(HF_PEERS if n == "hf" else [n])
    unknown = [n for n in expanded if n not in METHODS and n not in HF_PEERS and n not in variants]
    if unknown:
        raise ValueError(
            f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(all_methods() + list(variants))} (or 'hf' for all the hf-* peers)"
        )
    ours = ["ar"] + [n for n in dict.fromkeys(expanded) if (n in METHODS or n in variants) and n != "ar"]
    peers = [n for n in dict.fromkeys(expanded) if n in HF_PEERS]
    if peers and HF_BASELINE not in peers:
        peers.insert(0, HF_BASELINE)
    elif peers:
        peers.remove(HF_BASELINE)
        peers.insert(0, HF_BASELINE)
    return ours + peers


def base_method(method: str, variants: dict[str, tuple[str, dict[str, Any]]] | None = None) -> str:
    """The pipeline method a name runs: itself, or the method a variant label stands for."""
    return (variants or {}).get(method, (method, {}))[0]


def needs_draft(methods: Iterable[str], variants: dict[str, tuple[str, dict[str, Any]]] | None = None) -> bool:
    """Whether any of these methods, variants or peers needs the draft model loaded."""
    bases = [base_method(m, variants) for m in methods]
    return any((m in METHODS and METHODS[m].needs_draft_model) or m in HF_NEEDS_DRAFT for m in bases)


def parse_temperatures(spec: str | Sequence[float]) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    temps: list[float] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
        try:
            t = float(item)
        except ValueError:
            raise ValueError(f"temperature {item!r} is not a number (give e.g. --temperatures 0,0.7)") from None
        if math.isnan(t) or math.isinf(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {item!r}")
        if t not in temps:
            temps.append(t)
    if not temps:
        raise ValueError("give at least one temperature (e.g. --temperatures 0,0.7)")
    return temps


def parse_value(text: str) -> Any:
    """A command-line option value: JSON when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_opts(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (repeatable `--opt`) as a dict; dashes in keys become underscores."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--opt {item!r}: expected KEY=VALUE with a Python identifier as KEY")
        opts[key] = parse_value(value)
    return opts


# ---- prompts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchPrompt:
    id: str
    task: str
    text: str
    """The first turn: what is sent, as a chat message when the target has a chat template."""
    line: int
    turns: int


def load_prompts(path: str | os.PathLike[str]) -> list[BenchPrompt]:
    """Read a prompt file (one JSON object a line: `id`, `task`, `turns`), with line-numbered errors."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist" if not p.exists() else f"{str(p)!r} is not a file")
    prompts: list[BenchPrompt] = []
    first_line: dict[str, int] = {}
    with p.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{p.name} line {n}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object with id, task and turns")
            pid = obj.get("id")
            if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid).strip() == "":
                raise ValueError(f"{where}: missing or empty 'id'")
            pid = str(pid)
            task = obj.get("task")
            if not isinstance(task, str) or not task.strip():
                raise ValueError(f"{where}: missing or empty 'task' (prompt {pid!r})")
            turns = obj.get("turns")
            if not isinstance(turns, list) or not turns:
                raise ValueError(f"{where}: 'turns' must be a non-empty list of strings (prompt {pid!r})")
            if not isinstance(turns[0], str) or not turns[0].strip():
                raise ValueError(f"{where}: the first turn must be a non-empty string (prompt {pid!r})")
            if pid in first_line:
                raise ValueError(f"{where}: duplicate id {pid!r} (first on line {first_line[pid]})")
            first_line[pid] = n
            prompts.append(BenchPrompt(pid, task.strip(), turns[0], n, len(turns)))
    if not prompts:
        raise ValueError(f"prompt file {str(p)!r} has no prompts")
    return prompts


def select_prompts(
    prompts: Sequence[BenchPrompt], tasks: Sequence[str] | None = None, per_task: int | None = None
) -> list[BenchPrompt]:
    """Keep the given task categories, then the first `per_task` prompts of each in file order."""
    present = list(dict.fromkeys(p.task for p in prompts))
    chosen = list(prompts)
    if tasks:
        unknown = [t for t in tasks if t not in present]
        if unknown:
            raise ValueError(
                f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"the prompt file has: {', '.join(present)}"
            )
        wanted = set(tasks)
        chosen = [p for p in chosen if p.task in wanted]
    if per_task is not None:
        if per_task < 1:
            raise ValueError(f"--per-task must be >= 1, got {per_task}")
        seen: Counter[str] = Counter()
        kept = []
        for p in chosen:
            if seen[p.task] < per_task:
                seen[p.task] += 1
                kept.append(p)
        chosen = kept
    return chosen


def prompt_seed(prompt_id: str, repeat: int) -> int:
    """The sampling seed of a (prompt, repeat): the same for every method, stable across runs."""
    digest = hashlib.sha256(f"{prompt_id}\x00{repeat}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ---- settings and the output directory -----------------------------------------------------
@dataclass
class BenchSettings:
    methods: list[str]
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    max_new_tokens: int = 128
    repeats: int = 1
    gamma: int = 4
    top_k: int = 0
    top_p: float = 1.0
    opts: dict[str, Any] = field(default_factory=dict)
    """Per-method options passed to `Pipeline.generate` (max_ngram, budget, expansion, …)."""
    variants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    """Labelled runs of one of our methods with their own options (see `parse_variants`)."""
    run_info: dict[str, Any] = field(default_factory=dict)
    """What changes timings but not outputs (device, fast linear path, draft dtype, threads):
    rows in one directory must share it to be compared."""
    warmup_tokens: int = 4

    def __post_init__(self) -> None:
        self.methods = parse_methods(self.methods, self.variants)
        self.temperatures = parse_temperatures(self.temperatures)
        for name in ("max_new_tokens", "repeats", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for t in self.temperatures:  # the same checks and messages as generation itself
            SamplingConfig(temperature=t, top_k=self.top_k, top_p=self.top_p)
        clash = sorted(RESERVED_OPTS & set(self.opts))
        if clash:
            raise ValueError(f"option{'s' if len(clash) > 1 else ''} {', '.join(clash)} cannot be passed as --opt")

    def sampling(self, temperature: float) -> SamplingConfig:
        return SamplingConfig(temperature=temperature, top_k=self.top_k, top_p=self.top_p)


def fingerprint(settings: BenchSettings, target: str | None, dtype: str | None) -> dict[str, Any]:
    """What every row in one output directory must share for its rows to be comparable."""
    return {
        "target": target,
        "dtype": dtype,
        "max_new_tokens": settings.max_new_tokens,
        "gamma": settings.gamma,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "opts": settings.opts,
        "run": settings.run_info,
        **({"variants": {k: [m, o] for k, (m, o) in settings.variants.items()}} if settings.variants else {}),
    }


def check_out_dir(out_dir: str | os.PathLike[str], fp: dict[str, Any], draft: str | None = None) -> None:
    """Raise ValueError when `out_dir` holds results made with other settings (before any work)."""
    cfg_path = Path(out_dir) / CONFIG
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a directory")
    if not cfg_path.exists():
        return
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        old = cfg["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg_path}: unreadable ({exc}); fix or delete it to resume") from None
    # Keys an older directory did not record cannot be compared; every recorded one must match.
    diffs = [
        f"{k}={old.get(k)!r} (now {v!r})"
        for k, v in fp.items()
        if k in old and json.dumps(old.get(k), sort_keys=True) != json.dumps(v, sort_keys=True)
    ]
    old_draft = cfg.get("draft")
    if draft is not None and old_draft is not None and draft != old_draft:
        diffs.append(f"draft={old_draft!r} (now {draft!r})")
    if diffs:
        raise ValueError(
            f"{out_dir} holds results made with {', '.join(diffs)}; rows with different settings cannot be "
            "compared: use another --out, or the same settings to resume"
        )


@contextlib.contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    path = out_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            alive = False
            if pid > 0:
                try:
                    os.kill(pid, 0)
                    alive = True
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True
            if alive and pid != os.getpid():
                raise ValueError(
                    f"another bench (pid {pid}) is writing to {out_dir}; wait for it or stop it "
                    f"(delete {path} if that process is not a bench)"
                ) from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# ---- results file --------------------------------------------------------------------------
RowKey = tuple[str, str, float, int]


def row_key(row: dict[str, Any]) -> RowKey:
    return (str(row["id"]), str(row["method"]), float(row["temperature"]), int(row["repeat"]))


@dataclass
class LoadedResults:
    rows: list[dict[str, Any]]
    truncated_at: int | None = None
    """Byte offset of an unreadable last line (a run killed mid-write), if any."""
    truncated_line: int | None = None
    duplicates: int = 0


def load_results(path: str | os.PathLike[str]) -> LoadedResults:
    """Rows of a results file. An unreadable *last* line is reported, not fatal (a crash mid-write);
    an unreadable line elsewhere raises ValueError with its number."""
    p = Path(path)
    if not p.exists():
        return LoadedResults([])
    data = p.read_bytes()
    lines = data.split(b"\n")
    rows: list[dict[str, Any]] = []
    seen: set[RowKey] = set()
    out = LoadedResults(rows)
    offset = 0
    last_content = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, raw in enumerate(lines):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            key = row_key(row)
            if not isinstance(row.get("stats"), dict):
                raise ValueError("no stats")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            if i == last_content:
                out.truncated_at, out.truncated_line = start, i + 1
                break
            raise ValueError(
                f"{p.name} line {i + 1}: not a result row ({exc}); fix or remove that line to resume "
                "(nothing was changed)"
            ) from None
        if key in seen:
            out.duplicates += 1
            continue
        seen.add(key)
        rows.append(row)
    return out


def _set_aside_truncated(path: Path, loaded: LoadedResults, warn: Callable[[str], None]) -> None:
    """Move an unreadable last line to `results.jsonl.truncated` so appending stays clean."""
    if loaded.truncated_at is None:
        return
    with path.open("rb+") as f:
        f.seek(loaded.truncated_at)
        fragment = f.read()
        with (path.parent / (path.name + ".truncated")).open("ab") as g:
            g.write(fragment.rstrip(b"\n") + b"\n")
        f.seek(loaded.truncated_at)
        f.truncate()
    warn(
        f"{path.name} line {loaded.truncated_line} was incomplete (a run stopped mid-write); moved it to "
        f"{path.name}.truncated and will measure that row again"
    )


# ---- running one row -----------------------------------------------------------------------
def default_encoder(pipe: "Pipeline") -> Callable[[str], list[int]]:
    """The first turn as a chat message when the target has a chat template, else raw text."""
    chat = pipe.has_chat_template()
    return lambda text: pipe.encode(text, chat=chat)


def _sync(device: Any) -> None:
    if isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)


def _null_stats() -> dict[str, Any]:
    return {f.name: None for f in dataclasses.fields(DecodeStats)}


class _HFPeers:
    """Runs the hf-* peers on the pipeline's own transformers models."""

    def __init__(self, pipe: "Pipeline", settings: BenchSettings) -> None:
        self.target = getattr(pipe.target_lm, "model", None)
        self.draft = getattr(pipe.draft_lm, "model", None) if pipe.draft_lm is not None else None
        if self.target is None or not hasattr(self.target, "generate"):
            raise ValueError("the hf-* peers need a Hugging Face transformers target model")
        self.device = getattr(pipe.target_lm, "device", torch.device("cpu"))
        self.eos = list(pipe.eos_token_ids)
        gen_cfg = getattr(self.target, "generation_config", None)
        pad = getattr(gen_cfg, "pad_token_id", None)
        tok = getattr(pipe, "tokenizer", None)
        if pad is None and tok is not None:
            pad = getattr(tok, "pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.settings = settings
        self.max_ngram = int(settings.opts.get("max_ngram", 3))

    def settings_for(self, method: str) -> dict[str, Any]:
        if method == "hf-assisted-tuned":
            return {"num_assistant_tokens": self.settings.gamma, "num_assistant_tokens_schedule": "constant"}
        if method == "hf-assisted":
            cfg = self.draft.generation_config
            defaults = cfg._get_default_generation_params() if hasattr(cfg, "_get_default_generation_params") else {}
            return {
                k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else defaults.get(k)
                for k in ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
            }
        if method == "hf-pld":
            return {"prompt_lookup_num_tokens": self.settings.gamma, "max_matching_ngram_size": self.max_ngram}
        return {}

    def generate(
        self, method: str, ids: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int | None
    ) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
        kwargs: dict[str, Any] = {}
        if method in HF_NEEDS_DRAFT:
            if self.draft is None:
                raise ValueError(f"{method} needs a draft model (--draft)")
            kwargs["assistant_model"] = self.draft
        hf_settings = self.settings_for(method)
        if method == "hf-pld":
            kwargs.update(hf_settings)
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        # Assistant settings live on the assistant's generation config (transformers reads them
        # there); restore it afterwards, the "heuristic" schedule also writes to it.
        saved = copy.deepcopy(self.draft.generation_config) if self.draft is not None else None
        try:
            if method == "hf-assisted-tuned":
                for k, v in hf_settings.items():
                    setattr(self.draft.generation_config, k, v)
            if seed is not None:
                torch.manual_seed(seed)
            with _quiet_transformers(), torch.inference_mode():
                _sync(self.device)
                t0 = time.perf_counter()
                out = self.target.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos,
                    pad_token_id=self.pad,
                    repetition_penalty=None,
                    **kwargs,
                )
                _sync(self.device)
                wall = time.perf_counter() - t0
        finally:
            if saved is not None:
                self.draft.generation_config = saved
        new = out[0, len(ids) :].tolist()
        stats = _null_stats()
        stats.update(
            new_tokens=len(new),
            wall_s=wall,
            tokens_per_s=len(new) / wall if wall > 0 else 0.0,
            prompt_tokens=len(ids),
            stopped_by="eos" if new and new[-1] in self.eos else "length",
        )
        return new, stats, hf_settings


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' advisory warnings would break the progress bar on every row."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


# ---- the run -------------------------------------------------------------------------------
@dataclass
class BenchReport:
    out_dir: Path
    rows: list[dict[str, Any]]
    ran: int
    skipped: int
    summary: "Summary"
    summary_md: str
    plots: list[Path]
    interrupted: bool = False


def _fmt_temp(t: float) -> str:
    return f"{t:g}"


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
    dtype = str(getattr(pipe.target_lm, "dtype", None)) if pipe is not None else None
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

    with _lock(out):
        loaded = load_results(results_path)
        _set_aside_truncated(results_path, loaded, warn)
        if loaded.duplicates:
            warn(f"{RESULTS} has {loaded.duplicates} duplicate rows; the first of each is used")
        done: dict[RowKey, dict[str, Any]] = {row_key(r): r for r in loaded.rows}

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
            _write_config(out, fp, draft_name, command, session)
        if plan:
            assert pipe is not None
            ran, interrupted = _run_plan(
                pipe, plan, prompts, settings, results_path, done, encode, log, progress, session, skipped
            )

        rows = list(done.values())
        summary = summarize(rows)
        md = render_summary(summary, command=command, out_dir=out, fingerprint_=_read_fingerprint(out) or fp)
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


def _read_fingerprint(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / CONFIG).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _write_config(out: Path, fp: dict[str, Any], draft: str | None, command: str | None, session: str) -> None:
    path = out / CONFIG
    cfg: dict[str, Any] = {}
    if path.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["fingerprint"] = fp
    if draft is not None or "draft" not in cfg:
        cfg["draft"] = draft if draft is not None else cfg.get("draft")
    cfg.setdefault("sessions", []).append({"started": session, "command": command})
    tmp = out / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _run_plan(
    pipe: "Pipeline",
    plan: list[tuple[BenchPrompt, float, int, str]],
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
    from tqdm.auto import tqdm

    encode = encode or default_encoder(pipe)
    methods_needed = list(dict.fromkeys(m for _, _, _, m in plan))
    peers = _HFPeers(pipe, settings) if any(is_hf(m) for m in methods_needed) else None
    for m in methods_needed:
        b = base_method(m, settings.variants)
        if b in METHODS and METHODS[b].needs_draft_model and pipe.draft_lm is None:
            raise ValueError(f"method {m!r} needs a draft model (--draft)")
        if m in HF_NEEDS_DRAFT and pipe.draft_lm is None:
            raise ValueError(f"peer {m!r} needs a draft model (--draft)")

    # Encode every prompt up front: a prompt too long for the context fails now, not an hour in.
    ids_of: dict[str, list[int]] = {}
    limit = min(
        int(getattr(pipe.target_lm, "context_length", 1 << 30)),
        int(getattr(pipe.draft_lm, "context_length", 1 << 30)) if pipe.draft_lm is not None else 1 << 30,
    )
    for p in {p.id: p for p, _, _, _ in plan}.values():
        ids = list(encode(p.text))
        if not ids:
            raise ValueError(f"prompt {p.id!r} (line {p.line}) encodes to no tokens")
        need = len(ids) + settings.max_new_tokens + settings.gamma + 1
        if need > limit:
            raise ValueError(
                f"prompt {p.id!r} (line {p.line}) has {len(ids)} tokens; with {settings.max_new_tokens} new tokens "
                f"and drafts it needs {need} > the context of {limit} tokens (lower --max-new-tokens or drop it)"
            )
        ids_of[p.id] = ids

    def run_one(method: str, ids: list[int], max_new: int, sampling: SamplingConfig, seed: int | None):
        if is_hf(method):
            assert peers is not None
            return peers.generate(method, ids, max_new, sampling, seed)
        base, variant_opts = settings.variants.get(method, (method, {}))
        opts = {**settings.opts, **variant_opts}
        res = pipe.generate(ids, base, max_new, sampling=sampling, gamma=settings.gamma, seed=seed, **opts)
        return res.token_ids, res.stats.to_dict(), None

    # Warm-up: one short untimed generation per method and temperature still to run.
    warm_ids = ids_of[plan[0][0].id][:16]
    for m, t in dict.fromkeys((m, t) for _, t, _, m in plan):
        run_one(m, warm_ids, settings.warmup_tokens, settings.sampling(t), 0 if t > 0 else None)

    n_prompts = len({p.id for p, _, _, _ in plan})
    log(
        f"start: {len(plan)} rows to run ({skipped} already in {results_path.name}), {n_prompts} prompts, "
        f"methods {','.join(settings.methods)}, temperatures {','.join(map(_fmt_temp, settings.temperatures))}, "
        f"{settings.max_new_tokens} new tokens, {settings.repeats} repeat(s)"
    )
    bar = tqdm(total=len(plan), desc="bench", unit="row", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    ran = 0
    t_start = time.perf_counter()
    try:
        with results_path.open("a", encoding="utf-8") as f:
            for p, t, r, m in plan:
                bar.set_postfix_str(f"{p.id} {m} T={_fmt_temp(t)}", refresh=False)
                seed = prompt_seed(p.id, r) if t > 0 else None
                tokens, stats, hf_settings = run_one(m, ids_of[p.id], settings.max_new_tokens, settings.sampling(t), seed)
                ar = done.get((p.id, "ar", t, r))
                equal = None
                if t == 0:
                    equal = True if m == "ar" else (None if ar is None else tokens == ar["token_ids"])
                row: dict[str, Any] = {
                    "id": p.id,
                    "task": p.task,
                    "method": m,
                    "temperature": t,
                    "repeat": r,
                    "seed": seed,
                    "output_equals_ar": equal,
                    "text": pipe.decode(tokens),
                    "token_ids": tokens,
                    "stats": stats,
                }
                if hf_settings is not None:
                    row["hf_settings"] = hf_settings
                row["session"] = session
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                done[(p.id, m, t, r)] = row
                ran += 1
                bar.update(1)
                elapsed = time.perf_counter() - t_start
                eta = elapsed / ran * (len(plan) - ran)
                verdict = "" if equal is None or m == "ar" else (", equal to AR" if equal else ", DIFFERS FROM AR")
                log(
                    f"[{skipped + ran}/{skipped + len(plan)}] {p.id} {m} T={_fmt_temp(t)} r={r}: "
                    f"{stats['new_tokens']} tokens, {stats['tokens_per_s']:.2f} tokens/s{verdict} | "
                    f"elapsed {_fmt_duration(elapsed)}, ETA {_fmt_duration(eta)}"
                )
    except KeyboardInterrupt:
        log(f"interrupted after {ran} rows; re-run the same command to resume")
        return ran, True
    finally:
        bar.close()
    log(f"done: {ran} rows in {_fmt_duration(time.perf_counter() - t_start)}")
    return ran, False


# ---- summary -------------------------------------------------------------------------------
def geomean(values: Iterable[float]) -> float:
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
    tokens_per_call: float | None
    accepted_per_call: float | None
    acceptance_by_position: list[float]
    swi: float | None
    mismatches: int | None
    compared: int


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
    present = set(methods)
    order = [m for m in METHODS if m in present]
    order += sorted(m for m in present if m not in METHODS and not is_hf(m))
    order += [m for m in HF_PEERS if m in present]
    return order


def _ratio(row: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    if base is None:
        return None
    a, b = row["stats"].get("tokens_per_s"), base["stats"].get("tokens_per_s")
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
        for r in group:
            key = (str(r["id"]), m, t, int(r["repeat"]))
            ar = index.get((key[0], "ar", t, key[3]))
            q = _ratio(r, ar)
            if q is not None:
                ratios[r["task"]].append(q)
                ratios["all"].append(q)
                if m != "ar" and ar is not None and r.get("session") != ar.get("session"):
                    cross += 1
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
            tokens_per_call=tpc,
            accepted_per_call=apc,
            acceptance_by_position=[sum(p) / len(p) for p in positions],
            swi=sum(swis) / len(swis) if swis else None,
            mismatches=sum(1 for r in compared if r["output_equals_ar"] is False) if compared else None,
            compared=len(compared),
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
        "same prompt, temperature and repeat, measured back to back. **tok/call** = new tokens per target call; "
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
        lines += [f"## T = {_fmt_temp(t)}" + (" (greedy)" if t == 0 else " (sampling)"), ""]
        head = ["method", "n", "tok/s"] + cols + ["tok/call", "acc/call", "acceptance by position", "SWI", "≠AR"]
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
            cells += [_f(s.tokens_per_call), _f(s.accepted_per_call), apos, _f(s.swi), mism]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        hf_rows = [m for m in summary.methods if is_hf(m) and m != HF_BASELINE and (m, t) in summary.table]
        if hf_rows and (HF_BASELINE, t) in summary.table:
            lines += [f"Hugging Face peers against `{HF_BASELINE}` (their own AR), T = {_fmt_temp(t)}:", ""]
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


# ---- plots ---------------------------------------------------------------------------------
def make_plots(summary: Summary, out_dir: str | os.PathLike[str]) -> list[Path]:
    """speedup_T{t}.png per temperature and acceptance_by_position.png; raises ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths: list[Path] = []
    cols = summary.tasks + ["all"]
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(summary.methods)}
    for t in summary.temperatures:
        methods = [m for m in summary.methods if m != "ar" and (m, t) in summary.table]
        if not methods:
            continue
        fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 2.5 + len(cols) * (0.3 * len(methods) + 0.4))), 5.0))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            s = summary.table[(m, t)]
            vals = [s.speedup.get(c, float("nan")) for c in cols]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cols))]
            bars = ax.bar(xs, [v if math.isfinite(v) else 0 for v in vals], width, label=m, color=colors[m],
                          hatch="//" if is_hf(m) else None, edgecolor="white" if not is_hf(m) else "black",
                          linewidth=0.5)
            for b, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=7, rotation=90 if len(methods) > 3 else 0,
                                xytext=(0, 2), textcoords="offset points")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="AR (1.0)")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([c.replace("_", " ") for c in cols], rotation=20, ha="right")
        ax.set_ylabel("speedup over specdec AR (tokens/s ratio)")
        ax.set_title(f"Speedup by task category, T = {_fmt_temp(t)} (geometric mean over prompts)")
        ax.set_ylim(0, max([1.2] + [b.get_height() * 1.18 for b in ax.patches]))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"speedup_T{_fmt_temp(t)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    panels = []
    for label, temps in (("T = 0 (greedy)", [t for t in summary.temperatures if t == 0]),
                         ("T > 0 (sampling)", [t for t in summary.temperatures if t > 0])):
        lines = [
            (m, t, summary.table[(m, t)].acceptance_by_position)
            for t in temps
            for m in summary.methods
            if (m, t) in summary.table and summary.table[(m, t)].acceptance_by_position
        ]
        if lines:
            panels.append((label, lines, len(temps) > 1))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True)
        styles = ["-", "--", ":", "-."]
        for ax, (label, lines, several) in zip(axes[0], panels):
            temps = sorted({t for _, t, _ in lines})
            for m, t, acc in lines:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", color=colors[m],
                        linestyle=styles[temps.index(t) % len(styles)],
                        label=f"{m} T={_fmt_temp(t)}" if several else m)
            ax.set_title(f"Acceptance rate by draft position, {label}")
            ax.set_xlabel("draft position")
            ax.set_ylim(0, 1.02)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, frameon=False)
        axes[0][0].set_ylabel("accepted / proposed (mean over prompts)")
        fig.tight_layout()
        path = out / "acceptance_by_position.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(list(argv))
