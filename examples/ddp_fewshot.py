"""Few-shot meta-learning on several processes with Lightning's DDP: the meta-batch is split across them.

    python examples/ddp_fewshot.py --devices 2                   # 2 CPU processes (gloo); on GPUs: --accelerator gpu
    python examples/ddp_fewshot.py --devices 1 --save one.pt     # the same run on one process, for comparison

Each process runs its share of the tasks of every meta-batch and the processes average their hypergradients
before the outer step, so every process ends each step with the hyperparameters a single process would have.
"""

from __future__ import annotations

import argparse
import statistics

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

import lightning_hypergrad as lh
from lightning_hypergrad.callbacks import StepTimer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--estimator", default="greedy(0.99)", help="an estimator spec: greedy(0.99), t1t2, fo, ...")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--width", type=int, default=16, help="channels of the backbone's blocks")
    parser.add_argument("--inner-steps", type=int, default=5, help="T")
    parser.add_argument(
        "--broadcast-buffers", action="store_true", help="let DDP also broadcast the buffers before every forward"
    )
    parser.add_argument("--save", default=None, help="write the final module here (rank r > 0: PATH.rankr)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    estimator = lh.get_estimator(args.estimator)
    model = lh.FewShotClassifier(estimator=estimator, inner_steps=args.inner_steps, width=args.width)
    data = lh.FewShotDataModule(
        "digits", ways=5, shots=5, queries=5, meta_batch_size=args.meta_batch, train_batches=args.steps, val_tasks=1
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        # the module averages batch norm's running statistics with the hypergradients, in the same all-reduce, so
        # DDP's own broadcast of the buffers before every forward is redundant; off, the test of this example checks
        # that the module's averaging alone leaves the processes with equal buffers
        strategy=DDPStrategy(broadcast_buffers=args.broadcast_buffers) if args.devices > 1 else "auto",
        use_distributed_sampler=False,  # the data module splits each meta-batch across the processes itself
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[timer],
    )
    trainer.fit(model, data)
    if trainer.is_global_zero:
        later = timer.durations[1:] or timer.durations
        print(f"processes: {trainer.world_size}, median seconds per step: {statistics.median(later):.4f}")
    if args.save:  # every process writes its own module, so that they can be compared
        path = args.save if trainer.is_global_zero else f"{args.save}.rank{trainer.global_rank}"
        params = [p.detach().cpu() for p in model.parameters()]
        torch.save({"params": params, "buffers": [b.cpu() for b in model.buffers()]}, path)


if __name__ == "__main__":
    main()
