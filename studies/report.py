"""``python -m studies.report``: the published numbers of the README and docs/, written again from the records.

Each generated part of a page sits between two lines::

    <!-- generated:NAME -->
    ...
    <!-- /generated:NAME -->

and :data:`BLOCKS` says what writes it, from the committed records (no training, no measurement). ``python -m
studies.report`` rewrites every block in place; ``--check`` writes nothing and exits 1 naming each block whose text
differs from what its records give (``tests/test_published_numbers.py`` runs the same check). Every verdict in these
blocks, "better", "worse" or "level", is :func:`studies.stats.verdict`'s: a paired 95% interval that holds 0 is level.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studies.evidence import (
    BEST,
    DEFAULT,
    EXACT,
    RANDOM_SEARCH,
    ROOT,
    RULE,
    Setting,
    all_settings,
    best_or_level,
    candidate_values,
    cnn_args,
    default_rule,
    judge,
)
from studies.stats import BETTER, WORSE, Comparison, compare, verdict

FILES = ("README.md", "docs/choosing.md", "docs/results.md", "docs/scale.md")
"""The pages that hold generated blocks."""
BLOCK = re.compile(r"<!-- generated:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /generated:(?P=name) -->", re.DOTALL)
MARK = {BETTER: " **↑**", WORSE: " **↓**"}
"""The marks of a verdict in a dense table (none for level)."""


@functools.cache
def _settings() -> list[Setting]:
    """Every setting, read from the records once per process."""
    return all_settings()


def _by_key() -> dict[str, Setting]:
    return {s.key: s for s in _settings()}


def code(method: str) -> str:
    return "random search" if method == RANDOM_SEARCH else f"`{method}`"


# ---------------------------------------------------------------------------------------------------------------------
# what trains best: README, docs/choosing.md
# ---------------------------------------------------------------------------------------------------------------------

SHOWN = (DEFAULT, "fo", "t1t2", "greedy(0.99)", RANDOM_SEARCH)
"""The methods of the advice tables' columns (the exact hypergradient as the default)."""


def _cell(setting: Setting, method: str, *, interval: bool) -> str:
    """A method's verdict in ``setting`` against the best, with its difference (and interval)."""
    name = candidate_values(setting, method) if method != RANDOM_SEARCH else method
    if name is None or name not in setting.values:
        return "-"
    judgement = judge(setting)[name]
    if judgement.verdict == BEST:
        text = f"**best**, {setting.show(judgement.mean)}"
    else:
        comparison = judgement.comparison
        assert comparison is not None
        shown = comparison.text(setting.digits, scale=setting.scale) if interval else _mean_only(comparison, setting)
        text = f"{judgement.verdict}, {shown}"
    if name != method and method == DEFAULT:
        text += " (`rmd`)"
    return text


def _mean_only(comparison: Comparison, setting: Setting) -> str:
    return f"{setting.scale * comparison.mean:+.{setting.digits}f}"


def _setting_label(setting: Setting) -> str:
    return f"{setting.label} ({setting.measure}; {setting.unit})"


