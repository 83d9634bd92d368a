"""``python -m studies.horizon {nqm,cnn} [run|report] ...``: the short-horizon-bias study in two parts.

``nqm``: the noisy quadratic model (:mod:`studies.horizon.nqm_study`); ``cnn``: a CNN's per-layer learning rates and
weight decays tuned over its whole training on Omniglot (:mod:`studies.horizon.cnn_study`).
"""

from __future__ import annotations

import argparse
import sys

from studies.horizon import cnn_study, nqm_study


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m studies.horizon", description=__doc__.splitlines()[0])
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
        part.set_defaults(check=lambda args, study=study, part=part: study.check_arguments(part, args), main=study.main)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    args.check(args)
    return args.main(args)


if __name__ == "__main__":
    sys.exit(main())
