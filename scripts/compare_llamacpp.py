"""specdec against llama.cpp on the same GGUF file and prompts: end to end, decoding, prompt rate.

llama.cpp is a measurement peer, not a dependency: build its `llama-server` yourself (for example from
the vendored source of the `llama-cpp-python` sdist, `cmake -B build -DCMAKE_BUILD_TYPE=Release
-DLLAMA_CURL=OFF && cmake --build build --target llama-server -j`) and pass its path. Both sides get
the same prompt tokens (the target's chat template, rendered by specdec and sent to the server as
token ids), greedy decoding, the same thread count, one request at a time and the same cap on new
tokens; both stop at the end-of-sequence token. Per prompt and method it records the end-to-end
tokens/s (prefill included: llama.cpp's prompt_ms + predicted_ms against specdec's wall time), the
decode-only milliseconds per token and the prompt rate (tokens/s of the prefill) of both sides, and
whether each method's tokens equal specdec's own plain decoding (`ar`, which the script always runs).
The summary gives each ratio to llama.cpp as a geometric mean over the prompts, from one run.

With `--llama-draft`, llama.cpp's own speculative decoding (a second llama-server with the draft
model, `-md`) runs too, and its tokens are compared with llama.cpp's plain output: llama.cpp picks
kernels by batch size, so its speculative greedy output can differ from its plain output.

    python scripts/compare_llamacpp.py --llama-server /tmp/llama.cpp/build/bin/llama-server \\
        --prompts ../shared/bench/prompts-dev.jsonl --per-task 1 --methods ar,sps \\
        --weights native --threads 2 --max-new-tokens 96 --out runs/llamacpp

Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


IDLE_PAUSE_S = 1.0
"""How long specdec waits after a llama-server request: its threads poll briefly after work."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class LlamaServer:
    """A llama-server process on a free local port, stopped on exit."""

    def __init__(self, binary: str, gguf: Path, threads: int, ctx: int, log: Path, draft: Path | None = None,
                 draft_max: int = 8) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [binary, "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", "1",
               "--host", "127.0.0.1", "--port", str(self.port)]
        if draft is not None:
            cmd += ["-md", str(draft), "--spec-draft-n-max", str(draft_max), "-td", str(threads), "-tbd", str(threads)]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        raise SystemExit(f"llama-server did not become ready in {timeout:.0f} s; see {self.log.name}")

    def generate(self, ids: list[int], max_new: int) -> dict:
        body = {"prompt": ids, "n_predict": max_new, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                "return_tokens": True, "stream": False}
        out = post(self.url + "/completion", body, timeout=3600)
        t = out["timings"]
        n = int(t["predicted_n"])
        e2e_s = (float(t["prompt_ms"]) + float(t["predicted_ms"])) / 1e3
        prompt_n, prompt_ms = int(t["prompt_n"]), float(t["prompt_ms"])
        return {"new_tokens": n, "tokens": out.get("tokens"), "text": out.get("content", ""),
                "e2e_tok_s": n / e2e_s if e2e_s > 0 else 0.0, "decode_tok_s": float(t.get("predicted_per_second", 0.0)),
                "decode_ms_per_token": float(t["predicted_ms"]) / max(n, 1),
                "prompt_tok_s": prompt_n / (prompt_ms / 1e3) if prompt_ms > 0 else 0.0, "prompt_tokens": prompt_n}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", required=True, help="path to llama.cpp's llama-server binary")
    p.add_argument("--prompts", required=True, help="prompt file (one JSON object a line: id, task, turns)")
    p.add_argument("--tasks", default=None, help="comma-separated task categories to keep")
    p.add_argument("--per-task", type=int, default=None, help="first N prompts of each task")
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct", help="known model name or .gguf file")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="draft model for methods that need one")
    p.add_argument("--methods", default="ar,sps", help="specdec methods, comma-separated (ar always runs)")
    p.add_argument("--opt", action="append", default=[], help="method option KEY=VALUE (repeatable)")
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "native"], help="specdec weights")
    p.add_argument("--draft-weights", default=None, choices=["auto", "dense", "native"])
    p.add_argument("--llama-draft", action="store_true", help="also run llama.cpp's speculative decoding (-md)")
    p.add_argument("--llama-draft-max", type=int, default=8, help="llama.cpp's --spec-draft-n-max")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--ctx", type=int, default=4096, help="llama-server context size")
    p.add_argument("--out", required=True, help="output directory (results.jsonl, summary.md, llama-server.log)")
    return p.parse_args(argv)


