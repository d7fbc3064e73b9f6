"""Distributed step timings on CPU ranks over gloo (issue 19): run under torchrun, rank 0 prints a table.

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_step.py

* ``fsdp2``: ``optimizer.step()`` of an FSDP2-sharded model (``fully_shard`` per layer), the default engine
  (the native kernel on each rank's local tensors) against ``fused=False`` (the multi-tensor engine through
  DTensor's pointwise rules, the path DTensor groups took before), on the same gradients.
* ``ddp``: one training iteration's ``backward()`` + ``optimizer.step()`` under DDP, with
  ``torchsgd.overlap_with_ddp`` (each bucket updated when its all-reduce completes) against DDP followed by
  ``step()``. The forward pass is not timed.

Medians over ``--repeats`` timed iterations after warm-up; each rank runs ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

import torchsgd


def mlp(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def fsdp2_step(width: int, depth: int, repeats: int, flags: dict) -> float:
    from torch.distributed.fsdp import fully_shard

    model = mlp(width, depth)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    optimizer = torchsgd.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4, **flags)
    x = torch.randn(16, width)
    F.mse_loss(model(x), torch.zeros(16, width)).backward()
    times = []
    for i in range(repeats + 3):  # the same gradients every step: only the step is timed
        torch.distributed.barrier()
        start = time.perf_counter()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    report = optimizer.engine_report()[0]
    assert report["reason"] is None or flags, report
    return median_ms(times)


def ddp_iteration(width: int, depth: int, repeats: int, overlap: bool, bucket_mb: float) -> float:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(mlp(width, depth), bucket_cap_mb=bucket_mb)
    optimizer = torchsgd.SGD(ddp.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    if overlap:
        torchsgd.overlap_with_ddp(ddp, optimizer)
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    times = []
    for i in range(repeats + 3):
        x, y = torch.randn(32, width, generator=generator), torch.randn(32, width, generator=generator)
        loss = F.mse_loss(ddp(x), y)
        torch.distributed.barrier()
        start = time.perf_counter()
        loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
        optimizer.zero_grad()
    return median_ms(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bucket-mb", type=float, default=4.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rows = []
    for width, depth in ((1024, 8), (128, 64)):
        params = depth * (width * width + width)
        kernel = fsdp2_step(width, depth, args.repeats, {})
        foreach = fsdp2_step(width, depth, args.repeats, {"fused": False})
        rows.append(
            (
                f"fsdp2 step, {depth}x Linear({width}) = {params / 1e6:.2f}M params",
                "kernel on local tensors",
                kernel,
                "foreach on DTensor",
                foreach,
            )
        )
    for width, depth in ((1024, 8), (256, 32)):
        params = depth * (width * width + width)
        overlapped = ddp_iteration(width, depth, args.repeats, True, args.bucket_mb)
        plain = ddp_iteration(width, depth, args.repeats, False, args.bucket_mb)
        rows.append(
            (
                f"ddp backward+step, {depth}x Linear({width}) = {params / 1e6:.2f}M params",
                "overlap_with_ddp",
                overlapped,
                "DDP then step()",
                plain,
            )
        )
    if rank == 0:
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(
            f"{world} ranks (gloo), {args.threads} thread(s) each, {os.cpu_count()} CPUs "
            f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {when}; "
            f"median of {args.repeats}, DDP buckets {args.bucket_mb} MB"
        )
        for what, a_name, a, b_name, b in rows:
            print(f"{what}: {a_name} {a:.2f} ms, {b_name} {b:.2f} ms, ratio {b / a:.2f}x")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
