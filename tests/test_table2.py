"""``python -m studies.table2``: a tiny run on digits, resumption, the report's gamma selection, the paper config,
malformed records, and stopping the parallel runner (Ctrl-C, or the runner killed)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from lightning_cases import default_sigint

import lightning_hypergrad as lh
from studies.stats import mean_ci95, t975
from studies.table2 import (
    CHOSEN,
    PaperSettings,
    baseline_methods,
    canonical,
    choose_gammas,
    default_methods,
    jvps,
    main,
    paired_differences,
    record_name,
    report,
    resolve_root,
)
from studies.table2 import greedy_gamma as gamma_of

NEUMANN = "neumann(10, scale=0.1)"  # the paper's IFT, from configs/estimators/neumann.yaml
TINY = [
    "run",
    "--dataset",
    "digits",
    "--ways",
    "3",
    "--methods",
    "fo",
    "greedy(0.99)",
    "--steps",
    "3",
    "--meta-batch",
    "2",
    "--eval-tasks",
    "4",
    "--seeds",
    "2",
    "--shots",
    "2",
    "--workers",
    "1",
]
TINY_RECORDS = {record_name("digits", 3, m, s) for m in ("fo", "greedy(0.99)") for s in (0, 1)}
REPOSITORY = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshot(runs: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in runs.glob("*.json")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("table2")
    return out, main([*TINY, "--out", str(out)])


def test_tiny_run_writes_one_record_per_run_and_the_report(tiny_run: tuple[Path, int]) -> None:
    out, code = tiny_run
    assert code == 0
    runs = out / "runs"
    assert {p.name for p in runs.iterdir()} == TINY_RECORDS  # no temporary file left behind
    for name in TINY_RECORDS:
        record = json.loads((runs / name).read_text())
        assert record["dataset"] == "digits" and record["ways"] == 3 and record["shots"] == 2
        assert record["steps"] == record["steps_run"] == 3 and record["meta_batch"] == 2 and record["eval_tasks"] == 4
        assert record["jvps"] == (0 if record["method"] == "fo" else 10)
        assert record["gamma"] == (None if record["method"] == "fo" else 0.99)
        for key in ("val_acc", "test_acc"):
            assert 0.0 <= record[key] <= 1.0
        for key in ("val_ci95", "test_ci95", "seconds_per_step", "wall_seconds"):
            assert record[key] >= 0.0
        assert record["torch_threads"] == 1 and record["timestamp"]
        # the paper's settings come from its config
        assert record["config"] == "configs/paper/omniglot.yaml" and record["inner_steps"] == 10
        assert (record["inner_lr"], record["inner_momentum"], record["outer_lr"]) == (0.1, 0.9, 0.001)
        assert record["backbone"] == "3x32" and record["root"] is None
    assert {json.loads((runs / n).read_text())["method"] for n in TINY_RECORDS} == {"fo", "greedy(0.99)"}
    markdown = (out / "table2.md").read_text(encoding="utf-8")
    ours, paper = markdown.split("## The paper's Table 2")
    expected = ("| fo | 0 |", "| t1t2 | 1 | n/a |", f"| {NEUMANN} | 11 | n/a |", "| greedy(0.99) | 10 |")
    for row in (*expected, "| greedy (γ chosen on meta-val) | 10 |"):
        assert ours.count(row) == 2  # in both protocols' tables
    assert "| fo | 0 | 43.48 ± 1.64 |" in paper and "| greedy(0.99) | 10 | 46.10 ± 1.95 |" in paper
    assert "Inner SGD lr 0.1 momentum 0.9, T = 10; outer Adam lr 0.001; backbone 3 x 32 with batch norm." in ours
    assert "| method | JVPs | s/step | 3-way | 4-way | 5-way |" in markdown
    assert "(n=2)" in markdown and "n/a" in markdown and "CIFAR-100" in markdown
    rows = read_csv(out / "table2.csv")
    assert len(rows) == 2 * 5 * 3  # protocols x (FO, T1-T2, IFT, chosen, greedy(0.99)) x (3, 4, 5 ways)
    assert (out / "table2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes(tiny_run: tuple[Path, int], capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = tiny_run
    runs = out / "runs"
    before = snapshot(runs)
    capsys.readouterr()
    assert main([*TINY, "--out", str(out)]) == 0
    assert "4 done, 0 remaining" in capsys.readouterr().out
    assert snapshot(runs) == before  # nothing trained again

    removed = record_name("digits", 3, "fo", 1)
    old = json.loads((runs / removed).read_text())
    (runs / removed).unlink()
    assert main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 done, 1 remaining" in printed and "[1/1] digits 3-way fo seed 1" in printed
    after = snapshot(runs)
    assert {k: v for k, v in after.items() if k != removed} == {k: v for k, v in before.items() if k != removed}
    new = json.loads((runs / removed).read_text())
    assert (new["val_acc"], new["test_acc"]) == (old["val_acc"], old["test_acc"])  # the seed fixes the run


def test_records_with_other_settings_are_not_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = record_name("digits", 3, "fo", 0)
    (tmp_path / "runs").mkdir()
    record = {"dataset": "digits", "ways": 3, "method": "fo", "seed": 0, "shots": 2, "queries": 2, "steps": 5}
    (tmp_path / "runs" / name).write_text(json.dumps(record | {"meta_batch": 2, "eval_tasks": 4}))
    args = [*TINY[:6], "fo", *TINY[8:]]
    assert main([*args, "--seeds", "1", "--out", str(tmp_path)]) == 2
    assert "other settings" in capsys.readouterr().err


def make_record(ways: int, method: str, seed: int, val: float, test: float) -> dict[str, Any]:
    estimator = lh.get_estimator(method)
    return {
        "dataset": "omniglot",
        "ways": ways,
        "shots": 10,
        "queries": 10,
        "method": method,
        "gamma": getattr(estimator, "gamma", None),
        "jvps": jvps(estimator, 10),
        "seed": seed,
        "val_acc": val,
        "val_ci95": 0.01,
        "test_acc": test,
        "test_ci95": 0.01,
        "seconds_per_step": 0.5,
        "wall_seconds": 100.0,
        "steps": 200,
        "meta_batch": 10,
        "eval_tasks": 500,
        "timestamp": f"2025-01-01T00:00:0{seed}+00:00",
    }


# (val accuracies, test accuracies) over seeds 0, 1, 2: on 3 ways gamma 0.99 is best on validation but 0.9 on test;
# on 4 ways gamma 0.999 is best on validation, 0.99 on test. No 5-way record: those cells must read n/a.
HAND_MADE = {
    (3, "greedy(0.9)"): ([0.50, 0.52, 0.48], [0.70, 0.72, 0.71]),
    (3, "greedy(0.99)"): ([0.55, 0.60, 0.53], [0.40, 0.47, 0.44]),
    (3, "greedy(0.999)"): ([0.52, 0.51, 0.53], [0.50, 0.50, 0.52]),
    (4, "greedy(0.9)"): ([0.30, 0.31, 0.29], [0.30, 0.30, 0.30]),
    (4, "greedy(0.99)"): ([0.35, 0.33, 0.34], [0.60, 0.61, 0.62]),
    (4, "greedy(0.999)"): ([0.40, 0.36, 0.41], [0.33, 0.38, 0.35]),
    (3, "fo"): ([0.45], [0.44]),
}


@pytest.fixture()
def hand_made(tmp_path: Path) -> Path:
    (tmp_path / "runs").mkdir()
    for (ways, method), (vals, tests) in HAND_MADE.items():
        for seed, (val, test) in enumerate(zip(vals, tests)):
            record = make_record(ways, method, seed, val, test)
            (tmp_path / "runs" / record_name("omniglot", ways, method, seed)).write_text(json.dumps(record))
    return tmp_path


def independent_ci95(values: list[float]) -> float:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return 1.96 * std / math.sqrt(len(values))


def test_report_chooses_gamma_on_validation(hand_made: Path) -> None:
    assert report(hand_made) == 0
    rows = read_csv(hand_made / "table2.csv")

    def cell(protocol: str, method: str, ways: int) -> dict[str, str]:
        (row,) = [r for r in rows if (r["protocol"], r["method"], r["ways"]) == (protocol, method, str(ways))]
        return row

    for ways, gamma in ((3, "0.99"), (4, "0.999")):
        vals, tests = HAND_MADE[(ways, f"greedy({gamma})")]
        clean, paper = cell("clean", CHOSEN, ways), cell("paper", CHOSEN, ways)
        assert float(clean["gamma"]) == float(paper["gamma"]) == float(gamma)
        assert clean["reported_on"] == "test" and paper["reported_on"] == "val"
        assert float(clean["mean"]) == pytest.approx(100 * sum(tests) / 3)
        assert float(clean["ci95"]) == pytest.approx(independent_ci95([100 * t for t in tests]))
        assert float(paper["mean"]) == pytest.approx(100 * sum(vals) / 3)
        assert float(paper["ci95"]) == pytest.approx(independent_ci95([100 * v for v in vals]))
        assert clean["n"] == paper["n"] == "3"
    for method in (CHOSEN, "fo", "t1t2", NEUMANN, "greedy(0.99)"):
        assert cell("clean", method, 5)["mean"] == "" and cell("clean", method, 5)["n"] == "0"
    single = cell("clean", "fo", 3)
    assert float(single["mean"]) == pytest.approx(44.0) and single["ci95"] == "" and single["n"] == "1"
    # each gamma's own row reports that gamma, whatever was chosen
    assert float(cell("clean", "greedy(0.9)", 3)["mean"]) == pytest.approx(100 * statistics.fmean([0.70, 0.72, 0.71]))

    markdown = (hand_made / "table2.md").read_text(encoding="utf-8")
    assert "γ chosen: 3-way 0.99, 4-way 0.999" in markdown
    clean_table = markdown.split("(b) clean protocol")[1].split("###")[0]
    chosen_row = next(line for line in clean_table.splitlines() if line.startswith("| greedy (γ chosen"))
    mean, ci = (
        100 * sum(HAND_MADE[(3, "greedy(0.99)")][1]) / 3,
        independent_ci95([100 * t for t in HAND_MADE[(3, "greedy(0.99)")][1]]),
    )
    assert f"{mean:.2f} ± {ci:.2f} (n=3), γ=0.99" in chosen_row
    assert chosen_row.rstrip(" |").endswith("n/a")  # 5-way
    fo_row = next(line for line in clean_table.splitlines() if line.startswith("| fo |"))
    assert "| 44.00 (n=1) |" in fo_row  # a single seed shows no interval
    assert "Total compute" in markdown and (hand_made / "table2.png").is_file()


def test_gamma_ties_and_statistics() -> None:
    records = [make_record(5, m, s, 0.5, 0.1 * s) for m in ("greedy(0.999)", "greedy(0.9)") for s in (0, 1)]
    assert choose_gammas(records) == {("omniglot", 5): 0.9}  # ties go to the smallest gamma
    assert mean_ci95([]) == (None, None)
    assert mean_ci95([3.0]) == (3.0, None)
    mean, ci = mean_ci95([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and ci == pytest.approx(independent_ci95([1.0, 2.0, 4.0]))


def test_method_names() -> None:
    assert canonical("greedy(0.99)") == canonical("Greedy(0.990)") == str(lh.Greedy(0.99)) == "greedy(0.99)"
    assert canonical("greedy(0.999)") == "greedy(0.999)" and canonical("greedy(.9)") == "greedy(0.9)"
    names = ("fo", "t1t2", NEUMANN, "greedy(0.9)", "greedy_tail(0.9, 5)", "momentum_greedy(0.9)", "rmd")
    assert [jvps(lh.get_estimator(n), 10) for n in names] == [0, 1, 11, 10, 10, 10, 10]
    assert gamma_of("greedy_tail(0.9, 5)") is None and gamma_of("momentum_greedy(0.9)") is None  # rows of their own
    assert canonical("neumann(10,scale=0.1)") == NEUMANN and canonical("T1T2") == "t1t2"
    assert record_name("omniglot", 3, NEUMANN, 0) == "omniglot-3way-neumann(10,scale=0.1)-seed0.json"
    damped = record_name("omniglot", 3, canonical("neumann(10, damping='1/lr')"), 0)
    assert damped == "omniglot-3way-neumann(10,damping='1%2Flr')-seed0.json"  # a file, not a folder
    for bad in ("greedy0.99", "greedy_0.99", "greedy(1.5)", "greedy(0)", "ift"):  # the old forms are gone
        with pytest.raises(ValueError, match="greedy|gamma"):
            canonical(bad)
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "digits", "--methods", "greedy2"])


def test_root_is_refused_for_digits_and_never_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``digits`` reads no files: a ``--root`` would be recorded yet change nothing, so it is refused up front."""
    with pytest.raises(SystemExit) as stopped:
        main(["run", "--dataset", "digits", "--root", str(tmp_path), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2 and "--root does not apply to --dataset digits" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    paper = PaperSettings.from_config("configs/paper/omniglot.yaml")
    assert resolve_root("digits", None, paper) is None


def test_paper_settings_come_from_the_configs() -> None:
    omniglot = PaperSettings.from_config("configs/paper/omniglot.yaml")
    cifar = PaperSettings.from_config("configs/paper/cifar100.yaml")
    for paper in (omniglot, cifar):
        assert (paper.depth, paper.width, paper.inner_steps, paper.outer_lr) == (3, 32, 10, 0.001)
        assert (paper.meta_batch, paper.steps, paper.shots, paper.queries, paper.eval_tasks) == (10, 200, 10, 10, 500)
        assert paper.optimizer_setting("lr") == 0.1 and paper.optimizer_setting("momentum") == 0.9
        assert isinstance(paper.optimizer(), lh.SGD)
    assert (omniglot.dataset, omniglot.root) == ("omniglot", "../shared/data/omniglot")
    assert cifar.dataset == "cifar100"
    assert baseline_methods() == ("fo", "t1t2", NEUMANN)
    assert default_methods() == ["fo", "t1t2", NEUMANN, "greedy(0.9)", "greedy(0.99)", "greedy(0.999)"]
    with pytest.raises(ValueError, match="--config"):
        PaperSettings.from_config("configs/paper/missing.yaml")


def test_a_config_without_a_setting_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "paper.yaml"
    config.write_text("model:\n  init_args:\n    depth: 3\ndata:\n  init_args:\n    dataset: digits\n")
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "digits", "--config", str(config), "--out", str(tmp_path / "out")])
    assert "has no model.init_args.inner_optimizer" in capsys.readouterr().err