def _specdec_row(pipe, ids: list[int], methods: list[str], opts: dict, max_new: int, ref: dict) -> dict:
    from specdec.methods.registry import get_method

    out = {}
    for m in methods:
        known = get_method(m).options.names()
        res = pipe.generate(ids, m, max_new, **{k: v for k, v in opts.items() if k in known})
        st = res.stats
        decode_s = st.wall_s - st.prefill_s
        out[m] = {"new_tokens": st.new_tokens, "e2e_tok_s": st.tokens_per_s, "tokens_per_call": st.tokens_per_call,
                  "decode_ms_per_token": 1e3 * decode_s / max(st.new_tokens, 1),
                  "prompt_tok_s": len(ids) / st.prefill_s if st.prefill_s > 0 else 0.0, "tokens": res.token_ids,
                  "same_as_llamacpp": ref["tokens"] == res.token_ids if ref["tokens"] else None}
    for m in methods:
        out[m]["same_as_ar"] = out[m]["tokens"] == out["ar"]["tokens"]
    return out


def _summary(args: argparse.Namespace, rows: list[dict], methods: list[str], need_draft: bool) -> list[str]:
    lines = [f"target `{args.target}` ({args.weights} weights), draft `{args.draft if need_draft else '-'}`, "
             f"{args.threads} threads, greedy, at most {args.max_new_tokens} new tokens, {len(rows)} prompts",
             "", "| prompt | llama.cpp e2e tok/s | llama.cpp decode ms/token | llama.cpp prompt tok/s | "
             + " | ".join(f"{m} e2e tok/s | {m} / llama.cpp" for m in methods) + " |",
             "|---" * (4 + 2 * len(methods)) + "|"]
    for row in rows:
        ref = row["llama.cpp"]
        cells = [f"{row['specdec'][m]['e2e_tok_s']:.2f} | {row['specdec'][m]['e2e_tok_s'] / ref['e2e_tok_s']:.2f}x"
                 for m in methods]
        lines.append(f"| {row['id']} | {ref['e2e_tok_s']:.2f} | {ref['decode_ms_per_token']:.1f} | "
                     f"{ref['prompt_tok_s']:.0f} | " + " | ".join(cells) + " |")
    lines.append("")
    ar = [r["specdec"]["ar"] for r in rows]
    decode = geomean([r["llama.cpp"]["decode_ms_per_token"] / a["decode_ms_per_token"] for r, a in zip(rows, ar)])
    prompt = geomean([a["prompt_tok_s"] / r["llama.cpp"]["prompt_tok_s"] for r, a in zip(rows, ar)])
    lines.append(f"- specdec `ar` decodes at {decode:.2f}x llama.cpp's plain decoding speed (llama.cpp ms per token / "
                 f"ours) and reads prompts at {prompt:.2f}x its rate (geometric means)")
    for m in methods:
        ratio = geomean([r["specdec"][m]["e2e_tok_s"] / r["llama.cpp"]["e2e_tok_s"] for r in rows])
        same = sum(bool(r["specdec"][m]["same_as_llamacpp"]) for r in rows)
        exact = sum(r["specdec"][m]["same_as_ar"] for r in rows)
        lines.append(f"- `{m}`: {ratio:.2f}x llama.cpp end to end (geometric mean); output identical to specdec `ar` on "
                     f"{exact}/{len(rows)} prompts and to llama.cpp's on {same}/{len(rows)} (llama.cpp's activations "
                     f"and ours are rounded differently, so llama.cpp is a different computation)")
    spec = [r["llama.cpp-speculative"] for r in rows if "llama.cpp-speculative" in r]
    if spec:
        ratio = geomean([s["e2e_tok_s"] / r["llama.cpp"]["e2e_tok_s"] for s, r in zip(spec, rows)])
        same = sum(s["tokens"] == r["llama.cpp"]["tokens"] for s, r in zip(spec, rows))
        lines.append(f"- llama.cpp speculative (-md {args.draft}, --spec-draft-n-max {args.llama_draft_max}): {ratio:.2f}x its "
                     f"plain decoding end to end; output identical to its plain greedy output on {same}/{len(spec)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # specdec before torch: importing it bounds OpenMP's spin, which torch reads as it loads
    # (src/specdec/core/openmp.py)
    from specdec.bench.prompts import load_prompts, select_prompts
    from specdec.engine.pipeline import Pipeline
    from specdec.methods.registry import get_method
    from specdec.models.hub import fetch
    from specdec.models.hub.registry import KNOWN_MODELS

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in (args.tasks or "").split(",") if t]
    prompts = select_prompts(load_prompts(args.prompts), tasks=tasks or None, per_task=args.per_task)
    methods = ["ar"] + [m for m in args.methods.split(",") if m and m != "ar"]
    opts = dict(kv.split("=", 1) for kv in args.opt)
    need_draft = any(get_method(m).loads_draft_model for m in methods)
    gguf = fetch(args.target) if args.target in KNOWN_MODELS else Path(args.target)
    draft_gguf = (fetch(args.draft) if args.draft in KNOWN_MODELS else Path(args.draft)) if args.llama_draft else None

    print(f"loading {args.target} ({args.weights} weights) …", file=sys.stderr)
    pipe = Pipeline(args.target, args.draft if need_draft else None, weights=args.weights,
                    draft_weights=args.draft_weights)
    encoded = [pipe.encode(pr.text, chat=pipe.has_chat_template()) for pr in prompts]
    rows: list[dict] = [{"id": pr.id, "task": pr.task, "prompt_tokens": len(ids)} for pr, ids in zip(prompts, encoded)]
    servers = {"llama.cpp": (None, "llama-server.log")}
    if draft_gguf is not None:
        servers["llama.cpp-speculative"] = (draft_gguf, "llama-server-speculative.log")
    # Peers and specdec take turns prompt by prompt, so a drift of the machine's speed between
    # minutes (±20 % on shared VMs) falls on both sides alike. An idle llama-server sleeps (no CPU
    # time once its threads stop polling, hence the pause before specdec's turn).
    running: dict[str, LlamaServer] = {}
    try:
        for name, (draft_file, log) in servers.items():
            running[name] = LlamaServer(args.llama_server, gguf, args.threads, args.ctx, out / log, draft_file,
                                        args.llama_draft_max)
        for server in running.values():
            server.wait_ready()
            server.generate(encoded[0], 4)  # warm-up, not recorded
        pipe.generate(encoded[0], "ar", 4)  # warm-up, not recorded
        for row, ids in zip(rows, encoded):
            for name, server in running.items():
                row[name] = server.generate(ids, args.max_new_tokens)
            time.sleep(IDLE_PAUSE_S)
            row["specdec"] = _specdec_row(pipe, ids, methods, opts, args.max_new_tokens, row["llama.cpp"])
            line = " ".join(f"{m} {row['specdec'][m]['e2e_tok_s']:.2f}" for m in methods)
            print(f"{row['id']}: llama.cpp {row['llama.cpp']['e2e_tok_s']:.2f} tok/s "
                  f"(decode {row['llama.cpp']['decode_tok_s']:.2f}) | {line}", file=sys.stderr)
    finally:
        for server in running.values():
            server.close()

    with (out / "results.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = _summary(args, rows, methods, need_draft)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
