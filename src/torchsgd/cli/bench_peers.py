"""`torchsgd bench --peers`: torchsgd's optimizers against the other SGD libraries that are installed.

One table, one run: for each workload (parameter shapes), the median step time of torchsgd.SGD, torch's
fused SGD, and each torchsgd optimizer beside its peers (one comparison at a time, so that memory holds) (pytorch_optimizer's SGDW, LARS and
ScheduleFreeSGD, the schedulefree package's SGDScheduleFree, heavyball's SGD), timed in interleaved rounds
on the same parameter shapes. Every optimizer is handed fresh gradients before each timed step, the same
for all (heavyball consumes ``.grad``), and only ``step()`` is timed. A peer that is not installed is left
out and the table says so. fp32, momentum 0.9, weight decay 1e-4. A second table holds issue 17's targets
(ScheduleFreeSGD and LARS against SGD and their peers) as ratios of the same run, each marked met or not.
"""

from __future__ import annotations

import gc
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import torchsgd
from torchsgd.cli.bench import ResultTable, gpt2_small_shapes, ratio, resnet50_shapes

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4
WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "gpt2-small": gpt2_small_shapes,
    "2000x1000": lambda: [(1000,)] * 2000,
}
QUICK_WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {"200x1000": lambda: [(1000,)] * 200}


def _peer(module: str, name: str) -> Callable[..., torch.optim.Optimizer] | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def setups() -> dict[str, tuple[str, Callable[[list[torch.Tensor]], Any] | None]]:
    """name -> (the torchsgd optimizer it is compared with, a factory or None when not installed)."""
    po_sgdw = _peer("pytorch_optimizer", "SGDW")
    po_lars = _peer("pytorch_optimizer", "LARS")
    po_sf = _peer("pytorch_optimizer", "ScheduleFreeSGD")
    sf_sgd = _peer("schedulefree", "SGDScheduleFree")
    hb_sgd = _peer("heavyball", "SGD")
    common: dict[str, Any] = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    return {
        "torchsgd.SGD": ("torchsgd.SGD", lambda ps: torchsgd.SGD(ps, momentum=MOMENTUM, **common)),
        "torch fused SGD": ("torchsgd.SGD", lambda ps: torch.optim.SGD(ps, momentum=MOMENTUM, fused=True, **common)),
        "heavyball.SGD": (
            "torchsgd.SGD",
            None if hb_sgd is None else lambda ps: hb_sgd(ps, beta=MOMENTUM, **common),
        ),
        "torchsgd.SGDW": ("torchsgd.SGDW", lambda ps: torchsgd.SGDW(ps, momentum=MOMENTUM, **common)),
        "pytorch_optimizer.SGDW": (
            "torchsgd.SGDW",
            None if po_sgdw is None else lambda ps: po_sgdw(ps, momentum=MOMENTUM, **common),
        ),
        "torchsgd.LARS": ("torchsgd.LARS", lambda ps: torchsgd.LARS(ps, momentum=MOMENTUM, **common)),
        "pytorch_optimizer.LARS": (
            "torchsgd.LARS",
            None if po_lars is None else lambda ps: po_lars(ps, momentum=MOMENTUM, **common),
        ),
        "torchsgd.ScheduleFreeSGD": (
            "torchsgd.ScheduleFreeSGD",
            lambda ps: _train(torchsgd.ScheduleFreeSGD(ps, momentum=MOMENTUM, **common)),
        ),
        "schedulefree.SGDScheduleFree": (
            "torchsgd.ScheduleFreeSGD",
            None if sf_sgd is None else lambda ps: _train(sf_sgd(ps, momentum=MOMENTUM, **common)),
        ),
        "pytorch_optimizer.ScheduleFreeSGD": (
            "torchsgd.ScheduleFreeSGD",
            None if po_sf is None else lambda ps: _train(po_sf(ps, momentum=MOMENTUM, **common)),
        ),
    }


def _train(optimizer: Any) -> Any:
    optimizer.train()  # schedule-free optimizers step in train mode
    return optimizer


def time_rounds(
    shapes: list[tuple[int, ...]], factories: dict[str, Callable[[list[torch.Tensor]], Any]], rounds: int
) -> dict[str, list[float]]:
    """The ms of each ``step()`` for every optimizer, each on its own copy of the same parameters, with the
    same fresh gradients before every step, in interleaved rounds (one step of each a round, so that drift
    on a shared machine hits all alike); the garbage collector is held off while timing (a collection
    inside one timed step would land on one optimizer only)."""
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    grads = [torch.randn(shape, generator=generator) * 1e-3 for shape in shapes]
    runs = {}
    for name, factory in factories.items():
        params = [t.clone().requires_grad_() for t in initial]
        runs[name] = (params, factory(params))

    def step(name: str) -> float:
        params, optimizer = runs[name]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        optimizer.step()
        return 1e3 * (time.perf_counter() - start)

    for name in runs:  # first steps create the state
        step(name)
        step(name)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name in runs:
                samples[name].append(step(name))
    finally:
        gc.enable()
    runs.clear()
    gc.collect()
    return samples


def time_workload(
    shapes: list[tuple[int, ...]], factories: dict[str, Callable[[list[torch.Tensor]], Any]], rounds: int
) -> dict[str, float]:
    """Median ms of ``step()`` for every optimizer (:func:`time_rounds`)."""
    return {name: statistics.median(values) for name, values in time_rounds(shapes, factories, rounds).items()}


