"""Seconds per training step of ``FewShotClassifier`` through Lightning, for several estimators side by side.

    python benchmarks/lightning_step.py                                  # Omniglot if found, else digits
    python benchmarks/lightning_step.py --dataset digits --estimators fo greedy t1t2 rmd

Each estimator trains a fresh model (same seed) for ``--steps`` steps, in ``--rounds`` interleaved rounds
(FO, Greedy, ..., FO, Greedy, ...), so that a busy phase of a shared machine hits them alike. The time of each
training step is taken from Lightning's batch hooks (data loading excluded) and the median over all rounds is
reported, with its ratio to FO's. The paper's setting: 5-way 10-shot, meta-batch 10, T = 10, inner SGD 0.1 with
momentum 0.9, a 3 x 32 conv backbone.
"""

from __future__ import annotations

import argparse
import os
import statistics

import lightning as L
import torch

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks import StepTimer

DEFAULT_OMNIGLOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot")


def build(name: str) -> lh.HypergradEstimator:
    return lh.Greedy(0.99) if name == "greedy" else lh.get_estimator(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="omniglot (default when found) or digits")
    parser.add_argument("--root", default=os.environ.get("OMNIGLOT_ROOT", DEFAULT_OMNIGLOT))
    parser.add_argument("--estimators", nargs="+", default=["fo", "t1t2", "greedy"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = args.dataset or (
        "omniglot" if os.path.exists(os.path.join(args.root, "images_background.npz")) else "digits"
    )
    shots = 10 if dataset != "digits" else 5
    data = lh.FewShotDataModule(
        dataset=dataset, root=args.root if dataset == "omniglot" else None, ways=5, shots=shots, queries=shots,
        meta_batch_size=10, train_batches=args.steps + 1, val_tasks=1,
    )  # fmt: skip
    data.setup("fit")
    times: dict[str, list[float]] = {name: [] for name in args.estimators}
    for _ in range(args.rounds):
        for name in args.estimators:
            torch.manual_seed(0)
            model = lh.FewShotClassifier(estimator=build(name), inner_steps=10)
            timer = StepTimer()
            trainer = L.Trainer(
                max_steps=args.steps + 1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, callbacks=[timer], accelerator="cpu",
            )  # fmt: skip
            trainer.fit(model, data)
            times[name] += timer.durations[1:]  # the first step warms up
    fo = statistics.median(times["fo"]) if "fo" in times else None
    print(f"\n{dataset}, 5-way {shots}-shot, meta-batch 10, T = 10; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} x {args.steps} steps\n")  # fmt: skip
    print("| estimator | s/step | ratio to FO |\n|---|---:|---:|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.4f} | {median / fo:.2f} |" if fo else f"| {name} | {median:.4f} | |")


if __name__ == "__main__":
    main()
