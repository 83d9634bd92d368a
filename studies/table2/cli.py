"""The command line of ``python -m studies.table2 {run,report}``: its parser (the runner's :func:`main
<studies.table2.runner.main>` runs what it parses)."""

from __future__ import annotations

import argparse

from lightning_hypergrad.estimators import Greedy
from studies.common import StudyParser, estimator_spec, writable_folder
from studies.table2.settings import DATASETS, GREEDY_GAMMAS, METHODS_HELP, PAPER_WAYS


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m studies.table2`` parser with its ``run`` and ``report`` subcommands."""
    parser = StudyParser(
        prog="python -m studies.table2",
        description="Reproduce Table 2 of the paper (few-shot classification with FO, T1-T2, IFT and Greedy).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{run,report}")
    run = commands.add_parser(
        "run",
        help="train and evaluate every setting x method x seed (resumable), then write the report",
        description=(
            "Train a FewShotClassifier per (ways, method, seed) with the paper's settings, read from --config "
            "(configs/paper/<dataset>.yaml: inner SGD lr 0.1 momentum 0.9, T=10; outer Adam lr 1e-3; 3x32 conv "
            "backbone; 200 outer steps, meta-batch 10, 10-shot, 10 queries, 500 evaluation tasks); the flags below "
            "override them. Each run is evaluated on --eval-tasks meta-validation and meta-test tasks and written at "
            "once to OUT/runs/<dataset>-<ways>way-<method>-seed<k>.json; runs with a record are skipped, so "
            "rerunning the same command resumes an interrupted run. Runs are ordered seed-major. " + METHODS_HELP + "."
        ),
    )
    run.add_argument("--dataset", choices=DATASETS, default="omniglot", help="the dataset (default: omniglot)")
    run.add_argument(
        "--config",
        default=None,
        help="the config holding the paper's settings (default: configs/paper/<dataset>.yaml; digits: omniglot's)",
    )
    run.add_argument(
        "--root",
        default=None,
        help="data folder, stored in the records as given (default: the config's; omniglot: $OMNIGLOT_ROOT first; "
        "digits reads none)",
    )
    run.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. N-1 (default: 5)")
    run.add_argument("--ways", type=int, nargs="+", default=list(PAPER_WAYS), help="settings (default: 3 4 5)")
    run.add_argument(
        "--methods",
        type=estimator_spec,
        nargs="+",
        default=None,
        metavar="SPEC",
        help="estimator specs (default: the baselines of configs/estimators/{fo,t1t2,neumann}.yaml, then "
        + " ".join(str(Greedy(g)) for g in GREEDY_GAMMAS)
        + "); quote specs with spaces",
    )
    run.add_argument("--shots", type=int, default=None, help="support examples per class (default: the config's)")
    run.add_argument(
        "--queries",
        type=int,
        default=None,
        help="query examples per class (default: --shots if given, else the config's)",
    )
    run.add_argument("--steps", type=int, default=None, help="outer steps (default: the config's trainer.max_steps)")
    run.add_argument("--meta-batch", type=int, default=None, help="tasks per outer step (default: the config's)")
    run.add_argument(
        "--eval-tasks", type=int, default=None, help="meta-validation and meta-test tasks each (default: the config's)"
    )
    run.add_argument(
        "--workers", type=int, default=1, help="parallel worker processes (default: 1, which runs in this process)"
    )
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker (default: 1)")
    run.add_argument(
        "--out", type=writable_folder, default=None, help="output folder (default: studies/table2/results/<dataset>)"
    )
    rep = commands.add_parser(
        "report",
        help="write OUT/table2.md, table2.csv and table2.png from the records in OUT/runs",
        description=(
            "Summarize the records of OUT/runs: Greedy's gamma is chosen per setting by the best mean "
            "meta-validation accuracy; (a) the paper's protocol reports meta-validation accuracy, (b) the clean "
            "protocol meta-test accuracy. Cells are mean ± 1.96·std/√n over seeds."
        ),
    )
    rep.add_argument(
        "--out",
        type=writable_folder,
        required=True,
        help="the folder given to `run --out` (e.g. studies/table2/results/omniglot)",
    )
    return parser
