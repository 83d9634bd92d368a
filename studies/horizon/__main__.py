"""``python -m studies.horizon {nqm,cnn} [run|report] ...``: the short-horizon-bias study in two parts.

``nqm``: the noisy quadratic model (:mod:`studies.horizon.nqm_study`); ``cnn``: a CNN's per-layer learning rates and
weight decays tuned over its whole training on Omniglot (:mod:`studies.horizon.cnn_study`).

Before any work: an ``--out`` that cannot be written is refused, and a ``run`` holds ``<out>/<part>/.lock`` while it
works (:func:`studies.common.folder_lock`): a second run of the same part on the same ``--out`` would do the same
work and write the same records, and is refused while the first lives. Ctrl-C while the study starts (torch loading)
ends it with one line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path


def _leave_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write(f"stopped by {signal.Signals(signum).name} while starting: nothing was run\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def parser() -> argparse.ArgumentParser:
    from studies.common import StudyParser
    from studies.horizon import cnn_study, nqm_study

    top = StudyParser(prog="python -m studies.horizon", description=__doc__.splitlines()[0])
    parts = top.add_subparsers(dest="part", required=True)
    for name, study, summary in (
        ("nqm", nqm_study, "meta-learned SGD schedules on the noisy quadratic model against the exact optimum"),
        (
            "cnn",
            cnn_study,
            "a CNN's per-layer learning rates and weight decays, tuned over its whole training on Omniglot",
        ),
    ):
        part = parts.add_parser(name, help=summary, description=study.__doc__.splitlines()[0])
        study.add_arguments(part)
        part.set_defaults(
            check=lambda args, study=study, part=part: study.check_arguments(part, args),
            main=study.main,
            error=part.error,
        )
    return top


def main(argv: list[str] | None = None) -> int:
    from studies.common import FolderBusy, folder_lock, unwritable

    top = parser()
    args = top.parse_args(argv)
    reason = unwritable(args.out)
    if reason is not None:
        args.error(f"argument --out: cannot write the results into {args.out}: {reason}; give another --out")
    args.check(args)
    if args.action == "report":
        return args.main(args)
    try:
        with folder_lock(Path(args.out) / args.part):
            return args.main(args)
    except FolderBusy as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    previous = {s: signal.signal(s, _leave_while_starting) for s in (signal.SIGINT, signal.SIGTERM)}
    import studies.common  # noqa: F401 (torch: the long import)
    import studies.horizon.cnn_study  # noqa: F401

    for stop, handler in previous.items():
        signal.signal(stop, handler)
    sys.exit(main())
