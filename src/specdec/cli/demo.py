"""`specdec demo`: AR vs speculative decoding on the same prompt and models (equality, speed, acceptance)."""

from __future__ import annotations

import argparse
import sys

from specdec.cli.common import (
    add_generation_args, check_all_known, format_stats, given_options, load_pipeline, options_for, sampling_of,
)

DEFAULT_METHODS = "sps,pld"
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome, with a short docstring."


def cmd_demo(args: argparse.Namespace) -> int:
    from specdec.methods.registry import get_method

    if args.method is not None and args.methods is not None:
        raise ValueError("give --methods (a list to compare with AR) or --method, not both")
    names = args.methods or args.method or DEFAULT_METHODS
    methods = ["ar"] + [m for m in names.split(",") if m and m != "ar"]
    given = given_options(args)
    check_all_known(given, methods)
    pipe = load_pipeline(args, any(get_method(m).loads_draft_model for m in methods))
    sampling = sampling_of(args)
    ids = pipe.encode(args.chat or DEMO_PROMPT, chat=True if pipe.has_chat_template() else False)
    print(f"prompt: {args.chat or DEMO_PROMPT!r} ({len(ids)} tokens), {args.max_new_tokens} new tokens, "
          f"temperature {sampling.temperature}", file=sys.stderr)
    results = {}
    for method in methods:
        res = pipe.generate(ids, method, args.max_new_tokens, sampling=sampling, seed=args.seed,
                            **options_for(method, given, strict=False))
        results[method] = res
        print(f"[{method}] " + format_stats(res.stats.to_dict()), file=sys.stderr)
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


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat", help=f"the user message (default: {DEMO_PROMPT!r})")
    p.add_argument("--methods", help=f"methods to compare with AR (default {DEFAULT_METHODS}; --method M compares one)")
    add_generation_args(p, method_help="one method to compare with AR, instead of --methods")
    p.set_defaults(func=cmd_demo)
