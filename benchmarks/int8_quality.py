"""How 8-bit momentum trains against float32 momentum: the digits convnet and a character-level language model.

Each task (benchmarks/int8_tasks.py) trains with torchsgd.SGD's momentum kept in float32, in int8 rounded to
nearest, and in int8 with stochastic rounding, from the same initial weights and in the same batch order for
a seed. Prints, per task, a markdown table of the final held-out accuracy (mean over seeds, its difference
from float32 in points, and each seed's), and plots held-out accuracy and training loss per epoch (mean
over seeds) to docs/int8_curves.png. One thread; about five minutes for three seeds on a 2-core VM. Run:

    python benchmarks/int8_quality.py [--seeds 3] [--tasks digits,chars] [--plot docs/int8_curves.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_tasks import STORAGES, TASKS, Curves

DEFAULT_PLOT = Path(__file__).resolve().parent.parent / "docs" / "int8_curves.png"


def mean_curve(runs: list[Curves], attribute: str) -> list[float]:
    return [statistics.mean(values) for values in zip(*(getattr(run, attribute) for run in runs))]


def plot(results: dict[str, dict[str, list[Curves]]], path: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7), squeeze=False)
    styles = {"float32": {"color": "black"}, "int8 nearest": {"color": "tab:blue", "linestyle": "--"}}
    styles["int8 stochastic"] = {"color": "tab:orange", "linestyle": ":"}
    for column, (task, by_storage) in enumerate(results.items()):
        accuracy_axes, loss_axes = axes[0][column], axes[1][column]
        for storage, runs in by_storage.items():
            epochs = range(1, len(runs[0].test_accuracy) + 1)
            style = styles.get(storage, {})
            accuracy_axes.plot(epochs, mean_curve(runs, "test_accuracy"), marker="o", label=storage, **style)
            loss_axes.plot(epochs, mean_curve(runs, "train_loss"), marker="o", label=storage, **style)
        accuracy_axes.set_title(TASKS[task][0])
        accuracy_axes.set_ylabel("held-out accuracy %")
        loss_axes.set_ylabel("training loss (epoch mean)")
        loss_axes.set_yscale("log")
        loss_axes.set_xlabel("epoch")
        for each in (accuracy_axes, loss_axes):
            each.xaxis.set_major_locator(MaxNLocator(integer=True))
            each.grid(alpha=0.3)
            each.legend()
    figure.suptitle(f"torchsgd.SGD momentum storage, mean over {seeds} seed{'s' * (seeds != 1)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="where the curves go (default: %(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="print the tables only")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or args.seeds < 1:
        parser.error(f"unknown tasks {unknown}" if unknown else "--seeds must be at least 1")
    torch.set_num_threads(1)
    results: dict[str, dict[str, list[Curves]]] = {}
    for task in tasks:
        title, train = TASKS[task]
        print(f"\n{title}, seeds 0..{args.seeds - 1}\n")
        print(
            "| momentum storage | test accuracy % (mean) | vs float32 (points) | final train loss (mean) | per seed |"
        )
        print("|---|---:|---:|---:|---|")
        results[task] = {}
        baseline = 0.0
        for storage, options in STORAGES.items():
            start = time.perf_counter()
            runs = [train(seed, options) for seed in range(args.seeds)]
            results[task][storage] = runs
            finals = [run.test_accuracy[-1] for run in runs]
            mean = statistics.mean(finals)
            if storage == "float32":
                baseline = mean
            loss = statistics.mean(run.train_loss[-1] for run in runs)
            per_seed = " ".join(f"{a:.2f}" for a in finals)
            seconds = time.perf_counter() - start
            print(
                f"| {storage} | {mean:.2f} | {mean - baseline:+.2f} | {loss:.4f} | {per_seed} | ({seconds:.0f} s)",
                flush=True,
            )
    if not args.no_plot:
        plot(results, args.plot, args.seeds)


if __name__ == "__main__":
    main()
