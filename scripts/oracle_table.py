"""Per-prompt table of a `specdec bench` run: every method's tokens/s as a ratio to `ar` on the same
prompt (end to end and decode-only), the best fixed method per prompt (the oracle) and `auto`'s gap
to it. Usage: python scripts/oracle_table.py runs/X/results.jsonl [--temperature 0.7]"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--metric", choices=("decode", "e2e"), default="decode",
                    help="which tokens/s the oracle and the gap are judged on")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results)]
    rows = [r for r in rows if abs(r["temperature"] - args.temperature) < 1e-9 and r["repeat"] == 0]
    by: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by[r["id"]][r["method"]] = r["stats"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "ar"))
    key = {"decode": "decode_tokens_per_s", "e2e": "tokens_per_s"}[args.metric]
    other = {"decode": "tokens_per_s", "e2e": "decode_tokens_per_s"}[args.metric]
    print(f"{args.metric} tokens/s ratio to ar (in brackets: {'e2e' if args.metric == 'decode' else 'decode'}); "
          "tok/call after the slash\n")
    print("| prompt | new tokens | ar tok/s | " + " | ".join(methods) + " | oracle | auto / oracle |")
    print("|---|---:|---:|" + "---:|" * len(methods) + "---|---:|")
    ratios: dict[str, list[float]] = defaultdict(list)
    gaps = []
    for pid, ms in by.items():
        ar = ms["ar"]
        cells, best = [], ("", 0.0)
        for m in methods:
            st = ms.get(m)
            if st is None or not st.get(key) or not ar.get(key):
                cells.append("—")
                continue
            q, q2 = st[key] / ar[key], (st[other] or float("nan")) / (ar[other] or float("nan"))
            ratios[m].append(q)
            cells.append(f"{q:.2f} ({q2:.2f}) /{st['tokens_per_call']:.1f}")
            if m != "auto" and q > best[1]:
                best = (m, q)
        gap = ratios["auto"][-1] / best[1] if "auto" in ms and best[1] else float("nan")
        gaps.append(gap)
        print(f"| {pid} | {ar['new_tokens']} | {ar[key]:.1f} | " + " | ".join(cells)
              + f" | {best[0]} {best[1]:.2f} | {gap:.2f} |")
    print("| geomean | | | " + " | ".join(f"{geomean(ratios[m]):.2f}" for m in methods) + " | | "
          f"{geomean([g for g in gaps if g == g]):.2f} |")


if __name__ == "__main__":
    main()
