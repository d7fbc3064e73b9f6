"""`torchsgd bench --device cuda`: step time and step memory on a GPU, against torch's fused and foreach steps.

Everything in one run, on one device: a copy-bandwidth floor (``dst.copy_(src)`` over 64M float32, timed
with CUDA events), then, for each workload, the median step time of torch.optim.SGD(fused=True),
torch.optim.SGD(foreach=True) and torchsgd.SGD with its default engine (the Triton engine where triton is
installed; ``engine_report()`` says which ran, and the table shows it), interleaved round by round; and
what a step adds to ``torch.cuda.max_memory_allocated`` beyond the parameters, gradients and buffers that
exist before it (the step's transient).

Targets (issue 13): one 64M fp32 tensor with momentum at >= 85% of the copy floor; ResNet-50 and GPT-2 shapes
<= 1.0x torch fused; 2,000 tensors of 1,000 <= 0.5x torch foreach; pure bf16 + stochastic rounding <= 0.55x
torch fused fp32; no transient beyond first-step buffers.

``--device cpu`` runs the same code on the CPU (perf_counter timing, no CUDA memory figures): a smoke run,
which is how tests/test_bench_device.py checks this module on machines without a GPU.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import torchsgd
from torchsgd.cli.bench import ResultTable, gpt2_small_shapes, ratio, resnet50_shapes

HYPER: dict[str, Any] = dict(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "one-64M": lambda: [(64 * 1024 * 1024,)],
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "2000x1000": lambda: [(1000,)] * 2000,
}
QUICK_WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "one-1M": lambda: [(1024 * 1024,)],
    "200x1000": lambda: [(1000,)] * 200,
}
# Bytes an SGD-with-momentum step must move per fp32 element: read θ, ∇, b; write θ, b.
STEP_BYTES_PER_ELEMENT = 20


class Timer:
    """Milliseconds of a callable: CUDA events on a GPU (the device's own clock), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)


def copy_bandwidth(device: torch.device, numel: int, rounds: int = 20) -> float:
    """Bytes per second of ``dst.copy_(src)`` (4 read + 4 written per fp32 element), the median of ``rounds``."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    dst.copy_(src)
    timer.sync()
    times = [timer(lambda: dst.copy_(src)) for _ in range(rounds)]
    return 8 * numel / (statistics.median(times) / 1e3)


def make_params(shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=generator).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


SETUPS: dict[str, tuple[str, dict[str, Any], torch.dtype]] = {
    # name: (optimizer, options, parameter dtype)
    "torch fused": ("torch", {"fused": True}, torch.float32),
    "torch foreach": ("torch", {"foreach": True}, torch.float32),
    "torchsgd": ("torchsgd", {}, torch.float32),
    "torchsgd pure bf16 + SR": ("torchsgd", {"stochastic_rounding": True, "seed": 0}, torch.bfloat16),
}


def time_workload(
    shapes: list[tuple[int, ...]], device: torch.device, rounds: int
) -> tuple[dict[str, float], dict[str, int], str]:
    """Median step ms of every setup (interleaved rounds), the step transient of each (CUDA only; -1 on the
    CPU), and the engine torchsgd's default choice ran (with its reason, if it fell back)."""
    timer = Timer(device)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name, (kind, options, dtype) in SETUPS.items():
        params = make_params(shapes, device, dtype)
        make = torch.optim.SGD if kind == "torch" else torchsgd.SGD
        optimizers[name] = make(params, **HYPER, **options)
    transient: dict[str, int] = {}
    for name, opt in optimizers.items():
        opt.step()  # first steps create the buffers (and compile kernels)
        opt.step()
        timer.sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            opt.step()
            timer.sync()
            transient[name] = torch.cuda.max_memory_allocated(device) - before
        else:
            transient[name] = -1
    report = optimizers["torchsgd"].engine_report()[0]  # type: ignore[attr-defined]
    engine = report["ran"] + (f" ({report['reason']})" if report["reason"] else "")
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            samples[name].append(timer(opt.step))
    del optimizers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {name: statistics.median(values) for name, values in samples.items()}, transient, engine


def device_table(device: torch.device, quick: bool, rounds: int) -> tuple[ResultTable, float]:
    """The table of every workload, and the copy bandwidth (bytes/s) measured first."""
    bandwidth = copy_bandwidth(device, (1 if quick else 64) * 1024 * 1024)
    columns = ["workload", "tensors", "elements", *SETUPS, "torchsgd ÷ fused", "torchsgd ÷ foreach"]
    columns += ["bf16+SR ÷ fused fp32", "% of copy floor", "step transient (MB)", "engine"]
    table = ResultTable(
        f"Step time on {device_name(device)} (median ms), SGD momentum 0.9 + Nesterov + wd 1e-4",
        columns,
        note=f"copy floor: {STEP_BYTES_PER_ELEMENT} B/element at the measured dst.copy_(src) bandwidth "
        f"{bandwidth / 1e9:.0f} GB/s; step transient: what the third step added to max_memory_allocated, "
        "torchsgd default fp32 / pure bf16 + SR (no first-step buffers left to create, so 0 is the target).",
    )
    for name, shapes in (QUICK_WORKLOADS if quick else WORKLOADS).items():
        medians, transient, engine = time_workload(shapes(), device, rounds)
        numel = sum(torch.Size(s).numel() for s in shapes())
        floor_ms = 1e3 * STEP_BYTES_PER_ELEMENT * numel / bandwidth
        memory = (
            "n/a (CPU)"
            if transient["torchsgd"] < 0
            else f"{transient['torchsgd'] / 2**20:.1f} / {transient['torchsgd pure bf16 + SR'] / 2**20:.1f}"
        )
        table.rows.append(
            [
                name,
                str(len(shapes())),
                f"{numel / 1e6:.1f}M",
                *(f"{medians[setup]:.3f}" for setup in SETUPS),
                ratio(medians["torchsgd"] / medians["torch fused"]),
                ratio(medians["torchsgd"] / medians["torch foreach"]),
                ratio(medians["torchsgd pure bf16 + SR"] / medians["torch fused"]),
                f"{100 * floor_ms / medians['torchsgd']:.0f}%",
                memory,
                engine,
            ]
        )
    return table, bandwidth


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU (torch {torch.__version__}; a smoke run of the device bench)"


def run(console: Any, device_arg: str, quick: bool, rounds: int, docs: Any = None) -> int:
    """Measure on ``device_arg`` ("cuda", "cuda:N" or "cpu"), print the table, optionally write its docs section."""
    import datetime

    from torchsgd.cli.bench import markdown, print_table, write_docs_section

    device = torch.device(device_arg)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print(
            "torchsgd bench --device cuda: no CUDA device here (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}). Run it on a machine with a GPU and a CUDA build of torch; "
            "`pip install 'torchsgd\\[cuda]'` brings the Triton engine.",  # \\[: not rich markup
            style="red",
        )
        return 2
    if device.type not in ("cuda", "cpu"):
        console.print(f"torchsgd bench --device: cuda or cpu, got {device_arg!r}", style="red")
        return 2
    with console.status(f"timing steps on {device} ..."):
        table, _ = device_table(device, quick, rounds)
    print_table(console, table)
    if docs is not None and device.type == "cuda":
        context = f"{device_name(device)}; {datetime.date.today().isoformat()}; {rounds} interleaved rounds."
        write_docs_section(docs, "cuda", "\n\n".join(["## CUDA", context, markdown(table)]))
        console.print(f"wrote the CUDA table into {docs}")
    return 0
