"""The prompt file: one JSON object a line (`id`, `task`, `turns`), its line-numbered errors, the
per-task selection, and the sampling seed of each (prompt, repeat)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    task: str
    text: str
    """The first turn: what is sent, as a chat message when the target has a chat template."""
    line: int
    turns: int

    @property
    def digest(self) -> str:
        """A short hash of the text: a results row records it, so that rows run on a prompt's earlier
        text are never compared with rows run on its new one (`bench.run`)."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def load_prompts(path: str | os.PathLike[str]) -> list[BenchPrompt]:
    """Read a prompt file (one JSON object a line: `id`, `task`, `turns`), with line-numbered errors."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist" if not p.exists() else f"{str(p)!r} is not a file")
    prompts: list[BenchPrompt] = []
    first_line: dict[str, int] = {}
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        data = p.read_bytes()
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"prompt file {str(p)!r} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} "
                         "(save it as UTF-8)") from None
    for n, raw in enumerate(text.split("\n"), start=1):
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
