"""Long-run check: train a small model for many steps with torchsgd.SGD and watch for growth.

    .venv/bin/python benchmarks/long_run.py --steps 100000

Trains an MLP on a fixed synthetic dataset with ``torchsgd.SGD`` (default engine; momentum, Nesterov and
weight decay) and reports, at every checkpoint (every 10% of the run by default):

- the process's resident memory (RSS, from /proc/self/statm, or ru_maxrss where /proc is missing);
- the median time of a training step and of ``optimizer.step()`` alone over the window since the last
  checkpoint;
- the number of live Python objects after a full collection (``len(gc.get_objects())``) and, with
  ``--tracemalloc``, the Python memory traced (tracing starts before the first step; this script's own
  bookkeeping is filtered out), with the lines whose traced memory grew most from the first checkpoint
  to the last (a tracemalloc snapshot diff).

The first window includes warm-up (allocator, caches, lazily built state); growth is measured from the
first checkpoint to the last. ``--check`` exits with status 1 when RSS grows by more than
``--max-rss-growth-mib``, live objects by more than ``--max-object-growth``, or the last window's median
step time exceeds the first's by more than ``--max-slowdown``. ``--json`` writes the figures to a file.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import tracemalloc
from typing import Any

import torch

import torchsgd


def rss_mib() -> float:
    """Resident set size of this process now, in MiB."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the peak, in KiB on Linux


def traced_snapshot() -> tracemalloc.Snapshot:
    """Python allocations now, without this script's own bookkeeping (its rows and timings)."""
    return tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, __file__),
            tracemalloc.Filter(False, tracemalloc.__file__),
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100_000, help="training steps (default 100000)")
    parser.add_argument("--checkpoints", type=int, default=10, help="measurements over the run (default 10)")
    parser.add_argument("--engine", choices=["default", "fused", "foreach", "reference"], default="default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier timings)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=64, help="hidden width of the MLP")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if anything grows beyond the limits")
    parser.add_argument("--max-rss-growth-mib", type=float, default=8.0)
    parser.add_argument("--max-object-growth", type=int, default=100)
    parser.add_argument("--max-slowdown", type=float, default=0.25, help="allowed relative step-time increase")
    return parser.parse_args(argv)


ENGINE_FLAGS: dict[str, dict[str, Any]] = {
    "default": {},
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "reference": {"foreach": False},
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, args.width),
        torch.nn.ReLU(),
        torch.nn.Linear(args.width, args.width),
        torch.nn.ReLU(),
        torch.nn.Linear(args.width, 10),
    )
    optimizer = torchsgd.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, **ENGINE_FLAGS[args.engine]
    )
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(args.batch, 32, generator=generator), torch.randint(0, 10, (args.batch,), generator=generator))
        for _ in range(64)
    ]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"torchsgd {torchsgd.__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {args.threads} thread(s)"
    )
    print(
        f"MLP 32-{args.width}-{args.width}-10 ({n_params} parameters), batch {args.batch}, {args.steps} steps, "
        f"engine {args.engine}: SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)"
    )

    every = max(1, args.steps // args.checkpoints)
    if args.tracemalloc:
        tracemalloc.start()
        traced_snapshot().statistics("filename")  # the measurement's own first-use caches (filters, regexes)
    gc.collect()
    len(gc.get_objects())
    rows: list[dict[str, Any]] = []
    first_snapshot: tracemalloc.Snapshot | None = None
    step_times: list[float] = []
    opt_times: list[float] = []
    loss = torch.tensor(0.0)
    started = time.perf_counter()
    header = (
        f"{'step':>8} {'RSS MiB':>9} {'step µs':>9} {'opt.step µs':>11} {'objects':>9} {'traced KiB':>10} {'loss':>8}"
    )
    print(header)
    for step in range(1, args.steps + 1):
        x, y = batches[step % len(batches)]
        t0 = time.perf_counter()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
        if step % every == 0 or step == args.steps:
            traced_kib = None
            gc.collect()
            if args.tracemalloc:
                # Before the object count: only the first snapshot is kept (for the diff at the end), and
                # it is alive at every count from the first checkpoint on.
                snapshot = traced_snapshot()
                traced_kib = round(sum(stat.size for stat in snapshot.statistics("filename")) / 1024, 1)
                if first_snapshot is None:
                    first_snapshot = snapshot
                del snapshot
            gc.collect()
            row = {
                "step": step,
                "rss_mib": round(rss_mib(), 2),
                "median_step_us": round(statistics.median(step_times) * 1e6, 1),
                "median_optimizer_step_us": round(statistics.median(opt_times) * 1e6, 1),
                "objects": len(gc.get_objects()),
                "traced_kib": None,
                "loss": round(loss.item(), 4),
            }
            row["traced_kib"] = traced_kib
            rows.append(row)
            traced = "-" if row["traced_kib"] is None else f"{row['traced_kib']:.1f}"
            print(
                f"{step:>8} {row['rss_mib']:>9.2f} {row['median_step_us']:>9.1f} {row['median_optimizer_step_us']:>11.1f} "
                f"{row['objects']:>9} {traced:>10} {row['loss']:>8.4f}",
                flush=True,
            )
            step_times.clear()
            opt_times.clear()
    elapsed = time.perf_counter() - started
    growth = []
    if args.tracemalloc:
        if first_snapshot is not None:
            growth = traced_snapshot().compare_to(first_snapshot, "lineno")[:5]
        tracemalloc.stop()

    first, last = rows[0], rows[-1]
    summary = {
        "steps": args.steps,
        "seconds": round(elapsed, 1),
        "rss_growth_mib": round(last["rss_mib"] - first["rss_mib"], 2),
        "object_growth": last["objects"] - first["objects"],
        "traced_growth_kib": None if not args.tracemalloc else round(last["traced_kib"] - first["traced_kib"], 1),
        "step_time_ratio_last_to_first": round(last["median_step_us"] / first["median_step_us"], 3),
        "optimizer_step_time_ratio_last_to_first": round(
            last["median_optimizer_step_us"] / first["median_optimizer_step_us"], 3
        ),
        "object_counts": [row["objects"] for row in rows],
        "finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
    }
    print(f"{args.steps} steps in {elapsed:.1f} s ({elapsed / args.steps * 1e6:.0f} µs per step, measurement included)")
    print(
        f"from the first checkpoint to the last: RSS {summary['rss_growth_mib']:+.2f} MiB, "
        f"live objects {summary['object_growth']:+d}, "
        + (f"traced {summary['traced_growth_kib']:+.1f} KiB, " if args.tracemalloc else "")
        + f"median step time x{summary['step_time_ratio_last_to_first']:.3f} "
        f"(optimizer.step x{summary['optimizer_step_time_ratio_last_to_first']:.3f})"
    )
    if growth:
        print("largest changes of traced Python memory, first checkpoint to the end (tracemalloc, by line):")
        for stat in growth:
            print(f"  {stat}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, out, indent=2)

    if args.check:
        problems = []
        if summary["rss_growth_mib"] > args.max_rss_growth_mib:
            problems.append(f"RSS grew by {summary['rss_growth_mib']} MiB")
        if summary["object_growth"] > args.max_object_growth:
            problems.append(f"live objects grew by {summary['object_growth']}")
        if summary["step_time_ratio_last_to_first"] > 1 + args.max_slowdown:
            problems.append(f"the median step time grew x{summary['step_time_ratio_last_to_first']}")
        if not summary["finite"]:
            problems.append("the parameters are no longer finite")
        if problems:
            print("FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        print("no growth beyond the limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
