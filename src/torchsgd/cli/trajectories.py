"""``torchsgd trajectories``: the paths of SGD, momentum and Nesterov on two functions of two variables.

Each path is torchsgd.SGD stepping a 2-element parameter with gradients from autograd, drawn over the
function's contour lines: an ill-conditioned quadratic (a long narrow bowl) and the Rosenbrock function
(a curved valley). Schedule-free SGD joins the plot by itself once ``torchsgd.ScheduleFreeSGD`` exists.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table
from torch import Tensor
from torch.optim import Optimizer

import torchsgd
from torchsgd.cli.common import add_out_argument, console, out_dir, positive_int
from torchsgd.cli.optimizers import set_mode

PLOT_NAME = "trajectories.png"
CONVERGED = 1e-3  # the table reports the first step with f below this
DIVERGED = 1e6  # a path is cut where |x| or |y| passes this
SCHEDULE_FREE_LR_FACTOR = 5


@dataclass(frozen=True)
class Problem:
    title: str
    function: Callable[[Tensor, Tensor], Tensor]  # f(x, y), elementwise, for the grid and for the parameter
    start: tuple[float, float]
    minimum: tuple[float, float]
    xlim: tuple[float, float]
    ylim: tuple[float, float]


# Both are scaled for the same learning rate: at lr 1e-3 the quadratic's curvatures times lr are 0.01
# along x and 0.4 along y, as in the steep walls and flat floor of Rosenbrock's valley.
PROBLEMS = (
    Problem(
        "ill-conditioned quadratic  f = 5x² + 200y²  (κ = 40)",
        lambda x, y: 5 * x**2 + 200 * y**2,
        start=(-1.0, 0.3),
        minimum=(0.0, 0.0),
        xlim=(-1.1, 0.6),
        ylim=(-0.35, 0.35),
    ),
    Problem(
        "Rosenbrock  f = (1 − x)² + 100(y − x²)²",
        lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2,
        start=(-1.2, 1.0),
        minimum=(1.0, 1.0),
        xlim=(-1.6, 1.6),
        ylim=(-0.6, 1.6),
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every path (default: 0.001)")
    parser.add_argument(
        "--momentum", type=float, default=0.9, help="momentum of the momentum and Nesterov paths (default: 0.9)"
    )
    parser.add_argument("--steps", type=positive_int, default=1000, help="steps per path (default: 1000)")
    add_out_argument(parser)


def optimizers(lr: float, momentum: float) -> dict[str, Callable[[list[Tensor]], Optimizer]]:
    """The paths to draw: label → optimizer factory."""
    paths: dict[str, Callable[[list[Tensor]], Optimizer]] = {
        "SGD": lambda params: torchsgd.SGD(params, lr=lr),
        f"momentum {momentum:g}": lambda params: torchsgd.SGD(params, lr=lr, momentum=momentum),
        f"Nesterov {momentum:g}": lambda params: torchsgd.SGD(params, lr=lr, momentum=momentum, nesterov=True),
    }
    # The hook for schedule-free SGD: drawn whenever the library has it. Its points are read in eval mode
    # (the average it would be evaluated at), see follow(). It wants a larger lr than SGD; 5× is the most
    # that stays stable on Rosenbrock at the default lr.
    if hasattr(torchsgd, "ScheduleFreeSGD"):
        sf_lr = SCHEDULE_FREE_LR_FACTOR * lr
        paths[f"schedule-free, lr {sf_lr:g}"] = lambda params: torchsgd.ScheduleFreeSGD(
            params, lr=sf_lr, momentum=momentum
        )
    return paths


def follow(
    problem: Problem, make_optimizer: Callable[[list[Tensor]], Optimizer], steps: int
) -> list[tuple[float, float]]:
    """The points a path visits, from the start; it ends early if it leaves every reasonable bound."""
    point = torch.tensor(problem.start, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([point])
    visited = [problem.start]
    for _ in range(steps):
        set_mode(optimizer, "train")
        optimizer.zero_grad()
        problem.function(point[0], point[1]).backward()
        optimizer.step()
        set_mode(optimizer, "eval")
        x, y = point.tolist()
        if not (math.isfinite(x) and math.isfinite(y)) or max(abs(x), abs(y)) > DIVERGED:
            break
        visited.append((x, y))
    return visited


def run(args: argparse.Namespace) -> int:
    paths = optimizers(args.lr, args.momentum)
    for make in paths.values():  # the optimizer's own checks and messages, before any work
        make([torch.zeros(2, requires_grad=True)])
    out = out_dir(args.out)
    results = {
        problem: {label: follow(problem, make, args.steps) for label, make in paths.items()} for problem in PROBLEMS
    }

    term = console()
    for problem, by_label in results.items():
        term.print(summary_table(problem, by_label, args.steps))
    plot_path = plot(results, args, out / PLOT_NAME)
    term.print(f"wrote {plot_path}")
    return 0


def summary_table(problem: Problem, by_label: dict[str, list[tuple[float, float]]], steps: int) -> Table:
    table = Table(title=problem.title)
    table.add_column("path")
    table.add_column("final (x, y)", justify="right")
    table.add_column("final f", justify="right")
    table.add_column(f"steps to f < {CONVERGED:g}", justify="right")
    for label, points in by_label.items():
        xy = torch.tensor(points, dtype=torch.float64)
        values = problem.function(xy[:, 0], xy[:, 1])
        below = (values < CONVERGED).nonzero()
        x, y = points[-1]
        diverged = len(points) <= steps  # follow() stopped early
        table.add_row(
            label,
            f"({x:.4f}, {y:.4f})",
            "diverged" if diverged else f"{values[-1].item():.3g}",
            str(below[0].item()) if len(below) else "—",
        )
    return table


def plot(results: dict[Problem, dict[str, list[tuple[float, float]]]], args: argparse.Namespace, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), dpi=100, layout="constrained")
    figure.suptitle(f"torchsgd paths: lr {args.lr:g}, momentum {args.momentum:g}, {args.steps} steps")
    for axes, (problem, by_label) in zip(figure.subplots(1, 2), results.items()):
        xs = torch.linspace(*problem.xlim, 300, dtype=torch.float64)
        ys = torch.linspace(*problem.ylim, 300, dtype=torch.float64)
        grid_x, grid_y = torch.meshgrid(xs, ys, indexing="xy")
        values = problem.function(grid_x, grid_y)
        # Log-spaced levels: both functions span several orders of magnitude around their minimum.
        low, high = max(values.min().item(), 1e-3), values.max().item()
        levels = torch.logspace(math.log10(low), math.log10(high), 18).tolist()
        axes.contour(grid_x.numpy(), grid_y.numpy(), values.numpy(), levels=levels, colors="0.75", linewidths=0.7)
        for rank, (label, points) in enumerate(by_label.items()):
            px, py = zip(*points)
            # Earlier paths on top: plain SGD's short path would otherwise hide under the others.
            axes.plot(px, py, marker=".", markersize=2.5, linewidth=1.2, label=label, zorder=10 - rank)
        axes.plot(*problem.start, marker="o", color="black", markersize=5, linestyle="none", label="start", zorder=20)
        axes.plot(
            *problem.minimum, marker="*", color="black", markersize=11, linestyle="none", label="minimum", zorder=20
        )
        axes.set(title=problem.title, xlim=problem.xlim, ylim=problem.ylim, xlabel="x", ylabel="y")
        axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=100)
    return path
