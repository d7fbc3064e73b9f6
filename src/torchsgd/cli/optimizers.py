"""The optimizers the demo trains with: a registry of name → factory.

Each entry builds an optimizer from a model's parameters and the learning rate; a new variant is one
more ``register(...)`` call. The demo's loop needs nothing else: it puts optimizers that have ``train()`` / ``eval()`` (schedule-free) in the right mode around
evaluation, and casts the model and the data to the entry's ``dtype``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

import torchsgd

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


@dataclass(frozen=True)
class OptimizerEntry:
    """One way of training the demo's model.

    ``same_as`` names the entry whose final weights this one must equal bitwise (the drop-in promise);
    the demo checks it whenever both are run.
    """

    name: str
    description: str
    build: Callable[[Iterable[Tensor], float], Optimizer]
    same_as: str | None = None
    dtype: torch.dtype = torch.float32


REGISTRY: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    if entry.name in REGISTRY:
        raise ValueError(f"optimizer {entry.name!r} is registered twice")
    if entry.same_as is not None and entry.same_as not in REGISTRY:
        raise ValueError(f"optimizer {entry.name!r} is the same as {entry.same_as!r}, which is not registered")
    REGISTRY[entry.name] = entry
    return entry


register(
    OptimizerEntry(
        "torch",
        "torch.optim.SGD, Nesterov momentum",
        lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY),
    )
)
register(
    OptimizerEntry(
        "torchsgd",
        "torchsgd.SGD with torch's settings: must end bitwise equal",
        lambda params, lr: torchsgd.SGD(params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY),
        same_as="torch",
    )
)
register(
    OptimizerEntry(
        "torchsgd-int8",
        "torchsgd.SGD with torch's settings, momentum in 8 bits (int8 codes, a scale per 256)",
        lambda params, lr: torchsgd.SGD(
            params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY, momentum_dtype=torch.int8
        ),
    )
)
register(
    OptimizerEntry(
        "torchsgd-momentum",
        "torchsgd.SGD, momentum without Nesterov",
        lambda params, lr: torchsgd.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    )
)
register(
    OptimizerEntry(
        "torchsgd-plain",
        "torchsgd.SGD without momentum",
        lambda params, lr: torchsgd.SGD(params, lr=lr, weight_decay=WEIGHT_DECAY),
    )
)

register(
    OptimizerEntry(
        "torchsgd-sgdw",
        "torchsgd.SGDW: Nesterov, decoupled weight decay",
        lambda params, lr: torchsgd.SGDW(params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY),
    )
)
register(
    OptimizerEntry(
        "torchsgd-schedule-free",
        "torchsgd.ScheduleFreeSGD, lr ×10 (it wants larger steps)",
        lambda params, lr: torchsgd.ScheduleFreeSGD(params, lr=10 * lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    )
)
register(
    OptimizerEntry(
        "torchsgd-lars",
        "torchsgd.LARS, lr ×10 (trust ratios shrink the steps)",
        lambda params, lr: torchsgd.LARS(params, lr=10 * lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY),
    )
)
register(
    OptimizerEntry(
        "torchsgd-bf16",
        "torchsgd.SGD, pure-bfloat16 model and momentum, stochastic rounding",
        lambda params, lr: torchsgd.SGD(
            params,
            lr=lr,
            momentum=MOMENTUM,
            nesterov=True,
            weight_decay=WEIGHT_DECAY,
            stochastic_rounding=True,
            seed=0,  # fixed, so the run does not depend on the global generator's state
        ),
        dtype=torch.bfloat16,
    )
)
register(
    OptimizerEntry(
        "torchsgd-bf16-nearest",
        "torchsgd.SGD, pure-bfloat16, round-to-nearest (for contrast with stochastic rounding)",
        lambda params, lr: torchsgd.SGD(params, lr=lr, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY),
        dtype=torch.bfloat16,
    )
)

DEFAULT_OPTIMIZERS: tuple[str, ...] = tuple(REGISTRY)  # every variant the library has


def optimizer_names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated registry names, in the order given, each once."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in REGISTRY]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(REGISTRY)}"
        )
    return names


def set_mode(optimizer: Optimizer, mode: str) -> None:
    """Call ``optimizer.train()`` or ``optimizer.eval()`` where it has them (schedule-free optimizers keep
    two points and evaluate at the other one); torch's optimizers have neither, and nothing happens."""
    switch = getattr(optimizer, mode, None)
    if callable(switch):
        switch()
