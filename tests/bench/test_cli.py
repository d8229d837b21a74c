"""`specdec bench` on the command line: bad input is reported before any model is loaded."""

from specdec.cli import main
from tests.bench.helpers import prompt_line, write_lines


def test_cli_reports_bad_input_before_loading_models(tmp_path, capsys):
    good = write_lines(tmp_path / "ok.jsonl", [prompt_line("a", "qa")])
    bad = write_lines(tmp_path / "bad.jsonl", [prompt_line("a", "qa"), "{oops"])
    out = str(tmp_path / "o")
    cases = [
        (["--prompts", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["--prompts", str(bad)], "bad.jsonl line 2: invalid JSON"),
        (["--prompts", str(good), "--methods", "ar,warp"], "unknown method 'warp'; choose from: ar, sps, pld"),
        (["--prompts", str(good), "--tasks", "qa,poetry"], "unknown task 'poetry'; the prompt file has: qa"),
        (["--prompts", str(good), "--temperatures", "0,hot"], "temperature 'hot' is not a number"),
        (["--prompts", str(good), "--opt", "novalue"], "expected KEY=VALUE"),
        (["--prompts", str(good), "--max-new-tokens", "0"], "max-new-tokens must be a positive integer"),
        (["--prompts", str(good), "--budget", "16"], "'budget' is not an option of any of the methods ar, sps, pld"),
        (["--prompts", str(good), "--variant", "si=specinfer nope=1"], "method 'specinfer' has no option 'nope'"),
    ]
    for extra, message in cases:
        assert main(["bench", "--out", out, "--target", "no-such-model", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
