"""`torchsgd bench --memory`: peak memory of training a ~100M-parameter model, one process per setup.

Each setup runs in a fresh Python process (so no allocation of one run can hide in another's peak) that
builds the same MLP (24 × Linear(2048, 2048), 100.7M parameters), trains a few steps on a small batch (so
that parameters, gradients and optimizer state dominate), and reports two figures read from the kernel
(the process's peak resident memory, VmHWM, and the peak after the baseline, less that baseline: the
resident memory just before the model is built, the interpreter and libtorch, which no optimizer can
shrink), and a third: what the optimizer's constructor added.

Peaks are read from /proc/self/status (VmHWM), not ``getrusage``: Linux keeps ``ru_maxrss`` across exec, so
a child of a large process (pytest after a few hundred tests) starts with its parent's peak.

torch.optim.SGD's constructor imports torch._dynamo and sympy (torch.optim.Optimizer's methods are wrapped in
``torch._disable_dynamo``): about 70 MB that torchsgd's optimizers do not import unless something compiles
(optim/base.py). That import is part of torch's figures here, as it is of any program that uses
torch.optim.SGD, and is reported on its own ("optimizer import").
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torchsgd.cli.bench import ResultTable

# STEPS: step_in_backward's peak settles after about four steps (each backward leaves a gradient-sized heap
# hole or two behind, until the holes are reused): measure after it has.
WIDTH, DEPTH, BATCH, STEPS = 2048, 24, 8, 6


@dataclass(frozen=True)
class Setup:
    name: str
    param_dtype: str  # "float32" or "bfloat16"
    optimizer: str  # "torch" or "torchsgd"
    options: dict
    table: str = "default"  # which table: each compares its setups with its first (a torch.optim.SGD run)


SETUPS = [
    Setup("torch.optim.SGD, fp32", "float32", "torch", {}),
    Setup("torchsgd.SGD, fp32", "float32", "torchsgd", {}),
    Setup("torchsgd step_in_backward, fp32", "float32", "torchsgd", {"step_in_backward": True}),
    Setup("  + bf16 momentum", "float32", "torchsgd", {"step_in_backward": True, "momentum_dtype": "bfloat16"}),
    Setup(
        "  + pure bf16 params, stochastic rounding",
        "bfloat16",
        "torchsgd",
        {"step_in_backward": True, "momentum_dtype": "bfloat16", "stochastic_rounding": True},
    ),
    Setup("  + int8 momentum", "float32", "torchsgd", {"step_in_backward": True, "momentum_dtype": "int8"}),
    Setup(
        "  + pure bf16 params, stochastic rounding, int8 momentum",
        "bfloat16",
        "torchsgd",
        {"step_in_backward": True, "momentum_dtype": "int8", "stochastic_rounding": True},
    ),
    # foreach=True: the engine CUDA groups run where the Triton engine is not installed (issue 13's targets:
    # pure bf16 + SR adds at most 0.40x, bf16 momentum 0.50x of what torch's foreach step adds).
    Setup("torch.optim.SGD(foreach=True), fp32", "float32", "torch", {"foreach": True}, "foreach"),
    Setup("torchsgd foreach=True, fp32", "float32", "torchsgd", {"foreach": True}, "foreach"),
    Setup("  + bf16 momentum", "float32", "torchsgd", {"foreach": True, "momentum_dtype": "bfloat16"}, "foreach"),
    Setup(
        "  + pure bf16 params, stochastic rounding",
        "bfloat16",
        "torchsgd",
        {"foreach": True, "stochastic_rounding": True},
        "foreach",
    ),
]
TABLES = {
    "default": "default engines",
    "foreach": "foreach=True (what CUDA groups run without the Triton engine)",
}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM, since its exec or the last ``reset_peak_rss()``.

    Where /proc is missing, ``getrusage``'s ``ru_maxrss`` (which Linux keeps across exec, so it may include
    the parent's peak; KiB on Linux, bytes on macOS).
    """
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Start the peak over at the resident size now (Linux, /proc/self/clear_refs); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _rss_mb() -> float:
    return rss_bytes() / 2**20


