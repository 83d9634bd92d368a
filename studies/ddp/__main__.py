"""``python -m studies.ddp [--out DIR] [--only scaling|allreduce] [options]``: both DDP measurements.

Writes ``DIR/scaling_width<W>[_broadcast].json`` (:mod:`studies.ddp.scaling`) and ``DIR/allreduce_wait.txt``
(:mod:`studies.ddp.allreduce_wait`); ``--only`` runs one of them. Before any work: an ``--out`` (or ``--json``) that
cannot be written is refused, and the run holds ``DIR/.lock`` while it measures (:func:`studies.common.run_alone`):
a second run on the same ``--out`` is refused while the first lives.
"""

from collections.abc import Sequence
from pathlib import Path

from studies.common import StudyParser, run_alone, writable_folder
from studies.ddp import allreduce_wait, scaling


def main(argv: Sequence[str] | None = None) -> None:
    parser = StudyParser(prog="python -m studies.ddp", description=__doc__)
    parser.add_argument(
        "--out", type=writable_folder, default="studies/ddp/results", help="output folder (default studies/ddp/results)"
    )
    parser.add_argument("--only", choices=("scaling", "allreduce"), default=None, help="run one measurement only")
    scaling.add_arguments(parser)
    allreduce_wait.add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("meta_batch", "steps", "rounds", "width", "inner_steps", "numel", "repeats", "allreduce_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    with run_alone(args.out):  # a second run on the same --out would measure the same
        if args.only in (None, "scaling"):
            scaling.run(args, Path(args.out))
        if args.only in (None, "allreduce"):
            allreduce_wait.run(args, Path(args.out))


if __name__ == "__main__":  # spawned processes import this module again under another name
    main()
