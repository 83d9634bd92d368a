"""``python -m studies.cost.adapter``: what the ``nn.Module`` adapter costs an inner loop.

The paper's linear head (5-way, 288 features: the 3 x 32 backbone's on 28 x 28 images) written two ways, one as
``lh.InnerModel(nn.Linear(...), init="zeros")`` called as a module and one on positional tensors
(``F.linear(h, w[0], w[1])``), with the support and query features fixed (a hyperparameter matrix they pass
through), so that the inner loop and the estimator are all that is timed. One process, one torch thread, the two
forms in alternating order round by round; the median of the rounds after two warm-up rounds, and the ratio
module / flat of those medians. It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import lightning_hypergrad as lh
from studies.common import Progress

WAYS, SUPPORT, QUERY, FEATURES = 5, 50, 50, 288


def problems(steps: int) -> dict[str, lh.BilevelProblem]:
    """The two forms of one task's problem (the same numbers)."""
    g = torch.Generator().manual_seed(0)
    support, query = torch.randn(SUPPORT, FEATURES, generator=g), torch.randn(QUERY, FEATURES, generator=g)
    support_y = torch.arange(WAYS).repeat_interleave(SUPPORT // WAYS)
    query_y = torch.arange(WAYS).repeat_interleave(QUERY // WAYS)
    projection = nn.Parameter(torch.eye(FEATURES))
    inner = lh.InnerModel(nn.Linear(FEATURES, WAYS), init="zeros")

    def features():
        return [support @ projection, query @ projection]

    def make(head, init):
        return lh.BilevelProblem(
            lambda w, h: F.cross_entropy(head(w, h[0]), support_y),
            lambda w, h: F.cross_entropy(head(w, h[1]), query_y),
            [projection],
            init,
            lh.SGD(lr=0.1, momentum=0.9),
            steps,
            features=features,
        )

    flat_init = [torch.zeros(WAYS, FEATURES), torch.zeros(WAYS)]
    return {
        "module": make(inner, inner.init_params([projection])),
        "flat": make(lambda w, x: F.linear(x, w[0], w[1]), flat_init),
    }


def measure(spec: str, steps: int, rounds: int) -> dict[str, float]:
    estimator = lh.get_estimator(spec)
    pair = problems(steps)
    times: dict[str, list[float]] = {"module": [], "flat": []}
    for r in range(rounds + 2):
        for kind in ("module", "flat") if r % 2 == 0 else ("flat", "module"):
            start = time.perf_counter()
            estimator(pair[kind], check=False)
            times[kind].append(time.perf_counter() - start)
    module, flat = (statistics.median(times[k][2:]) for k in ("module", "flat"))
    return {"module_ms": 1e3 * module, "flat_ms": 1e3 * flat, "ratio": module / flat}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m studies.cost.adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--estimators", nargs="+", default=["fo", "t1t2", "greedy(0.99)", "rmd"])
    parser.add_argument("--inner-steps", nargs="+", type=int, default=[10, 50])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per form (default 10)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| T | estimator | flat (ms) | module (ms) | module / flat |")
    print("| ---: | --- | ---: | ---: | ---: |")
    progress = Progress(len(args.inner_steps) * len(args.estimators), work=sum(args.inner_steps) * len(args.estimators))
    for steps in args.inner_steps:
        for spec in args.estimators:
            r = measure(spec, steps, args.rounds)
            print(f"| {steps} | {spec} | {r['flat_ms']:.2f} | {r['module_ms']:.2f} | {r['ratio']:.3f} |", flush=True)
            progress.step(f"{spec} T={steps}: module / flat {r['ratio']:.3f}", steps)


if __name__ == "__main__":
    main()
