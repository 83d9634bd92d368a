"""``python -m studies.horizon nqm [run|report] ...``: see :mod:`studies.horizon.nqm_study`.

One subcommand per part of the study: ``nqm`` (the noisy quadratic model); a network part would be a second one.
"""

from __future__ import annotations

import argparse
import sys

from studies.horizon import nqm_study


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m studies.horizon", description=__doc__.splitlines()[0])
    parts = top.add_subparsers(dest="part", required=True)
    nqm = parts.add_parser(
        "nqm",
        help="meta-learned SGD schedules on the noisy quadratic model against the exact optimum",
        description=nqm_study.__doc__.splitlines()[0],
    )
    nqm_study.add_arguments(nqm)
    nqm.set_defaults(check=lambda args: nqm_study.check_arguments(nqm, args), main=nqm_study.main)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    args.check(args)
    return args.main(args)


if __name__ == "__main__":
    sys.exit(main())
