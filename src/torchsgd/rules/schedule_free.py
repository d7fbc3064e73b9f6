"""Schedule-free SGD (Defazio et al. 2024, "The Road Less Scheduled"), written once for the engines.

Training evaluates the gradient at y, an interpolation between the SGD iterate z and the running average
x; the parameters hold y in train mode and x in eval mode. With c = weight / Σweights (weights grow with
the step count and the warmed-up lr)::

    g ← ∇f(y) + λ·y
    y ← y + c·(z − y)                       (torch.lerp)
    y ← y + γ·(μ·(1 − c) − 1)·g
    z ← z − γ·g

    eval():  y ← y + (1 − 1/μ)·(z − y)      (the parameters become x)
    train(): x ← x + (1 − μ)·(z − x)        (the parameters become y again)

With stochastic rounding (16-bit parameters) the step computes in float32 and rounds y and z once each
(:func:`schedule_free_update_rounded`: y takes a parameter's noise, z a momentum buffer's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from torchsgd.rules.rounding import BUFFER, PARAM, round_to_dtype
from torchsgd.rules.sgd import TENSOR, TensorAlgebra

X = TypeVar("X")  # one tensor, or a list of tensors


@dataclass(frozen=True)
class ScheduleFreeStep:
    """The scalars of one step of one param group."""

    lr: float  # γ after warmup
    ckp1: float  # c, the averaging weight
    momentum: float
    weight_decay: float


def advance_schedule(group: Mapping[str, Any]) -> tuple[ScheduleFreeStep, dict[str, Any]]:
    """The scalars of the group's next step, and its bookkeeping after it (k, lr_max, weight_sum, ...).

    A pure function: the caller stores the bookkeeping (``group.update(...)``). Same arithmetic as the
    schedulefree package, so both produce the same coefficients.
    """
    k = group["k"]
    warmup_steps = group["warmup_steps"]
    schedule = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = group["lr"] * schedule
    lr_max = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:
        ckp1 = 0
    scalars = ScheduleFreeStep(lr=lr, ckp1=ckp1, momentum=group["momentum"], weight_decay=group["weight_decay"])
    return scalars, {"k": k + 1, "scheduled_lr": lr, "lr_max": lr_max, "weight_sum": weight_sum}


def _number(x: float | Tensor) -> float:
    # A Tensor lr makes the step's scalars 0-d Tensors (computed as schedulefree computes them); torch reads
    # an alpha Tensor as its value, so passing the value gives the same numbers on either algebra.
    return x.item() if isinstance(x, Tensor) else x


def schedule_free_update(algebra: TensorAlgebra[X], y: X, grad: X, z: X, s: ScheduleFreeStep) -> None:
    """One step, in place, for one parameter (``TENSOR``) or a list of same-device, same-dtype ones (``LIST``)."""
    g = algebra.add(grad, y, alpha=_number(s.weight_decay)) if s.weight_decay != 0 else grad
    algebra.lerp_(y, z, s.ckp1)
    algebra.add_(y, g, alpha=_number(s.lr * (s.momentum * (1 - s.ckp1) - 1)))
    algebra.add_(z, g, alpha=-_number(s.lr))  # z − γ·g (torch's sub_ is add_ with −alpha)


def schedule_free_update_rounded(y: Tensor, grad: Tensor, z: Tensor, s: ScheduleFreeStep, key: int | None) -> None:
    """One step of one parameter in float32, y and z each rounded once to their dtype (stochastically
    when ``key``, the parameter's noise key of rules/rounding.py, is given; elements in row-major order)."""
    y32, grad32, z32 = y.float(), grad.float(), z.float()
    schedule_free_update(TENSOR, y32, grad32, z32, s)
    y.copy_(round_to_dtype(y32, y.dtype, key, PARAM))
    z.copy_(round_to_dtype(z32, z.dtype, key, BUFFER))


def to_average_(ys: list[Tensor], zs: list[Tensor], momentum: float) -> None:
    """eval(): each parameter moves from y to the average x."""
    _lerp_each(ys, zs, 1 - 1 / momentum)


def to_interpolation_(xs: list[Tensor], zs: list[Tensor], momentum: float) -> None:
    """train(): each parameter moves from the average x back to y."""
    _lerp_each(xs, zs, 1 - momentum)


def _lerp_each(starts: list[Tensor], ends: list[Tensor], weight: float) -> None:
    """``start.lerp_(end, weight)`` for each pair (torch.lerp's rounding, as the schedulefree package swaps).

    Plain CPU tensors go in one ``torch._foreach_lerp_``, which on CPU runs that same lerp_ kernel tensor
    by tensor (the same bits) without a Python call each: a swap of 2,000 small tensors took 23 ms as a loop.
    Others (CUDA, whose multi-tensor lerp is another kernel; tensor subclasses) take one lerp_ each."""
    if all(type(t) in (Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in (*starts, *ends)):
        if starts:
            torch._foreach_lerp_(starts, ends, weight)
        return
    for start, end in zip(starts, ends, strict=True):
        start.lerp_(end=end, weight=weight)
