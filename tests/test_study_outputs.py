"""No study loses what it wrote or does its work for nothing: records are never replaced by fewer rows, an ``--out``
that cannot be written is refused before any work, one run at a time works in a records folder, and every refusal
or stop is one line.

The defects these guard against: ``python -m studies.peers`` with a peer missing replaced the committed table by one
without that peer's rows; the horizon and peers studies ended in 24-47-line tracebacks for an unwritable ``--out``
(after all the compute) or a record missing a key, and ``--threads 0`` was a RuntimeError; two horizon runs on one
``--out`` both did all the work; the Table 2 runner's Ctrl-C exited 1 without a word under ``--workers 1`` (the
default), and a Ctrl-C while it started printed a 23-line traceback; the cost, quality, hpo, iMAML, MAML-Omniglot
timing, compile, DDP, GPU check, trace and scale studies wrote their results only after all their work, into an
``--out`` that nothing had checked (a traceback at the end), and two runs of one on the same ``--out`` both worked.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback
from lightning_cases import quiet_trainer

import lightning_hypergrad as lh
from studies.compile import study as compile_study
from studies.cost import checkpointed_rmd, launches
from studies.cost import estimators as cost_estimators
from studies.cost import plot as cost_plot
from studies.cost.__main__ import main as cost
from studies.ddp import allreduce_wait
from studies.ddp import scaling as ddp_scaling
from studies.ddp.__main__ import main as ddp
from studies.gpu_check import check as gpu_check
from studies.horizon.__main__ import main as horizon
from studies.hpo import comparison, tuning, unseen
from studies.imaml import study as imaml
from studies.lightning_step import step_time
from studies.maml_omniglot import report as maml_report
from studies.maml_omniglot import timing as maml_timing
from studies.maml_omniglot.__main__ import main as maml_omniglot
from studies.peers import study as peers
from studies.quality import greedy_variants, quality
from studies.scale import study as scale
from studies.table2 import runner as table2
from studies.trace import trace

ROOT = Path(__file__).resolve().parents[1]
NQM = ["nqm", "--dims", "6", "--steps", "4", "--outer-steps", "2", "--eval-every", "1", "--seeds", "1"]
NQM += ["--methods", "rmd"]


def one_line(captured: str) -> str:
    lines = captured.strip().splitlines()
    assert len(lines) == 1, captured
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------------
# an --out that cannot be written, --threads 0, a record missing a key: one line, before any work
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Every study's work, made to fail the test if it starts."""

    def work(*args, **kwargs):
        raise AssertionError("the study started its work")

    monkeypatch.setattr(peers, "equality", work)
    monkeypatch.setattr(table2, "execute", work)
    from studies.horizon import nqm_study

    monkeypatch.setattr(nqm_study, "run_one", work)
    monkeypatch.setattr(nqm_study, "compute_optimum", work)
    for module, names in (
        (cost_estimators, ("main",)),
        (cost_plot, ("plot_metric",)),
        (launches, ("measure",)),
        (checkpointed_rmd, ("measure_memory", "alternating_seconds")),
        (quality, ("choose_data", "train", "run_variants")),
        (greedy_variants, ("digits",)),
        (unseen, ("measure",)),
        (comparison, ("run",)),
        (tuning, ("fit",)),
        (imaml, ("run_one", "measure_memory")),
        (maml_timing, ("data_module",)),
        (maml_report, ("write_report",)),
        (compile_study, ("run_study", "write_report")),
        (ddp_scaling, ("run",)),
        (allreduce_wait, ("run",)),
        (step_time, ("time_configs",)),
        (trace, ("command_run", "command_init")),
        (scale, ("run", "report")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, work)


@pytest.mark.parametrize(
    "study, args",
    [
        pytest.param(horizon, NQM, id="horizon"),
        pytest.param(peers.main, ["--rounds", "1"], id="peers"),
        pytest.param(
            table2.main,
            ["run", "--dataset", "digits", "--seeds", "1", "--ways", "3", "--methods", "fo"],
            id="table2 run",
        ),
        pytest.param(table2.main, ["report"], id="table2 report"),
        pytest.param(cost, [], id="cost"),
        pytest.param(cost_plot.main, [], id="cost plot"),
        pytest.param(launches.main, [], id="cost launches"),
        pytest.param(checkpointed_rmd.main, [], id="cost checkpointed_rmd"),
        pytest.param(quality.main, ["--quick"], id="quality"),
        pytest.param(quality.main, ["--variants"], id="quality variants"),
        pytest.param(greedy_variants.main, [], id="quality greedy_variants"),  # --out a file: its folder checked
        pytest.param(unseen.main, [], id="hpo unseen"),
        pytest.param(comparison.main, [], id="hpo comparison"),
        pytest.param(tuning.main, [], id="hpo tuning"),
        pytest.param(imaml.main, ["run"], id="imaml run"),
        pytest.param(imaml.main, ["memory"], id="imaml memory"),
        pytest.param(imaml.main, ["report"], id="imaml report"),
        pytest.param(maml_omniglot, ["timing"], id="maml_omniglot timing"),
        pytest.param(maml_omniglot, ["report"], id="maml_omniglot report"),
        pytest.param(compile_study.main, ["run", "--quick"], id="compile run"),
        pytest.param(compile_study.main, ["report"], id="compile report"),
        pytest.param(ddp, [], id="ddp"),
        pytest.param(gpu_check.main, ["--device", "cpu"], id="gpu_check"),
        pytest.param(trace.main, ["run", "--dataset", "digits"], id="trace run"),
        pytest.param(trace.main, ["init", "--dataset", "digits"], id="trace init"),
        pytest.param(scale.main, ["run"], id="scale run"),
        pytest.param(scale.main, ["report"], id="scale report"),
    ],
)
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(study, args, tmp_path, capsys, no_work):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "results"
    with pytest.raises(SystemExit) as stopped:
        study([*args, "--out", str(out)])
    assert stopped.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert f"cannot write the results into {out}: {tmp_path / 'file'} is a file, not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_json_file_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, no_work):
    """The cost and DDP studies' ``--json`` (the records' file, elsewhere than ``--out``) is checked as ``--out`` is."""
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / "file" / "records.json"
    for study in (cost, ddp):
        with pytest.raises(SystemExit) as stopped:
            study(["--json", str(path), "--out", str(tmp_path / "out")])
        assert stopped.value.code == 2
        line = one_line(capsys.readouterr().err)
        assert f"argument --json: cannot write the results into {path}: {tmp_path / 'file'} is a file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_read_only_out_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, no_work):
    out = tmp_path / "results"
    out.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != out)  # (the tests run as root here)
    with pytest.raises(SystemExit):
        horizon([*NQM, "--out", str(out)])
    assert f"{out} is not writable" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("study, args", [(horizon, NQM), (peers.main, [])], ids=["horizon", "peers"])
