"""``python -m studies.cost [--out DIR] [options of studies.cost.estimators]``: measure, then plot.

Writes the records to ``DIR/estimators_<device>.json`` (or ``--json PATH``), then ``DIR/cost.md``,
``DIR/memory_vs_T.png`` and ``DIR/time_vs_T.png`` from them (:mod:`studies.cost.plot`). Every other option goes
to :mod:`studies.cost.estimators` (``--quick``, ``--problems``, ``--estimators``, ``--inner-steps`` ...).
"""

import argparse
from pathlib import Path

import torch

from studies.cost import estimators, plot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m studies.cost", add_help=False)
    parser.add_argument("--out", default="studies/cost/results", help="output folder (default studies/cost/results)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default=None)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
    device = known.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = Path(known.json or Path(known.out) / f"estimators_{device}.json")
    estimators.main([*rest, "--device", device, "--json", str(records)])
    plot.main(["--input", str(records), "--out", known.out])


if __name__ == "__main__":
    main()
