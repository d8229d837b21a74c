"""The output directory: results.jsonl rows (read back for resume, a half-written last line set
aside), config.json (the fingerprint rows must share), and the lock file that keeps two runs out of
one directory."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
SUMMARY = "summary.md"
CONFIG = "config.json"
LOG = "bench.log"
LOCK = ".lock"


def command_line(argv: Sequence[str]) -> str:
    """The command as config.json and summary.md record it (shell-quoted)."""
    return shlex.join(list(argv))


# ---- lock file ---------------------------------------------------------------------------------
@contextlib.contextmanager
def lock_out_dir(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s lock file while a run writes there (a stale lock of a dead process is taken over)."""
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


# ---- results file ------------------------------------------------------------------------------
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


def set_aside_truncated(path: Path, loaded: LoadedResults, warn: Callable[[str], None]) -> None:
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


# ---- config.json -------------------------------------------------------------------------------
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


def read_fingerprint(out: Path) -> dict[str, Any] | None:
    """The fingerprint recorded in `out`'s config.json, if it is readable."""
    try:
        return json.loads((out / CONFIG).read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def write_config(out: Path, fp: dict[str, Any], draft: str | None, command: str | None, session: str) -> None:
    """Record the fingerprint, the draft model(s) and this session's command in config.json."""
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
