"""``python -m studies.table2 report``: ``table2.md`` (both protocols' tables, the paired differences to FO and to
T1-T2, the cost per setting and the paper's table), ``table2.csv`` and the plots (:mod:`studies.table2.plots`),
from the records in ``<out>/runs`` (:mod:`studies.table2.summary` computes the numbers)."""

from __future__ import annotations

import csv
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from studies.common import atomic_path, format_duration, write_text
from studies.table2.plots import plot, plot_differences
from studies.table2.records import load_records
from studies.table2.settings import CHOSEN, COMPARED_SETTINGS, PAPER_RESULTS, PAPER_WAYS, PROTOCOLS
from studies.table2.summary import Entry, PairedDifference, choose_gammas, paired_differences, summarize


def _paired_table(differences: Sequence[PairedDifference], ways_shown: Sequence[int]) -> list[str]:
    lines = [
        "| method | " + " | ".join(f"{w}-way" for w in ways_shown) + " |",
        "|---|" + "---:|" * len(ways_shown),
    ]
    for name in dict.fromkeys(d.method for d in differences):
        cells = {d.ways: d for d in differences if d.method == name}
        first = next(iter(cells.values()))
        label = (
            first.label
            if name != CHOSEN
            else f"{first.label} (γ: " + ", ".join(f"{cells[w].gamma:g}" for w in ways_shown if w in cells) + ")"
        )
        lines.append(f"| {label} | " + " | ".join(cells[w].text() if w in cells else "n/a" for w in ways_shown) + " |")
    return lines


def _markdown_table(entries: Sequence[Entry], ways_shown: Sequence[int], rows: Sequence[str]) -> list[str]:
    lines = [
        "| method | JVPs | s/step | " + " | ".join(f"{w}-way" for w in ways_shown) + " |",
        "|---|---:|---:|" + "---:|" * len(ways_shown),
    ]
    for name in rows:
        cells = {e.ways: e for e in entries if e.method == name}
        first = next(iter(cells.values()))
        times = [t for e in cells.values() for t in e.step_times]
        sps = f"{statistics.median(times):.3f}" if times else "n/a"
        texts = [cells[w].text() if w in cells else "n/a" for w in ways_shown]
        count = "n/a" if first.jvps is None else first.jvps
        lines.append(f"| {first.label} | {count} | {sps} | " + " | ".join(texts) + " |")
    return lines


def _cost_table(entries: Sequence[Entry], ways_shown: Sequence[int], rows: Sequence[str]) -> list[str]:
    """Per setting: each row's median step time over its runs (n) and its ratio to FO's in the same setting."""
    lines = ["| method | " + " | ".join(f"{w}-way" for w in ways_shown) + " |", "|---|" + "---:|" * len(ways_shown)]
    fo = {e.ways: e.seconds_per_step for e in entries if e.method == "fo"}
    for name in rows:
        cells = {e.ways: e for e in entries if e.method == name}
        texts = []
        for w in ways_shown:
            cell = cells.get(w)
            if cell is None or cell.seconds_per_step is None:
                texts.append("n/a")
                continue
            ratio = f", {cell.seconds_per_step / fo[w]:.2f}x fo" if fo.get(w) else ""
            texts.append(f"{cell.seconds_per_step:.3f} (n={len(cell.step_times)}){ratio}")
        lines.append(f"| {next(iter(cells.values())).label} | " + " | ".join(texts) + " |")
    return lines


def _paper_table() -> list[str]:
    lines = [
        "| method | JVPs | " + " | ".join(f"{w}-way" for w in PAPER_WAYS) + " |",
        "|---|---:|" + "---:|" * len(PAPER_WAYS),
    ]
    for label, (count, cells) in PAPER_RESULTS.items():
        lines.append(
            f"| {label} | {count} | " + " | ".join(f"{cells[w][0]:.2f} ± {cells[w][1]:.2f}" for w in PAPER_WAYS) + " |"
        )
    return lines


MODEL_SETTINGS = ("inner_optimizer", "inner_lr", "inner_momentum", "inner_steps", "outer_lr", "backbone")
"""The records' fields that the report states under each dataset's title (from the config of the run)."""


def _combos(records: Sequence[dict[str, Any]], fields: Sequence[str]) -> list[tuple[Any, ...]]:
    # records written before the runner read its config have no inner_optimizer: they all used SGD
    defaults = {"inner_optimizer": "SGD"}
    return sorted({tuple(r.get(name, defaults.get(name)) for name in fields) for r in records}, key=str)


def _one_or_warning(texts: Sequence[str], what: str, template: str) -> list[str]:
    if len(texts) == 1:
        return [template.format(texts[0])]
    return [f"**Warning: the records mix {what}:**"] + [f"- {t}" for t in texts]


def _settings_text(records: Sequence[dict[str, Any]]) -> list[str]:
    texts = [
        f"{shots}-shot, {queries} queries per class, {steps} outer steps, meta-batch {mb}, {tasks} meta-validation "
        f"and {tasks} meta-test tasks per run"
        for shots, queries, steps, mb, tasks in _combos(records, COMPARED_SETTINGS)
    ]
    return _one_or_warning(texts, "settings", "Settings: {}.")