def test_threads_0_is_one_line(study, args, tmp_path, capsys, no_work):
    with pytest.raises(SystemExit) as stopped:
        study([*args, "--threads", "0", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "--threads must be >= 1, got 0" in one_line(capsys.readouterr().err)


def test_a_horizon_record_missing_a_key_is_one_line_naming_the_file_and_the_key(tmp_path, capsys):
    assert horizon([*NQM, "--out", str(tmp_path)]) == 0
    record = tmp_path / "nqm" / "rmd-seed0.json"
    data = json.loads(record.read_text())
    del data["curve"]
    record.write_text(json.dumps(data))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        horizon([NQM[0], "report", *NQM[1:], "--out", str(tmp_path)])
    assert (
        str(stopped.value)
        == f"error: {record} has no 'curve': it is no complete record of this study; delete it to redo it"
    )


# ---------------------------------------------------------------------------------------------------------------------
# one run at a time in a records folder
# ---------------------------------------------------------------------------------------------------------------------


def test_a_second_horizon_run_on_the_same_out_is_refused_while_the_first_lives(tmp_path, capsys):
    (tmp_path / "nqm").mkdir()
    with open(tmp_path / "nqm" / ".lock", "w") as held:  # a run under way (this process, alive) holds the lock
        held.write(f"{os.getpid()}\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert horizon([*NQM, "--out", str(tmp_path)]) == 2
        line = one_line(capsys.readouterr().err)
        assert line == (
            f"error: another run (pid {os.getpid()}) is writing into {tmp_path / 'nqm'} (it holds "
            f"{tmp_path / 'nqm' / '.lock'}): wait for it to end, or give another --out"
        )
        assert not (tmp_path / "nqm" / "rmd-seed0.json").exists()
    # the lock of a run that is gone (killed) is taken over
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "nqm" / ".lock").write_text(f"{gone.pid}\n")
    assert horizon([*NQM, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "nqm" / "rmd-seed0.json").is_file() and not (tmp_path / "nqm" / ".lock").exists()


TRACE = ["run", "--dataset", "digits", "--ways", "3", "--steps", "2"]


def test_a_second_trace_run_on_the_same_out_is_refused_while_the_first_lives(tmp_path, capsys, monkeypatch):
    """A study whose runs write different records into one folder locks each record: the same run is refused while
    one lives, another (another seed) is not, and the lock of a run that is gone is taken over."""
    done = []
    monkeypatch.setattr(trace, "command_run", lambda args: done.append(trace.record_name(args)))
    name = "run-digits-3way-10shot-neumann(10)-seed0-2steps"
    lock = tmp_path / f".{name}.lock"
    with open(lock, "w") as held:  # a run under way (this process, alive) holds the lock
        held.write(f"{os.getpid()}\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SystemExit) as stopped:
            trace.main([*TRACE, "--out", str(tmp_path)])
        assert stopped.value.code == 2
        assert one_line(capsys.readouterr().err) == (
            f"error: another run (pid {os.getpid()}) is writing into {tmp_path} (it holds {lock}): wait for it to "
            "end, or give another --out"
        )
        assert done == []
        assert trace.main([*TRACE, "--seed", "1", "--out", str(tmp_path)]) == 0  # another record: no duplicate
        assert done == [name.replace("seed0", "seed1")]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid}\n")
    assert trace.main([*TRACE, "--out", str(tmp_path)]) == 0
    assert done[-1] == name and not lock.exists()


# ---------------------------------------------------------------------------------------------------------------------
# the peers study never replaces its table by one with fewer rows
# ---------------------------------------------------------------------------------------------------------------------

EARLIER = {
    "equality": [
        {"problem": "hpo", "T": 10, "method": "rmd", "peer": "higher innerloop_ctx", "relative_difference": 1e-15},
        {"problem": "hpo", "T": 10, "method": "rmd", "peer": "TorchOpt MetaSGD", "relative_difference": 1e-15},
    ],
    "timing": [
        {"problem": "hpo", "T": 10, "who": "peer", "method": "higher innerloop_ctx", "seconds": 1.0, "peak_bytes": 1},
    ],
    "missing": {},
    "machine": "the machine of the committed table",
    "peers": "higher 0.2.1, torchopt 0.7.3",
}


def _without_higher(monkeypatch, equality, timing):
    real = peers.import_peers

    def import_peers(folder):
        found, missing = real(folder)
        found.pop("higher", None)
        missing["higher"] = f"higher does not import (ImportError: not here); install it with {peers.INSTALL}"
        return found, missing

    monkeypatch.setattr(peers, "import_peers", import_peers)
    monkeypatch.setattr(peers, "equality", lambda found, hpo_steps: equality)
    monkeypatch.setattr(peers, "timing", lambda found, hpo_steps, rounds: timing)


def test_a_missing_peer_never_replaces_the_table_that_holds_its_rows(tmp_path, capsys, monkeypatch):
    table = tmp_path / "peers.json"
    table.write_text(json.dumps(EARLIER))
    before = table.read_bytes()
    _without_higher(monkeypatch, EARLIER["equality"][1:], [])
    assert peers.main(["--rounds", "1", "--hpo-steps", "10", "--out", str(tmp_path)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line == (
        f"error: {tmp_path / 'peers'}.json holds rows that this run would not write (higher does not import here "
        "(install with bash scripts/install_peers.sh)): nothing was run; give another --out to write a table "
        "without them"
    )
    assert table.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["peers.json"]


def test_a_run_with_fewer_rows_than_the_table_writes_beside_it(tmp_path, capsys, monkeypatch):
    """A row lost for a reason not foreseen before the run (here, a method gone): the earlier table is kept."""
    table = tmp_path / "peers.json"
    table.write_text(json.dumps({**EARLIER, "timing": []}))
    before = table.read_bytes()
    _without_higher(monkeypatch, EARLIER["equality"][1:], [])
    monkeypatch.setattr(peers, "rows_kept", lambda *args: None)  # the check before the run saw nothing
    assert peers.main(["--rounds", "1", "--hpo-steps", "10", "--out", str(tmp_path)]) == 1
    assert "kept, this one written as peers-fewer-rows" in capsys.readouterr().err
    assert table.read_bytes() == before
    assert json.loads((tmp_path / "peers-fewer-rows.json").read_text())["equality"] == EARLIER["equality"][1:]


# ---------------------------------------------------------------------------------------------------------------------
# the Table 2 runner's stops
# ---------------------------------------------------------------------------------------------------------------------


class _CtrlC(Callback):
    def on_train_batch_start(self, *args) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the signal's handler runs meanwhile


def _fit_stopped_by_ctrl_c(config, runs_dir):
    """A run of this process that Ctrl-C stops in Lightning's fit (which ends it with ``SystemExit(1)``)."""
    data = lh.FewShotDataModule("digits", ways=3, shots=2, queries=2, meta_batch_size=1, train_batches=4, val_tasks=1)
    quiet_trainer(max_steps=4, callbacks=[_CtrlC()]).fit(lh.FewShotClassifier(width=4, inner_steps=1), data)
    raise AssertionError("not stopped")


def test_table2_ctrl_c_with_one_worker_exits_130_with_its_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(table2, "run_one", _fit_stopped_by_ctrl_c)
    previous = signal.getsignal(signal.SIGINT)
    args = ["run", "--dataset", "digits", "--seeds", "1", "--ways", "3", "--methods", "fo", "--steps", "2"]
    assert table2.main([*args, "--eval-tasks", "2", "--workers", "1", "--out", str(tmp_path)]) == 130
    assert "interrupted after" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is previous  # (Lightning leaves Ctrl-C ignored: put back)
    assert not list((tmp_path / "runs").iterdir()) and not (tmp_path / ".runner.lock").exists()


def test_table2_ctrl_c_while_starting_is_one_line(tmp_path):
    command = [sys.executable, "-m", "studies.table2", "run", "--dataset", "digits", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # importing torch and Lightning takes longer
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err[-2000:]
    assert one_line(err) == "stopped by SIGINT while starting: nothing was run" and not out
