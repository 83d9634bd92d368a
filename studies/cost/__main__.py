"""``python -m studies.cost [--out DIR] [options of studies.cost.estimators]``: measure, then plot.

Writes the records to ``DIR/estimators_<device>.json`` (or ``--json PATH``), then ``DIR/cost.md``,
``DIR/memory_vs_T.png`` and ``DIR/time_vs_T.png`` from them (:mod:`studies.cost.plot`). Every other option goes
to :mod:`studies.cost.estimators` (``--quick``, ``--problems``, ``--estimators``, ``--inner-steps`` ...).

Before any work: an ``--out`` (or ``--json``) that cannot be written is refused, and the run holds ``DIR/.cost.lock``
while it works (:func:`studies.common.run_alone`): a second run on the same ``--out`` is refused while the first lives.
"""

from pathlib import Path

import torch

from studies.common import StudyParser, run_alone, writable_file, writable_folder
from studies.cost import estimators, plot

LOCK = ".cost.lock"


def main(argv: list[str] | None = None) -> None:
    parser = StudyParser(prog="python -m studies.cost", add_help=False)
    parser.add_argument(
        "--out", type=writable_folder, default="studies/cost/results", help="output folder (studies/cost/results)"
    )
    parser.add_argument("--json", type=writable_file, default=None)
    parser.add_argument("--device", default=None)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(__doc__)
        estimators.parse_args(["--help"])  # its options, then exit 0
    device = known.device or ("cuda" if torch.cuda.is_available() else "cpu")
    records = Path(known.json or Path(known.out) / f"estimators_{device}.json")
    with run_alone(known.out, LOCK):
        estimators.main([*rest, "--device", device, "--json", str(records)])
        plot.main(["--input", str(records), "--out", known.out])


if __name__ == "__main__":
    main()