def _model_text(records: Sequence[dict[str, Any]]) -> list[str]:
    seeds = sorted({r["seed"] for r in records})
    texts = [
        f"Inner {opt} lr {lr} momentum {momentum}, T = {steps}; outer Adam lr {outer_lr}; "
        f"backbone {str(backbone).replace('x', ' x ')} with batch norm."
        for opt, lr, momentum, steps, outer_lr, backbone in _combos(records, MODEL_SETTINGS)
        if (lr, momentum, steps, outer_lr, backbone) != (None,) * 5  # hand-written records may not say
    ]
    runs = f"{len(records)} runs, seeds {seeds}."
    if not texts:
        return [runs]
    return _one_or_warning(texts, "model settings", "{} " + runs) + ([runs] if len(texts) > 1 else [])


def render_markdown(records: Sequence[dict[str, Any]], entries: Sequence[Entry]) -> str:
    """``table2.md``: per dataset, both protocols' tables; then the paper's table and the compute time."""
    lines = ["# Table 2 reproduction: few-shot classification", ""]
    chosen = choose_gammas(records)
    for dataset in sorted({e.dataset for e in entries}):
        mine = [r for r in records if r["dataset"] == dataset]
        ways_shown = sorted({e.ways for e in entries if e.dataset == dataset})
        rows = list(dict.fromkeys(e.method for e in entries if e.dataset == dataset))
        compute = sum(r.get("wall_seconds") or 0.0 for r in mine)
        lines += [
            f"## {dataset}",
            "",
            *_settings_text(mine),
            *_model_text(mine),
            "",
            "Cells: accuracy in percent, mean ± 1.96 · std / √n over n seeds (sample std; one seed: no interval). "
            "s/step: training step time, the median over the row's runs of each run's median step (per setting: "
            "(d) below). γ is chosen per setting by the best mean meta-validation accuracy over seeds.",
            "",
            "γ chosen: "
            + (", ".join(f"{w}-way {chosen[(dataset, w)]:g}" for w in ways_shown if (dataset, w) in chosen) or "n/a"),
            "",
        ]
        for protocol, (_, title) in PROTOCOLS.items():
            cells = [e for e in entries if e.dataset == dataset and e.protocol == protocol]
            lines += [f"### {title}", "", *_markdown_table(cells, ways_shown, rows), ""]
        for reference in ("fo", "t1t2"):
            differences = [d for d in paired_differences(mine, reference) if d.dataset == dataset]
            if not differences:
                continue
            lines += [
                f"### (c) paired difference to {reference}, meta-test (clean protocol)",
                "",
                f"Cells: the method's meta-test accuracy minus {reference}'s, seed by seed (the seeds share their task "
                "streams), in points: mean [95% interval, Student's t over the n seeds both have]. **↑** / **↓**: "
                "the interval lies above / below 0 (better / worse beyond the interval).",
                "",
                *_paired_table(differences, ways_shown),
                "",
            ]
        clean = [e for e in entries if e.dataset == dataset and e.protocol == "clean"]
        lines += [
            "### (d) cost: seconds per training step",
            "",
            "Cells: the median over the runs of each run's median step time (one outer step: the meta-batch's inner "
            "loops and hypergradients), n runs, and its ratio to fo's in the same setting. Measured in the runs "
            "above, so only as comparable as the conditions they ran under (other jobs on the cores inflate them).",
            "",
            *_cost_table(clean, ways_shown, rows),
            "",
            f"Total compute: {format_duration(compute)} ({compute / 3600:.2f} h), runs' wall time summed.",
            "",
        ]
    lines += [
        "## The paper's Table 2 (CIFAR-100, not this dataset)",
        "",
        "Accuracy in percent, mean ± 95% CI, as published (10-shot; the paper's Greedy row is γ = 0.99).",
        "",
        *_paper_table(),
        "",
    ]
    total = sum(r.get("wall_seconds") or 0.0 for r in records)
    lines += [f"Total compute, all records: {format_duration(total)} ({total / 3600:.2f} h), {len(records)} runs.", ""]
    return "\n".join(lines)


def write_csv(path: Path, entries: Sequence[Entry]) -> None:
    """``table2.csv``: one row per dataset x protocol x method x setting."""
    fields = [name for name in Entry.__dataclass_fields__ if name != "step_times"]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for entry in entries:
            row = asdict(entry)
            writer.writerow({k: "" if row[k] is None else row[k] for k in fields})


def report(out: Path) -> int:
    """Writes ``table2.md``, ``table2.csv`` and ``table2.png`` in ``out`` from the records in ``out/runs``."""
    records = load_records(out)
    if not records:
        print(f"report: no records in {out / 'runs'}", file=sys.stderr)
        return 1
    entries = summarize(records)
    markdown = render_markdown(records, entries)
    md_path = out / "table2.md"
    write_text(md_path, markdown)
    write_csv(out / "table2.csv", entries)
    plot(out / "table2.png", entries)
    written = [md_path, out / "table2.csv", out / "table2.png"]
    for reference in ("fo", "t1t2"):
        if plot_differences(out / f"table2_vs_{reference}.png", records, reference):
            written.append(out / f"table2_vs_{reference}.png")
    print(markdown)
    print(f"report: wrote {', '.join(str(p) for p in written)} from {len(records)} records")
    return 0