# Issue 17's targets: (row, numerator, denominator, the most the ratio may be), on ResNet-50's and GPT-2's
# shapes. On the 2,000-tensor workload the issue sets only the ratio against the peer (TARGET_MANY_TENSORS);
# its ratios to torchsgd.SGD are shown with no target.
TARGETS = [
    ("ScheduleFreeSGD ÷ schedulefree", "torchsgd.ScheduleFreeSGD", "schedulefree.SGDScheduleFree", 0.65),
    ("ScheduleFreeSGD ÷ torchsgd.SGD", "torchsgd.ScheduleFreeSGD", "torchsgd.SGD", 1.1),
    ("LARS ÷ torchsgd.SGD", "torchsgd.LARS", "torchsgd.SGD", 1.5),
    ("LARS ÷ pytorch_optimizer.LARS", "torchsgd.LARS", "pytorch_optimizer.LARS", 0.35),
]
MANY_TENSORS, TARGET_MANY_TENSORS = "2000x1000", 0.3


ANCHOR = "torchsgd.SGD"  # timed again inside every comparison, so that the targets' ratios to it are of one round


def targets_table(groups: dict[str, dict[str, dict[str, float]]]) -> ResultTable:
    """The targets' ratios from one run's medians (comparison -> workload -> optimizer -> ms), each taken
    within the comparison of its numerator (torchsgd.SGD is timed in each): the ratio, met or not. On
    MANY_TENSORS a ratio to a torchsgd optimizer has no target (the issue sets none) and says so."""
    workloads = list(next(iter(groups.values()))) if groups else []
    table = ResultTable(
        "Issue 17's targets, ratios of the run above (ok: met; over: not met)",
        ["ratio", "target", *workloads],
        names=2,
        note=f"Each ratio within one comparison's interleaved rounds ({ANCHOR} is timed in each). On "
        f"{MANY_TENSORS} the issue's only target is the one against the peer, {TARGET_MANY_TENSORS:g}x; the "
        f"ratios to {ANCHOR} there are shown with no target. A peer that is not installed leaves its cells empty.",
    )
    for label, numerator, denominator, limit in TARGETS:
        cells = []
        medians = groups.get(numerator, {})
        for w in workloads:
            if numerator not in medians.get(w, {}) or denominator not in medians[w]:
                cells.append("—")
                continue
            value = medians[w][numerator] / medians[w][denominator]
            if w == MANY_TENSORS and denominator.startswith("torchsgd"):
                cells.append(f"{ratio(value)} (no target)")
                continue
            bound = TARGET_MANY_TENSORS if w == MANY_TENSORS else limit
            cells.append(f"{ratio(value)} {'ok' if value <= bound else 'over'} (≤ {bound:g})")
        table.rows.append([label, f"≤ {limit:g}", *cells])
    return table


def peers_table(quick: bool, rounds: int) -> ResultTable:
    return peers_tables(quick, rounds)[0]


def peers_tables(quick: bool, rounds: int) -> tuple[ResultTable, ResultTable]:
    """The step-time table and the targets table, from one run."""
    available = {name: factory for name, (_, factory) in setups().items() if factory is not None}
    missing = [name for name, (_, factory) in setups().items() if factory is None]
    ours = {name: base for name, (base, _) in setups().items()}
    workloads = QUICK_WORKLOADS if quick else WORKLOADS
    columns = ["optimizer", *workloads, *(f"÷ ours, {w}" for w in workloads)]
    table = ResultTable(
        f"Step time against the peers (median ms, fp32, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY:g})",
        columns,
        note="÷ ours: the row's time over the torchsgd optimizer it is compared with (SGD for torch fused and "
        "heavyball); fresh gradients before every step, only step() timed."
        + (f" Not installed, left out: {', '.join(missing)}." if missing else ""),
    )
    # One comparison at a time (a torchsgd optimizer and its peers, interleaved): ten optimizers' copies of
    # GPT-2's 124M parameters, gradients and state at once would not fit in memory.
    medians: dict[str, dict[str, float]] = {w: {} for w in workloads}
    by_comparison: dict[str, dict[str, dict[str, float]]] = {}
    for base in dict.fromkeys(ours[name] for name in available):
        group = {name: factory for name, factory in available.items() if ours[name] == base}
        group.setdefault(ANCHOR, available[ANCHOR])
        for w, shapes in workloads.items():
            timed = time_workload(shapes(), group, rounds)
            by_comparison.setdefault(base, {})[w] = timed
            medians[w].update({name: t for name, t in timed.items() if ours[name] == base})
    for name in available:
        times = [medians[w][name] for w in workloads]
        ratios = [ratio(medians[w][name] / medians[w][ours[name]]) for w in workloads]
        table.rows.append([name, *(f"{t:.2f}" for t in times), *ratios])
    return table, targets_table(by_comparison)


def run(console: Any, quick: bool, rounds: int, docs: Any = None) -> int:
    import datetime

    from torchsgd.cli.bench import machine_description, markdown, print_table, write_docs_section

    with console.status("timing torchsgd and its peers ..."):
        table, targets = peers_tables(quick, rounds)
    print_table(console, table)
    print_table(console, targets)
    if docs is not None:
        context = f"{machine_description()}; {datetime.date.today().isoformat()}; {rounds} interleaved rounds."
        write_docs_section(docs, "peers", "\n\n".join(["## Peers", context, markdown(table), markdown(targets)]))
        console.print(f"wrote the peers table into {docs}")
    return 0
