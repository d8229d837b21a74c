"""`specdec tune --quick` and `auto`'s first use: measure once, price every method on one cost model
(`tuning.costmodel`), keep the winner (docs/algorithms.md §7.7).

What is measured, once per (machine, model pair, dtypes, greedy or sampling):
1. t_target(k) and t_draft(k): forward times over k new tokens (cached for the pair and machine, so
   the second mode's tune reuses them);
2. plain decoding's milliseconds per token (the loop included) on the first prompt;
3. one acceptance run: every prompt is decoded with a *comb* tree — a star of `width` children at
   the root (the positional acceptance vectors: top-k, SWOR and i.i.d./MSS, Rao-Blackwellised as in
   `tuning.acceptance`) and a chain of `chain_depth` drafts under the top child (per step the exact
   acceptance probability of each chain token and the draft's confidence where it was drawn); the
   run's loop overhead per call and its text (a sample of the target) are kept;
4. the draft's argmax along that text (for the cascade's replay).
Then every method's candidates are priced (`tuning.pricing`: each method declares its own in its
file — sps's draft lengths and stopping thresholds, Sequoia's sizes, SpecInfer's expansions, …). The
fastest expected one wins, possibly plain decoding.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from specdec.core.hardware import fingerprint
from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig
from specdec.core.store import PROFILE_VERSION, measurement_dir, read_json, write_json
from specdec.core.tree import TokenTree
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.sequoia import SequoiaDrafter
from specdec.models.base import LanguageModel
from specdec.models.timing import measure_forward
from specdec.tuning.choice import profile_header
from specdec.tuning.costmodel import ChainSteps, Costs, best, interpolate_ms
from specdec.tuning.pricing import PricingInputs, price
from specdec.verify.mss import mss_node
from specdec.verify.swor import swor_node

Log = Callable[[str], None]


@dataclass(frozen=True)
class QuickSettings:
    """How much the quick tune measures (defaults sized for ~a minute on a 1.5B/0.5B pair on 2 cores)."""

    target_ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    draft_ks: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256)
    """Up to the blocks of a draft level, and beyond: `auto` prices the draft's prefill of a long prompt
    (an arm's first play) from the same table."""
    repeats: int = 3
    """Timed passes per k (the median is kept): one pass can catch a hiccup, and every candidate's
    price is built on these times."""
    context: int = 128
    num_prompts: int = 3
    gen_tokens: int = 32
    """Tokens decoded per tune prompt: at 16 the model-free drafters' replays saw almost no repeated text."""
    ar_tokens: int = 6
    width: int = 4
    chain_depth: int = 6
    seed: int = 0


@dataclass
class Measurements:
    """Everything the candidates are priced from (JSON-ready through `to_dict`)."""

    costs: Costs
    topk: list[float] = field(default_factory=list)
    swor: list[float] | None = None
    iid: list[float] | None = None
    chain: ChainSteps = field(default_factory=ChainSteps)
    steps: int = 0
    texts: list[tuple[int, Tensor]] = field(default_factory=list)
    draft_pred: list[Tensor] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"timing": {"target_ms": {str(k): v for k, v in self.costs.target_ms.items()},
                           "draft_ms": {str(k): v for k, v in self.costs.draft_ms.items()},
                           "ar_ms_per_token": self.costs.ar_ms, "overhead_ms": self.costs.overhead_ms},
                "acceptance": {"topk": self.topk, "swor": self.swor, "iid": self.iid, "iterations": self.steps,
                               "chain_steps": len(self.chain.accept), "chain": asdict(self.chain)},
                "texts_tokens": sum(int(ids.shape[0]) - p for p, ids in self.texts)}


def comb_paths(width: int, depth: int) -> list[tuple[int, ...]]:
    """A star of `width` children at the root plus a chain of `depth` drafts under the top child."""
    return [(r,) for r in range(width)] + [(0,) * d for d in range(2, depth + 1)]


# ---- timing ------------------------------------------------------------------------------------
def timing_cache_key(key: dict[str, Any]) -> str:
    return "|".join(str(key.get(k)) for k in ("target", "draft", "device", "dtype", "draft_dtype"))


def timing_cache_path() -> Any:
    return measurement_dir() / "timing" / "forward.json"