def test_report_command_without_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--out", str(tmp_path)]) == 1
    assert "no records" in capsys.readouterr().err


def test_cifar100_protocol_runs_end_to_end_on_a_generated_stand_in(tmp_path: Path) -> None:
    """CIFAR-100 cannot be downloaded here: a small copy in the official layout goes through the whole runner."""
    from test_data import _write_cifar

    _write_cifar(tmp_path / "cifar")
    out = tmp_path / "out"
    argv = ["run", "--dataset", "cifar100", "--root", str(tmp_path / "cifar"), "--ways", "3"]
    argv += ["--methods", "t1t2", "--steps", "2", "--meta-batch", "2", "--eval-tasks", "4", "--seeds", "1"]
    assert main([*argv, "--shots", "2", "--queries", "3", "--out", str(out)]) == 0
    record = json.loads((out / "runs" / record_name("cifar100", 3, "t1t2", 0)).read_text())
    assert record["dataset"] == "cifar100" and 0.0 <= record["val_acc"] <= 1.0
    assert record["root"] == str(tmp_path / "cifar") and record["config"] == "configs/paper/cifar100.yaml"
    assert (out / "table2.md").is_file() and (out / "table2.png").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# malformed records
# ---------------------------------------------------------------------------------------------------------------------

DIGITS_SETTINGS = {"dataset": "digits", "shots": 2, "queries": 2, "steps": 3, "meta_batch": 2, "eval_tasks": 4}
"""What a record of ``TINY`` (one method, one seed) holds, so that only its malformed field is wrong."""
MALFORMED = [
    ("{}", "has no dataset, ways, method, seed, val_acc, test_acc"),
    (json.dumps(make_record(3, "fo", 0, 0.5, 0.5) | DIGITS_SETTINGS | {"test_acc": None}), "test_acc is null"),
    (json.dumps(make_record(3, "fo", 0, 0.5, 0.5) | DIGITS_SETTINGS | {"ways": "3"}), 'ways is "3"'),
    ('{"dataset": "digits", "ways": 3', "is not JSON"),
    ("[0.5, 0.5]", "holds [0.5, 0.5] (list), not a JSON object"),
]
DELETE = "delete the file to rerun that run"


