"""`torchsgd bench`: optimizer step time against torch, measured in the same run, with the memory floor.

Every figure is a median over interleaved rounds (torch loop, torch foreach, torch fused, torchsgd, then
again), so drift on a shared machine hits all implementations alike. Ratios are torchsgd / torch.
With ``--write-docs PATH`` the tables also go to PATH (docs/benchmarks.md in ``make bench``), each command
into its own marked section, and the step bench rewrites the README's one table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import torchsgd

# ---------------------------------------------------------------------------------------- parameter sets


def tiny_mlp_shapes() -> list[tuple[int, ...]]:
    dims = [64, 256, 256, 8]
    return [s for a, b in itertools.pairwise(dims) for s in ((b, a), (b,))]


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (built here without torchvision)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out_ch = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return [*shapes, (1000, 2048), (1000,)]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small (124.4M parameters, tied output embedding)."""
    d, vocab, ctx = 768, 50257, 1024
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [*shapes, (d,), (d,)]


PARAMETER_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "tiny-mlp": tiny_mlp_shapes,
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "2000x1000": lambda: [(1000,)] * 2000,
    "one-64M": lambda: [(64 * 1024 * 1024,)],
}
QUICK_SETS = {"tiny-mlp": tiny_mlp_shapes, "500x1000": lambda: [(1000,)] * 500, "one-4M": lambda: [(4 * 1024 * 1024,)]}

CONFIGS = {
    "momentum+wd+nesterov": dict(lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=True),
    "plain": dict(lr=0.01),
}

IMPLEMENTATIONS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "torch loop": lambda params, **kw: torch.optim.SGD(params, foreach=False, **kw),
    "torch foreach": lambda params, **kw: torch.optim.SGD(params, foreach=True, **kw),
    "torch fused": lambda params, **kw: torch.optim.SGD(params, fused=True, **kw),
    "torchsgd": lambda params, **kw: torchsgd.SGD(params, **kw),
}

# --------------------------------------------------------------------------------------------- timing


def interleaved_samples(
    steps: Mapping[str, Callable[[], object]], budget_s: float, min_rounds: int, max_rounds: int = 200
) -> dict[str, list[float]]:
    """Seconds of each call of each callable, timed in interleaved rounds (so drift hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < deadline and rounds < max_rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
    return samples


def interleaved_medians(
    steps: Mapping[str, Callable[[], object]], budget_s: float, min_rounds: int, max_rounds: int = 200
) -> dict[str, float]:
    """Median milliseconds of each callable, timed in interleaved rounds."""
    samples = interleaved_samples(steps, budget_s, min_rounds, max_rounds)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


def measure_bandwidth(numel: int = 32 * 1024 * 1024, rounds: int = 7) -> float:
    """Bytes per second of ``a.add_(b)`` on large fp32 tensors (reads 8, writes 4 bytes per element)."""
    a, b = torch.ones(numel), torch.ones(numel)
    a.add_(b)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        a.add_(b)
        times.append(time.perf_counter() - start)
    return 12 * numel / statistics.median(times)


@dataclass
class Row:
    workload: str
    config: str
    tensors: int
    numel: int
    median_ms: dict[str, float]


def time_step_sets(
    shapes: list[tuple[int, ...]], config: dict, implementations: list[str], budget_s: float, min_rounds: int
) -> dict[str, float]:
    """Median step time (ms) of each implementation on the same parameters, interleaved round by round."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizers = {name: IMPLEMENTATIONS[name](params, **config) for name in implementations}
    for opt in optimizers.values():  # first steps allocate momentum buffers (and compile kernels)
        opt.step()
        opt.step()
    medians = interleaved_medians({name: opt.step for name, opt in optimizers.items()}, budget_s, min_rounds)
    del optimizers, params
    gc.collect()
    return medians


