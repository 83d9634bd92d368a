"""The Table 2 report's figures: ``table2.png`` (accuracy per setting and method, with 95% intervals) and
``table2_vs_<reference>.png`` (each method's paired difference to a reference, with its 95% interval)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studies.common import atomic_path
from studies.stats import BETTER, WORSE
from studies.table2.settings import CHOSEN, PROTOCOLS
from studies.table2.summary import Entry, paired_differences


def plot(path: Path, entries: Sequence[Entry]) -> None:
    """``table2.png``: per dataset, grouped bars (setting x method) with 95% CIs, clean protocol then the paper's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datasets = sorted({e.dataset for e in entries})
    figure = Figure(figsize=(14, 4.8 * len(datasets)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(datasets), 2, squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, protocol in enumerate(("clean", "paper")):
            ax = axes[row][col]
            cells = [e for e in entries if e.dataset == dataset and e.protocol == protocol]
            ways_shown = sorted({e.ways for e in cells})
            methods = list(dict.fromkeys(e.method for e in cells))
            width = 0.8 / max(len(methods), 1)
            for i, name in enumerate(methods):
                by_ways = {e.ways: e for e in cells if e.method == name}
                heights = [by_ways[w].mean if by_ways[w].mean is not None else math.nan for w in ways_shown]
                errors = [by_ways[w].ci95 or 0.0 for w in ways_shown]
                greedy_gamma_row = name.startswith("greedy") and name != CHOSEN
                ax.bar(
                    [x - 0.4 + width * (i + 0.5) for x in range(len(ways_shown))],
                    heights,
                    width,
                    yerr=errors,
                    capsize=2,
                    label=by_ways[ways_shown[0]].label,
                    alpha=0.5 if greedy_gamma_row else 0.95,
                    hatch="//" if greedy_gamma_row else None,
                )
            for x, w in enumerate(ways_shown):
                chance = "chance" if x == 0 else None
                ax.hlines(100 / w, x - 0.45, x + 0.45, colors="gray", linestyles=":", label=chance)
            ax.set_xticks(range(len(ways_shown)), [f"{w}-way" for w in ways_shown])
            ax.set_ylabel(f"meta-{'test' if protocol == 'clean' else 'validation'} accuracy (%)")
            ax.set_title(f"{dataset}: {PROTOCOLS[protocol][1]}", fontsize=9)
            tops = [(e.mean or 0.0) + (e.ci95 or 0.0) for e in cells] + [100 / w for w in ways_shown]
            ax.set_ylim(0, min(100.0, 1.35 * max(tops)) if max(tops) < 100 else 105)
            ax.legend(fontsize=7, ncol=3, loc="upper right")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)


OFF_SCALE = 10.0
"""Points of difference beyond which :func:`plot_differences` draws a method at the edge of its panel."""


def plot_differences(path: Path, records: Sequence[dict[str, Any]], reference: str = "fo") -> bool:
    """``table2_vs_<reference>.png``: each method's paired meta-test difference to ``reference`` with its 95% interval.

    One panel per dataset and setting; a dot per method, the interval as a bar, 0 as a line. False (nothing
    written) where no method has a paired difference.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    differences = [d for d in paired_differences(records, reference) if d.mean is not None]
    panels = sorted({(d.dataset, d.ways) for d in differences})
    if not panels:
        return False
    methods = list(dict.fromkeys(d.method for d in differences))
    # wide enough for the title and the method names when there is a single panel
    figure = Figure(figsize=(max(4.2 * len(panels), 7.5), 0.45 * len(methods) + 1.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (dataset, ways) in zip(axes, panels):
        mine = {d.method: d for d in differences if (d.dataset, d.ways) == (dataset, ways)}
        # the scale follows the differences within OFF_SCALE points, so that half a point stays visible; the rows
        # beyond it are drawn at the edge with their value written out
        near = [x for d in mine.values() if abs(d.mean) <= OFF_SCALE for x in (d.mean, d.low, d.high) if x is not None]
        edge = 1.15 * max([abs(x) for x in near] + [0.5])
        for y, name in enumerate(methods):
            d = mine.get(name)
            if d is None:
                continue
            color = {BETTER: "tab:green", WORSE: "tab:red"}.get(d.verdict, "tab:gray")
            if abs(d.mean) > OFF_SCALE:
                x = math.copysign(edge, d.mean)
                ax.plot([x], [y], "<" if d.mean < 0 else ">", color=color)
                span = "" if d.low is None else f" [{d.low:+.1f}, {d.high:+.1f}]"
                ax.annotate(f"{d.mean:+.1f}{span}, off scale", (x, y), xytext=(0, 7), textcoords="offset points",
                            ha="left" if d.mean < 0 else "right", fontsize=7, color=color)  # fmt: skip
                continue
            if d.low is not None and d.high is not None:
                ax.plot([d.low, d.high], [y, y], color=color, linewidth=2.5, solid_capstyle="butt")
            ax.plot([d.mean], [y], "o", color=color)
        ax.set_xlim(-edge * 1.05, edge * 1.05)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(methods)), [next(d.label for d in differences if d.method == m) for m in methods])
        ax.invert_yaxis()
        n = sorted({d.n for d in mine.values()})
        ax.set_title(f"{dataset} {ways}-way (n = {', '.join(map(str, n))} seeds)", fontsize=9)
        ax.set_xlabel("points")
    figure.suptitle(
        f"Meta-test accuracy minus {reference}'s, paired by seed, with its 95% interval\n"
        "(green: better, red: worse beyond the interval)",
        fontsize=10,
    )
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)
    return True