@pytest.mark.parametrize(("content", "problem"), MALFORMED)
def test_run_names_a_malformed_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, problem: str
) -> None:
    path = tmp_path / "runs" / record_name("digits", 3, "fo", 0)
    path.parent.mkdir()
    path.write_text(content)
    args = [*TINY[:6], "fo", *TINY[8:]]
    assert main([*args, "--seeds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {problem}" in err and DELETE in err
    assert "other settings" not in err
    assert path.read_text() == content  # neither trained again nor overwritten
    assert not (tmp_path / "table2.md").exists()


def test_report_skips_malformed_records_and_names_them(hand_made: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = hand_made / "runs"
    bad = {record_name("omniglot", 3, "fo", seed): content for seed, (content, _) in enumerate(MALFORMED, start=1)}
    for name, content in bad.items():
        (runs / name).write_text(content)
    assert report(hand_made) == 0
    err = capsys.readouterr().err
    for (name, _), (_, problem) in zip(bad.items(), MALFORMED):
        (line,) = [line for line in err.splitlines() if name in line]
        assert line.startswith("warning: skipping") and f"{runs / name}: {problem}" in line and DELETE in line
    rows = read_csv(hand_made / "table2.csv")
    (fo,) = [r for r in rows if (r["protocol"], r["method"], r["ways"]) == ("clean", "fo", "3")]
    assert fo["n"] == "1" and float(fo["mean"]) == pytest.approx(44.0)  # the good record only

    only_bad = hand_made / "only_bad"
    (only_bad / "runs").mkdir(parents=True)
    (only_bad / "runs" / record_name("omniglot", 3, "fo", 0)).write_text("{}")
    assert main(["report", "--out", str(only_bad)]) == 1
    err = capsys.readouterr().err
    assert "has no dataset" in err and DELETE in err and "no records" in err


# ---------------------------------------------------------------------------------------------------------------------
# stopping the parallel runner
# ---------------------------------------------------------------------------------------------------------------------

PARALLEL = [*TINY[:6], "fo", "--steps", "100", "--meta-batch", "1", "--eval-tasks", "2", "--seeds", "40"]
PARALLEL += ["--shots", "1", "--workers", "2"]  # 40 runs of about a second each on two workers
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent, ...), ``None`` if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None and int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if (fields := _stat(pid)) is not None and fields[0] != "Z"]  # Z: exited, unreaped


def _wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def _records(runs: Path) -> set[str]:
    return {p.name for p in runs.glob("*.json") if not p.name.startswith(".")} if runs.is_dir() else set()


def _check_records(runs: Path) -> None:
    """Every file is a complete record; no temporary file is left."""
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".")]
    for name in _records(runs):
        record = json.loads((runs / name).read_text())
        assert record["steps_run"] == 100 and 0.0 <= record["test_acc"] <= 1.0


