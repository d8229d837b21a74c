"""The `specdec` command line: models, generate, demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from specdec.pipeline import DEFAULT_DRAFT, DEFAULT_TARGET, METHODS, Pipeline
from specdec.sampling import SamplingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _err(msg: str) -> None:
    print(f"specdec: error: {msg}", file=sys.stderr)


# ---- models --------------------------------------------------------------------------------
def cmd_models_list(args: argparse.Namespace) -> int:
    from specdec.hub import cache_dir, list_models

    rows = list_models()
    print(f"cache: {cache_dir()}")
    for row in rows:
        state = "converted" if row.get("converted") else ("fetched" if row.get("cached") else "not fetched")
        print(f"  {row['name']:<30} {row['size'] / 1e6:8.1f} MB  {state}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from specdec.hub import fetch

    for name in args.names:
        path = fetch(name, progress=not args.quiet)
        print(f"{name}: {path}")
    return 0


# ---- generate ------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"known model name, .gguf file, local dir or HF id (default {DEFAULT_TARGET})")
    p.add_argument("--draft", default=DEFAULT_DRAFT, help=f"draft model for methods that need one (default {DEFAULT_DRAFT})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="sps", choices=sorted(METHODS), help="decoding method (default sps)")
    p.add_argument("--gamma", type=int, default=4, help="draft length per target call (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (T > 0)")
    p.add_argument("--max-ngram", type=int, default=3, help="pld: longest n-gram to look up")


def _sampling(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def _prompt(args: argparse.Namespace) -> tuple[str, bool | None]:
    given = [(args.prompt, False), (args.chat, True), (args.text, None)]
    given = [(t, c) for t, c in given if t is not None]
    if len(given) != 1:
        raise ValueError("give exactly one prompt: TEXT, --prompt TEXT (raw) or --chat TEXT (chat message)")
    return given[0]


def _load(args: argparse.Namespace, need_draft: bool) -> Pipeline:
    t0 = time.perf_counter()
    print(f"loading {args.target}" + (f" + {args.draft}" if need_draft else "") + " …", file=sys.stderr)
    pipe = Pipeline(args.target, args.draft if need_draft else None, device=args.device, dtype=DTYPES[args.dtype])
    print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe


class _TextStreamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, pipe: Pipeline, out: Any) -> None:
        self.pipe, self.out = pipe, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, chunk: list[int]) -> None:
        self.ids.extend(chunk)
        text = self.pipe.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def _format_stats(stats: dict[str, Any]) -> str:
    apos = ", ".join(f"{a:.2f}" for a in stats["accepted_per_position"])
    return (
        f"{stats['new_tokens']} tokens in {stats['wall_s']:.2f} s = {stats['tokens_per_s']:.2f} tokens/s | "
        f"target calls {stats['target_calls']}, {stats['tokens_per_call']:.2f} tokens/call, "
        f"accepted {stats['accepted_tokens']}/{stats['draft_tokens']} drafts "
        f"({stats['mean_accepted_per_call']:.2f}/call) | draft {stats['draft_s']:.2f} s, target {stats['target_s']:.2f} s"
        + (f" | acceptance by position [{apos}]" if apos else "")
    )


def cmd_generate(args: argparse.Namespace) -> int:
    text, chat = _prompt(args)
    sampling = _sampling(args)
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    pipe = _load(args, METHODS[args.method].needs_draft_model)
    dec, chunks = pipe.stream(
        text, args.method, args.max_new_tokens, sampling, gamma=args.gamma, seed=args.seed, chat=chat,
        max_ngram=args.max_ngram,
    )
    if args.json:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk)
        assert dec.last_stats is not None
        print(json.dumps({"text": pipe.decode(ids), "token_ids": ids, "stats": dec.last_stats.to_dict()}))
        return 0
    streamer = _TextStreamer(pipe, sys.stdout)
    for chunk in chunks:
        streamer.push(chunk)
    sys.stdout.write("\n")
    assert dec.last_stats is not None
    print(f"[{args.method}] " + _format_stats(dec.last_stats.to_dict()), file=sys.stderr)
    return 0


# ---- demo ----------------------------------------------------------------------------------
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome, with a short docstring."


def cmd_demo(args: argparse.Namespace) -> int:
    """AR vs speculative decoding on the same prompt and models: equality, speed, acceptance."""
    pipe = _load(args, True)
    sampling = _sampling(args)
    ids = pipe.encode(args.chat or DEMO_PROMPT, chat=True if pipe.has_chat_template() else False)
    print(f"prompt: {args.chat or DEMO_PROMPT!r} ({len(ids)} tokens), {args.max_new_tokens} new tokens, "
          f"temperature {sampling.temperature}", file=sys.stderr)
    results = {}
    for method in ["ar"] + [m for m in args.methods.split(",") if m != "ar"]:
        res = pipe.generate(ids, method, args.max_new_tokens, sampling=sampling, gamma=args.gamma, seed=args.seed)
        results[method] = res
        print(f"[{method}] " + _format_stats(res.stats.to_dict()), file=sys.stderr)
    ar = results["ar"]
    print("\n--- AR output ---\n" + ar.text + "\n-----------------")
    for method, res in results.items():
        if method == "ar":
            continue
        same = res.token_ids == ar.token_ids
        speed = res.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else float("nan")
        verdict = "identical to AR" if same else ("differs from AR (expected when sampling)" if not sampling.greedy else "DIFFERS FROM AR")
        print(
            f"{method}: {res.stats.tokens_per_s:.2f} tokens/s vs AR {ar.stats.tokens_per_s:.2f} tokens/s -> "
            f"speedup {speed:.2f}x; {res.stats.tokens_per_call:.2f} tokens and "
            f"{res.stats.mean_accepted_per_call:.2f} accepted drafts per target call; output {verdict}"
        )
        if sampling.greedy and not same:
            return 1
    return 0


# ---- entry point ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specdec", description="Lossless speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list or fetch the known models")
    msub = models.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known models and whether they are cached").set_defaults(func=cmd_models_list)
    fetch = msub.add_parser("fetch", help="download, assemble and verify a known model")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--quiet", action="store_true")
    fetch.set_defaults(func=cmd_models_fetch)

    gen = sub.add_parser("generate", help="generate text with one method")
    gen.add_argument("text", nargs="?", help="prompt; rendered as a chat message when the model has a chat template")
    gen.add_argument("--prompt", help="raw prompt text (no chat template)")
    gen.add_argument("--chat", help="user message rendered with the target's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _add_model_args(gen)
    _add_decode_args(gen)
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="AR vs speculative decoding on the default models")
    demo.add_argument("--chat", help=f"the user message (default: {DEMO_PROMPT!r})")
    demo.add_argument("--methods", default="sps,pld", help="methods to compare with AR (default sps,pld)")
    _add_model_args(demo)
    _add_decode_args(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from specdec.hub import ModelError

    try:
        return int(args.func(args))
    except (ModelError, ValueError) as exc:
        _err(str(exc))
        return 2
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
