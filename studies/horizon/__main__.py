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
    nqm = parts.add_parser(
        "nqm",
        help="meta-learned SGD schedules on the noisy quadratic model against the exact optimum",
        description=nqm_study.__doc__.splitlines()[0],
    )
    nqm_study.add_arguments(nqm)
    nqm.set_defaults(check=lambda args: nqm_study.check_arguments(nqm, args), main=nqm_study.main)
    cnn = parts.add_parser(
        "cnn",
        help="a CNN's per-layer learning rates and weight decays, tuned over its whole training on Omniglot",
        description=cnn_study.__doc__.splitlines()[0],
    )
    cnn_study.add_arguments(cnn)
    cnn.set_defaults(check=lambda args: cnn_study.check_arguments(cnn, args), main=cnn_study.main)
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    args = top.parse_args(argv)
    args.check(args)
    return args.main(args)


if __name__ == "__main__":
    sys.exit(main())