@pytest.fixture()
def parallel_runner(tmp_path: Path) -> Any:
    """Starts ``PARALLEL`` in a process of its own; yields it, its child processes and its output folder once a
    first record is written (its workers are then running); kills whatever is left of them afterwards."""
    out, log = tmp_path / "out", tmp_path / "runner.log"
    command = [sys.executable, "-m", "studies.table2", *PARALLEL, "--out", str(out)]
    with log.open("w") as output:
        runner = subprocess.Popen(
            command,
            cwd=REPOSITORY,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=default_sigint,  # as in a terminal, whatever the test runner was started with
        )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while not _records(out / "runs"):
            if runner.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the runner wrote no record:\n{log.read_text()}")
            time.sleep(0.05)
        children = _children(runner.pid)
        assert len(children) >= 2, log.read_text()  # the workers (and multiprocessing's resource tracker)
        yield runner, children, out
    finally:
        for pid in [runner.pid, *children]:
            if _alive([pid]):
                os.kill(pid, signal.SIGKILL)
        runner.wait()


@needs_proc
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_parallel_runner_and_its_workers(parallel_runner: Any, stop: signal.Signals) -> None:
    """Ctrl-C, and a scheduler's SIGTERM alike: the workers stopped, the "interrupted" line, status 130."""
    runner, children, out = parallel_runner
    runs = out / "runs"
    before = _records(runs)
    start = time.monotonic()
    runner.send_signal(stop)
    code = runner.wait(timeout=60)
    seconds = time.monotonic() - start
    left = _wait_until_gone(children, 2.0)
    assert code == 130 and seconds < 10.0
    assert not left  # no worker (nor resource tracker) behind
    after = _records(runs)
    assert before <= after and len(after) <= len(before) + 2  # at most the runs that were ending; no new run
    assert "interrupted after" in (out.parent / "runner.log").read_text()
    assert not (out / ".runner.lock").exists()  # the next runner may start
    _check_records(runs)
    time.sleep(1.0)
    assert _records(runs) == after


