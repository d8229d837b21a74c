"""`specdec bench`: every method, and Hugging Face's own `generate` as peers, on a prompt file.

    from specdec import Pipeline
    from specdec.bench.prompts import load_prompts, select_prompts
    from specdec.bench.run import run_bench
    from specdec.bench.settings import BenchSettings

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

Methods come from the method registry (`methods.registry`) at call time, so a method registered
there shows up here with no change; `--opt`/`--variant` options are checked against each method's
`Options` and passed to `Pipeline.generate`.

Modules: `settings` (what a run is), `prompts` (the prompt file), `store` (the output directory),
`peers` (the hf-* peers), `run` (measuring), `summary` (the tables), `plots` (the PNGs).
"""