def at_todays_speed(model: LanguageModel | None, table: dict[int, float], settings: QuickSettings,
                    ) -> dict[int, float]:
    """A cached t(k) table scaled by how fast one token's pass runs now.

    The shape of t(k) belongs to the machine and is kept; its level is not: a shared machine's speed
    drifts (a virtual machine's native forward read 26 and 33 ms a minute apart), and the plain
    decoding every candidate is divided by is measured now. Pricing a table from a slow minute
    against a fast minute's plain decoding made every drafting candidate look 20 % worse.
    """
    if model is None or 1 not in table or table[1] <= 0:
        return table
    now = measure_forward(model, (1,), settings.context, settings.repeats).ms[1]
    return {k: v * now / table[1] for k, v in table.items()}


def measure_costs(target: LanguageModel, draft: LanguageModel | None, key: dict[str, Any], settings: QuickSettings,
                  use_cache: bool = True) -> tuple[dict[int, float], dict[int, float]]:
    """t_target(k) and t_draft(k), measured once per pair and machine (both tuning modes share them)."""
    fp = fingerprint(target.device)
    path = timing_cache_path()
    cache = read_json(path, PROFILE_VERSION, fp) if use_cache else {}
    name = timing_cache_key(key) + f"|{settings.target_ks}|{settings.draft_ks}|{settings.context}|{settings.repeats}"
    entry = cache.get(name)
    if isinstance(entry, dict) and "target_ms" in entry:
        return (at_todays_speed(target, {int(k): float(v) for k, v in entry["target_ms"].items()}, settings),
                at_todays_speed(draft, {int(k): float(v) for k, v in entry["draft_ms"].items()}, settings))
    target_ms = measure_forward(target, settings.target_ks, settings.context, settings.repeats, path="target").ms
    draft_ms = {} if draft is None else \
        measure_forward(draft, settings.draft_ks, settings.context, settings.repeats, path="draft").ms
    if use_cache:
        cache[name] = {"target_ms": target_ms, "draft_ms": draft_ms}
        try:
            write_json(path, PROFILE_VERSION, fp, cache)
        except OSError:
            pass  # only costs a measurement next time
    return target_ms, draft_ms


