"""The Table 2 runner's worker processes (``--workers > 1``): each runs one run at a time, sent over a pipe.

A worker ignores Ctrl-C (the runner stops its workers itself), leaves on ``SIGTERM`` without a record of the run under
way, and leaves by itself when its runner is gone, even killed with ``SIGKILL``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch

from studies.table2.run import RunConfig, run_one

PARENT_POLL_SECONDS = 0.2
"""How often a worker checks that the runner that started it is still alive."""
STOP_GRACE_SECONDS = 10.0
"""How long a stopped worker may take to leave (its run's temporary file removed) before it is killed."""
STOP_WATCHDOG_SECONDS = 2.0
"""How long after its stop signal a worker leaves by itself, whatever its main thread is doing."""
_stopping = False


def _stop_worker(signum: int, frame: Any) -> None:
    """A worker's ``SIGTERM`` handler: leaves the run at once through ``SystemExit``, which removes the temporary
    file of a record being written (:func:`studies.common.atomic_path`), so that no half-finished run leaves one."""
    global _stopping
    if not _stopping:  # a second signal must not interrupt the cleanup of the first
        _stopping = True
        # and should a library swallow the SystemExit (an import under way that catches BaseException), leave anyway
        threading.Thread(target=_leave_after, args=(STOP_WATCHDOG_SECONDS, 128 + signum), daemon=True).start()
        raise SystemExit(128 + signum)


def _leave_after(seconds: float, code: int) -> None:
    time.sleep(seconds)
    os._exit(code)  # the runner removes what a run under way left (its temporary file)


def _watch_parent(parent: int) -> None:
    """Stops this worker when the runner that started it is gone (even killed with ``SIGKILL``): the worker is then
    re-parented, so ``os.getppid()`` changes."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_SECONDS)  # the main thread did not stop (stuck outside Python): leave anyway
    os._exit(1)


def _worker_process(conn: Connection, parent: int, threads: int) -> None:
    """A worker process's entry point: :func:`_worker`, then ``os._exit`` with its status. The records and the
    temporary files are settled by then; what is skipped is the interpreter's own teardown, seconds of freeing torch's
    modules that would keep a stopped worker (or the end of ``run``) waiting."""
    code = 0
    try:
        _worker(conn, parent, threads)
    except SystemExit as stop:  # raised by _stop_worker
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)


def _worker(conn: Connection, parent: int, threads: int) -> None:
    """The loop of a worker process: runs the jobs that the runner sends over ``conn`` one at a time, answering each
    with ``(True, record)`` or ``(False, repr(error))``, until it receives ``None`` or the connection closes.

    ``SIGINT`` is ignored (a Ctrl-C in a terminal reaches every process of the group; the runner stops its workers
    itself), ``SIGTERM`` stops the worker, and so does the runner's death.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked while the runner started this process: see start_worker
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, _stop_worker)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    torch.set_num_threads(threads)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        config, runs_dir = job
        try:
            answer = (True, run_one(config, runs_dir))
        except Exception as error:  # reported by the runner; the worker goes on with the next run
            answer = (False, repr(error))
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return


@dataclass
class Worker:
    """The runner's handle on one worker process and the job it is running (``None``: idle)."""

    process: BaseProcess
    conn: Connection
    job: RunConfig | None = None


def start_worker(context: BaseContext, threads: int) -> Worker:
    """Starts a worker process. ``SIGINT`` is blocked in this thread meanwhile, so that the new process starts with
    it blocked (until it ignores it) and a Ctrl-C at that moment reaches the runner, late, rather than the worker."""
    conn, child = context.Pipe()
    process = context.Process(target=_worker_process, args=(child, os.getpid(), threads), name="table2-worker")
    block = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if block:  # started on the first spawn otherwise, it would unblock SIGINT (multiprocessing.resource_tracker)
        resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if block else None
    try:
        process.start()
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
    return Worker(process, conn)


def stop_workers(pool: Sequence[Worker], runs_dir: Path, wait: bool) -> None:
    """Ends every worker: idle ones are told to leave when ``wait``, the others stopped with ``SIGTERM`` (the run
    under way is abandoned without a record), then killed if they are still there after
    :data:`STOP_GRACE_SECONDS`. A second Ctrl-C meanwhile is ignored, so that no worker is left behind."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        for worker in pool:
            if wait and worker.job is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            elif worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in pool:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in pool:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            if worker.job is not None:  # a run abandoned: its temporary file, if it was left (see _leave_after)
                for tmp in runs_dir.glob(f".*.{worker.process.pid}.tmp.json"):  # see studies.common.atomic_path
                    with contextlib.suppress(OSError):
                        tmp.unlink()
            worker.conn.close()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