PRECISION_SETUPS = {
    "torch fused, fp32": (torch.float32, lambda p, **kw: torch.optim.SGD(p, fused=True, **kw)),
    "torchsgd, fp32": (torch.float32, lambda p, **kw: torchsgd.SGD(p, **kw)),
    "torchsgd, bf16 momentum": (torch.float32, lambda p, **kw: torchsgd.SGD(p, momentum_dtype=torch.bfloat16, **kw)),
    "torchsgd, pure bf16 + SR": (
        torch.bfloat16,
        lambda p, **kw: torchsgd.SGD(p, momentum_dtype=torch.bfloat16, stochastic_rounding=True, **kw),
    ),
    "torchsgd, int8 momentum": (torch.float32, lambda p, **kw: torchsgd.SGD(p, momentum_dtype=torch.int8, **kw)),
    "torchsgd, pure bf16 + SR, int8 momentum": (
        torch.bfloat16,
        lambda p, **kw: torchsgd.SGD(p, momentum_dtype=torch.int8, stochastic_rounding=True, **kw),
    ),
}


# On a virtual machine a large tensor's step time depends on the memory it landed on, and that depends on the
# process's allocation history: on this project's machine two identical pure-bf16 setups built one after the
# other stepped in 9.4 and 15.2 ms, and the slowness followed the tensors when they were swapped between the
# two optimizers. So no setup may be favoured by the order in which they are built: the setups are built
# PRECISION_SETUPS times, each time starting with another one, every tensor made directly in its dtype (no
# temporaries freed in between), and the samples of all passes are pooled.
def time_precision(numel: int, budget_s: float, min_rounds: int) -> dict[str, float]:
    """Median step time of the low-precision setups on one tensor, interleaved, over rotated allocations."""
    config = CONFIGS["momentum+wd+nesterov"]
    generator = torch.Generator().manual_seed(0)
    names = list(PRECISION_SETUPS)
    pooled: dict[str, list[float]] = {name: [] for name in names}
    for first in range(len(names)):
        optimizers = {}
        for name in names[first:] + names[:first]:
            dtype, make = PRECISION_SETUPS[name]
            p = torch.randn(numel, generator=generator, dtype=dtype).requires_grad_()
            p.grad = torch.randn(numel, generator=generator, dtype=dtype).mul_(1e-3)
            optimizers[name] = make([p], **config)
            optimizers[name].step()
        samples = interleaved_samples(
            {name: optimizers[name].step for name in names}, budget_s / 2, max(1, min_rounds // 2)
        )
        for name, values in samples.items():
            pooled[name] += values
        del optimizers, p
        gc.collect()
    return {name: 1e3 * statistics.median(values) for name, values in pooled.items()}


HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def time_half(numel: int, budget_s: float, min_rounds: int) -> dict[str, dict[str, float]]:
    """Median step time of torch's three engines and torchsgd's default on bf16 and fp16 parameters with no
    option (the numbers of torch's loop: the default engine's per-operation rounding), one tensor."""
    config = CONFIGS["momentum+wd+nesterov"]
    generator = torch.Generator().manual_seed(0)
    results = {}
    for label, dtype in HALF_DTYPES.items():
        optimizers = {}
        for name, make in IMPLEMENTATIONS.items():
            p = torch.randn(numel, generator=generator).to(dtype).requires_grad_()
            p.grad = (torch.randn(numel, generator=generator) * 1e-3).to(dtype)
            optimizers[name] = make([p], **config)
            optimizers[name].step()
        results[label] = interleaved_medians({n: o.step for n, o in optimizers.items()}, budget_s, min_rounds)
        del optimizers
        gc.collect()
    return results


def _clip_then_fused(params: Any, **kw: Any) -> torch.optim.Optimizer:
    """torch's way of clipping: clip_grad_norm_ before its fused step."""
    opt = torch.optim.SGD(params, fused=True, **kw)
    step = opt.step

    def clipped_step(closure: Any = None) -> Any:
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
        return step(closure)

    opt.step = clipped_step  # type: ignore[method-assign]  # on purpose: the bench times opt.step
    return opt


OPTION_SETUPS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "torch fused": lambda p, **kw: torch.optim.SGD(p, fused=True, **kw),
    "torch clip_grad_norm_ + fused": _clip_then_fused,
    "torchsgd": lambda p, **kw: torchsgd.SGD(p, **kw),
    "torchsgd skip_nonfinite": lambda p, **kw: torchsgd.SGD(p, skip_nonfinite=True, **kw),
    "torchsgd max_grad_norm": lambda p, **kw: torchsgd.SGD(p, max_grad_norm=1.0, **kw),
    "torchsgd max_grad_norm + skip_nonfinite": lambda p, **kw: torchsgd.SGD(
        p, max_grad_norm=1.0, skip_nonfinite=True, **kw
    ),
}


