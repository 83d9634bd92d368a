"""A quiet console and a clean working directory: what a run prints is about the run, and what it leaves is its own.

The command line runs in a temporary working directory, on the digits quickstart with one or two steps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = str(Path(sys.executable).parent / "lightning-hypergrad")
QUICKSTART = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
LR_SCHEDULE = ["--config", str(ROOT / "configs" / "hpo" / "lr_schedule.yaml")]
SMALL = [
    "--trainer.max_steps=2",
    "--data.init_args.train_batches=2",
    "--data.init_args.val_tasks=2",
    "--data.init_args.test_tasks=2",
    "--model.init_args.inner_steps=2",
]
NO_LOGGER = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
CHECKPOINTS = Path("lightning-hypergrad") / "quickstart" / "checkpoints"


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The command line in ``cwd``, with W&B's own variables unset unless given (and W&B not silenced)."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "LIGHTNING_HYPERGRAD_DEBUG"
    }
    environment |= {"OMP_NUM_THREADS": "1", **env}
    return subprocess.run([COMMAND, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def left_in(folder: Path) -> list[str]:
    """What ``folder`` holds, every file and folder, relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------------------------------
# a quiet console
# ---------------------------------------------------------------------------------------------------------------------


def test_a_quickstart_fit_prints_what_concerns_the_run_and_nothing_else(tmp_path):
    result = run(["fit", *QUICKSTART, *SMALL], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert "litlogger" not in printed  # Lightning's advertisement at every start
    assert "anonymous setting has no effect" not in printed  # W&B, about an argument Lightning passes as None
    assert "LeafSpec" not in printed  # torch's deprecation, of a class Lightning's own code uses
    assert "Run data is saved locally in wandb/offline-run-" in printed  # W&B's lines about the run stay
    assert "Epoch 0: 100%" in result.stdout  # Lightning's progress bar (on stdout)
    # a warning about the user's settings stays: 2 batches an epoch, logged every 10 steps
    assert "smaller than the logging interval Trainer(log_every_n_steps=10)" in printed


def test_a_cpu_memory_measurement_drops_only_the_profilers_own_lines(tmp_path):
    code = (
        "import os, torch\n"
        "from studies.common import AllocatorPeak\n"
        "def step():\n"
        "    os.write(2, b'a line of the measured call\\n')\n"
        "    return torch.ones(1000) * 2\n"
        "print(AllocatorPeak().measure(step) > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert "gpuGetDeviceCount" not in done.stderr and "profiler_start" not in done.stderr, done.stderr
    assert done.stderr.splitlines() == ["a line of the measured call"]


def test_progress_lines_give_the_time_so_far_and_the_time_left():
    from studies.common import Progress, format_duration

    now = [100.0]
    progress = Progress(3, work=40, clock=lambda: now[0])
    now[0] += 10  # a unit of work 10 done in 10 s: 30 left, 30 s
    assert progress.line("first", 10) == "[1/3] first (0m10s elapsed, about 0m30s left)"
    now[0] += 110  # 20 more in 110 s: 120 s for 30, 10 left
    assert progress.line("second", 20) == "[2/3] second (2m00s elapsed, about 0m40s left)"
    now[0] += 3600
    assert progress.line("third", 10) == "[3/3] third (1h02m00s elapsed, done)"
    assert format_duration(59.6) == "1m00s" and format_duration(-1) == "0m00s"


STUDY_LOOPS = [
    "cost/estimators.py",
    "cost/checkpointed_rmd.py",
    "cost/adapter.py",
    "ddp/scaling.py",
    "ddp/allreduce_wait.py",
    "gpu_check/check.py",
    "hpo/comparison.py",
    "hpo/unseen.py",
    "hpo/tuning.py",
    "lightning_step/step_time.py",
    "quality/quality.py",
    "quality/variants.py",
    "quality/greedy_variants.py",
    "table2/runner.py",
    "trace/trace.py",
]


@pytest.mark.parametrize("module", STUDY_LOOPS)
def test_every_study_shows_its_progress_with_the_time_left_through_the_shared_helper(module):
    source = (ROOT / "studies" / module).read_text()
    assert "Progress(" in source and ("progress.step(" in source or "progress.line(" in source)


def test_the_table2_runner_says_the_time_left_after_each_run(tmp_path, capsys):
    from studies.table2.runner import main

    args = ["run", "--dataset", "digits", "--ways", "3", "--methods", "fo", "t1t2", "--steps", "1", "--meta-batch"]
    assert main([*args, "1", "--eval-tasks", "2", "--seeds", "1", "--shots", "1", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("[1/2] digits 3-way fo seed 0: val ") and lines[0].endswith(" left)")
    assert "elapsed, about " in lines[0] and lines[1].endswith("elapsed, done)")


# ---------------------------------------------------------------------------------------------------------------------
# a clean working directory
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A folder where ``fit`` ran without a logger, 2 steps."""
    folder = tmp_path_factory.mktemp("fitted")
    result = run(["fit", *QUICKSTART, *SMALL, *NO_LOGGER], folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_without_a_logger_every_run_saves_its_config_beside_its_checkpoints_not_in_the_working_directory(
    fitted, tmp_path
):
    (last,) = (fitted / CHECKPOINTS).glob("last-*.ckpt")
    run_name = last.stem.removeprefix("last-")
    assert sorted(p.name for p in fitted.iterdir()) == ["lightning-hypergrad"]  # no config*.yaml here
    assert (fitted / CHECKPOINTS / f"config-{run_name}.yaml").read_text().count("max_steps: 2") == 1
    shutil.copytree(fitted / "lightning-hypergrad", tmp_path / "lightning-hypergrad")
    for subcommand in ("validate", "test"):
        result = run([subcommand, *QUICKSTART, *SMALL, *NO_LOGGER, "--ckpt_path", "last"], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert len(list((tmp_path / CHECKPOINTS).glob(f"config-{subcommand}-*.yaml"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning-hypergrad"]


def test_resuming_a_finished_run_trains_nothing_and_leaves_nothing(fitted, tmp_path):
    shutil.copytree(fitted / "lightning-hypergrad", tmp_path / "lightning-hypergrad")
    before = left_in(tmp_path)
    result = run(["fit", *QUICKSTART, *SMALL, "--ckpt_path", "last"], tmp_path)  # with the config's W&B logger
    assert result.returncode == 0, result.stderr[-3000:]
    assert "its run has reached step 2, and trainer.max_steps is 2: nothing to train" in result.stderr
    assert "wandb:" not in result.stderr
    assert left_in(tmp_path) == before


def test_an_error_after_the_logger_started_leaves_no_empty_wandb_run(tmp_path):
    # the callback's estimators are checked when fitting starts, after W&B started its run
    compare = [
        "--trainer.callbacks+=lightning_hypergrad.HypergradCallback",
        '--trainer.callbacks.compare=["neumann(10)"]',
    ]
    result = run(["fit", *LR_SCHEDULE, "--trainer.max_steps=2", *compare], tmp_path)
    assert result.returncode == 1
    assert "error: HypergradCallback compare=neumann(10): Neumann cannot differentiate" in result.stderr
    assert "removed the W&B run wandb/offline-run-" in result.stderr
    assert "wandb sync" not in result.stderr  # W&B's closing lines would name the removed folder
    assert left_in(tmp_path) == []


def _too_few_images(root: Path) -> list[str]:
    """A ``folder`` dataset of 10 classes of 3 images, and tasks that need 4 per class."""
    import numpy as np
    from PIL import Image

    for label in range(10):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 25 * label + i, dtype=np.uint8)).save(root / f"c{label}" / f"{i}.png")
    data = ["--data.init_args.dataset=folder", f"--data.init_args.root={root}", "--data.init_args.ways=2"]
    return [*QUICKSTART, *data, "--data.init_args.shots=3", "--data.init_args.queries=1", "--trainer.max_steps=1"]


def _damaged_archive(root: Path) -> list[str]:
    """Omniglot archives whose zip directory is intact but whose images are not (found when they are loaded)."""
    from test_data_integrity import _flip_inside_images, _write_omniglot

    root.mkdir()
    background, _ = _write_omniglot(root)
    _flip_inside_images(background)
    data = ["--data.init_args.dataset=omniglot", f"--data.init_args.root={root}", "--data.init_args.ways=2"]
    return [*QUICKSTART, *data, "--data.init_args.shots=1", "--data.init_args.queries=1", "--trainer.max_steps=1"]


@pytest.mark.parametrize("case", ["estimator against optimizer", "split too small", "damaged archive"])
def test_an_error_that_can_be_found_before_the_logger_starts_starts_no_wandb_run(tmp_path, case):
    if case == "split too small":
        args, message = _too_few_images(tmp_path / "images"), "shots + queries = 3 + 1 = 4, but 6 classes"
    elif case == "damaged archive":
        args = _damaged_archive(tmp_path / "omniglot")
        message = f"{tmp_path / 'omniglot' / 'images_background.npz'} cannot be read, it is damaged"
    else:
        args = [*LR_SCHEDULE, "--model.init_args.estimator=neumann(10)", "--trainer.max_steps=2"]
        message = "Neumann cannot differentiate through the inner optimizer's own settings (lr)"
    cwd = tmp_path / "run"
    cwd.mkdir()
    result = run(["fit", *args], cwd)
    assert result.returncode == 1
    assert f"error: {message}" in result.stderr
    assert "wandb:" not in result.stderr and "Sanity Checking" not in result.stderr
    assert left_in(cwd) == []


def test_wandb_mode_disabled_is_followed_over_the_configs_offline_setting(tmp_path):
    result = run(["fit", *QUICKSTART, *SMALL, "--trainer.enable_progress_bar=false"], tmp_path, WANDB_MODE="disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb:" not in result.stderr and not (tmp_path / "wandb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning-hypergrad"]
    (last,) = (tmp_path / CHECKPOINTS).glob("last-*.ckpt")
    assert (tmp_path / CHECKPOINTS / f"config-{last.stem.removeprefix('last-')}.yaml").is_file()


@pytest.mark.parametrize(
    "mode, configured, offline",
    [("offline", False, True), ("online", True, False), ("disabled", True, False), (None, True, True)],
)
def test_wandb_mode_decides_the_loggers_mode_and_wandb_dir_its_folder(monkeypatch, tmp_path, mode, configured, offline):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_hypergrad.cli.wandb import follow_wandb_environment

    monkeypatch.delenv("WANDB_MODE", raising=False)
    if mode is not None:
        monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    logger = WandbLogger(project="p", offline=configured)
    follow_wandb_environment(logger)
    assert logger._offline is offline  # (offline: Lightning sets WANDB_MODE=dryrun when the run starts)
    assert logger._wandb_init["dir"] == logger.save_dir == str(tmp_path / "runs")
    assert "anonymous" not in logger._wandb_init  # W&B warns about anonymous=None, which Lightning passes
    given = WandbLogger(project="p", save_dir=str(tmp_path / "given"), anonymous=True)
    follow_wandb_environment(given)
    assert given._wandb_init["dir"] == str(tmp_path / "given") and given._wandb_init["anonymous"] == "allow"