@needs_proc
def test_workers_of_a_killed_runner_exit_within_a_second_or_so(parallel_runner: Any) -> None:
    """``kill -9`` of the runner: its workers notice within a fifth of a second and leave without the interpreter's
    teardown (seconds of it otherwise), leaving no temporary record file."""
    runner, children, out = parallel_runner
    runs = out / "runs"
    before = _records(runs)
    runner.kill()
    runner.wait()
    from studies.table2.runner import LOCK_NAME, runner_lock

    assert (out / LOCK_NAME).exists()  # left behind, but not held: a new runner takes it over at once
    with runner_lock(runs):
        pass
    assert not _wait_until_gone(children, 1.5)
    after = _records(runs)
    assert before <= after and len(after) <= len(before) + 2
    _check_records(runs)


def test_paired_differences_to_fo_by_seed_with_students_interval(tmp_path: Path) -> None:
    """FO and two methods on 4 seeds; the differences seed by seed, computed here by hand."""
    fo = [0.90, 0.80, 0.85, 0.70]  # the seeds differ a lot: an unpaired interval would be wide
    better = [0.92, 0.81, 0.87, 0.73]  # +2, +1, +2, +3 points: above 0 beyond the interval
    same = [0.91, 0.79, 0.86, 0.69]  # +1, -1, +1, -1 points: the interval holds 0
    (tmp_path / "runs").mkdir()
    for method, tests in (("fo", fo), ("greedy(0.9)", better), ("t1t2", same)):
        for seed, test in enumerate(tests):
            record = make_record(5, method, seed, 0.5, test)
            (tmp_path / "runs" / record_name("omniglot", 5, method, seed)).write_text(json.dumps(record))
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").iterdir())]
    found = {d.method: d for d in paired_differences(records, "fo")}
    assert "fo" not in found
    diffs = [2.0, 1.0, 2.0, 3.0]
    half = 3.182 * statistics.stdev(diffs) / math.sqrt(4)  # t_{0.975} with 3 degrees of freedom
    greedy = found["greedy(0.9)"]
    assert greedy.n == 4 and greedy.mean == pytest.approx(2.0)
    assert (greedy.low, greedy.high) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert greedy.low > 0 and "**↑**" in greedy.text()
    chosen = found[CHOSEN]  # the only gamma there is
    assert chosen.gamma == 0.9 and chosen.mean == pytest.approx(2.0)
    t1t2 = found["t1t2"]
    assert t1t2.mean == pytest.approx(0.0, abs=1e-12) and t1t2.low < 0 < t1t2.high and "**" not in t1t2.text()
    assert t975(3) == 3.182 and t975(9) == 2.262 and t975(35) == 2.042 and t975(1000) == 1.96
    assert report(tmp_path) == 0
    markdown = (tmp_path / "table2.md").read_text(encoding="utf-8")
    assert "(c) paired difference to fo" in markdown and "(c) paired difference to t1t2" in markdown
    assert (tmp_path / "table2_vs_fo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_is_the_median_of_each_runs_median_step_and_its_ratio_to_fo(tmp_path: Path) -> None:
    """A paused run (mean step 8 s, median 0.52 s) must not move the cost; ratios to FO are per setting."""
    steps = {  # (ways, method): per seed (mean, median) step time
        (5, "fo"): [(0.50, 0.50), (0.70, 0.60), (0.40, 0.40)],
        (5, "greedy(0.5)"): [(0.55, 0.54), (8.30, 0.52), (0.66, 0.66)],
        (10, "fo"): [(1.00, 1.00), (1.20, 1.10)],
        (10, "greedy(0.5)"): [(1.50, 1.40), (1.70, 1.60)],
    }
    (tmp_path / "runs").mkdir()
    for (ways, method), times in steps.items():
        for seed, (mean, median) in enumerate(times):
            record = make_record(ways, method, seed, 0.5, 0.5) | {
                "seconds_per_step": mean,
                "seconds_per_step_median": median,
            }
            if (ways, method, seed) == (10, "fo", 1):
                del record["seconds_per_step_median"]  # older records have the mean only: it is used
            (tmp_path / "runs" / record_name("omniglot", ways, method, seed)).write_text(json.dumps(record))
    assert report(tmp_path) == 0
    markdown = (tmp_path / "table2.md").read_text(encoding="utf-8")
    cost = markdown.split("(d) cost")[1].split("Total compute")[0]
    # 5-way: fo median of (0.50, 0.60, 0.40) = 0.50; greedy median of (0.54, 0.52, 0.66) = 0.54 -> 1.08x
    # 10-way: fo median of (1.00, 1.20) = 1.10; greedy median of (1.40, 1.60) = 1.50 -> 1.36x
    assert "| fo | n/a | n/a | 0.500 (n=3), 1.00x fo | 1.100 (n=2), 1.00x fo |" in cost
    assert "| greedy(0.5) | n/a | n/a | 0.540 (n=3), 1.08x fo | 1.500 (n=2), 1.36x fo |" in cost
    # the tables' s/step column: the median over all of the row's runs (both settings)
    assert "| greedy(0.5) | 10 | 0.660 |" in markdown  # median of 0.54, 0.52, 0.66, 1.40, 1.60
    assert "| fo | 0 | 0.600 |" in markdown  # median of 0.50, 0.60, 0.40, 1.00, 1.20
    with (tmp_path / "table2.csv").open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["method"] == "greedy(0.5)" and r["protocol"] == "clean"]
    assert {int(r["ways"]): r["seconds_per_step"] for r in rows} == {3: "", 4: "", 5: "0.54", 10: "1.5"}
    assert "step_times" not in rows[0]