def time_options(shapes: list[tuple[int, ...]], budget_s: float, min_rounds: int) -> dict[str, float]:
    """Median step time with the in-step options, each on its own copy of the parameters, interleaved."""
    config = CONFIGS["momentum+wd+nesterov"]
    optimizers = {}
    for name, make in OPTION_SETUPS.items():
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        optimizers[name] = make(params, **config)
        optimizers[name].step()
    return interleaved_medians({name: opt.step for name, opt in optimizers.items()}, budget_s, min_rounds)


TRAINING_SETUPS = {
    **IMPLEMENTATIONS,
    "torchsgd step_in_backward": lambda params, **kw: torchsgd.SGD(params, step_in_backward=True, **kw),
}


def time_training_step(implementations: list[str], budget_s: float, min_rounds: int) -> dict[str, float]:
    """Median time of a whole training step (forward, backward, step) of a small MLP, batch 64."""
    models, optimizers = {}, {}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=generator)
    y = torch.randint(0, 10, (64,), generator=generator)
    for name in implementations:
        torch.manual_seed(0)
        models[name] = torch.nn.Sequential(
            torch.nn.Linear(512, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 10),
        )
        optimizers[name] = TRAINING_SETUPS[name](models[name].parameters(), **CONFIGS["momentum+wd+nesterov"])

    def train_step(name: str) -> None:
        optimizers[name].zero_grad()
        torch.nn.functional.cross_entropy(models[name](x), y).backward()
        optimizers[name].step()

    for name in implementations:
        train_step(name)
        train_step(name)
    steps = {name: functools.partial(train_step, name) for name in implementations}
    return interleaved_medians(steps, budget_s, min_rounds, max_rounds=300)


# ------------------------------------------------------------------------ tables: the console and the docs


@dataclass
class ResultTable:
    """One table of figures, formatted once: printed by rich, and written as Markdown with --write-docs."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    names: int = 1  # how many leading columns hold names (left-aligned); the others hold figures
    note: str = ""


def ms(value: float) -> str:
    """Milliseconds to three significant digits, trailing zeros kept: 330, 44.0, 7.52, 0.0380."""
    for least, decimals in ((99.95, 0), (9.995, 1), (0.9995, 2)):
        if value >= least:
            return f"{value:.{decimals}f}"
    return f"{value:#.3g}"


def ratio(value: float) -> str:
    return f"{value:.2f}"


def print_table(console, table: ResultTable) -> None:
    from rich.table import Table

    shown = Table(title=table.title)
    for index, column in enumerate(table.columns):
        shown.add_column(column, justify="left" if index < table.names else "right")
    for row in table.rows:
        shown.add_row(*row)
    console.print(shown)
    if table.note:
        console.print(table.note)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]], names: int = 1) -> str:
    """A Markdown table, the first ``names`` columns left-aligned and the figures right-aligned."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    rule = "|" + "|".join("---" if index < names else "---:" for index in range(len(columns))) + "|"
    return "\n".join([line(columns), rule, *(line(row) for row in rows)])


def markdown(table: ResultTable) -> str:
    parts = [f"### {table.title}", markdown_table(table.columns, table.rows, table.names)]
    return "\n\n".join(parts + ([table.note] if table.note else []))


def machine_description() -> str:
    """The CPU model (from /proc/cpuinfo), cores, torch's version and threads: what a figure was measured on."""
    import platform

    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    if "avx512f" in flags.split():
        model += " with AVX-512"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# The generated benchmarks file: each command owns the text between its section's markers and replaces only
# that, so `torchsgd bench` then `torchsgd bench --memory` give the whole file, in either order.
DOCS_HEADER = "<!-- written by make bench (torchsgd bench --write-docs); do not edit by hand -->"
SECTION_COMMANDS = {
    "step": "torchsgd bench --write-docs docs/benchmarks.md",
    "memory": "torchsgd bench --memory --write-docs docs/benchmarks.md",
    "cuda": "torchsgd bench --device cuda --write-docs docs/benchmarks.md",
    "peers": "torchsgd bench --peers --write-docs docs/benchmarks.md",
}
DOCS_INTRODUCTION = """# Benchmarks

The tables of the last `make bench` (`torchsgd bench` and `torchsgd bench --memory`, each with
`--write-docs docs/benchmarks.md`), each section with the machine and the date it was measured on. Ratios
are torchsgd ÷ torch measured in the same run. What the figures measure and how to read them:
[performance.md](performance.md)."""


