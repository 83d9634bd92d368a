"""A run stopped before its end exits non-zero (130 for SIGINT, 143 for SIGTERM) with one line saying so.

Before: SIGTERM at step 55 of 400 printed ``Received SIGTERM: 15`` and exited 0 (a scheduler took the preempted run
for finished); Ctrl-C exited 1 with no line, and Ctrl-C while the imports ran showed their traceback.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from test_resume import COMMAND, ENV, QUICKSTART

LONG = [*QUICKSTART, "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.max_steps=400"]
LONG += ["--data.init_args.train_batches=400", "--checkpoint.every_n_train_steps=3"]


def _stopped(tmp_path: Path, stop: signal.Signals, after_checkpoint: bool) -> tuple[int, str]:
    process = subprocess.Popen(
        [COMMAND, "fit", *LONG], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    folder = tmp_path / "lightning-hypergrad" / "quickstart" / "checkpoints"
    deadline = time.monotonic() + 300
    if after_checkpoint:
        while not list(folder.glob("last-*.ckpt")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.5)
    else:
        time.sleep(0.5)  # torch and Lightning are still loading
    process.send_signal(stop)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def test_sigterm_during_training_exits_143_naming_the_step_the_checkpoint_and_the_resume_command(tmp_path):
    status, err = _stopped(tmp_path, signal.SIGTERM, after_checkpoint=True)
    assert status == 143, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert line.startswith("stopped by SIGTERM at step ") and " of 400: last checkpoint " in line
    assert "lightning-hypergrad/quickstart/checkpoints/last-" in line
    assert line.endswith("--checkpoint.every_n_train_steps=3 --ckpt_path last")
    assert "Traceback" not in err


def test_ctrl_c_while_the_imports_run_exits_130_with_one_line(tmp_path):
    status, err = _stopped(tmp_path, signal.SIGINT, after_checkpoint=False)
    assert status == 130, err[-2000:]
    assert "stopped by SIGINT before training started: nothing to resume, run the command again" in err
    assert "Traceback" not in err and "partially initialized" not in err


def test_an_error_left_by_an_import_cut_short_by_ctrl_c_is_reported_as_the_stop() -> None:
    """A library that swallows the KeyboardInterrupt of an import leaves a half-initialized module, and the error that
    follows (``module 'numpy' has no attribute 'iterable'``) must read as the stop it comes from, not as a traceback."""
    code = (
        "from lightning_hypergrad.cli.entry import StopSignals\n"
        "stops = StopSignals()\n"
        "stops.received.append('SIGINT')\n"
        "stops.excepthook(AttributeError, AttributeError(\"module 'numpy' has no attribute 'iterable'\"), None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130
    assert done.stderr == "stopped by SIGINT before training started: nothing to resume, run the command again\n"


def test_a_stop_signal_during_the_imports_leaves_at_once_whatever_the_import_does() -> None:
    """Before ``main`` runs nothing is started, so the early handler leaves at once with the one line: a
    KeyboardInterrupt raised through an import could be swallowed by it (or abort in torch's C++ part, status -6)."""
    code = (
        "import os, signal, sys, time\n"
        "sys.argv[0] = 'lightning-hypergrad'\n"
        "from lightning_hypergrad.cli.entry import install_early\n"
        "install_early()\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "except BaseException:\n"
        "    pass\n"
        "print('still running')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (130, "")
    assert done.stderr == "stopped by SIGINT before training started: nothing to resume, run the command again\n"
