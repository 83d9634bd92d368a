"""``python -m studies.maml_omniglot``: the resumable run equals an uninterrupted one to the bit, refuses a second run
on its folder and other settings, and its timing and report run; all tiny, on generated archives in a temporary
folder (a 2-layer network of width 8 on 8x8 images, 3-way tasks, meta-batches of 2)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("learn2learn", reason="learn2learn (the few-shot extra) is not installed")

from test_omniglot_l2l_preparation import write_archives  # noqa: E402

from studies.maml_omniglot.__main__ import main  # noqa: E402

TOTAL = 6
TINY = [
    "--image-size", "8", "--sizes", "8", "8", "--ways", "3", "--meta-batch", "2", "--total", str(TOTAL),
    "--log-every", "2", "--val-every", "3", "--val-tasks", "4", "--test-tasks", "6", "--task-pool", "5",
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("omniglot")
    write_archives(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(root: str, out: Path, *extra: str) -> int:
    return main(["run", "--root", root, *TINY, "--out", str(out), "--checkpoint-every", "2", *extra])


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_a_resumed_run_equals_an_uninterrupted_one_to_the_bit(root: str, tmp_path: Path):
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    assert _run(root, whole) == 0
    assert _run(root, pieces, "--iterations", "3") == 0
    assert _checkpoint(pieces)["iteration"] == 3 and not (pieces / "record.json").exists()
    # killed after the curve's lines past the checkpoint were appended, one of them cut short: they are dropped
    with open(pieces / "curve.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "iteration": 4, "loss": 9.0, "acc": 0.0, "iterations": 1}) + '\n{"kind')
    assert _run(root, pieces) == 0
    assert (pieces / "curve.jsonl").read_text() == (whole / "curve.jsonl").read_text()
    a, b = _checkpoint(whole), _checkpoint(pieces)
    assert a["iteration"] == b["iteration"] == TOTAL
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][k][name]), (k, name)
    records = [json.loads((out / "record.json").read_text()) for out in (whole, pieces)]
    assert records[0]["test"]["per_task_acc"] == records[1]["test"]["per_task_acc"]
    assert records[0]["test"]["loss"] == records[1]["test"]["loss"] and records[0]["test"]["tasks"] == 6
    assert [(s["from"], s["to"]) for s in records[1]["sittings"]] == [(0, 3), (3, TOTAL)]
    curve = [json.loads(line) for line in (whole / "curve.jsonl").read_text().splitlines()]
    assert [(p["kind"], p["iteration"]) for p in curve] == [
        ("val", 0), ("train", 2), ("val", 3), ("train", 4), ("train", 6), ("val", 6)
    ]  # fmt: skip
    # a changed model would show: a run from another seed ends elsewhere
    assert _run(root, tmp_path / "other", "--seed", "1", "--iterations", "2") == 0
    assert not torch.equal(_checkpoint(tmp_path / "other")["model"][key], _checkpoint(pieces)["model"][key])
    assert _run(root, pieces) == 0  # done: nothing to do, nothing changed
    assert _checkpoint(pieces)["iteration"] == TOTAL


def test_a_second_run_on_the_folder_and_other_settings_are_refused(root: str, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # a run under way (this process, alive) holds the lock
        held.write(f"{os.getpid()}\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert _run(root, out, "--iterations", "1") == 2
        assert capsys.readouterr().err == (
            f"python -m studies.maml_omniglot run: error: another run (pid {os.getpid()}) is writing into {out} (it "
            f"holds {out / '.lock'}): wait for it to end, or give another --out\n"
        )
        assert not (out / "checkpoint.pt").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout.strip())  # a run killed with SIGKILL left it: taken over
    assert _run(root, out, "--iterations", "1") == 0 and not (out / ".lock").exists()
    capsys.readouterr()
    assert _run(root, out, "--iterations", "2", "--meta-lr", "0.01") == 2
    err = capsys.readouterr().err
    assert "was written with other settings (meta_lr: 0.003 there, 0.01 now)" in err and err.count("\n") == 1


def test_bad_input_is_one_line_before_any_work(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["run", "--root", str(tmp_path), "--iterations", "0", "--out", str(tmp_path / "x")])
    assert exit.value.code == 2 and "--iterations must be in [1, --total=60000], got 0" in capsys.readouterr().err
    assert main(["run", "--root", str(tmp_path / "nowhere"), *TINY, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Omniglot data not found; looked for" in err and err.count("\n") == 1


def test_timing_and_report(root: str, tmp_path: Path):
    out = tmp_path / "results"
    assert main(["timing", "--root", root, *TINY, "--out", str(out), "--rounds", "2", "--warmup", "1"]) == 0
    timing = json.loads((out / "timing.json").read_text())
    assert set(timing["seconds"]) == {"ours_sampling", "ours_step", "l2l_step", "l2l_sampling", "l2l_example_iteration"}
    assert all(len(v) == 2 and min(v) > 0 for v in timing["seconds"].values())
    assert timing["max_parameter_difference"] < 1e-6  # three identical steps of lh.MAML and learn2learn's MAML
    assert main(["report", "--out", str(out)]) == 0
    page = (out / "README.md").read_text()
    assert "Not yet: the run has not reached its 6 iterations" in page and "| the step on the same tasks |" in page
    assert _run(root, out) == 0  # the whole tiny run writes its record and the page again
    record = json.loads((out / "record.json").read_text())
    page = (out / "README.md").read_text()
    assert f"{100 * record['test']['acc']:.1f}% ± {100 * record['test']['acc_ci95']:.1f}" in page
    assert "88.9%" in page and "89.7% ± 1.1" in page and (out / "curve.png").stat().st_size > 0


def test_training_tasks_come_from_the_pool_and_change_with_the_iteration(root: str):
    from studies.maml_omniglot.experiment import Setting, Tasks, data_module

    setting = Setting(ways=3, meta_batch=4, image_size=8, task_pool=5)
    tasks = Tasks(setting, data_module(setting, root))
    seen = {}
    for iteration in range(6):
        batch = tasks.train(iteration)
        assert len(batch) == 4 and batch[0]["support_x"].shape == (3, 1, 8, 8)
        for task in batch:
            seen[task["support_x"].numpy().tobytes()] = task
    assert 2 < len(seen) <= 5  # 24 draws from a pool of 5 tasks
    assert not torch.equal(tasks.train(0)[0]["support_x"], tasks.train(1)[0]["support_x"])
    assert all(torch.equal(a["query_x"], b["query_x"]) for a, b in zip(tasks.train(3), tasks.train(3)))


@pytest.mark.slow  # a second Python process: about 10 s
def test_a_run_killed_at_any_time_resumes_to_the_uninterrupted_numbers(root: str, tmp_path: Path):
    """``SIGKILL`` right after the first checkpoint (no handler runs): the next run takes over the dead run's lock,
    resumes from the checkpoint and ends where an uninterrupted run ends."""
    import os
    import signal
    import time

    longer = [*TINY, "--total", "60", "--log-every", "10", "--val-every", "30"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "studies.maml_omniglot", "run", "--root", root, *longer, "--out", str(killed)]
    process = subprocess.Popen(
        [*command, "--checkpoint-every", "5"],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / ".lock").exists() or process.returncode == 0  # killed: its lock is left behind
    stopped = torch.load(killed / "checkpoint.pt", weights_only=True)["iteration"]
    assert main(["run", "--root", root, *longer, "--out", str(killed), "--checkpoint-every", "5"]) == 0
    assert main(["run", "--root", root, *longer, "--out", str(whole), "--checkpoint-every", "60"]) == 0
    assert (killed / "curve.jsonl").read_text() == (whole / "curve.jsonl").read_text()
    records = [json.loads((out / "record.json").read_text()) for out in (killed, whole)]
    assert records[0]["test"]["per_task_acc"] == records[1]["test"]["per_task_acc"]
    assert records[0]["test"]["loss"] == records[1]["test"]["loss"]
    assert process.returncode == 0 or records[0]["sittings"][1]["from"] == stopped > 0  # resumed mid-run