def child(setup_index: int) -> None:
    """Run one setup in this process and print its figures as JSON."""
    import torch

    import torchsgd

    torch.manual_seed(0)
    setup = SETUPS[setup_index]
    dtype = getattr(torch, setup.param_dtype)
    x = torch.randn(BATCH, WIDTH, dtype=dtype)
    y = torch.randint(0, WIDTH, (BATCH,))
    torchsgd.engines.build.native_module()  # loaded before the baseline, like libtorch itself
    baseline = _rss_mb()
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH, dtype=dtype), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    options = dict(setup.options)
    if "momentum_dtype" in options:
        options["momentum_dtype"] = getattr(torch, options["momentum_dtype"])
    hyper: dict[str, Any] = dict(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True)
    before_optimizer = _rss_mb()
    opt: torch.optim.Optimizer
    if setup.optimizer == "torch":
        opt = torch.optim.SGD(model.parameters(), **hyper, **options)
    else:
        opt = torchsgd.SGD(model.parameters(), **hyper, **options)
    optimizer_import = _rss_mb() - before_optimizer  # the constructor allocates no state: only imports
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    peak = peak_rss_bytes() / 2**20
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak_mb": peak, "baseline_mb": baseline, "import_mb": optimizer_import, "params": params}))


RUNS = 3  # fresh processes per setup: the median is kept


def measure(runs: int = RUNS) -> list[tuple[Setup, dict]]:
    """Each setup in ``runs`` fresh processes, taken in turn (setup by setup, round after round); per setup
    the run of median peak. (The same code's peak varies by up to 20% between processes: where the heap
    places the gradients and state that backward allocates and frees, glibc's fragmentation.)"""
    samples: list[list[dict]] = [[] for _ in SETUPS]
    for _ in range(runs):
        for index, setup in enumerate(SETUPS):
            out = subprocess.run(
                [sys.executable, "-c", f"from torchsgd.cli.memory import child; child({index})"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"memory run {setup.name!r} failed:\n{out.stderr[-2000:]}")
            samples[index].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = []
    for setup, rows in zip(SETUPS, samples):
        rows = sorted(rows, key=lambda row: row["peak_mb"])
        results.append((setup, {**rows[len(rows) // 2], "runs": len(rows)}))
    return results


def memory_tables(results: list[tuple[Setup, dict]]) -> list[ResultTable]:
    """The figures of ``measure()``, one table per ``Setup.table``."""
    return [
        memory_table([(setup, row) for setup, row in results if setup.table == name], title)
        for name, title in TABLES.items()
        if any(setup.table == name for setup, _ in results)
    ]


def memory_table(results: list[tuple[Setup, dict]], title: str = TABLES["default"]) -> ResultTable:
    """The figures of some setups as one table, ratios against the first (a torch.optim.SGD run)."""
    from torchsgd.cli.bench import ResultTable, ratio  # here, not at the top: the child processes import this module

    torch_row = results[0][1]
    torch_peak = torch_row["peak_mb"]
    torch_training = torch_peak - torch_row["baseline_mb"]
    table = ResultTable(
        f"Peak memory, MLP {DEPTH}×Linear({WIDTH},{WIDTH}) = {torch_row['params'] / 1e6:.1f}M "
        f"params, batch {BATCH}, SGD momentum 0.9 + Nesterov + wd (MB), {title}",
        ["setup", "process peak", "÷ torch", "above baseline", "÷ torch ", "optimizer import"],
        note=f"process peak = VmHWM of a fresh process, the median of {torch_row.get('runs', 1)} per setup; above baseline = that peak minus the resident "
        f"memory after importing torch and loading the kernel (about {torch_row['baseline_mb']:.0f} MB); "
        "optimizer import = resident memory the optimizer's constructor added (torch.optim.SGD imports "
        "torch._dynamo and sympy; torchsgd does not unless something compiles).",
    )
    for setup, row in results:
        training = row["peak_mb"] - row["baseline_mb"]
        table.rows.append(
            [
                setup.name.strip(),
                f"{row['peak_mb']:.0f}",
                ratio(row["peak_mb"] / torch_peak),
                f"{training:.0f}",
                ratio(training / torch_training),
                f"{row['import_mb']:.0f}",
            ]
        )
    return table


def run(console, docs: Path | None = None) -> int:
    """Measure, print the table, and with ``docs`` write it into that file's memory section."""
    import datetime

    from torchsgd.cli.bench import machine_description, markdown, print_table, write_docs_section

    with console.status("measuring peak memory, one process per setup ..."):
        results = measure()
    tables = memory_tables(results)
    for table in tables:
        print_table(console, table)
    if docs is not None:
        context = f"{machine_description()}; {datetime.date.today().isoformat()}; {STEPS} training steps a setup."
        body = ["## Peak memory", context, *(markdown(table) for table in tables)]
        write_docs_section(docs, "memory", "\n\n".join(body))
        console.print(f"wrote the memory table into {docs}")
    return 0