def test_one_runner_at_a_time_per_records_folder(tmp_path):
    """A second runner on the same --out is refused while the first runs; a stale lock (runner gone) is taken over."""
    from studies.table2.runner import LOCK_NAME, RunnerBusy, runner_lock

    runs = tmp_path / "runs"
    with runner_lock(runs):  # holds the lock (flock) while the block runs: a second runner is refused
        assert runs.is_dir() and (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunnerBusy) as busy:
            with runner_lock(runs):
                pass
        assert str(busy.value) == (
            f"another run (pid {os.getpid()}) is writing into {tmp_path} (it holds {tmp_path / LOCK_NAME}): wait for "
            "it to end, or give another --out"
        )
    assert not (tmp_path / LOCK_NAME).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_NAME).write_text(gone.stdout.strip())  # left by a runner that has ended: not locked, taken over
    with runner_lock(runs):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_stopped_worker_leaves_even_when_a_library_swallows_its_exit(tmp_path: Path) -> None:
    """The stop signal raises ``SystemExit`` in the worker; code that catches ``BaseException`` (an import under way)
    would keep it running until the runner kills it seconds later. It leaves by itself after the watchdog's delay."""
    code = (
        "import signal, time\n"
        "from studies.table2.workers import _stop_worker\n"
        "signal.signal(signal.SIGTERM, _stop_worker)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(0.05)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], cwd=REPOSITORY, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
