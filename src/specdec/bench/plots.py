"""The PNG plots: speedup by task category per temperature, and acceptance by draft position.
matplotlib is an optional extra (`specdec[bench]`), imported only when plotting."""

from __future__ import annotations

import math
import os
from pathlib import Path

from specdec.bench.peers import is_hf
from specdec.bench.settings import fmt_temp
from specdec.bench.summary import Summary


def make_plots(summary: Summary, out_dir: str | os.PathLike[str]) -> list[Path]:
    """speedup_T{t}.png per temperature and acceptance_by_position.png; raises ImportError
    without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths: list[Path] = []
    cols = summary.tasks + ["all"]
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(summary.methods)}
    for t in summary.temperatures:
        methods = [m for m in summary.methods if m != "ar" and (m, t) in summary.table]
        if not methods:
            continue
        fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 2.5 + len(cols) * (0.3 * len(methods) + 0.4))), 5.0))
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            s = summary.table[(m, t)]
            vals = [s.speedup.get(c, float("nan")) for c in cols]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cols))]
            bars = ax.bar(xs, [v if math.isfinite(v) else 0 for v in vals], width, label=m, color=colors[m],
                          hatch="//" if is_hf(m) else None, edgecolor="white" if not is_hf(m) else "black",
                          linewidth=0.5)
            for b, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                va="bottom", fontsize=7, rotation=90 if len(methods) > 3 else 0,
                                xytext=(0, 2), textcoords="offset points")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="AR (1.0)")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([c.replace("_", " ") for c in cols], rotation=20, ha="right")
        ax.set_ylabel("speedup over specdec AR (tokens/s ratio)")
        ax.set_title(f"Speedup by task category, T = {fmt_temp(t)} (geometric mean over prompts)")
        ax.set_ylim(0, max([1.2] + [b.get_height() * 1.18 for b in ax.patches]))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"speedup_T{fmt_temp(t)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

    panels = []
    for label, temps in (("T = 0 (greedy)", [t for t in summary.temperatures if t == 0]),
                         ("T > 0 (sampling)", [t for t in summary.temperatures if t > 0])):
        lines = [
            (m, t, summary.table[(m, t)].acceptance_by_position)
            for t in temps
            for m in summary.methods
            if (m, t) in summary.table and summary.table[(m, t)].acceptance_by_position
        ]
        if lines:
            panels.append((label, lines, len(temps) > 1))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False, sharey=True)
        styles = ["-", "--", ":", "-."]
        for ax, (label, lines, several) in zip(axes[0], panels):
            temps = sorted({t for _, t, _ in lines})
            for m, t, acc in lines:
                ax.plot(range(1, len(acc) + 1), acc, marker="o", color=colors[m],
                        linestyle=styles[temps.index(t) % len(styles)],
                        label=f"{m} T={fmt_temp(t)}" if several else m)
            ax.set_title(f"Acceptance rate by draft position, {label}")
            ax.set_xlabel("draft position")
            ax.set_ylim(0, 1.02)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, frameon=False)
        axes[0][0].set_ylabel("accepted / proposed (mean over prompts)")
        fig.tight_layout()
        path = out / "acceptance_by_position.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