def measure_ar(target: LanguageModel, prompt: list[int], sampling: SamplingConfig, tokens: int, seed: int,
               eos: Sequence[int], repeats: int = 1) -> float:
    """Plain decoding's ms per token after the prefill, its loop included: the median of `repeats`
    runs (every candidate's speedup is divided by it, so one run caught by a hiccup would skew them all)."""
    dec = SpeculativeDecoder(target, None, sampling, eos_token_ids=())  # no EOS: always `tokens` steps
    gen = None if sampling.greedy else torch.Generator(device=target.device).manual_seed(seed)
    dec.generate(prompt, 2, gen)  # warm-up
    runs = []
    for _ in range(max(repeats, 1)):
        _, st = dec.generate(prompt, tokens, gen)
        runs.append((st.wall_s - st.prefill_s) / max(st.new_tokens, 1) * 1e3)
    return sorted(runs)[len(runs) // 2]


# ---- the acceptance run ------------------------------------------------------------------------
def chain_nodes(tree: TokenTree) -> list[int]:
    """The comb's chain: the root's first child, then each node's only child."""
    parents = tree.parents.tolist()
    out: list[int] = []
    cur = 0
    while True:
        kids = [i for i in range(1, len(parents)) if parents[i] == cur]
        if not kids:
            return out
        cur = kids[0]
        out.append(cur)


def run_acceptance(target: LanguageModel, draft: LanguageModel, prompts: list[list[int]], sampling: SamplingConfig,
                   settings: QuickSettings, eos: Sequence[int], tick: Callable[[], None] = lambda: None,
                   ) -> tuple[Measurements, float, int]:
    """Decode every prompt with the comb tree, recording vectors and chains; returns the measurements
    (costs left empty), the loop's ms per call beyond drafting, and the comb's block size."""
    width, depth = settings.width, settings.chain_depth
    mode = "greedy" if sampling.greedy else "swor"
    drafter = SequoiaDrafter(draft, sampling, comb_paths(width, depth), mode, record_confidence=True)
    dec = SpeculativeDecoder(target, drafter, sampling, eos_token_ids=eos)
    verify = dec.verifier
    m = Measurements(Costs({}, {}, 0.0, 0.0))
    sums = {"topk": torch.zeros(width, dtype=torch.float64), "swor": torch.zeros(width, dtype=torch.float64),
            "iid": torch.zeros(width, dtype=torch.float64)}
    iid_gen = torch.Generator().manual_seed(settings.seed + 1)  # the extra i.i.d. draws: not the decoder's stream

    recording_s = [0.0]  # the records' own time: not the loop's overhead, which every candidate pays

    def recording(tree: TokenTree, target_probs: Tensor, generator: torch.Generator | None) -> VerifyResult:
        if tree.num_drafted:
            t0 = time.perf_counter()
            _record(tree, target_probs, drafter.last_confidence)
            recording_s[0] += time.perf_counter() - t0
        return verify(tree, target_probs, generator)

    def _record(tree: TokenTree, target_probs: Tensor, confidence: Tensor | None) -> None:
        root_p = target_probs[0].double().cpu()  # [V] the target at the root
        kids = (tree.parents == 0).nonzero().flatten()  # root children in rank (= sampling) order
        kid_tokens = tree.tokens[kids]
        q_root = None
        if tree.draft_probs is not None:
            q_root = tree.draft_probs[int(tree.cand_draft_row[int(kids[0]) - 1])].double().cpu()  # [V]
            acc, _ = swor_node(root_p, kid_tokens, q_root)
            reach = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - acc, 0)[:-1]])
            sums["swor"][: acc.shape[0]] += acc * reach
            draws = torch.multinomial(q_root.float(), width, replacement=True, generator=iid_gen)  # [W] i.i.d.
            acc, _ = mss_node(root_p, draws, q_root.expand(width, -1))
            reach = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - acc, 0)[:-1]])
            sums["iid"] += acc * reach
            top = torch.topk(q_root, width).indices
        else:
            top = kid_tokens
        sums["topk"][: top.shape[0]] += root_p[top]
        m.steps += 1
        chain = chain_nodes(tree)
        if len(chain) < depth or confidence is None:
            return  # a chain cut by the length cap (or a tiny support): not a full record
        accept, conf = [], []
        for node in chain:
            parent = int(tree.parents[node])
            p_row = target_probs[parent].double().cpu()
            token = int(tree.tokens[node])
            if tree.draft_probs is None:  # greedy: accepted iff it is the target's argmax
                accept.append(float(int(p_row.argmax()) == token))
            else:
                q = float(tree.draft_probs[int(tree.cand_draft_row[node - 1])][token])
                accept.append(min(1.0, float(p_row[token]) / q) if q > 0 else 0.0)
            conf.append(float(confidence[node - 1]))
        m.chain.accept.append(accept)
        m.chain.confidence.append(conf)

    dec.verifier = recording
    device = target.device
    gen = None if sampling.greedy else torch.Generator(device=device).manual_seed(settings.seed)
    wall = calls = 0.0
    for ids in prompts:
        out, st = dec.generate(ids, settings.gen_tokens, gen)
        m.texts.append((len(ids), torch.tensor(list(ids) + out, dtype=torch.long)))
        wall += st.wall_s - st.prefill_s - st.draft_s
        calls += st.target_calls
        tick()
    wall -= recording_s[0]
    if m.steps == 0:
        raise ValueError("the acceptance run drafted nothing; give longer --gen-tokens")
    m.topk = (sums["topk"] / m.steps).tolist()
    if not sampling.greedy:
        m.swor = (sums["swor"] / m.steps).tolist()
        m.iid = (sums["iid"] / m.steps).tolist()
    block = 1 + width + depth - 1
    return m, (wall / max(calls, 1)) * 1e3, block


def draft_argmax_along(draft: LanguageModel, texts: Sequence[tuple[int, Tensor]]) -> list[Tensor]:
    """The draft's greedy prediction after every prefix of each text (one pass per text)."""
    out = []
    for _, ids in texts:
        draft.reset(ids.shape[0] + 1)
        out.append(draft.forward(ids).argmax(-1).cpu())
        draft.crop(0)
    return out


