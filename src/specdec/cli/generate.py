"""`specdec generate`: one prompt, one method; streamed text or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from specdec.cli.common import (
    add_generation_args, check_max_new_tokens, check_target, device_of, format_stats, given_options, load_pipeline,
    options_for, resolve_method, sampling_of,
)


def prompt_of(args: argparse.Namespace) -> tuple[str, bool | None]:
    """The one prompt given (TEXT, --prompt or --chat) and whether it is a chat message, checked
    before any model loads."""
    from specdec.engine.pipeline import check_text

    given = [(t, c, f) for t, c, f in zip((args.prompt, args.chat, args.text), (False, True, None),
                                          ("--prompt", "--chat", "the prompt")) if t is not None]
    if len(given) != 1:
        raise ValueError("give exactly one prompt: TEXT, --prompt TEXT (raw) or --chat TEXT (chat message)")
    text, chat, flag = given[0]
    if text == "-":  # as other command-line tools read stdin
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{flag} from stdin is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        flag = f"{flag} from stdin"
    check_text(text, flag)  # not empty, and UTF-8
    return text, chat


def unused_flags(args: argparse.Namespace, method) -> list[str]:
    """Notes on flags given that this run will not use (said, not refused: they are valid, only idle)."""
    notes = []
    if args.temperature == 0:
        idle = [flag for flag, value, off in (("--top-p", args.top_p, 1.0), ("--top-k", args.top_k, 0),
                                              ("--seed", args.seed, None)) if value != off]
        if idle:
            notes.append(f"{', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect at --temperature 0 "
                         "(greedy decoding draws nothing)")
    if args.draft and not method.loads_draft_model:
        notes.append(f"--method {method.name} uses no draft model: --draft is not loaded")
    return notes


def method_label(pipe, method: str, sampling, run=None) -> str:
    """The method, and for auto what it follows (`run`: what `Pipeline.stream` returned)."""
    if method != "auto":
        return method
    from specdec.core.store import ProfileProblem, find_profile
    from specdec.engine.pipeline import PlannedRun
    from specdec.methods.auto import planned_label

    try:
        label = find_profile(pipe.profile_key(sampling))["winner"]["label"]
    except (ProfileProblem, KeyError, TypeError):
        return method
    return f"auto: {planned_label(run.planned, label) if isinstance(run, PlannedRun) else label}"


def cmd_generate(args: argparse.Namespace) -> int:
    from specdec.engine.text import TextAssembler
    from specdec.methods.registry import get_method

    # Everything that needs no model is checked before one loads, the flags before the target.
    text, chat = prompt_of(args)
    sampling = sampling_of(args)
    device_of(args)
    if args.method is None:
        check_target(args)  # before resolve_method speaks of it (a missing target gets its error alone)
    args.method = resolve_method(args)
    method = get_method(args.method)
    opts = options_for(args.method, given_options(args))
    method.make_options(opts)  # a bad value is reported now, not after the models have loaded
    check_target(args)
    check_max_new_tokens(args)
    for note in unused_flags(args, method):
        print(f"specdec: note: {note}", file=sys.stderr)
    pipe = load_pipeline(args, method.loads_draft_model, optional_draft=not method.needs_draft_model)
    dec, chunks = pipe.stream(text, args.method, args.max_new_tokens, sampling, seed=args.seed, chat=chat, **opts)
    text_out = TextAssembler(pipe.decode, [])
    if args.json:
        ids: list[int] = []
        for chunk in chunks:
            ids.extend(chunk)
            text_out.push(chunk)
        assert dec.last_stats is not None
        text_out.flush()  # the text as a stream would show it: no half character at the end
        print(json.dumps({"text": text_out.released, "token_ids": ids, "stats": dec.last_stats.to_dict()}))
        return 0
    for chunk in chunks:
        sys.stdout.write(text_out.push(chunk)[0])
        sys.stdout.flush()
    sys.stdout.write(text_out.flush() + "\n")
    assert dec.last_stats is not None
    label = method_label(pipe, args.method, sampling, dec)
    print(f"[{label}] " + format_stats(dec.last_stats.to_dict()), file=sys.stderr)
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", nargs="?", help="prompt; rendered as a chat message when the model has a chat template "
                   "(- reads it from stdin, as --prompt - and --chat - do)")
    p.add_argument("--prompt", help="raw prompt text (no chat template)")
    p.add_argument("--chat", help="user message rendered with the target's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)
