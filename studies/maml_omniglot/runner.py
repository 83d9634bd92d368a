"""``python -m studies.maml_omniglot run``: the resumable run, killed at any time and resumed bit for bit.

Files in ``--out`` (default ``studies/maml_omniglot/results``):

- ``checkpoint.pt``: the network, Adam's state, the iteration, the curve point being summed and the time spent per
  sitting; written atomically (a temporary file, then a rename) every ``--checkpoint-every`` iterations and when the
  run stops. A run resumes from it with the same tasks, so its numbers equal those of an uninterrupted run to the bit.
  Not committed (``results/.gitignore``).
- ``curve.jsonl``: one line per curve point, appended before each checkpoint: ``{"kind": "train", "iteration", "loss",
  "acc", "iterations"}`` (the mean meta-train query loss and accuracy of the last ``--log-every`` iterations) and
  ``{"kind": "val", "iteration", "loss", "acc", "acc_ci95", "tasks"}`` (the fixed validation tasks, every
  ``--val-every`` iterations and at 0). Lines past the checkpoint (a run killed between the two) are dropped on resume.
- ``record.json``: written when the run reaches ``--total``: the accuracy on ``--test-tasks`` unseen test tasks (fixed
  by the seed) with its 95% interval and every task's accuracy, the settings, the time, the machine.
- ``.lock``: held while a run works on the folder (:func:`studies.common.folder_lock`); a second run on it refuses,
  and the lock left by a run that is gone (killed with ``SIGKILL``) is taken over at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from studies.common import (
    FolderBusy,
    Progress,
    atomic_path,
    folder_lock,
    log,
    machine_description,
    write_json,
    write_text,
)
from studies.maml_omniglot.experiment import (
    OUT,
    PUBLISHED,
    Setting,
    StudyError,
    Tasks,
    add_setting_arguments,
    build_model,
    check_setting_arguments,
    data_module,
    evaluate,
    train_step,
)
from studies.maml_omniglot.records import CHECKPOINT, CURVE, LOCK, RECORD, read_curve
from studies.maml_omniglot.report import write_report
from studies.stats import mean_ci95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_setting_arguments(parser)
    parser.add_argument("--out", default=OUT, help=f"the run's folder (default {OUT})")
    parser.add_argument("--iterations", type=int, default=None, help="stop at this iteration (default: --total)")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N iterations (500)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Setting:
    setting = check_setting_arguments(parser, args)
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.iterations is not None and not 1 <= args.iterations <= setting.total:
        parser.error(f"--iterations must be in [1, --total={setting.total}], got {args.iterations}")
    return setting


# ---------------------------------------------------------------------------------------------------------------------
# the curve, the checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def _lines(points: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(p) + "\n" for p in points)


def trim_curve(path: Path, iteration: int | None) -> None:
    """Keeps the points up to ``iteration`` (the checkpoint's; ``None``: none), rewriting the file if that drops any."""
    points = read_curve(path)
    kept = [] if iteration is None else [p for p in points if p["iteration"] <= iteration]
    if path.is_file() and path.read_text(encoding="utf-8") != _lines(kept):
        write_text(path, _lines(kept))


def append_curve(path: Path, points: list[dict[str, Any]]) -> None:
    if not points:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(_lines(points))
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def load_checkpoint(path: Path, setting: Setting) -> dict[str, Any] | None:
    """The checkpoint in the run's folder, or ``None``; refuses one written with other settings."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 (a damaged checkpoint: say which file)
        raise StudyError(f"{path} cannot be read ({type(error).__name__}): delete it to start the run again") from None
    differ = [
        f"{key}: {state['setting'].get(key)!r} there, {value!r} now"
        for key, value in setting.as_record().items()
        if state["setting"].get(key) != value
    ]
    if differ:
        raise StudyError(
            f"{path} was written with other settings ({'; '.join(differ)}): give the same settings to resume it, or "
            "another --out"
        )
    return state


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------


def _validation_point(model, tasks: list[dict], iteration: int) -> dict[str, Any]:
    losses, accuracies = evaluate(model, tasks)
    acc, ci95 = mean_ci95(accuracies)
    loss, _ = mean_ci95(losses)
    return {"kind": "val", "iteration": iteration, "loss": loss, "acc": acc, "acc_ci95": ci95, "tasks": len(tasks)}


def _checkpoints(start: int, stop: int, every: int) -> int:
    """How many checkpoints a sitting from ``start`` to ``stop`` writes (one every ``every``, and one at the stop)."""
    return stop // every - start // every + (stop % every != 0)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, setting: Setting) -> int:
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    try:
        with folder_lock(out, LOCK), _sigterm_as_interrupt():
            return _run(args, setting, out)
    except FolderBusy as error:  # another living run works on out: the command's one error line
        raise StudyError(str(error)) from None
    except KeyboardInterrupt:
        saved = out / CHECKPOINT
        where = f"its checkpoint at iteration {_saved_iteration(saved)}" if saved.is_file() else "the start"
        log(f"interrupted: the same command resumes the run from {where}")
        return 130


def _saved_iteration(path: Path) -> int | str:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except Exception:  # noqa: BLE001 (only for the message)
        return "?"


def _run(args: argparse.Namespace, setting: Setting, out: Path) -> int:
    stop = args.iterations or setting.total
    state = load_checkpoint(out / CHECKPOINT, setting)
    done = 0 if state is None else state["iteration"]
    if done >= stop and (done < setting.total or (out / RECORD).is_file()):
        log(f"{out}: the run is at iteration {done}, at or past --iterations {stop}: nothing to do")
        return 0
    data = data_module(setting, args.root)  # its files are checked here, before any long work
    trim_curve(out / CURVE, None if state is None else done)
    curve = read_curve(out / CURVE)
    last_point = {kind: next((p for p in reversed(curve) if p["kind"] == kind), None) for kind in ("train", "val")}
    model = build_model(setting)
    optimizer = torch.optim.Adam(model.parameters(), lr=setting.meta_lr)
    block = {"loss": 0.0, "acc": 0.0, "count": 0}
    sittings: list[dict[str, Any]] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        block, sittings = state["block"], state["sittings"]
        torch.set_rng_state(state["torch_rng"])
        log(f"resuming {out} from its checkpoint at iteration {done}")
    log(f"loading Omniglot (learn2learn's preparation) from {args.root}")
    tasks = Tasks(setting, data)
    val_tasks = tasks.fixed("val", setting.val_tasks)
    sitting = {"from": done, "to": done, "seconds": 0.0, "threads": torch.get_num_threads()}
    sitting["load_average"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    sittings.append(sitting)
    pending: list[dict[str, Any]] = []
    if done == 0:
        pending.append(_validation_point(model, val_tasks, 0))
        last_point["val"] = pending[-1]
    progress = Progress(_checkpoints(done, stop, args.checkpoint_every), work=stop - done)
    last = done
    while done < stop:
        start = time.perf_counter()
        loss, acc = train_step(model, optimizer, tasks.train(done))
        sitting["seconds"] += time.perf_counter() - start
        done += 1
        block = {"loss": block["loss"] + loss, "acc": block["acc"] + acc, "count": block["count"] + 1}
        if done % setting.log_every == 0 or done == setting.total:
            n = block["count"]
            pending.append(
                {"kind": "train", "iteration": done, "loss": block["loss"] / n, "acc": block["acc"] / n,
                 "iterations": n}
            )  # fmt: skip
            block = {"loss": 0.0, "acc": 0.0, "count": 0}
            last_point["train"] = pending[-1]
        if done % setting.val_every == 0 or done == setting.total:
            pending.append(_validation_point(model, val_tasks, done))
            last_point["val"] = pending[-1]
        if done % args.checkpoint_every == 0 or done == stop:
            sitting["to"] = done
            append_curve(out / CURVE, pending)
            pending = []
            state = {
                "setting": setting.as_record(),
                "iteration": done,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "block": block,
                "sittings": sittings,
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(out / CHECKPOINT, state)
            progress.step(
                f"iteration {done}/{setting.total}: "
                f"{sitting['seconds'] / max(done - sitting['from'], 1):.3f} s/iteration; {_latest(last_point)}",
                work=done - last,
            )
            last = done
    if done == setting.total and not (out / RECORD).is_file():
        write_record(out, setting, model, tasks, sittings)
        write_report(out)
    return 0


def _latest(points: dict[str, dict[str, Any] | None]) -> str:
    """The last curve points, for the progress line."""
    parts = [
        f"{'meta-train' if kind == 'train' else 'validation'} acc {p['acc']:.3f} at {p['iteration']}"
        for kind, p in points.items()
        if p is not None
    ]
    return ", ".join(parts) or "no curve point yet"


def write_record(out: Path, setting: Setting, model, tasks: Tasks, sittings: list[dict[str, Any]]) -> None:
    """The test of the trained network on ``test_tasks`` unseen tasks, and ``record.json``."""
    log(f"testing on {setting.test_tasks} unseen tasks of the meta-test classes")
    start = time.perf_counter()
    losses, accuracies = evaluate(model, tasks.fixed("test", setting.test_tasks))
    acc, ci95 = mean_ci95(accuracies)
    seconds = sum(s["seconds"] for s in sittings)
    iterations = sum(s["to"] - s["from"] for s in sittings)
    record = {
        "study": "maml_omniglot",
        "setting": setting.as_record(),
        "estimator": setting.estimator,
        "iterations": setting.total,
        "test": {
            "tasks": len(accuracies),
            "acc": acc,
            "acc_ci95": ci95,
            "loss": mean_ci95(losses)[0],
            "per_task_acc": accuracies,
            "seconds": time.perf_counter() - start,
        },
        "final_validation": next(p for p in reversed(read_curve(out / CURVE)) if p["kind"] == "val"),
        "train_seconds": seconds,
        "seconds_per_iteration": seconds / max(iterations, 1),
        "sittings": sittings,
        "machine": machine_description(),
        "published": PUBLISHED,
    }
    write_json(out / RECORD, record)
    log(f"test accuracy {acc:.4f} +- {ci95:.4f} (95%) on {len(accuracies)} tasks: {out / RECORD}")
