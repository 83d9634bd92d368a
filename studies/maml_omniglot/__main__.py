"""``python -m studies.maml_omniglot {run,timing,report} ...``: learn2learn's MAML row on Omniglot, reproduced."""

from __future__ import annotations

import argparse
import sys

from studies.common import StudyParser
from studies.maml_omniglot import report, runner, timing
from studies.maml_omniglot.experiment import StudyError


def parser() -> argparse.ArgumentParser:
    top = StudyParser(prog="python -m studies.maml_omniglot", description=__doc__.splitlines()[0])
    actions = top.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="the resumable training run, then the test (record.json)")
    runner.add_arguments(run)
    run.set_defaults(check=runner.check_arguments, main=runner.run, sub=run)
    time = actions.add_parser("timing", help="seconds per iteration beside learn2learn's loop (timing.json)")
    timing.add_arguments(time)
    time.set_defaults(check=timing.check_arguments, main=timing.timing, sub=time)
    page = actions.add_parser("report", help="the results page and the curve from the records")
    report.add_arguments(page)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    if args.action == "report":
        print(report.write_report(args.out))
        return 0
    setting = args.check(args.sub, args)
    try:
        return args.main(args, setting)
    except StudyError as error:
        print(f"{top.prog} {args.action}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
