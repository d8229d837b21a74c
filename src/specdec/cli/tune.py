"""`specdec tune`: measure this machine, pick the fastest method and options (or none) and save it as a profile;
with --project-offload, also project SpecExec/Sequoia speedups for a target offloaded to CPU RAM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec.cli.common import add_model_args, device_of, forget_measurements, load_pipeline, sampling_of
from specdec.core.options import check_positive_int
from specdec.core.sampling import SamplingConfig
from specdec.core.store import profile_path, read_profile, save_profile
from specdec.engine.pipeline import Pipeline
from specdec.models.hf import HFLanguageModel
from specdec.models.parallel.target import ShardedTarget
from specdec.tuning.acceptance import DEFAULT_WIDTH
from specdec.tuning.choice import DEFAULT_MAX_DEPTH, DEFAULT_SIZES, TUNE_PROMPTS, format_candidates, tune
from specdec.tuning.projection import (
    DEFAULT_PROJECT_MAX_DEPTH, DEFAULT_PROJECT_SIZES, format_projection, project_offload,
)

DESCRIPTION = (
    "Measure this machine and save the fastest choice (possibly no speculation) as the profile `--method auto` "
    "follows, keyed by model pair, device, dtypes, greedy or sampling, and hardware. --quick (what auto runs on "
    "first use): forward times, plain decoding and one acceptance run, then every method and shape priced on one "
    "cost model (sps with several gamma and adaptive stopping, Sequoia trees, SpecInfer expansions, SpecExec "
    "budgets, csd k-matrices, pld, maxgram). Without --quick: Sequoia's DP over every tree size and depth, the "
    "winner checked against plain decoding. With --project-offload, also (or only, with --profile) project the "
    "speedup of SpecExec/Sequoia trees for a target offloaded to CPU RAM."
)


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name} must be a comma-separated list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{name} must be a comma-separated list of positive integers, got {text!r}")
    return values


def load_tune_prompts(args: argparse.Namespace, pipe: Pipeline) -> list[list[int]]:
    """Token ids of the prompts acceptance is measured on: --prompts (first turns) or the built-in ones."""
    if args.prompts:
        from specdec.bench.prompts import load_prompts

        texts = [p.text for p in load_prompts(args.prompts)]  # the first turn of each
    else:
        texts = list(TUNE_PROMPTS)
    texts = texts[: check_positive_int("--num-prompts", args.num_prompts)]
    return [pipe.encode(t) for t in texts]


def _fmt_vec(vec: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in vec) + "]"


def cmd_quick(args: argparse.Namespace, sampling: SamplingConfig) -> int:
    import dataclasses

    from specdec.tuning import autotune
    from specdec.tuning.quick import format_quick

    defaults = autotune.DEFAULT_SETTINGS
    settings = dataclasses.replace(
        defaults,
        num_prompts=check_positive_int("--num-prompts", defaults.num_prompts if args.num_prompts is None
                                       else args.num_prompts),
        gen_tokens=check_positive_int("--gen-tokens", defaults.gen_tokens if args.gen_tokens is None
                                      else args.gen_tokens),
        seed=args.seed)
    # A target without a known draft is tuned over the draft-free methods (the profile `auto` then
    # follows there, as the error of an untuned `auto` says to make).
    pipe = load_pipeline(args, True, optional_draft=True)
    texts = None
    if args.prompts:
        from specdec.bench.prompts import load_prompts

        texts = [p.text for p in load_prompts(args.prompts)]
    profile = autotune.tune_pipeline(pipe, sampling, prompts=autotune.tune_prompts(pipe, texts)[: settings.num_prompts],
                                     settings=settings)
    print(format_quick(profile))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    sampling = sampling_of(args)
    drafts = args.draft or []
    if len(drafts) > 1:
        raise ValueError("specdec tune measures one draft model; give a single --draft")
    if args.remeasure:
        forget_measurements(device_of(args))
    if args.quick:
        if args.project_offload or args.profile:
            raise ValueError("--quick tunes this machine; --project-offload/--profile belong to the full tune")
        return cmd_quick(args, sampling)
    if args.num_prompts is None:
        args.num_prompts = 4
    if args.gen_tokens is None:
        args.gen_tokens = 24
    if args.profile and not args.project_offload:
        raise ValueError("--profile is only read with --project-offload (a plain tune measures this machine)")
    if args.profile:
        profile = read_profile(args.profile)
    else:
        sizes = _int_list(args.sizes, "--sizes")
        pipe = load_pipeline(args, True)  # --offload is applied while loading
        if not isinstance(pipe.target_lm, (HFLanguageModel, ShardedTarget)) or not isinstance(pipe.draft_lm,
                                                                                            HFLanguageModel):
            raise ValueError("the full specdec tune measures transformers models: add --weights dense (and "
                             "--draft-weights dense where you set it); the native default is tuned by "
                             "`specdec tune --quick`, which auto runs on first use")
        key = pipe.profile_key(sampling)
        if key is None:
            raise ValueError("tune profiles are for one draft model; give a single --draft")
        existing = Path(args.out) if args.out else profile_path(key)
        if args.project_offload and existing.is_file() and not args.force:
            profile = read_profile(existing)
            print(f"using the acceptance measured in {existing} (--force to measure again)", file=sys.stderr)
        else:
            prompts = load_tune_prompts(args, pipe)
            profile = tune(pipe.target_lm, pipe.draft_lm, prompts, sampling, key, sizes=sizes,
                           max_depth=args.max_depth, width=args.width, gen_tokens=args.gen_tokens,
                           measure_prompts=args.measure_prompts, measure_tokens=args.measure_tokens,
                           repeats=args.repeats, seed=args.seed, eos_token_ids=pipe.eos_token_ids,
                           log=lambda msg: print(msg, file=sys.stderr))
            profile["offloaded_target"] = bool(args.offload)
            out = save_profile(profile, existing)
            print(format_candidates(profile))
            acc = profile["acceptance"]
            print(f"\nacceptance vectors ({acc['iterations']} steps): "
                  + (f"swor {_fmt_vec(acc['swor'])}; " if acc["swor"] else "") + f"top-k {_fmt_vec(acc['topk'])}")
            print(f"saved {out} ({profile['tune_s']:.0f} s)", file=sys.stderr)
    if args.project_offload:
        proj = project_offload(profile, args.bandwidth, args.target_params, args.bytes_per_param,
                               args.draft_ms_per_level, args.gpu_tflops,
                               _int_list(args.project_sizes, "--project-sizes"), args.project_max_depth)
        print("\n" + format_projection(proj, profile))
    return 0


def configure(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    add_model_args(p)  # --offload among them: tune for a target offloaded to CPU RAM (GPU only)
    p.add_argument("--quick", action="store_true",
                   help="every method on one cost model from one short measurement (what auto runs on first use)")
    p.add_argument("--remeasure", action="store_true",
                   help="forget this machine's cached kernel, draft-precision and forward-time measurements first "
                   "(take them again on a quiet machine)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature to tune for (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="tree sizes (drafted tokens) to consider; the target is timed at size + 1 tokens "
                   f"(default {','.join(map(str, DEFAULT_SIZES))})")
    p.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH, help=f"deepest tree (default {DEFAULT_MAX_DEPTH})")
    p.add_argument("--width", type=int, default=DEFAULT_WIDTH,
                   help=f"star-tree width for the acceptance vector = most children per node (default {DEFAULT_WIDTH})")
    p.add_argument("--prompts", default=None, help="JSONL prompt file as for bench (default: built-in prompts)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="prompts used to measure acceptance (default 4; --quick: 3)")
    p.add_argument("--gen-tokens", type=int, default=None,
                   help="tokens generated per prompt for acceptance (default 24; --quick: 16)")
    p.add_argument("--measure-prompts", type=int, default=1,
                   help="prompts on which the winner is run against plain decoding (0 = skip; default 1)")
    p.add_argument("--measure-tokens", type=int, default=32, help="tokens per such run (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per block size (median; default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="profile file (default: the cache's profiles/ folder, found by key)")
    p.add_argument("--project-offload", action="store_true",
                   help="print a projection (not a measurement) of SpecExec/Sequoia speedups for an offloaded target "
                   "of --target-params parameters streamed at --bandwidth, from the measured acceptance")
    p.add_argument("--profile", default=None, help="with --project-offload: use this saved profile, load no model")
    p.add_argument("--force", action="store_true", help="with --project-offload: measure again even if a profile exists")
    p.add_argument("--bandwidth", type=float, default=25.0, help="host-to-GPU GB/s for the projection (default 25, "
                   "about PCIe 4.0 x16)")
    p.add_argument("--target-params", type=float, default=70e9, help="parameters of the projected target (default 70e9)")
    p.add_argument("--bytes-per-param", type=float, default=2.0, help="2 = 16-bit, 0.5 = 4-bit (default 2)")
    p.add_argument("--draft-ms-per-level", type=float, default=15.0,
                   help="ms per draft forward in the projection (default 15, about a 7B 16-bit draft on a 1 TB/s GPU)")
    p.add_argument("--gpu-tflops", type=float, default=100.0, help="GPU TFLOP/s for the target's compute (default 100)")
    p.add_argument("--project-sizes", default=",".join(map(str, DEFAULT_PROJECT_SIZES)),
                   help="tree sizes for the projection")
    p.add_argument("--project-max-depth", type=int, default=DEFAULT_PROJECT_MAX_DEPTH,
                   help=f"deepest tree in the projection (default {DEFAULT_PROJECT_MAX_DEPTH})")
    p.set_defaults(func=cmd_tune)
