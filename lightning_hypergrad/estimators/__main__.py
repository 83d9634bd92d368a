"""``python -m lightning_hypergrad.estimators``: print the estimator table; ``--readme README.md`` rewrites it there."""

import argparse
from pathlib import Path

from lightning_hypergrad.estimators.registry import estimator_table, replace_table

parser = argparse.ArgumentParser(prog="python -m lightning_hypergrad.estimators", description=__doc__)
parser.add_argument("--readme", type=Path, help="rewrite the table between its markers in this file")
args = parser.parse_args()
if args.readme is None:
    print(estimator_table())
else:
    args.readme.write_text(replace_table(args.readme.read_text(encoding="utf-8")), encoding="utf-8")
