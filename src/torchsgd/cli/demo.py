"""``torchsgd demo``: train a small convnet on the digits data with torch.optim.SGD and torchsgd's variants.

Every optimizer starts from the same initial weights and sees the batches in the same order, so the
runs differ only by the optimizer; torchsgd.SGD with torch's settings must end on bitwise the same weights.

With ``--distributed``, under torchrun, every run is data-parallel instead: DistributedDataParallel over the
ranks (gloo, CPU), each step's batch split across them; rank 0 prints the same table (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer

from torchsgd.cli.common import add_out_argument, console, out_dir, positive_int, seed_int
from torchsgd.cli.data import Digits, load_digits_split
from torchsgd.cli.memory import peak_rss_bytes
from torchsgd.cli.models import small_convnet
from torchsgd.cli.optimizers import (
    DEFAULT_OPTIMIZERS,
    MOMENTUM,
    REGISTRY,
    WEIGHT_DECAY,
    OptimizerEntry,
    optimizer_names,
    set_mode,
)

PLOT_NAME = "loss_accuracy.png"
# How long a rank waits in a collective for the others before it fails (a crashed or stuck peer).
DISTRIBUTED_TIMEOUT = datetime.timedelta(seconds=60)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the split, the initial weights and the batch order (default: 0)",
    )
    parser.add_argument("--epochs", type=positive_int, default=12, help="passes over the training set (default: 12)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default: 32)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of every optimizer (default: 0.1)")
    parser.add_argument(
        "--optimizers",
        type=optimizer_names,
        default=DEFAULT_OPTIMIZERS,
        metavar="NAMES",
        help=f"comma-separated, from: {', '.join(REGISTRY)} (default: {','.join(DEFAULT_OPTIMIZERS)})",
    )
    parser.add_argument(
        "--train-samples",
        type=positive_int,
        default=None,
        metavar="N",
        help="train on the first N training images only, for a quick run (default: all 1347)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="train data-parallel (DDP, gloo, CPU) on the ranks torchrun starts, each step's batch split "
        "across them; rank 0 prints: torchrun --standalone --nproc-per-node 2 -m torchsgd demo --distributed",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch's intra-op threads while training (default: 1; the model is tiny, so more threads only "
        "add overhead, and on a busy machine much more)",
    )
    add_out_argument(parser)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run."""

    rank: int
    size: int