def markers(section: str) -> tuple[str, str]:
    return f"<!-- bench:{section}:start -->", f"<!-- bench:{section}:end -->"


def replace_section(text: str, section: str, body: str) -> str | None:
    """``text`` with what lies between ``section``'s markers replaced by ``body``; None when a marker is missing."""
    start, end = markers(section)
    head, found_start, rest = text.partition(start)
    _, found_end, tail = rest.partition(end)
    if not (found_start and found_end):
        return None
    return f"{head}{start}\n{body.strip()}\n{end}{tail}"


def write_docs_section(path: Path, section: str, body: str) -> None:
    """Replace ``section`` of the generated benchmarks file, creating the file with every section if missing."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not text.strip():
        empty = (
            f"{markers(name)[0]}\n(not measured yet: `{command}`)\n{markers(name)[1]}"
            for name, command in SECTION_COMMANDS.items()
        )
        text = "\n\n".join([DOCS_HEADER + "\n" + DOCS_INTRODUCTION, *empty]) + "\n"
    updated = replace_section(text, section, body)
    if updated is None:  # a file from before this section existed: the section goes at the end
        start, end = markers(section)
        updated = f"{text.rstrip()}\n\n{start}\n{body.strip()}\n{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated, encoding="utf-8")


# Names for the README's table (the detailed tables use the --sets names).
WORKLOADS = {
    "tiny-mlp": "tiny MLP 64-256-256-8",
    "resnet50": "ResNet-50 shapes",
    "gpt2-small": "GPT-2 small shapes",
    "2000x1000": "2000 tensors × 1000",
    "one-64M": "one tensor of 64M",
    "500x1000": "500 tensors × 1000",
    "one-4M": "one tensor of 4M",
}


def readme_section(rows: Sequence[Row], machine: str, date: str) -> str:
    """The README's one table: torch's fused step and torchsgd's, per workload and config."""
    table = markdown_table(
        ["workload", "torch fused ms", "torchsgd ms", "ratio"],
        [
            [
                f"{WORKLOADS.get(row.workload, row.workload)}, {row.config}",
                ms(row.median_ms["torch fused"]),
                ms(row.median_ms["torchsgd"]),
                ratio(row.median_ms["torchsgd"] / row.median_ms["torch fused"]),
            ]
            for row in rows
        ],
    )
    return (
        f"fp32 step time (median ms; ratio = torchsgd ÷ torch's fused step, measured in the same run) on {machine},"
        f" {date}. Every table: [docs/benchmarks.md](docs/benchmarks.md).\n\n{table}"
    )


def write_readme_section(path: Path, body: str) -> bool:
    """Replace the README's benchmark table between its markers; False (nothing written) without them."""
    updated = replace_section(path.read_text(encoding="utf-8"), "readme", body) if path.exists() else None
    if updated is not None:
        path.write_text(updated, encoding="utf-8")
    return updated is not None


# -------------------------------------------------------------------------------------------- command


FLOOR_NOTE = (
    "floor = bytes moved per step at the measured bandwidth: 20 B/element with momentum "
    "(read p, g, b; write p, b), 12 B/element without. Working sets that fit in cache can beat it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sets",
        default=None,
        help=f"comma-separated parameter sets (default: all of {', '.join(PARAMETER_SETS)}; "
        f"with --quick: {', '.join(QUICK_SETS)})",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per workload (default 2)")
    parser.add_argument("--min-rounds", type=int, default=5, help="at least this many steps each (default 5)")
    parser.add_argument("--quick", action="store_true", help="small parameter sets and tensors, for a smoke run")
    parser.add_argument("--no-train", action="store_true", help="skip the full training-step row")
    parser.add_argument("--no-precision", action="store_true", help="skip the low-precision rows")
    parser.add_argument("--no-options", action="store_true", help="skip the clipping / non-finite guard rows")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="measure peak memory of training a 100M-parameter model instead (one process per setup)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="cuda (or cuda:N): step time and step memory on a GPU against torch fused and foreach, with a "
        "copy-bandwidth floor (cli/bench_device.py); cpu: the same code as a smoke run",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="torchsgd's SGD, SGDW, LARS and ScheduleFreeSGD against the peer libraries installed "
        "(pytorch_optimizer, schedulefree, heavyball) on ResNet-50, GPT-2 and 2,000x1,000 shapes",
    )
    parser.add_argument(
        "--rounds", type=int, default=50, help="with --device or --peers: interleaved timing rounds (default 50)"
    )
    parser.add_argument(
        "--write-docs",
        metavar="PATH",
        default=None,
        help="also write the tables as Markdown into this command's section of PATH (make bench: "
        "docs/benchmarks.md), and the step bench's summary into the README's marked table",
    )
    parser.add_argument(
        "--readme",
        metavar="PATH",
        default="README.md",
        help="the README whose table between <!-- bench:readme:start/end --> the step bench rewrites with "
        "--write-docs (default README.md)",
    )