def readme_advice_table() -> str:
    header = (
        "| setting | best | exact RMD (the default) | `fo` | `t1t2` | `greedy(0.99)` | random search |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in _settings():
        if not s.counted:
            continue
        best = judge(s)
        top = next(iter(best))
        cells = [_cell(s, m, interval=False) for m in SHOWN]
        cells = [c.replace(f"**best**, {s.show(best[top].mean)}", "**best**") for c in cells]
        rows.append(f"| {_setting_label(s)} | {code(top)}, {s.show(best[top].mean)} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def choosing_settings_table() -> str:
    header = (
        "| setting | best | exact RMD (the default) | `fo` | `t1t2` | `greedy(0.9)` | `greedy(0.99)` | random "
        "search |\n|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in _settings():
        best = judge(s)
        top = next(iter(best))
        label = _setting_label(s) + ("" if s.counted else " **not counted**")
        cells = [_cell(s, m, interval=True) for m in (DEFAULT, "fo", "t1t2", "greedy(0.9)", "greedy(0.99)")]
        cells.append(_cell(s, RANDOM_SEARCH, interval=True))
        cells = [c.replace(f"**best**, {s.show(best[top].mean)}", "**best**") for c in cells]
        rows.append(f"| {label} | {code(top)}, {s.show(best[top].mean)} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _labels(keys: list[str]) -> str:
    found = _by_key()
    return "; ".join(found[k].label for k in keys) if keys else "none"


def choosing_rule() -> str:
    settings = _settings()
    counted = [s for s in settings if s.counted]
    tallies = default_rule(settings)
    lines = [
        f"**The rule.** {RULE}",
        "",
        f"Counted: {_count(len(counted), 'setting')} (the table above, less those marked not counted).",
        "",
        "| candidate | best or level | worse | where worse |",
        "|---|---:|---:|---|",
    ]
    for t in tallies:
        lines.append(f"| {code(t.method)} | {len(t.best_or_level)} | {len(t.worse)} | {_labels(t.worse)} |")
    chosen = tallies[0]
    agrees = chosen.method == DEFAULT
    lines += [
        "",
        f"**What it says:** {code(chosen.method)}, best or level with the best in {len(chosen.best_or_level)} of "
        f"{len(counted)} settings and worse in {len(chosen.worse)}"
        + (f" ({_labels(chosen.worse)})" if chosen.worse else "")
        + ". "
        + (
            "That is `BilevelModule`'s default."
            if agrees
            else f"`BilevelModule`'s default is `{DEFAULT}`, not this: the rule and the code disagree."
        ),
    ]
    return "\n".join(lines) + "\n"


def _exact_cell(setting: Setting) -> tuple[str, Any]:
    name = candidate_values(setting, DEFAULT) or EXACT
    return name, judge(setting)[name]


def _vs(setting: Setting, method: str, reference: str) -> Comparison:
    """``method`` against ``reference`` in ``setting``, paired over the units both have."""
    mine, theirs = setting.values[method], setting.values[reference]
    common = sorted(set(mine) & set(theirs))
    return compare([mine[k] for k in common], [theirs[k] for k in common], higher_is_better=setting.higher_is_better)


def readme_advice() -> str:
    settings = _settings()
    counted = [s for s in settings if s.counted]
    tallies = {t.method: t for t in default_rule(settings)}
    chosen = next(iter(tallies.values()))
    exact = tallies[DEFAULT]
    few_shot = [s for s in counted if s.key.startswith("omniglot")]
    lost, below = [], []
    for s in few_shot:  # the default against `fo`, the cheapest, on the few-shot heads the configs target
        found = _vs(s, candidate_values(s, DEFAULT) or EXACT, "fo")
        if found.verdict == WORSE:
            lost.append(f"{s.label}, {found.text(s.digits, scale=s.scale)} points against `fo`")
        elif found.mean * (1 if s.higher_is_better else -1) < 0:
            below.append(f"{s.label}, {found.text(s.digits, scale=s.scale)}")
    for s in counted:
        if s in few_shot:
            continue
        judgement = judge(s)[candidate_values(s, DEFAULT) or EXACT]
        if judgement.verdict == WORSE and judgement.comparison is not None:
            best = next(iter(judge(s)))
            lost.append(f"{s.label}, {judgement.comparison.text(s.digits, scale=s.scale)} against {code(best)}")
    fo_worse = [s.label for s in few_shot if not best_or_level(judge(s)["fo"])]
    cnn = [s for s in settings if s.key.startswith("cnn")]
    rs = [s for s in cnn if RANDOM_SEARCH in s.values and best_or_level(judge(s)[RANDOM_SEARCH])]
    others = ", ".join(f"{code(m)} {len(t.best_or_level)}" for m, t in tallies.items() if m != DEFAULT)
    text = (
        "**Which to use.** One rule picks the default from these records (the estimator best or level with the best in "
        "the most settings: [docs/choosing.md](docs/choosing.md#the-default-estimator)): "
        + (
            f"the exact hypergradient, best or level in {len(exact.best_or_level)} of the {len(counted)} settings "
            f"({others}). `BilevelModule`'s default is its checkpointed form `{DEFAULT}`; take `rmd` where its "
            "O(P T) memory fits."
            if chosen.method == DEFAULT
            else f"{code(chosen.method)}, best or level in {len(chosen.best_or_level)} of the {len(counted)} settings; "
            f"`BilevelModule`'s default, `{DEFAULT}`, is best or level in {len(exact.best_or_level)} ({others})."
        )
        + " **Where the default loses:** "
        + ("; ".join(lost) if lost else "nowhere beyond the intervals")
        + ("; below `fo` on average but level, the intervals being wide: " + "; ".join(below) if below else "")
        + f". On the few-shot heads `fo` costs least and is best or level in {len(few_shot) - len(fo_worse)} of "
        f"{len(few_shot)} (not on {', '.join(fo_worse) if fo_worse else 'any'}). Random search was best or level in "
        f"{len(rs)} of the {len(cnn)} CNN runs (counted or not): with a handful of hyperparameters, try it first. "
        "Check an estimate on your own problem with `HypergradCallback`.\n"
    )
    return text


def choosing_cosine() -> str:
    ten = json.loads((ROOT / "studies/quality/results/variants_10shot.json").read_text(encoding="utf-8"))["overall"]
    one = json.loads((ROOT / "studies/quality/results/variants_1shot.json").read_text(encoding="utf-8"))["overall"]
    greedy_like = [m for m in one if m not in ("fo", "t1t2") and not m.startswith("neumann")]
    rates = [100 * one[m]["win_rate_vs_t1t2"] for m in greedy_like]
    beats = [m for m in greedy_like if one[m]["mean_cosine"] > one["t1t2"]["mean_cosine"]]
    return (
        "Cosine to the exact (RMD) hypergradient on Omniglot tasks ([docs/results.md](results.md)): on 5-way 10-shot "
        "tasks `greedy(0.99)`'s mean cosine to RMD is at least T1-T2's in "
        f"{ten['greedy(0.99)']['settings_at_least_t1t2']} of {ten['greedy(0.99)']['n_settings']} settings, "
        "`greedy(0.5)`'s in "
        f"{ten['greedy(0.5)']['settings_at_least_t1t2']}; on 1-shot tasks "
        + (
            "every Greedy and Greedy variant"
            if len(beats) == len(greedy_like)
            else f"{len(beats)} of the {len(greedy_like)} Greedy estimators and variants"
        )
        + f" has a higher mean cosine than T1-T2 ({min(rates):.0f}-{max(rates):.0f}% of paired tasks won: "
        + ", ".join(f"`{m}` {100 * one[m]['win_rate_vs_t1t2']:.0f}%" for m in greedy_like)
        + "), yet none is at least T1-T2's in every setting ([docs/greedy_variants.md](greedy_variants.md)).\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# docs/results.md, section 1: Table 2
# ---------------------------------------------------------------------------------------------------------------------


def _table2(folder: str):
    from studies.table2.records import load_records
    from studies.table2.summary import paired_differences, summarize

    records = load_records(ROOT / folder)
    return records, summarize(records), paired_differences


def _table2_cells(protocol: str) -> str:
    _, entries, _ = _table2("studies/table2/results/omniglot")
    entries = [e for e in entries if e.protocol == protocol]
    ways = sorted({e.ways for e in entries})
    lines = [
        "| method | JVPs | s/step | " + " | ".join(f"{w}-way" for w in ways) + " |",
        "|---|---:|---:|" + "---:|" * len(ways),
    ]
    for name in dict.fromkeys(e.method for e in entries):
        cells = {e.ways: e for e in entries if e.method == name}
        first = next(iter(cells.values()))
        times = [t for e in cells.values() for t in e.step_times]
        sps = f"{statistics.median(times):.3f}" if times else "n/a"
        count = "n/a" if first.jvps is None else first.jvps
        texts = [cells[w].text() if w in cells else "n/a" for w in ways]
        lines.append(f"| {first.label} | {count} | {sps} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def table2_10shot_val() -> str:
    return _table2_cells("paper")


def table2_10shot_test() -> str:
    return _table2_cells("clean")


def _paired_cell(d) -> str:
    if d.mean is None:
        return "n/a"
    if d.low is None or d.high is None:
        return f"{d.mean:+.2f} (n={d.n})"
    return f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" + MARK.get(
        verdict((d.low, d.high), higher_is_better=True), ""
    )


def table2_10shot_vs_fo() -> str:
    from studies.table2.settings import CHOSEN

    records, _, paired = _table2("studies/table2/results/omniglot")
    differences = paired(records, "fo")
    ways = sorted({d.ways for d in differences})
    lines = ["| method | " + " | ".join(f"{w}-way" for w in ways) + " |", "|---|" + "---:|" * len(ways)]
    for name in dict.fromkeys(d.method for d in differences):
        cells = {d.ways: d for d in differences if d.method == name}
        label = next(iter(cells.values())).label
        if name == CHOSEN:
            label += " (γ: " + ", ".join(f"{cells[w].gamma:g}" for w in ways if w in cells) + ")"
        lines.append(f"| {label} | " + " | ".join(_paired_cell(cells[w]) if w in cells else "n/a" for w in ways) + " |")
    return "\n".join(lines) + "\n"


def table2_10shot_seeds() -> str:
    records, _, _ = _table2("studies/table2/results/omniglot")
    from studies.table2.settings import canonical

    lines = ["| method | 3-way | 4-way | 5-way |", "|---|---|---|---|"]
    for method in ("rmd", "greedy(0.5)"):
        cells = []
        for ways in (3, 4, 5):
            runs = sorted(
                (r for r in records if canonical(r["method"]) == method and r["ways"] == ways), key=lambda r: r["seed"]
            )
            cells.append(", ".join(f"{100 * r['test_acc']:.1f}" for r in runs))
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _one_shot(ways: int) -> str:
    from studies.table2.settings import CHOSEN

    records, entries, paired = _table2("studies/table2/results/omniglot-1shot")
    entries = [e for e in entries if e.protocol == "clean" and e.ways == ways and e.method != CHOSEN and e.n]
    vs = {ref: {d.method: d for d in paired(records, ref) if d.ways == ways} for ref in ("fo", "t1t2")}
    lines = ["| method | seeds | meta-test | minus `fo` | minus `t1t2` |", "|---|---:|---:|---:|---:|"]
    for e in entries:
        cells = [_paired_cell(vs[ref][e.method]) if e.method in vs[ref] else "–" for ref in ("fo", "t1t2")]
        cell = f"{e.mean:.2f}" + ("" if e.ci95 is None else f" ± {e.ci95:.2f}")
        lines.append(f"| `{e.label}` | {e.n} | {cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table2_1shot_5way() -> str:
    return _one_shot(5)


def table2_1shot_10way() -> str:
    return _one_shot(10)


# ---------------------------------------------------------------------------------------------------------------------
# docs/results.md, section 1: what stalls IFT (the trace runs)
# ---------------------------------------------------------------------------------------------------------------------

TRACE_RUN = {
    "dataset": "omniglot",
    "ways": 3,
    "shots": 10,
    "seed": 0,
    "steps": 100,
    "clip": None,
    "inner_weight_decay": None,
    "freeze_last_norm": False,
    "precision": 32,
    "correction_scale": 1.0,
}
"""The trace run that a row names, less what the row changes: 3-way 10-shot, seed 0, 100 steps, nothing changed."""
TRACE_CAUSES = (
    ("`fo`", {"method": "fo"}),
    ("`neumann(10)`", {"method": "neumann(10)"}),
    ("`greedy(0.5)`", {"method": "greedy(0.5)"}),
    ("`neumann(10)`, hypergradient norm clipped at 100", {"method": "neumann(10)", "clip": 100.0}),
    ("`neumann(10)`, clipped at 10", {"method": "neumann(10)", "clip": 10.0}),
    ("`neumann(10)`, last batch norm frozen", {"method": "neumann(10)", "freeze_last_norm": True}),
    ("`greedy(0.5)`, last batch norm frozen", {"method": "greedy(0.5)", "freeze_last_norm": True}),
    ("`fo`, inner weight decay 1.0", {"method": "fo", "inner_weight_decay": 1.0}),
    (
        "`neumann(10, damping=1.0)`, inner weight decay 1.0",
        {"method": "neumann(10, damping=1.0)", "inner_weight_decay": 1.0},
    ),
    ("`neumann(10)`, float64", {"method": "neumann(10)", "precision": 64}),
    ("`greedy(0.5)`, float64", {"method": "greedy(0.5)", "precision": 64}),
    ("`truncated_rmd(3)` (exact through the last 3 steps)", {"method": "truncated_rmd(3)"}),
    ("`rmd` (exact through all 10)", {"method": "rmd"}),
)
"""The rows of the table of changes tried: (label, what its run changes from :data:`TRACE_RUN`)."""
TRACE_CORRECTION = (
    ("fo", 1.0, ()),
    ("t1t2", 0.5, ()),
    ("t1t2", 1.0, (1,)),
    ("t1t2", 1.5, ()),
    ("t1t2", 2.0, ()),
    ("t1t2", 4.0, ()),
    ("greedy(0.5)", 1.0, (1,)),
    ("greedy(0.5)", 0.5, ()),
    ("greedy(0.9)", 1.0, ()),
    ("greedy(0.9)", 2.0, ()),
    ("greedy(0.99)", 1.0, ()),
    ("neumann(10)", 1.0, (1,)),
    ("neumann(10)", 0.1, ()),
)
"""The rows of the correction-scale table: (method, correction scale, the seeds whose cell is the Table 2 run)."""
TRACE_SEEDS = (0, 1)


@functools.cache
def _trace_runs() -> tuple[dict[str, Any], ...]:
    """The records of ``python -m studies.trace run``, with the fields that older records lack as they ran."""
    from studies.table2.settings import canonical

    runs = []
    for path in sorted((ROOT / "studies/trace/results").glob("run-*.json")):
        run = json.loads(path.read_text(encoding="utf-8"))
        run.setdefault("precision", 32)  # recorded before --precision: float32
        if run.get("correction_scale") is None:  # recorded before --correction-scale, or run without it
            run["correction_scale"] = 1.0
        run["method"] = canonical(run["method"])
        run["path"] = path
        runs.append(run)
    return tuple(runs)


def _trace_run(**changes: Any) -> dict[str, Any] | None:
    """The one trace run of :data:`TRACE_RUN` with ``changes``; ``None`` when there is none."""
    from studies.table2.settings import canonical

    wanted = {**TRACE_RUN, **changes, "method": canonical(changes["method"])}
    found = [r for r in _trace_runs() if all(r.get(k) == v for k, v in wanted.items())]
    if len(found) > 1:
        raise ValueError(f"more than one trace run of {wanted}: " + ", ".join(r["path"].name for r in found))
    return found[0] if found else None


def _norm(value: float) -> str:
    """A hypergradient norm as the tables show it: 2 significant digits, whole below 1000, then ``1.3e6``."""
    if float(f"{value:.2g}") < 100:
        return f"{value:.2g}"
    if value < 999.5:
        return f"{value:.0f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def trace_causes() -> str:
    lines = [
        "| run | meta-test | median / max hypergradient norm | last batch norm's scale, shift after 100 steps |",
        "|---|---:|---:|---:|",
    ]
    for label, changes in TRACE_CAUSES:
        run = _trace_run(**changes)
        if run is None:
            raise ValueError(f"no trace run of {changes} in studies/trace/results")
        norms = [row["hypergrad_norm"] for row in run["trace"]]
        last = run["trace"][-1]
        norm = (
            "1 (frozen)"
            if run["freeze_last_norm"]
            else f"{last['last_norm_scale']:.3f}, {last['last_norm_shift']:+.3f}"
        )
        lines.append(
            f"| {label} | {100 * run['test_acc']:.1f} | {_norm(statistics.median(norms))} / {_norm(max(norms))} "
            f"| {norm} |"
        )
    return "\n".join(lines) + "\n"


def trace_correction() -> str:
    from studies.table2.settings import canonical

    records, _, _ = _table2("studies/table2/results/omniglot")
    lines = [
        "| run | s | " + " | ".join(f"seed {s}" for s in TRACE_SEEDS) + " |",
        "|---|---:|" + "---:|" * len(TRACE_SEEDS),
    ]
    starred = []
    for method, scale, from_table2 in TRACE_CORRECTION:
        cells = [code(method), "(0)" if method == "fo" else f"{scale:g}"]
        for seed in TRACE_SEEDS:
            if seed in from_table2:
                (record,) = [
                    r
                    for r in records
                    if canonical(r["method"]) == canonical(method)
                    and (r["ways"], r["shots"], r["seed"]) == (TRACE_RUN["ways"], TRACE_RUN["shots"], seed)
                ]
                starred.append(record)
                cells.append(f"({100 * record['test_acc']:.1f})*")
            else:
                run = _trace_run(method=method, seed=seed, correction_scale=scale)
                cells.append("" if run is None else f"{100 * run['test_acc']:.1f}")
        lines.append("|" + "|".join(f" {c} " if c else " " for c in cells) + "|")
    if starred:
        (steps,), (tasks,) = {r["steps"] for r in starred}, {r["eval_tasks"] for r in starred}
        lines += ["", f"\\* the Table 2 run of that seed ({steps} steps, {tasks} test tasks), not a trace run."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# docs/results.md, sections 2 and 3: quality, cost
# ---------------------------------------------------------------------------------------------------------------------


def quality_cosine() -> str:
    rows = json.loads((ROOT / "studies/quality/results/quality.json").read_text(encoding="utf-8"))
    mine = [r for r in rows if r["checkpoint_step"] == 200 and r["momentum"] == 0.9]
    ts = sorted({r["T"] for r in mine})
    lines = ["| estimator | " + " | ".join(f"T={t}" for t in ts) + " |", "|---|" + "---:|" * len(ts)]
    for name in ("fo", "t1t2", "greedy(0.9)", "greedy(0.99)", "greedy(1.0)"):
        cells = {r["T"]: r for r in mine if r["estimator"] == name}
        lines.append(
            f"| {name} | "
            + " | ".join(f"{cells[t]['cosine_mean']:.3f} +- {cells[t]['cosine_std']:.3f}" for t in ts)
            + " |"
        )
    return "\n".join(lines) + "\n"


def variants_digits() -> str:
    """docs/results.md section 2b: the Greedy variants' cosine to RMD on the digits tasks."""
    from studies.quality.greedy_variants import table

    return table(json.loads((ROOT / "studies/quality/results/greedy_variants.json").read_text(encoding="utf-8")))


def variants_overall() -> str:
    overall = {
        shots: json.loads((ROOT / f"studies/quality/results/variants_{shots}.json").read_text(encoding="utf-8"))[
            "overall"
        ]
        for shots in ("10shot", "1shot")
    }
    lines = [
        "| estimator | 10-shot: mean cosine | settings ≥ T1-T2 | paired wins vs T1-T2 | 1-shot: mean cosine | "
        "settings ≥ T1-T2 | paired wins |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in overall["10shot"]:
        cells = []
        for shots in ("10shot", "1shot"):
            o = overall[shots][name]
            if name == "t1t2":
                cells += [f"{o['mean_cosine']:.3f}", "–", "–"]
            else:
                cells += [
                    f"{o['mean_cosine']:.3f}",
                    f"{o['settings_at_least_t1t2']}/{o['n_settings']}",
                    f"{100 * o['win_rate_vs_t1t2']:.0f}%",
                ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cost(problem: str) -> list[dict[str, Any]]:
    rows = json.loads((ROOT / "studies/cost/results/estimators_cpu.json").read_text(encoding="utf-8"))
    return [r for r in rows if r["problem"] == problem]


def cost_fewshot() -> str:
    rows = _cost("fewshot")
    ts = sorted({r["T"] for r in rows})
    return "\n".join(_cost_header(ts, "s/step (x FO)") + _cost_rows(rows, ts)) + "\n"


def _cost_header(ts: list[int], seconds: str) -> list[str]:
    """The head of a cost table: the seconds (as ``seconds`` names them) at each T, then the peak MiB at each T."""
    return [
        "| estimator | "
        + " | ".join(f"T={t}: {seconds}" for t in ts)
        + " | "
        + " | ".join(f"T={t}: peak MiB" for t in ts)
        + " |",
        "|---|" + "---:|" * (2 * len(ts)),
    ]


def _cost_rows(rows: list[dict], ts: list[int]) -> list[str]:
    """One table row per estimator of a cost-study record: seconds per step (ratio) and peak MiB at each T."""
    lines = []
    for name in dict.fromkeys(r["estimator"] for r in rows):
        by_t = {r["T"]: r for r in rows if r["estimator"] == name}
        lines.append(
            f"| {name} | "
            + " | ".join(f"{by_t[t]['seconds_per_step']:.3f} ({by_t[t]['ratio']:.2f})" for t in ts)
            + " | "
            + " | ".join(f"{by_t[t]['peak_bytes'] / 2**20:.1f}" for t in ts)
            + " |"
        )
    return lines


def cost_whole() -> str:
    rows = _cost("whole_network")
    plain = next(r for r in rows if r["estimator"] == "plain_step")
    rows = [r for r in rows if r["estimator"] != "plain_step"]
    ts = sorted({r["T"] for r in rows})
    lines = [
        *_cost_header(ts, "s/step (per inner step, x plain step)"),
        f"| plain training step | {plain['seconds_per_step']:.4f} |"
        + " |" * (len(ts) - 1)
        + f" {plain['peak_bytes'] / 2**20:.1f} |"
        + " |" * (len(ts) - 1),
    ]
    return "\n".join(lines + _cost_rows(rows, ts)) + "\n"


def scale_fewshot_batched() -> str:
    rows = json.loads((ROOT / "studies/cost/results/estimators_fewshot_batched_cpu.json").read_text(encoding="utf-8"))
    ts = sorted({r["T"] for r in rows})
    forms = (("fewshot", "one by one"), ("fewshot_batched", "batched"))
    lines = [
        "| estimator | " + " | ".join(f"T={t} {label}" for t in ts for _, label in forms) + " |",
        "|---|" + "---:|" * (len(ts) * len(forms)),
    ]
    by = {(r["problem"], r["estimator"], r["T"]): r for r in rows}
    for name in dict.fromkeys(r["estimator"] for r in rows):
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{by[(p, name, t)]['seconds_per_step']:.3f} ({by[(p, name, t)]['ratio']:.2f})"
                for t in ts
                for p, _ in forms
            )
            + " |"
        )
    peaks = []
    for t in ts:
        for p, _ in forms:
            mib = [r["peak_bytes"] / 2**20 for r in rows if r["problem"] == p and r["T"] == t]
            low, high = min(mib), max(mib)
            peaks.append(f"{low:.1f}-{high:.1f}" if high < 100 else f"{low:.0f}-{high:.0f}")
    lines.append("| peak MiB (all rows) | " + " | ".join(peaks) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# docs/results.md, sections 4 and 4b: the horizon study
# ---------------------------------------------------------------------------------------------------------------------


def nqm_table() -> str:
    from studies.evidence import _horizon_args
    from studies.horizon.nqm_study import load_records

    optimum, records = load_records(_horizon_args("nqm", "report"))
    setting = _by_key()["nqm"]
    judged = judge(setting)
    best_loss = optimum["optimum"]["expected_loss"]
    opt_rates = optimum["optimum"]["rates"]

    def ratio(rates: list[float]) -> float:
        return math.exp(statistics.fmean(math.log(r / o) for r, o in zip(rates, opt_rates)))

    def excess(loss: float) -> str:
        percent = 100 * (loss / best_loss - 1)
        return "0%" if percent == 0 else f"{percent:+.1f}%" if abs(percent) < 10 else f"{percent:+.0f}%"

    def geomean(columns: list[list[float]]) -> list[float]:
        return [math.exp(statistics.fmean(math.log(r) for r in step)) for step in zip(*columns)]

    lines = [
        "| schedule | E[L(w_T)] | excess over the optimum | rates / optimum's (geometric mean) | vs the best, paired |",
        "| --- | --- | --- | --- | --- |",
    ]
    references = (
        ("optimum (closed form)", "optimum"),
        (f"best constant rate ({optimum['constant']['rate']:.2f})", "constant"),
        ("start (constant 0.1; where `fo` ends)", "start"),
        ("one-step greedy schedule (Wu et al.; closed form)", "greedy_schedule"),
    )
    for label, key in references:
        loss = optimum[key]["expected_loss"]
        vs = "-"
        if key == "start":
            j = judged["fo"]
            vs = f"{j.comparison.text(4)}, {j.verdict}" if j.comparison else j.verdict
        lines.append(f"| {label} | {loss:.4f} | {excess(loss)} | {ratio(optimum[key]['rates']):.2f} | {vs} |")
    for method, runs in records.items():
        loss = statistics.fmean(r["expected_loss"] for r in runs)
        j = judged[method]
        vs = "**best**" if j.verdict == BEST else f"{j.comparison.text(4)}, {j.verdict}"
        label = f"`{method}`" + (" (γ = 1 − lr, Theorem 4.6)" if method == "greedy(0.9)" else "")
        lines.append(
            f"| {label} | {loss:.4f} | {excess(loss)} | {ratio(geomean([r['rates'] for r in runs])):.2f} | {vs} |"
        )
    return "\n".join(lines) + "\n"


def _cnn_table(key: str) -> str:
    from studies.horizon.cnn_study import (
        RANDOM_SEARCH as RS,
    )
    from studies.horizon.cnn_study import (
        compare_searches,
        comparison_text,
        each_search,
        exact_method,
        final_values,
        load_records,
        start_searches,
        start_values,
        summary,
    )

    args = cnn_args(key)
    records = load_records(args, args.steps[0])
    losses = {m: final_values(runs) for m, runs in records.items()}
    exact = exact_method(records)
    ref_rs, ref_exact = losses.get(RS), losses.get(exact or "")
    start = start_searches(records)
    lines = [
        f"| method | searches | test loss [95%] | each search | vs random search | vs `{exact}` | cosine to exact "
        "(median) | s / outer step | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| start (`fo` ends here) | - | {statistics.fmean(start_values(records)):.3f} | - | "
        f"{comparison_text(compare_searches(start, ref_rs))} | {comparison_text(compare_searches(start, ref_exact))} "
        "| | | |",
    ]
    for method, runs in records.items():
        mean, interval, unit = summary(losses[method])
        shown = f"{mean:.3f}" + ("" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]")
        shown += " †" if unit != "searches" else ""
        cos = [c for r in runs for _, c in r["cosines"]]
        cos_text = f"{statistics.median(cos):.2f}" if cos else ("1" if method.startswith("rmd") else "")
        secs = statistics.fmean(r["search_seconds"] for r in runs)
        per_step = (
            f"{secs / args.outer_steps:.2f}"
            if method != RS
            else f"{secs / statistics.fmean(r['trials'] for r in runs):.2f} / trial"
        )
        peak = statistics.fmean(r["peak_bytes"] for r in runs) / 2**20
        vs_rs = "0" if method == RS else comparison_text(compare_searches(losses[method], ref_rs))
        vs_exact = "0" if method == exact else comparison_text(compare_searches(losses[method], ref_exact))
        lines.append(
            f"| {code(method)} | {len(runs)} | {shown} | {each_search(losses[method])} | {vs_rs} | {vs_exact} | "
            f"{cos_text} | {per_step} | {peak:.1f} |"
        )
    return "\n".join(lines) + "\n"


def cnn_t100() -> str:
    return _cnn_table("cnn-T100")


def cnn_t1000() -> str:
    return _cnn_table("cnn-T1000")


def cnn_knots4() -> str:
    return _cnn_table("cnn-knots4")


def verdict_sentence(setting: Setting) -> str:
    """Which method is best in ``setting``, which are level with it and which are worse, with the differences."""
    judged = judge(setting)
    best = next(iter(judged.values()))
    groups: dict[str, list[str]] = {}
    for j in list(judged.values())[1:]:
        shown = j.comparison.text(setting.digits, scale=setting.scale) if j.comparison else ""
        groups.setdefault(j.verdict, []).append(f"{code(j.method)} {shown}")
    parts = [f"best: {code(best.method)} ({setting.show(best.mean)})"]
    for word in ("level", "better", "worse", "not judged"):
        if word in groups:
            parts.append(f"{word}: " + ", ".join(groups[word]))
    return f"{setting.label} ({setting.unit}; differences to the best, {setting.measure}): " + "; ".join(parts) + "."


def against(setting: Setting, reference: str, label: str) -> str:
    """Every other method of ``setting`` against ``reference``, paired, grouped by verdict."""
    groups: dict[str, list[str]] = {}
    base = setting.values[reference]
    for method, values in setting.values.items():
        if method == reference:
            continue
        common = sorted(set(values) & set(base))
        found = compare(
            [values[k] for k in common], [base[k] for k in common], higher_is_better=setting.higher_is_better
        )
        groups.setdefault(found.verdict, []).append(f"{code(method)} {found.text(setting.digits, scale=setting.scale)}")
    parts = [
        f"{word}: " + ", ".join(groups[word]) for word in ("better", "level", "worse", "not judged") if word in groups
    ]
    return f"against {label}: " + "; ".join(parts) + "."


def cnn_findings() -> str:
    found = _by_key()
    lines = []
    for key in ("cnn-T100", "cnn-T1000"):
        setting = found[key]
        lines.append(f"- {verdict_sentence(setting)} The same {against(setting, 'fo', 'the start (where `fo` ends)')}")
    return "\n".join(lines) + "\n"


def cnn_long() -> str:
    from studies.horizon.cnn_study import (
        RANDOM_SEARCH as RS,
    )
    from studies.horizon.cnn_study import compare_searches, comparison_text, final_values, load_records, snapshot_losses

    args = cnn_args("cnn-long")
    records = load_records(args, args.steps[0])
    steps = [step for step, _, _ in snapshot_losses(next(r for m, r in records.items() if m != RS))]
    lines = [
        "| method | " + " | ".join(str(s) for s in steps) + " | final vs random search |",
        "|---|" + "---:|" * len(steps) + "---|",
    ]
    ref = final_values(records[RS])
    for method, runs in records.items():
        points = snapshot_losses(runs)
        label = code(method) + (
            f" (the incumbent; {sum(r['trials'] for r in runs)} trials in all)" if method == RS else ""
        )
        vs = "0" if method == RS else comparison_text(compare_searches(final_values(runs), ref))
        lines.append(f"| {label} | " + " | ".join(f"{y:.2f}" for _, _, y in points) + f" | {vs} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# docs/results.md, sections 5 and 6: the peers, iMAML
# ---------------------------------------------------------------------------------------------------------------------

PEER_ROWS = (
    ("ANIL", "anil", 10, "rmd", "learn2learn MAML(head)", "learn2learn `MAML(head)`"),
    ("ANIL", "anil", 10, "fo", "learn2learn MAML(head, first_order)", "learn2learn `MAML(head, first_order=True)`"),
    ("MAML", "maml", 5, "rmd", "learn2learn MAML", "learn2learn `MAML`"),
    ("MAML", "maml", 5, "fo", "learn2learn MAML(first_order)", "learn2learn `MAML(first_order=True)`"),
    ("iMAML", "imaml", 5, "cg(5, normal=True, tol=0.0)", "TorchOpt iMAML (custom_root, normal CG)",
     "TorchOpt `custom_root` + `solve_normal_cg`"),
    ("iMAML", "imaml", 5, "minres(5)", "TorchOpt iMAML (custom_root, normal CG)",
     "TorchOpt `custom_root` + `solve_normal_cg`"),
    ("HPO", "hpo", 10, "rmd", ("higher innerloop_ctx", "TorchOpt MetaSGD"), "higher / TorchOpt"),
    ("HPO", "hpo", 100, "rmd", ("higher innerloop_ctx", "TorchOpt MetaSGD"), "higher / TorchOpt"),
    ("HPO", "hpo", 100, "rmd(checkpoint_every='sqrt')", "higher innerloop_ctx", "higher"),
    ("HPO", "hpo", 10, "mixed_rmd", "higher innerloop_ctx", "higher"),
    ("HPO", "hpo", 100, "mixed_rmd", "higher innerloop_ctx", "higher"),
    ("HPO", "hpo", 100, "mixed_rmd(checkpoint_every='sqrt')", "higher innerloop_ctx", "higher"),
    ("HPO", "hpo", 100, "greedy(0.99)", "higher innerloop_ctx", "higher"),
    ("HPO", "hpo", 100, "t1t2", "higher innerloop_ctx", "higher"),
)  # fmt: skip
"""The rows of the peers' time and memory table: (problem, its key, T, our method, the peer(s), the peer's label)."""


def peers_timing() -> str:
    data = json.loads((ROOT / "studies/peers/results/peers.json").read_text(encoding="utf-8"))
    times = {(t["problem"], t["T"], t["who"], t["method"]): t for t in data["timing"]}
    lines = ["| problem | T | ours | peer | time ratio | memory ratio |", "|---|---:|---|---|---:|---:|"]
    for problem, key, steps, ours, peers, label in PEER_ROWS:
        mine = times[(key, steps, "ours", ours)]
        theirs = [times[(key, steps, "peer", p)] for p in ((peers,) if isinstance(peers, str) else peers)]
        time_ratio = " / ".join(f"{mine['seconds'] / t['seconds']:.2f}" for t in theirs)
        memory_ratio = " / ".join(f"{mine['peak_bytes'] / t['peak_bytes']:.2f}" for t in theirs)
        lines.append(f"| {problem} | {steps} | `{ours}` | {label} | {time_ratio} | {memory_ratio} |")
    return "\n".join(lines) + "\n"


def peers_equality() -> str:
    data = json.loads((ROOT / "studies/peers/results/peers.json").read_text(encoding="utf-8"))
    eq = data["equality"]

    def most(problem: str, steps: int | None = None, methods: tuple[str, ...] | None = None) -> str:
        values = [
            e["relative_difference"]
            for e in eq
            if e["problem"] == problem
            and (steps is None or e["T"] == steps)
            and (methods is None or e["method"] in methods)
        ]
        return f"{max(values):.1e}"

    exact = ("rmd", "rmd(checkpoint_every='sqrt')")
    mixed = ("mixed_rmd", "mixed_rmd(checkpoint_every='sqrt')")
    return (
        "**Equal, in float64.** The largest entry of the difference over the peer's largest entry: ANIL `rmd` and "
        f"`fo` against learn2learn's second- and first-order `MAML`, {most('anil')} at most; whole-network MAML, "
        f"{most('maml')}; iMAML `cg(5, normal=True, tol=0.0)` against TorchOpt's, {most('imaml')}; HPO `rmd` and "
        f"`rmd(checkpoint_every='sqrt')` against both higher and TorchOpt, {most('hpo', 10, exact)} at T = 10 and "
        f"{most('hpo', 100, exact)} at T = 100; `mixed_rmd` (both forms), {most('hpo', 10, mixed)} and "
        f"{most('hpo', 100, mixed)}. `tests/test_peers.py` holds them to 1e-12 (CI installs the peers).\n"
    )


def maml_omniglot() -> str:
    """docs/results.md section 7: the MAML run of learn2learn's published row, its test accuracy on unseen tasks
    against the published figures (one run: the interval is over its test tasks, the published figures have no
    run-to-run interval to pair with, so the verdict reads whether each published figure lies in the run's interval)."""
    from studies.maml_omniglot.experiment import PUBLISHED

    record = json.loads((ROOT / "studies/maml_omniglot/results/record.json").read_text(encoding="utf-8"))
    test = record["test"]
    low, high = test["acc"] - test["acc_ci95"], test["acc"] + test["acc_ci95"]

    def against(figure: float) -> str:
        if low <= figure <= high:
            return "inside the run's interval"
        side = "above" if figure > high else "below"
        return f"{side} the run's interval, {100 * abs(figure - test['acc']):.1f} points from its mean"

    lines = [
        "| | 5-way 1-shot accuracy on unseen tasks | tasks | published figure against this run |",
        "|---|---|---|---|",
        f"| this run (`lh.MAML`, `{record['estimator']}`, {record['iterations']:,} iterations) | "
        f"{100 * test['acc']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] | {test['tasks']} | |",
        f"| learn2learn, published | {100 * PUBLISHED['learn2learn']['acc']:.1f}% | not stated | "
        f"{against(PUBLISHED['learn2learn']['acc'])} |",
        f"| Finn et al. (2017), published | {100 * PUBLISHED['paper']['acc']:.1f}% "
        f"± {100 * PUBLISHED['paper']['ci95']:.1f} | | {against(PUBLISHED['paper']['acc'])} |",
    ]
    return "\n".join(lines) + "\n"


def scale_maml() -> str:
    """docs/scale.md: whole-network MAML's exact meta-gradient, ours against the peers (studies/scale/maml.py)."""
    from studies.scale.maml import target_line, timing_table

    record = json.loads((ROOT / "studies/scale/results_maml/maml.json").read_text(encoding="utf-8"))
    return "\n".join([*timing_table(record), "", target_line(record)]) + "\n"


def scale_cnn() -> str:
    """docs/scale.md: peak memory against T on the horizon CNN, every exact method (studies/scale/study.py)."""
    from studies.scale import study

    args = study.parse_args(["report", "--out", str(ROOT / study.OUT)])[1]
    return "\n".join(study.peak_table(study.load_records(args))) + "\n"


def scale_cnn_timing() -> str:
    """docs/scale.md: the horizon CNN's seconds in interleaved rounds and the targets (studies/scale/timing.py)."""
    from studies.scale.timing import OUT, table, target_lines

    record = json.loads((ROOT / OUT / "timing.json").read_text(encoding="utf-8"))
    return "\n".join([*table(record), "", *target_lines(record)]) + "\n"


def imaml_accuracy() -> str:
    from studies.imaml.study import accuracy_table

    return "\n".join(accuracy_table(ROOT / "studies/imaml/results")) + "\n"


def imaml_memory() -> str:
    from studies.imaml.study import memory_table

    return "\n".join(memory_table(ROOT / "studies/imaml/results")) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# the blocks, rewriting and checking them
# ---------------------------------------------------------------------------------------------------------------------

BLOCKS: dict[str, Callable[[], str]] = {
    "variants-digits": variants_digits,
    "scale-maml": scale_maml,
    "scale-cnn": scale_cnn,
    "scale-cnn-timing": scale_cnn_timing,
    "maml-omniglot": maml_omniglot,
    "readme-advice-table": readme_advice_table,
    "readme-advice": readme_advice,
    "choosing-settings": choosing_settings_table,
    "choosing-rule": choosing_rule,
    "choosing-cosine": choosing_cosine,
    "table2-10shot-val": table2_10shot_val,
    "table2-10shot-test": table2_10shot_test,
    "table2-10shot-vs-fo": table2_10shot_vs_fo,
    "table2-10shot-seeds": table2_10shot_seeds,
    "table2-1shot-5way": table2_1shot_5way,
    "table2-1shot-10way": table2_1shot_10way,
    "trace-causes": trace_causes,
    "trace-correction": trace_correction,
    "quality-cosine": quality_cosine,
    "variants-overall": variants_overall,
    "cost-fewshot": cost_fewshot,
    "cost-whole": cost_whole,
    "nqm": nqm_table,
    "cnn-T100": cnn_t100,
    "cnn-T1000": cnn_t1000,
    "cnn-findings": cnn_findings,
    "cnn-knots4": cnn_knots4,
    "cnn-long": cnn_long,
    "peers-equality": peers_equality,
    "peers-timing": peers_timing,
    "imaml-accuracy": imaml_accuracy,
    "imaml-memory": imaml_memory,
    "scale-fewshot-batched": scale_fewshot_batched,
}
"""Every generated block, by name: the function that writes its text from the records."""


def blocks_in(text: str) -> dict[str, str]:
    """The generated blocks of a page, by name: their text as it stands."""
    found: dict[str, str] = {}
    for match in BLOCK.finditer(text):
        if match["name"] in found:
            raise ValueError(f"the block {match['name']!r} appears twice")
        found[match["name"]] = match["body"]
    return found


def rewrite(text: str, generated: dict[str, str]) -> str:
    """``text`` with each block's body replaced by ``generated[name]``."""

    def body(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in generated:
            raise ValueError(f"no generator for the block {name!r}: add it to studies.report.BLOCKS")
        return f"<!-- generated:{name} -->\n{generated[name]}<!-- /generated:{name} -->"

    return BLOCK.sub(body, text)


@functools.cache
def generated() -> dict[str, str]:
    """Every block's text from the records (once per process: the records are read once)."""
    return {name: make() for name, make in BLOCKS.items()}


def differences(root: Path = ROOT) -> list[str]:
    """Each block whose published text differs from what its records give, as ``page: block`` (also blocks that
    appear nowhere or have no generator)."""
    problems, seen = [], set()
    for page in FILES:
        text = (root / page).read_text(encoding="utf-8")
        for name, body in blocks_in(text).items():
            if name not in BLOCKS:
                problems.append(f"{page}: {name} (no generator)")
                continue
            if name in seen:
                problems.append(f"{page}: {name} (appears on two pages)")
            seen.add(name)
            if generated()[name] != body:
                problems.append(f"{page}: {name}")
    problems += [f"(no page): {name}" for name in BLOCKS if name not in seen]
    return problems


def write_all(root: Path = ROOT) -> list[str]:
    """Rewrites every block of every page; returns the pages changed."""
    changed = []
    for page in FILES:
        path = root / page
        text = path.read_text(encoding="utf-8")
        new = rewrite(text, generated())
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.report", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming the blocks that differ")
    parser.add_argument("--show", metavar="NAME", help="print one block's generated text")
    args = parser.parse_args(argv)
    if args.show:
        print(BLOCKS[args.show](), end="")
        return 0
    if args.check:
        problems = differences()
        for problem in problems:
            print(f"differs from its records: {problem}", file=sys.stderr)
        return 1 if problems else 0
    changed = write_all()
    print("rewrote: " + (", ".join(changed) if changed else "nothing (every block is up to date)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
