"""The paper's few-shot model in Lightning: a conv backbone meta-learned with the greedy hypergradient.

python examples/fewshot.py                                   # digits, offline, about a minute on a CPU
python examples/fewshot.py --dataset omniglot --root ../shared/data/omniglot --shots 10 --estimator fo
"""

from __future__ import annotations

import argparse

import lightning as L

import lightning_hypergrad as lh


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="digits, omniglot, cifar100, mini-imagenet, ...")
    parser.add_argument("--root", default=None, help="where the data set lies (not needed for digits)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="outer steps")
    parser.add_argument(
        "--estimator", default="greedy(0.99)", help="an estimator spec: fo, t1t2, greedy(0.99), rmd, neumann(10), ..."
    )
    args = parser.parse_args(argv)

    estimator = lh.get_estimator(args.estimator)
    data = lh.FewShotDataModule(
        dataset=args.dataset, root=args.root, ways=args.ways, shots=args.shots, queries=10,
        meta_batch_size=10, train_batches=args.steps, val_tasks=100,
    )  # fmt: skip
    model = lh.FewShotClassifier(
        estimator=estimator, inner_optimizer=lh.SGD(lr=0.1, momentum=0.9), inner_steps=10, outer_lr=1e-3
    )
    trainer = L.Trainer(
        max_steps=args.steps, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        callbacks=[lh.HypergradCallback(every_n_steps=max(args.steps // 4, 1))],
    )  # fmt: skip
    trainer.fit(model, data)
    metrics = trainer.validate(model, data)[0]
    print(f"{estimator}: meta-validation accuracy {metrics['val/acc']:.3f} +- {metrics['val/acc_ci95']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