def step_tables(
    args: argparse.Namespace, console, sets: dict, names: list[str], configs: list[str], bandwidth: float
) -> tuple[list[ResultTable], list[Row]]:
    """Time every table of the step bench, printing each as it is done; the tables and the fp32 rows."""
    implementations = list(IMPLEMENTATIONS)
    tables: list[ResultTable] = []

    def done(table: ResultTable) -> None:
        print_table(console, table)
        tables.append(table)

    step = ResultTable(
        "SGD step time, fp32 (median ms; ratio = torchsgd / torch)",
        ["workload", "config", "tensors", "params", *implementations, "floor", "÷ loop", "÷ fused", "÷ floor"],
        names=2,
        note=FLOOR_NOTE,
    )
    rows: list[Row] = []
    for set_name in names:
        shapes = sets[set_name]()
        numel = sum(math.prod(s) for s in shapes)
        for config_name in configs:
            with console.status(f"timing {set_name} / {config_name} ..."):
                medians = time_step_sets(shapes, CONFIGS[config_name], implementations, args.budget, args.min_rounds)
            rows.append(Row(set_name, config_name, len(shapes), numel, medians))
            bytes_per_element = 20 if CONFIGS[config_name].get("momentum") else 12
            floor_ms = 1e3 * bytes_per_element * numel / bandwidth
            ours = medians["torchsgd"]
            step.rows.append(
                [
                    set_name,
                    config_name,
                    str(len(shapes)),
                    f"{numel / 1e6:.2f}M",
                    *(ms(medians[name]) for name in implementations),
                    ms(floor_ms),
                    ratio(ours / medians["torch loop"]),
                    ratio(ours / medians["torch fused"]),
                    ratio(ours / floor_ms),
                ]
            )
    done(step)
    if not args.no_options:
        options = ResultTable(
            "In-step options, momentum+wd+nesterov (median ms; clipping at max norm 1.0)", ["workload", *OPTION_SETUPS]
        )
        for set_name in [n for n in names if n in ("tiny-mlp", "resnet50", "2000x1000", "500x1000")]:
            with console.status(f"timing options on {set_name} ..."):
                medians = time_options(sets[set_name](), args.budget, args.min_rounds)
            options.rows.append([set_name, *(ms(medians[name]) for name in OPTION_SETUPS)])
        done(options)
    if not args.no_precision:
        numel = (4 if args.quick else 64) * 1024 * 1024
        with console.status("timing low-precision storage ..."):
            precision = time_precision(numel, args.budget, args.min_rounds)
        done(
            ResultTable(
                f"Low precision, one tensor of {numel // 2**20}M, momentum+wd+nesterov "
                f"(median ms; the setups built {len(PRECISION_SETUPS)} times, each time in another order)",
                [
                    *PRECISION_SETUPS,
                    "bf16 momentum ÷ torchsgd fp32",
                    "pure bf16 ÷ torch fused",
                    "int8 momentum ÷ torch fused",
                ],
                [
                    [
                        *(ms(precision[name]) for name in PRECISION_SETUPS),
                        ratio(precision["torchsgd, bf16 momentum"] / precision["torchsgd, fp32"]),
                        ratio(precision["torchsgd, pure bf16 + SR"] / precision["torch fused, fp32"]),
                        ratio(precision["torchsgd, int8 momentum"] / precision["torch fused, fp32"]),
                    ]
                ],
                names=0,
            )
        )
        numel = (4 if args.quick else 16) * 1024 * 1024
        with console.status("timing half-precision parameters ..."):
            half = time_half(numel, args.budget, args.min_rounds)
        done(
            ResultTable(
                f"Half-precision parameters, no options, one tensor of {numel // 2**20}M, momentum+wd+nesterov "
                "(median ms)",
                ["dtype", *IMPLEMENTATIONS, "÷ torch loop", "÷ torch foreach"],
                [
                    [
                        label,
                        *(ms(times[n]) for n in IMPLEMENTATIONS),
                        ratio(times["torchsgd"] / times["torch loop"]),
                        ratio(times["torchsgd"] / times["torch foreach"]),
                    ]
                    for label, times in half.items()
                ],
                note="torch fused on fp16/bf16 is not a reference: it does not write the parameters of its "
                "vectorised blocks (torch's fused bug 1), so it skips most of the work. torchsgd's "
                "default runs both in the native kernel at torch's per-operation rounding.",
            )
        )
    if not args.no_train:
        setups = [*implementations, "torchsgd step_in_backward"]
        with console.status("timing a full training step ..."):
            train = time_training_step(setups, args.budget, args.min_rounds)
        done(
            ResultTable(
                "Full training step: MLP 512-1024-1024-10, batch 64, forward + backward + step (median ms)",
                [*setups, "torchsgd ÷ torch fused", "in-backward ÷ torch fused"],
                [
                    [
                        *(ms(train[name]) for name in setups),
                        ratio(train["torchsgd"] / train["torch fused"]),
                        ratio(train["torchsgd step_in_backward"] / train["torch fused"]),
                    ]
                ],
                names=0,
            )
        )
    return tables, rows


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=max(160, Console().width))
    docs = Path(args.write_docs) if args.write_docs else None
    if args.memory:
        from torchsgd.cli.memory import run as run_memory

        return run_memory(console, docs)
    if args.peers:
        from torchsgd.cli.bench_peers import run as run_peers

        return run_peers(console, args.quick, args.rounds, docs)
    if args.device is not None:
        from torchsgd.cli.bench_device import run as run_device

        return run_device(console, args.device, args.quick, args.rounds, docs)
    sets = QUICK_SETS if args.quick else PARAMETER_SETS
    names = [s for s in (args.sets or ",".join(sets)).split(",") if s]
    unknown = [n for n in names if n not in sets]
    configs = [c for c in args.configs.split(",") if c]
    unknown += [c for c in configs if c not in CONFIGS]
    if unknown:
        console.print(f"torchsgd bench: unknown parameter set or config: {', '.join(unknown)}", style="red")
        return 2
    bandwidth = measure_bandwidth(8 * 1024 * 1024 if args.quick else 32 * 1024 * 1024)
    engine = torchsgd.engines.build.native_module()
    machine = machine_description()
    kernel = "loaded" if engine else "unavailable: " + str(torchsgd.engines.build.native_failure())
    console.print(
        f"{machine}; fused CPU kernel: {kernel}; "
        f"measured bandwidth {bandwidth / 1e9:.1f} GB/s (a.add_(b), 12 B/element)"
    )
    tables, rows = step_tables(args, console, sets, names, configs, bandwidth)
    if docs is not None:
        date = datetime.date.today().isoformat()
        context = (
            f"{machine}; {date}; fused CPU kernel {kernel}; measured bandwidth {bandwidth / 1e9:.1f} GB/s "
            f"(`a.add_(b)`, 12 B/element). Parameter sets {', '.join(names)}; configs {', '.join(configs)}; "
            f"{args.budget:g} s of timing a workload, at least {args.min_rounds} rounds."
        )
        write_docs_section(docs, "step", "\n\n".join(["## Step time", context, *map(markdown, tables)]))
        console.print(f"wrote the step tables into {docs}")
        if rows and write_readme_section(Path(args.readme), readme_section(rows, machine, date)):
            console.print(f"wrote the benchmark table of {args.readme}")
        elif rows:
            console.print(f"{args.readme}: no <!-- bench:readme:start/end --> markers, left as it is", style="yellow")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchsgd bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
