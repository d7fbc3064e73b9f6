"""torchsgd.LARS's step against torchsgd.SGD's (issue 17: LARS ≤ 1.5x SGD), and where LARS's time goes.

    .venv/bin/python benchmarks/lars_step.py                 # ResNet-50 and GPT-2 small shapes, 1 and 2 threads
    .venv/bin/python benchmarks/lars_step.py --rounds 30 --threads 1 --workloads resnet50

fp32, lr 0.01, momentum 0.9, weight decay 1e-4, the shapes of ``torchsgd bench --peers``. Every optimizer
runs on its own copy of the same parameters and is handed the same fresh gradients (clones) before each
timed step; only ``step()`` (or the one kernel call) is timed. The setups run in interleaved rounds, so that
drift on a shared machine hits them alike, and each figure is a median; every ratio is of one run's medians.

Rows, per thread count and workload:

- ``SGD``: torchsgd.SGD's step.
- ``LARS``: torchsgd.LARS's step as it is (the adapted parameters through ``native_extras.lars_step``: per
  tensor, its two norms and then its update while it is in cache).
- ``LARS, two passes``: the same optimizer with ``lars_step`` declining, i.e. the path before it (the
  kernel's norm pass over every tensor, the ratios back in Python, then the fused SGD pass with them).
- ``norm pass``: the kernel's norm pass alone (``lars_trust_ratios`` over the adapted parameters).

``÷ SGD`` is the ratio of the medians; ``paired`` the median of each round's own ratio (the setups of one
round ran back to back, so this one is the less moved by drift); ``spread`` the interquartile range over the
median of the row's samples, a rough noise figure.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import torchsgd
from torchsgd.cli.bench import gpt2_small_shapes, machine_description, resnet50_shapes
from torchsgd.engines import native_extras
from torchsgd.engines.build import native_module

WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
}
OPTIONS: dict[str, Any] = dict(lr=0.01, momentum=0.9, weight_decay=1e-4)
TRUST: dict[str, Any] = dict(weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8, lr=0.01, trust_clip=False)


def time_workload(shapes: list[tuple[int, ...]], rounds: int) -> dict[str, list[float]]:
    """ms samples of each setup, interleaved round by round."""
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) * 1e-3 for shape in shapes]
    kernel = native_module()
    two_pass_step = native_extras.lars_step

    def optimizer(factory: Callable[..., torch.optim.Optimizer]) -> tuple[list[torch.Tensor], Any]:
        params = [t.clone().requires_grad_() for t in initial]
        return params, factory(params, **OPTIONS)

    sgd = optimizer(torchsgd.SGD)
    lars = optimizer(torchsgd.LARS)
    lars_two_pass = optimizer(torchsgd.LARS)
    adapted = [p for p in lars[0] if p.ndim > 1]
    ratios = torch.empty(len(adapted), dtype=torch.float64)

    def fresh(params: list[torch.Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def step(setup: tuple[list[torch.Tensor], Any], two_passes: bool = False) -> float:
        params, opt = setup
        fresh(params)
        if two_passes:
            native_extras.lars_step = lambda *a, **k: None  # type: ignore[assignment]
        try:
            start = time.perf_counter()
            opt.step()
            return 1e3 * (time.perf_counter() - start)
        finally:
            native_extras.lars_step = two_pass_step

    def norm_pass() -> float:
        fresh(lars[0])
        start = time.perf_counter()
        kernel.lars_trust_ratios(adapted, ratios, vector_bytes=32, **TRUST)
        return 1e3 * (time.perf_counter() - start)

    setups: dict[str, Callable[[], float]] = {
        "SGD": lambda: step(sgd),
        "LARS": lambda: step(lars),
        "LARS, two passes": lambda: step(lars_two_pass, two_passes=True),
    }
    if kernel is not None and native_extras.VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability()) == 32:
        setups["norm pass"] = norm_pass
    for run in setups.values():  # the first steps create the state
        run()
        run()
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(rounds):
        for name, run in setups.items():
            samples[name].append(run())
    return samples


def spread(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"of {', '.join(WORKLOADS)}")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    workloads = args.workloads.split(",")
    previous = torch.get_num_threads()
    machine = machine_description().removesuffix(f", {previous} threads")  # the table has its own column
    print(f"{machine}; {datetime.date.today().isoformat()}; {args.rounds} interleaved rounds")
    print(
        "median ms of step() (fp32, momentum 0.9, weight decay 1e-4); ratio: ÷ SGD of the same run; spread: IQR/median"
    )
    print()
    print(f"| threads | workload | {'setup':<16} | {'ms':>8} | {'÷ SGD':>6} | paired | spread |")
    print("|---:|---|---|---:|---:|---:|---:|")
    try:
        for n in threads:
            torch.set_num_threads(n)
            for workload in workloads:
                samples = time_workload(WORKLOADS[workload](), args.rounds)
                gc.collect()
                sgd = statistics.median(samples["SGD"])
                for name, values in samples.items():
                    median = statistics.median(values)
                    paired = statistics.median(v / s for v, s in zip(values, samples["SGD"]))
                    print(
                        f"| {n} | {workload} | {name:<16} | {median:8.2f} | {median / sgd:6.2f} | {paired:6.2f} "
                        f"| {spread(values):6.2f} |",
                        flush=True,
                    )
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    main()
