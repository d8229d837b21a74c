"""Per-prompt table of a `specdec bench` run: every method's tokens/s as a ratio to `ar` on the same
prompt (end to end and decode-only), the best fixed method per prompt (the oracle) and `auto`'s gap
to it. Usage: python scripts/oracle_table.py runs/X/results.jsonl [--temperature 0.7] [--metric M]

Metrics: `decode` (`decode_tokens_per_s`: the first iteration's time and tokens left out), `e2e`
(`tokens_per_s`) and `after-prefill` (every new token over the time after the target's prompt pass).
`decode` leaves out the first iteration's tokens as well as its time, so a method whose first
iteration emits several tokens is judged on the rest alone (on a 21-token answer, `auto`'s first
iteration emitted 5 tokens and `sps` γ=2's 3); `after-prefill` counts them, and the draft model's
own prompt fill, which the target's prompt pass does not hold."""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def after_prefill(st: dict) -> float | None:
    if st.get("after_prefill_tokens_per_s") is not None:
        return st["after_prefill_tokens_per_s"]
    wall, prefill = st.get("wall_s"), st.get("prefill_s")  # rows from before the field
    return st["new_tokens"] / (wall - prefill) if wall is not None and prefill is not None and wall > prefill else None


RATES = {
    "decode": lambda st: st.get("decode_tokens_per_s"),
    "e2e": lambda st: st.get("tokens_per_s"),
    "after-prefill": after_prefill,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--metric", choices=tuple(RATES), default="decode",
                    help="which tokens/s the oracle and the gap are judged on")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results)]
    rows = [r for r in rows if abs(r["temperature"] - args.temperature) < 1e-9 and r["repeat"] == 0]
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["id"]][r["method"]] = r["stats"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "ar"))
    rate = RATES[args.metric]
    other_name = "e2e" if args.metric == "decode" else "decode"
    other = RATES[other_name]
    print(f"{args.metric} tokens/s ratio to ar (in brackets: {other_name}); tok/call after the slash\n")
    print("| prompt | new tokens | ar tok/s | " + " | ".join(methods) + " | oracle | auto / oracle |")
    print("|---|---:|---:|" + "---:|" * len(methods) + "---|---:|")
    ratios: dict[str, list[float]] = defaultdict(list)
    gaps = []
    for pid, ms in by.items():
        ar = ms["ar"]
        cells, best, auto = [], ("", 0.0), None
        for m in methods:
            st = ms.get(m)
            if st is None or not rate(st) or not rate(ar):
                cells.append("—")
                continue
            q, q2 = rate(st) / rate(ar), (other(st) or float("nan")) / (other(ar) or float("nan"))
            ratios[m].append(q)
            auto = q if m == "auto" else auto
            per_call = st.get("tokens_per_call")
            cells.append(f"{q:.2f} ({q2:.2f}) /" + (f"{per_call:.1f}" if per_call is not None else "—"))
            if m != "auto" and not m.startswith("hf-") and q > best[1]:  # the oracle: our fixed methods
                best = (m, q)
        gap = auto / best[1] if auto is not None and best[1] else float("nan")
        gaps.append(gap)
        print(f"| {pid} | {ar['new_tokens']} | {rate(ar) or float('nan'):.1f} | " + " | ".join(cells)
              + f" | {best[0]} {best[1]:.2f} | {gap:.2f} |")
    print("| geomean | | | " + " | ".join(f"{geomean(ratios[m]):.2f}" for m in methods) + " | | "
          f"{geomean([g for g in gaps if g == g]):.2f} |")


if __name__ == "__main__":
    main()