@contextmanager
def data_parallel(enabled: bool) -> Iterator[World | None]:
    """With ``enabled``: join the process group torchrun describes in the environment (gloo) for the block."""
    if not enabled:
        yield None
        return
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ValueError(
            f"--distributed: {', '.join(missing)} not set; start the ranks with torchrun, e.g. "
            "torchrun --standalone --nproc-per-node 2 -m torchsgd demo --distributed"
        )
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=DISTRIBUTED_TIMEOUT)
    try:
        yield World(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


@dataclass
class Run:
    """What one optimizer's training produced. Curves have one point per epoch, epoch 0 being the start."""

    entry: OptimizerEntry
    train_losses: list[float] = field(default_factory=list)
    test_accuracies: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    state_bytes: int = 0
    peak_rss_bytes: int = 0
    final_weights: list[Tensor] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    entries = [REGISTRY[name] for name in args.optimizers]
    for entry in entries:  # bad settings fail here, with the optimizer's own message, before any training
        entry.build([torch.zeros(1, requires_grad=True)], args.lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(getattr(args, "threads", 1))
    try:
        with data_parallel(getattr(args, "distributed", False)) as world:
            return run_training(args, entries, world)
    finally:
        torch.set_num_threads(threads)


def run_training(args: argparse.Namespace, entries: list[OptimizerEntry], world: World | None) -> int:
    out = out_dir(args.out)
    data = load_digits_split(args.seed, args.train_samples)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(args.seed)
        initial_weights = small_convnet().state_dict()

    term = console()
    term.quiet = world is not None and world.rank != 0  # every rank trains; rank 0 alone prints
    steps_per_epoch = -(-len(data.train_labels) // args.batch_size)
    term.print(
        f"digits: {len(data.train_labels)} training and {len(data.test_labels)} test images (8×8), "
        f"seed {args.seed}, {args.epochs} epoch{'s' * (args.epochs != 1)} of {steps_per_epoch} steps, "
        f"batch {args.batch_size}, lr {args.lr:g}"
    )
    if world is not None:
        term.print(
            f"data-parallel: DistributedDataParallel over {world.size} ranks (gloo, CPU), each step's batch split "
            "across them and their gradients averaged; rank 0 prints"
        )
    runs = []
    name_width = max(len(entry.name) for entry in entries)
    with Progress(
        TextColumn(f"{{task.description:<{name_width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=term,
    ) as progress:
        total = args.epochs * steps_per_epoch
        tasks = [progress.add_task(e.name, total=total, status="waiting", start=False) for e in entries]
        for entry, task in zip(entries, tasks):
            progress.start_task(task)
            runs.append(train(entry, initial_weights, data, args, progress, task, world))

    term.print(results_table(runs))
    legend = Table.grid(padding=(0, 2))
    for r in runs:
        legend.add_row(r.entry.name, r.entry.description)
    term.print(legend)
    checks = identity_checks(runs)
    for _, line in checks:
        term.print(line)
    if not checks:
        term.print("identical: not checked (run torch together with torchsgd to compare them bitwise)")
    if world is None or world.rank == 0:
        plot_path = plot_curves(runs, out / PLOT_NAME)
        term.print(f"wrote {plot_path}")
    return 0 if all(equal for equal, _ in checks) else 1


def train(
    entry: OptimizerEntry,
    initial_weights: dict[str, Tensor],
    data: Digits,
    args: argparse.Namespace,
    progress: Progress,
    task: TaskID,
    world: World | None = None,
) -> Run:
    """Train a fresh model from ``initial_weights`` with ``entry``'s optimizer, timing each step.

    With a ``world``, the model is wrapped in DistributedDataParallel and each rank takes its share of every
    batch; the loss is scaled so that DDP's average of the ranks' gradients is the gradient of the mean
    loss over the whole batch, even when the batch does not split evenly.
    """
    model = small_convnet()
    model.load_state_dict(initial_weights)
    model.to(entry.dtype)
    net: nn.Module = model
    if world is not None:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    optimizer = entry.build(model.parameters(), args.lr)
    train_images, test_images = data.train_images.to(entry.dtype), data.test_images.to(entry.dtype)
    batch_order = torch.Generator().manual_seed(args.seed)  # the same batches, in the same order, for every entry
    result = Run(entry)
    record_epoch(result, model, optimizer, train_images, data.train_labels, test_images, data.test_labels)
    for _ in range(args.epochs):
        model.train()
        set_mode(optimizer, "train")
        for batch in torch.randperm(len(train_images), generator=batch_order).split(args.batch_size):
            optimizer.zero_grad()
            if world is None:
                F.cross_entropy(model(train_images[batch]), data.train_labels[batch]).backward()
            else:
                share = batch.tensor_split(world.size)[world.rank]
                loss_sum = F.cross_entropy(net(train_images[share]), data.train_labels[share], reduction="sum")
                (loss_sum * (world.size / len(batch))).backward()
            start = time.perf_counter()
            optimizer.step()
            result.step_seconds.append(time.perf_counter() - start)
            progress.advance(task)
        record_epoch(result, model, optimizer, train_images, data.train_labels, test_images, data.test_labels)
        progress.update(
            task, status=f"loss {result.train_losses[-1]:.4f}  test acc {100 * result.test_accuracies[-1]:.1f}%"
        )
    result.state_bytes = sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, Tensor)
    )
    result.peak_rss_bytes = peak_rss_bytes()
    result.final_weights = [p.detach().clone() for p in model.parameters()]
    return result


@torch.no_grad()
def record_epoch(
    result: Run,
    model: nn.Module,
    optimizer: Optimizer,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
) -> None:
    """Append the loss on the whole training set and the test accuracy of the current weights."""
    model.eval()
    set_mode(optimizer, "eval")
    result.train_losses.append(F.cross_entropy(model(train_x).float(), train_y).item())
    result.test_accuracies.append((model(test_x).argmax(dim=1) == test_y).float().mean().item())


def results_table(runs: list[Run]) -> Table:
    table = Table(
        title="digits, small convnet",
        caption=(
            f"All with weight decay {WEIGHT_DECAY:g}, and momentum {MOMENTUM:g} where they have momentum. "
            "train loss: of the final weights, on the whole training set. "
            "step ms: median of optimizer.step() alone. state: tensors the optimizer keeps. "
            "peak RSS: the whole process's high-water mark after that run (VmHWM); it includes "
            "Python, torch and the data and never goes down."
        ),
        caption_justify="left",
    )
    table.add_column("optimizer", no_wrap=True)
    table.add_column("test acc", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("step ms", justify="right")
    table.add_column("state KiB", justify="right")
    table.add_column("peak RSS", justify="right")
    for r in runs:
        table.add_row(
            r.entry.name,
            f"{100 * r.test_accuracies[-1]:.2f}%",
            f"{r.train_losses[-1]:.4f}",
            f"{1000 * statistics.median(r.step_seconds):.3f}",
            f"{r.state_bytes / 1024:.1f}",
            f"{r.peak_rss_bytes / 2**20:.0f} MiB",
        )
    return table


def identity_checks(runs: list[Run]) -> list[tuple[bool, str]]:
    """For each entry run together with the entry it must equal: whether the final weights are bitwise
    equal, and the ``identical: yes/no`` line that says so."""
    by_name = {r.entry.name: r for r in runs}
    checks = []
    for r in runs:
        twin = by_name.get(r.entry.same_as) if r.entry.same_as else None
        if twin is None:
            continue
        pairs = list(zip(r.final_weights, twin.final_weights))
        differing = sum(not torch.equal(a, b) for a, b in pairs)
        if differing:
            worst = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            line = (
                f"identical: no ({r.entry.name} ≠ {twin.entry.name} in {differing} of {len(pairs)} weight tensors, "
                f"largest difference {worst:.3g})"
            )
        else:
            count = sum(w.numel() for w in r.final_weights)
            line = f"identical: yes ({r.entry.name} = {twin.entry.name}: all {count:,} final weights bitwise equal)"
        checks.append((not differing, line))
    return checks


def plot_curves(runs: list[Run], path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4), dpi=100, layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for r in runs:
        # An entry that must equal another is drawn dashed on top of it, so both stay visible.
        style = {"linestyle": "--", "linewidth": 2.5} if r.entry.same_as else {"linewidth": 1.5}
        epochs = range(len(r.train_losses))
        loss_axes.plot(epochs, r.train_losses, label=r.entry.name, **style)
        accuracy_axes.plot(epochs, [100 * a for a in r.test_accuracies], label=r.entry.name, **style)
    loss_axes.set(title="training loss (whole training set)", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    # The runs differ in the last few percent; lower epochs' points are cut off below 80%.
    accuracy_axes.set(title="test accuracy", xlabel="epoch", ylabel="%", ylim=(80, 100.5))
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.legend(*loss_axes.get_legend_handles_labels(), loc="outside right center", fontsize="small")
    figure.savefig(path, dpi=100)
    return path