# ---- the whole quick tune ----------------------------------------------------------------------
def quick_tune(
    target: LanguageModel,
    draft: LanguageModel | None,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    key: dict[str, Any],
    *,
    settings: QuickSettings = QuickSettings(),
    eos_token_ids: Sequence[int] = (),
    tokenizer: Any = None,
    bigram: list[int] | None = None,
    progress: bool = True,
    log: Log = lambda msg: None,
) -> dict[str, Any]:
    """Measure, price and choose; returns the profile (not saved). `tokenizer`: the target's (model-free
    candidates are built with it); `bigram`: Max-Gram's fill table when one is cached for it (None:
    Max-Gram candidates copy only)."""
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("the tune needs at least one prompt")
    prompts = prompts[: settings.num_prompts]
    t0 = time.perf_counter()
    stages = 3 + len(prompts) + (1 if draft is not None else 0)
    # A bar on a terminal only: elsewhere (a log, CI) its carriage-return redraws make one long line.
    bar = tqdm(total=stages, desc="tuning", unit="step", file=sys.stderr, disable=not (progress and sys.stderr.isatty()),
               dynamic_ncols=True)
    try:
        bar.set_postfix_str("forward times", refresh=True)
        target_ms, draft_ms = measure_costs(target, draft, key, settings)
        bar.update(1)
        bar.set_postfix_str("plain decoding", refresh=True)
        ar_ms = measure_ar(target, prompts[0], sampling, settings.ar_tokens, settings.seed, eos_token_ids,
                           settings.repeats)
        bar.update(1)
        if draft is not None:
            bar.set_postfix_str("acceptance", refresh=True)
            m, per_call, block = run_acceptance(target, draft, prompts, sampling, settings, eos_token_ids,
                                                tick=lambda: bar.update(1))
            overhead = max(per_call - interpolate_ms(target_ms, block), 0.0)
            m.draft_pred = draft_argmax_along(draft, m.texts)
            bar.update(1)
        else:
            m, overhead = Measurements(Costs({}, {}, 0.0, 0.0)), 0.0
            dec = SpeculativeDecoder(target, None, sampling, eos_token_ids=eos_token_ids)
            gen = None if sampling.greedy else torch.Generator().manual_seed(settings.seed)
            for ids in prompts:
                out, _ = dec.generate(ids, settings.gen_tokens, gen)
                m.texts.append((len(ids), torch.tensor(list(ids) + out, dtype=torch.long)))
                bar.update(1)
        m.costs = Costs(target_ms, draft_ms, ar_ms, overhead)
        bar.set_postfix_str("pricing", refresh=True)
        rows = price(PricingInputs(m.costs, m.chain, m.topk, m.swor, m.iid, m.texts, m.draft_pred, target, sampling,
                                   tokenizer, bigram if tokenizer is not None else None,
                                   (draft,) if draft is not None else (), eos_token_ids), draft is not None)
        bar.update(1)
    finally:
        bar.close()
    winner = dict(best(rows))
    profile = {
        **profile_header("quick", key, target, sampling),
        "pid": os.getpid(),
        "settings": asdict(settings),
        **m.to_dict(),
        "candidates": rows,
        "winner": winner,
        "tune_s": time.perf_counter() - t0,
    }
    log(summary_line(profile))
    return profile


def summary_line(profile: dict[str, Any]) -> str:
    """What auto chose and the speedup it expects, in one line."""
    w = profile["winner"]
    mode = profile["key"].get("mode", "")
    return (f"auto ({mode}): {w['label']}, expected {w['expected_speedup']:.2f}x plain decoding "
            f"({w['tokens_per_call']:.2f} tokens per target call; tuned in {profile.get('tune_s', 0):.0f} s)")


def format_quick(profile: dict[str, Any], top: int = 12) -> str:
    """The best candidates of each method, then the winner."""
    rows = profile["candidates"]
    lines = ["| candidate | tokens/call | target ms | draft ms | overhead ms | expected speedup | basis |",
             "|---|---:|---:|---:|---:|---:|---|"]
    best_of: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["method"] not in best_of or r["expected_speedup"] > best_of[r["method"]]["expected_speedup"]:
            best_of[r["method"]] = r
    shown = sorted(rows, key=lambda r: -r["expected_speedup"])[:top]
    for r in shown + [r for r in best_of.values() if r not in shown]:
        lines.append(f"| {r['label']} | {r['tokens_per_call']:.2f} | {r['target_ms']:.1f} | {r['draft_ms']:.1f} | "
                     f"{r['overhead_ms']:.1f} | {r['expected_speedup']:.2f}x | {r['basis']} |")
    return "\n".join(lines) + "\n\n" + summary_line(profile)
