"""Exact resume from every checkpoint the command line writes, ``--ckpt_path last``, settings given with
``--ckpt_path``, and what W&B keeps of a killed or resumed run.

Exactness is bit for bit on CPU with ``deterministic: true``: a run resumed from a checkpoint ends with the
hyperparameters (and batch norm's statistics) of the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_cases import quiet_trainer

import lightning_hypergrad as lh

pytestmark = [  # Lightning's hints that do not apply here: the data module resumes mid-epoch, and with manual
    # optimization a checkpoint holds the state after the step, which is the state to resume from
    pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended"),
    pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
]
ROOT = Path(__file__).resolve().parents[1]
COMMAND = str(Path(sys.executable).parent / "lightning-hypergrad")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
ENV.pop("LIGHTNING_HYPERGRAD_DEBUG", None)
QUICKSTART = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
SMALL = [  # 4 batches an epoch: the epochs end at steps 4, 8, 12
    "--trainer.enable_progress_bar=false",
    "--trainer.log_every_n_steps=1",
    "--trainer.deterministic=true",
    "--data.init_args.train_batches=4",
    "--data.init_args.val_tasks=4",
    "--data.init_args.meta_batch_size=2",
    "--model.init_args.inner_steps=2",
    "--model.init_args.width=8",
]
NO_WANDB = ["--trainer.logger=false"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([COMMAND, *args], cwd=cwd, env=ENV | env, capture_output=True, text=True, timeout=600)


def fit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    result = run(["fit", *QUICKSTART, *SMALL, *args], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def checkpoints(folder: Path) -> dict[str, dict]:
    return {path.name: torch.load(path, weights_only=False) for path in sorted(folder.glob("*.ckpt"))}


def final_state(folder: Path, step: int, exclude: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The module's state in a checkpoint of ``folder`` (not named in ``exclude``) written at ``step``."""
    found = [s for name, s in checkpoints(folder).items() if s["global_step"] == step and name not in exclude]
    assert found, f"no checkpoint of step {step} in {sorted(p.name for p in folder.iterdir())}"
    return found[0]["state_dict"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


# ---------------------------------------------------------------------------------------------------------------------
# the Trainer API: every kind of checkpoint, with the inner model restarting (the default) or carried on (online)
# ---------------------------------------------------------------------------------------------------------------------

STEPS = 10  # 4 batches an epoch: epoch ends at 4 and 8, then 2 batches of the third epoch


def _build(online: bool):
    L.seed_everything(0)
    model = lh.FewShotClassifier(estimator=lh.Greedy(0.9), inner_steps=2, width=8)
    model.online = online  # the head and its optimizer state carry on from task to task, one task a step
    data = lh.FewShotDataModule(
        "digits", ways=3, shots=2, queries=3, meta_batch_size=1 if online else 2, train_batches=4, val_tasks=2
    )
    return model, data


def _fit(online: bool, max_steps: int, folder: Path | None = None, ckpt_path: Path | None = None):
    model, data = _build(online)
    callbacks = []
    if folder is not None:  # what the command line writes: epoch ends and last, and every 3 steps
        callbacks = [
            ModelCheckpoint(dirpath=folder, save_top_k=-1, save_last=True),
            ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_train_steps=3, filename="mid-{epoch}-{step}"),
        ]
    trainer = quiet_trainer(
        max_steps=max_steps,
        num_sanity_val_steps=2,  # Lightning's default, as the command line runs
        deterministic=True,
        callbacks=callbacks,
        enable_checkpointing=folder is not None,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    assert trainer.global_step == max_steps
    return model.state_dict()


@pytest.fixture(scope="module", params=[False, True], ids=["restart", "online"])
def uninterrupted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("online" if request.param else "restart")
    return request.param, folder, _fit(request.param, STEPS, folder)


@pytest.mark.parametrize(
    "checkpoint",
    [
        "epoch=0-step=4.ckpt",  # epoch ends
        "epoch=1-step=8.ckpt",
        "mid-epoch=0-step=3.ckpt",  # in the middle of an epoch
        "mid-epoch=1-step=6.ckpt",
        "mid-epoch=2-step=9.ckpt",
    ],
)
def test_a_run_resumed_from_any_checkpoint_ends_exactly_like_the_uninterrupted_one(uninterrupted, checkpoint):
    online, folder, expected = uninterrupted
    assert (folder / checkpoint).is_file()
    assert_same_state(_fit(online, STEPS, ckpt_path=folder / checkpoint), expected)


def test_a_stopped_run_continued_from_its_last_checkpoint_ends_like_the_uninterrupted_one(uninterrupted, tmp_path):
    """A run stopped at step 6, in the middle of its second epoch (its last checkpoint is written at the end of that
    cut epoch), continued to step 10."""
    online, _, expected = uninterrupted
    _fit(online, 6, tmp_path)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6
    assert_same_state(_fit(online, STEPS, ckpt_path=tmp_path / "last.ckpt"), expected)


class _EpochScheduled(lh.FewShotClassifier):
    """An outer learning rate halved at the end of every epoch."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _fit_scheduled(max_steps: int, folder: Path | None = None, ckpt_path: Path | None = None):
    L.seed_everything(0)
    model = _EpochScheduled(estimator=lh.Greedy(0.9), inner_steps=2, width=8)
    data = lh.FewShotDataModule("digits", ways=3, shots=2, queries=3, meta_batch_size=2, train_batches=4, val_tasks=2)
    trainer = quiet_trainer(
        max_steps=max_steps,
        num_sanity_val_steps=2,  # Lightning's default, as the command line runs
        deterministic=True,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=-1)] if folder else [],
        enable_checkpointing=folder is not None,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model.state_dict(), trainer.optimizers[0].param_groups[0]["lr"]


def test_an_epoch_scheduler_is_stepped_once_per_epoch_across_a_resume(tmp_path):
    expected, lr = _fit_scheduled(STEPS, tmp_path)
    resumed, resumed_lr = _fit_scheduled(STEPS, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    assert resumed_lr == lr
    assert_same_state(resumed, expected)


# ---------------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart_12_steps(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An uninterrupted quickstart run of 12 steps that keeps all its checkpoints: its working directory and its
    final state."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    fit(cwd, "--trainer.max_steps=12", "--checkpoint.save_top_k=-1", *NO_WANDB)
    return cwd, final_state(cwd / CHECKPOINTS, 12)


CHECKPOINTS = Path("lightning-hypergrad", "quickstart", "checkpoints")


def test_ckpt_path_last_resumes_the_previous_run_of_the_config_exactly(tmp_path, quickstart_12_steps):
    """As a user types it: a run of 8 steps, then the same command with ``--ckpt_path last`` and 12 steps."""
    folder = tmp_path / CHECKPOINTS
    first = fit(tmp_path, "--trainer.max_steps=8")
    before = digests(folder)
    first_id = next(name for name in before if name.startswith("last-"))[len("last-") : -len(".ckpt")]

    resumed = fit(tmp_path, "--trainer.max_steps=12", "--ckpt_path", "last")
    assert f"last-{first_id}.ckpt" in resumed.stderr  # Lightning names the file it restores
    # nothing of the first run is overwritten or deleted, and the resumed run trained steps 9 to 12 only
    after = digests(folder)
    assert {name: after.get(name) for name in before} == before
    assert_same_state(final_state(folder, 12), quickstart_12_steps[1])
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 2 and runs[0].name.endswith(first_id) and not runs[1].name.endswith(first_id)
    # logged at the uninterrupted run's steps (it logs at 0 to 11; Lightning's count came back one too far, 9 to 12)
    assert logged_steps(runs[0]) == list(range(8)) and logged_steps(runs[1]) == list(range(8, 12))
    # the note says how to continue the first W&B run instead
    assert f"--trainer.logger.init_args.id {first_id} --trainer.logger.init_args.resume allow" in resumed.stderr
    assert "Traceback" not in first.stderr + resumed.stderr


def test_a_cli_run_resumed_from_an_epoch_end_checkpoint_ends_exactly_like_the_uninterrupted_one(
    quickstart_12_steps,
):
    """The reported case: resumed from the checkpoint written at the end of the first epoch (step 4)."""
    cwd, expected = quickstart_12_steps
    folder = cwd / CHECKPOINTS
    epoch_end = next(folder.glob("*-epoch=0-step=4.ckpt"))
    before = {path.name for path in folder.glob("*.ckpt")}
    fit(cwd, "--trainer.max_steps=12", "--ckpt_path", str(epoch_end), *NO_WANDB)
    assert_same_state(final_state(folder, 12, exclude=before), expected)


def test_an_online_hpo_config_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path):
    """configs/hpo/lr_schedule.yaml (online: the network trains on across the outer steps), 4 steps an epoch, a
    checkpoint every 3 steps: resumed from step 3 and from step 6, it ends at step 9 as the uninterrupted run."""
    args = [
        "fit",
        "--config",
        str(ROOT / "configs" / "hpo" / "lr_schedule.yaml"),
        *NO_WANDB,
        "--trainer.enable_progress_bar=false",
        "--trainer.deterministic=true",
        "--trainer.max_steps=9",
        "--trainer.callbacks=[]",
        "--data.init_args.train_size=100",
        "--data.init_args.val_size=50",
        "--data.init_args.test_size=50",
        "--data.init_args.steps_per_epoch=4",
        "--model.init_args.inner_steps=2",
        "--checkpoint.every_n_train_steps=3",
        "--checkpoint.save_top_k=-1",
    ]
    result = run(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "lightning-hypergrad" / "lr_schedule" / "checkpoints"  # its own folder, not quickstart's
    expected = final_state(folder, 9)
    uninterrupted = {path.name for path in folder.glob("*.ckpt")}
    for step in (3, 6):
        (checkpoint,) = [folder / name for name in uninterrupted if name.endswith(f"-step={step}.ckpt")]
        assert torch.load(checkpoint, weights_only=False)["lightning_hypergrad"]["carried_params"] is not None
        before = {path.name for path in folder.glob("*.ckpt")}
        result = run([*args, "--ckpt_path", str(checkpoint)], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert_same_state(final_state(folder, 9, exclude=before), expected)


def test_settings_given_with_ckpt_path_are_applied_and_named(tmp_path):
    """Evaluating a trained backbone with another number of inner steps: the override is used and named."""
    fit(tmp_path, "--trainer.max_steps=2", *NO_WANDB)
    (checkpoint, *_) = sorted(tmp_path.rglob("*.ckpt"))
    validate = ["validate", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", str(checkpoint)]
    plain = run(validate, tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    overridden = run([*validate, "--model.init_args.inner_steps=1"], tmp_path)
    assert overridden.returncode == 0, overridden.stderr[-3000:]
    assert val_metric(plain.stdout, "val/outer_loss") != val_metric(overridden.stdout, "val/outer_loss")
    assert "note:" not in plain.stderr
    assert "model.inner_steps: 1 (checkpoint: 2)" in overridden.stderr


def test_ckpt_path_last_without_a_checkpoint_is_an_error_for_validate(tmp_path):
    result = run(["validate", *QUICKSTART, *SMALL, *NO_WANDB, "--ckpt_path", "last"], tmp_path)
    assert result.returncode == 1
    assert "no last checkpoint of this config in lightning-hypergrad/quickstart/checkpoints" in result.stderr
    assert "Traceback" not in result.stderr


def val_metric(stdout: str, key: str) -> float:
    """A number of the table that ``validate`` prints."""
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == key:
            return float(fields[1])
    raise AssertionError(f"{key} not in {stdout}")


# ---------------------------------------------------------------------------------------------------------------------
# W&B: a killed run keeps its history; a resumed run continues its W&B run when asked
# ---------------------------------------------------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file (LevelDB's log format: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    position, block, parts, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 or len(chunk) < length:  # padding, or the chunk being written when the run was killed
            continue
        parts = chunk if kind in (1, 2) else parts + chunk  # full or first; middle or last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def logged_steps(run_dir: Path) -> list[int]:
    """The distinct ``trainer/global_step`` of the run's history, in order."""
    steps = []
    files = list(run_dir.glob("run-*.wandb"))
    for record in wandb_records(files[0]) if files else []:
        if record.WhichOneof("record_type") != "history":
            continue
        for item in record.history.item:
            if "/".join(item.nested_key or [item.key]) == "trainer/global_step":
                step = int(json.loads(item.value_json))
                if not steps or steps[-1] != step:
                    steps.append(step)
    return steps


def _logged_so_far(cwd) -> list[int]:
    """The steps in the history of the W&B run under way in ``cwd`` (none while it has no file yet)."""
    runs = list((cwd / "wandb").glob("offline-run-*"))
    try:
        return logged_steps(runs[0]) if runs else []
    except Exception:  # a record being written
        return []


def test_a_killed_run_keeps_its_wandb_history_and_a_resumed_one_continues_its_wandb_run(tmp_path):
    """SIGKILL two seconds after the first checkpoint: the run's ``.wandb`` file holds what it logged up to a second
    before (W&B wrote the file every 15 s, or when 32 KiB had piled up, so such a run kept nothing); resumed with the
    W&B id, the new records belong to the same run."""
    args = [*QUICKSTART, "--trainer.enable_progress_bar=false", "--data.init_args.train_batches=2"]
    args += ["--data.init_args.val_tasks=2"]
    log = open(tmp_path / "output.log", "w")  # a file, not a pipe that could fill up and block the run
    command = [COMMAND, "fit", *args, "--trainer.max_steps=100000"]
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    folder = tmp_path / CHECKPOINTS
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("lightning-hypergrad/**/*.ckpt")):
            assert process.poll() is None, (tmp_path / "output.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        # two seconds, or up to six on a loaded machine until the history shows step 2: well inside W&B's own
        # 15 s flush interval, which this guards against
        waited = time.monotonic()
        while time.monotonic() - waited < 6:
            time.sleep(0.5)
            if time.monotonic() - waited >= 2 and any(s >= 2 for s in _logged_so_far(tmp_path)):
                break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    (killed,) = (tmp_path / "wandb").glob("offline-run-*")
    run_id = killed.name.rsplit("-", 1)[1]
    steps = logged_steps(killed)
    assert steps and steps[-1] >= 2, (steps, [(p.name, p.stat().st_size) for p in killed.glob("run-*.wandb")])

    last = next(folder.glob(f"last-{run_id}*.ckpt"))
    resumed_at = torch.load(last, weights_only=False)["global_step"]
    continued = ["--trainer.logger.init_args.id", run_id, "--trainer.logger.init_args.resume", "allow"]
    resume = ["fit", *args, "--trainer.log_every_n_steps=1", f"--trainer.max_steps={resumed_at + 2}"]
    resume += ["--ckpt_path", "last", *continued]
    before = digests(folder)
    result = run(resume, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = digests(folder)
    assert {name: after.get(name) for name in before} == before  # the same run's name, yet no file overwritten
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # `wandb sync wandb/offline-run-*-<id>` uploads both into the one run, in order
    steps = logged_steps(runs[1])
    # it goes on at the uninterrupted run's steps: batch k logs at step k - 1 (Lightning's count came one too far)
    assert steps == [resumed_at, resumed_at + 1], (resumed_at, steps)
    assert (runs[1] / "files" / "lightning_config.yaml").is_file()
    assert "note: resuming run" not in result.stderr
