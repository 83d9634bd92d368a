"""No study loses what it wrote or does its work for nothing: records are never replaced by fewer rows, an ``--out``
that cannot be written is refused before any work, one run at a time works in a records folder, and every refusal
or stop is one line.

The defects these guard against: ``python -m studies.peers`` with a peer missing replaced the committed table by one
without that peer's rows; the horizon and peers studies ended in 24-47-line tracebacks for an unwritable ``--out``
(after all the compute) or a record missing a key, and ``--threads 0`` was a RuntimeError; two horizon runs on one
``--out`` both did all the work; the Table 2 runner's Ctrl-C exited 1 without a word under ``--workers 1`` (the
default), and a Ctrl-C while it started printed a 23-line traceback.
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
from studies.horizon.__main__ import main as horizon
from studies.peers import study as peers
from studies.table2 import runner as table2

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


@pytest.mark.parametrize(
    "study, args",
    [
        (horizon, NQM),
        (peers.main, ["--rounds", "1"]),
        (table2.main, ["run", "--dataset", "digits", "--seeds", "1", "--ways", "3", "--methods", "fo"]),
        (table2.main, ["report"]),
    ],
    ids=["horizon", "peers", "table2 run", "table2 report"],
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
