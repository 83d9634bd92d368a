"""The GPU check (``studies/gpu_check``, ``scripts/gpu_check.sh``) in its tiny CPU form, its refusal without CUDA,
its GPU-against-CPU comparison run CPU against CPU, and ``StepTimer``'s wait for a CUDA device."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks import StepTimer
from lightning_hypergrad.module import split_meta_batch
from studies.gpu_check import check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_tiny_cpu_form_prints_every_configuration_and_writes_the_files(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ["--device", "cpu", "--dataset", "digits", "--steps", "1", "--rounds", "1", "--inner-steps", "2",
            "--estimators", "fo", "greedy(0.99)", "--out", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["python -m studies.gpu_check", *argv])
    runpy.run_module("studies.gpu_check", run_name="__main__", alter_sys=True)
    printed = capsys.readouterr().out
    for name in ("fo", "greedy(0.99)"):
        for tasks in ("batched", "one by one"):
            rows = [line for line in printed.splitlines() if line.startswith(f"| {name} | 2 | {tasks} |")]
            assert len(rows) == 1 and rows[0].endswith("| n/a |"), printed  # no CUDA memory on the CPU
    assert "| greedy(0.99) | 2 | batched |" in printed and "digits" in printed and "device: cpu" in printed
    assert "comparison needs a CUDA device (skipped)" in printed

    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["machine"].startswith("device: cpu")
    assert record["cpu_vs_gpu"] is None and "skipped" in record["cpu_vs_gpu_skipped"]
    rows = {(r["estimator"], r["inner_steps"], r["tasks"]): r for r in record["steps"]}
    assert set(rows) == {(n, 2, t) for n in ("fo", "greedy(0.99)") for t in ("batched", "one by one")}
    assert all(r["seconds_per_step"] > 0 and len(r["durations"]) == 1 and r["peak_cuda_mib"] is None
               for r in rows.values())  # fmt: skip
    assert rows[("fo", 2, "batched")]["ratio_to_fo"] == 1.0
    batched, one_by_one = rows[("greedy(0.99)", 2, "batched")], rows[("greedy(0.99)", 2, "one by one")]
    assert batched["one_by_one_over_batched"] == pytest.approx(
        one_by_one["seconds_per_step"] / batched["seconds_per_step"]
    )
    assert one_by_one["one_by_one_over_batched"] is None
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| fo | 2 | one by one |" in markdown and record["machine"] in markdown


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_exits_with_the_fix_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the check started working without CUDA")

    monkeypatch.setattr(lh, "FewShotDataModule", no_work)
    with pytest.raises(SystemExit) as exit:
        check.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit.value.code == check.NO_CUDA and not list(tmp_path.iterdir())

    done = subprocess.run(  # the default device is cuda
        [sys.executable, "-m", "studies.gpu_check", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == check.NO_CUDA and "\n" not in done.stderr.strip()
    assert "run it on a CUDA machine, or pass --device cpu" in done.stderr


def test_the_script_is_bash_and_runs_the_check() -> None:
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert SCRIPT.stat().st_mode & 0o111, "scripts/gpu_check.sh should be executable"
    commands = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[:5] == [  # installs nothing but through the README's install command, and that only without .venv
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'export VENV="${VENV:-.venv}"',
        '[ -x "$VENV/bin/python" ] || bash scripts/install.sh',
        '"$VENV/bin/python" -m studies.gpu_check "$@"',
    ]
    assert commands[5] == 'case " $* " in *" --device cpu "*) exit 0 ;; esac'  # the CPU form: part 1 alone
    rest = "\n".join(commands[6:])
    for part in ("-m studies.cost.estimators --device cuda", "-m studies.cost.launches --device cuda",
                 "-m studies.peers --device cuda"):  # fmt: skip
        assert part in rest
    installs = [c for c in commands if "install" in c and "scripts/" in c]
    assert all("scripts/install.sh" in c or "scripts/install_peers.sh" in c for c in installs)
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_comparison_of_two_devices_run_cpu_against_cpu() -> None:
    data = lh.FewShotDataModule(
        dataset="digits", ways=5, shots=2, queries=2, meta_batch_size=3, train_batches=1, val_tasks=1
    )
    data.setup("fit")
    tasks = split_meta_batch(next(iter(data.train_dataloader())))
    rows = check.compare_devices(tasks, data.image_shape, ["fo", "rmd"], [2], torch.device("cpu"))
    columns = [column for column, _, _ in check.PRECISIONS]
    assert [(r["estimator"], r["inner_steps"]) for r in rows] == [("fo", 2), ("rmd", 2)]
    assert all(0 <= r[c] < 1e-6 for r in rows for c in columns)  # the same computation twice
    table = check.comparison_table(rows)
    assert table[0] == "| estimator | T | " + " | ".join(columns) + " |" and table[2].startswith("| fo | 2 | ")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_step_timer_waits_for_a_cuda_device_only(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    waits: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waits.append)
    module = SimpleNamespace(device=torch.device(device, 0) if device == "cuda" else torch.device(device))
    module.log = lambda *args, **kwargs: None
    timer = StepTimer()
    for step in range(2):
        timer.on_train_batch_start(None, module, None, step)
        timer.on_train_batch_end(None, module, None, None, step)
    assert len(timer.durations) == 2
    assert waits == ([torch.device("cuda", 0)] * 4 if device == "cuda" else [])
