"""`specdec bench` prompt files: line-numbered errors, fields, per-task selection."""

import json

import pytest

from specdec.bench.prompts import load_prompts, select_prompts
from tests.bench.helpers import prompt_line, write_lines


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "line 2: invalid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        (json.dumps({"task": "qa", "turns": ["x"]}), "line 2: missing or empty 'id'"),
        (json.dumps({"id": "b", "turns": ["x"]}), "line 2: missing or empty 'task'"),
        (json.dumps({"id": "b", "task": "qa"}), "line 2: 'turns' must be a non-empty list"),
        (json.dumps({"id": "b", "task": "qa", "turns": []}), "line 2: 'turns' must be a non-empty list"),
        (json.dumps({"id": "b", "task": "qa", "turns": [""]}), "line 2: the first turn must be a non-empty"),
        (prompt_line("a", "qa"), "line 2: duplicate id 'a' \\(first on line 1\\)"),
    ],
)
def test_prompt_file_errors_name_the_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "p.jsonl", [prompt_line("a", "qa"), bad_line, prompt_line("c", "qa")])
    with pytest.raises(ValueError, match="p.jsonl " + message):
        load_prompts(path)


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    second = '{"id": "b", "task": "qa", "turns": ["caf\u00e9"]}'  # é written raw, as latin-1 writes it
    path.write_bytes((prompt_line("a", "qa") + "\n" + second + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=f"prompt file '{path}' is not UTF-8 text: byte 0xe9 on line 2"):
        load_prompts(path)


def test_missing_and_empty_prompt_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(write_lines(tmp_path / "empty.jsonl", ["", "  "]))


def test_prompt_fields_and_blank_lines(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [prompt_line(7, "mt", turns=["first", "second"]), "", prompt_line("b", "qa")])
    first, second = load_prompts(path)
    assert (first.id, first.task, first.text, first.line, first.turns) == ("7", "mt", "first", 1, 2)
    assert second.line == 3


def test_per_task_selection_is_deterministic_and_tasks_filter(tmp_path):
    lines = [prompt_line(f"{t}-{i}", t) for i in range(4) for t in ("qa", "math", "rag")]
    prompts = load_prompts(write_lines(tmp_path / "p.jsonl", lines))
    chosen = select_prompts(prompts, per_task=2)
    assert [p.id for p in chosen] == ["qa-0", "math-0", "rag-0", "qa-1", "math-1", "rag-1"]
    assert chosen == select_prompts(list(prompts), per_task=2)
    assert [p.id for p in select_prompts(prompts, tasks=["rag"], per_task=1)] == ["rag-0"]
    with pytest.raises(ValueError, match="unknown task 'nope'; the prompt file has: qa, math, rag"):
        select_prompts(prompts, tasks=["nope"])
    with pytest.raises(ValueError, match="per-task"):
        select_prompts(prompts, per_task=0)
