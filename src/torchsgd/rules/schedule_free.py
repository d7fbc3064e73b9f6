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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ScheduleFreeStep:
    """The scalars of one step of one param group."""

    lr: float  # γ after warmup
    ckp1: float  # c, the averaging weight
    momentum: float
    weight_decay: float


def advance_schedule(group: dict[str, Any]) -> ScheduleFreeStep:
    """Advance the group's bookkeeping (k, lr_max, weight_sum) by one step and return its scalars.

    Same arithmetic as the schedulefree package, so both produce the same coefficients.
    """
    k = group["k"]
    warmup_steps = group["warmup_steps"]
    schedule = (k + 1) / warmup_steps if k < warmup_steps else 1.0
    lr = group["lr"] * schedule
    group["scheduled_lr"] = lr
    lr_max = group["lr_max"] = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] = group["weight_sum"] + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:
        ckp1 = 0
    group["k"] = k + 1
    return ScheduleFreeStep(lr=lr, ckp1=ckp1, momentum=group["momentum"], weight_decay=group["weight_decay"])


def update_one(y: Tensor, grad: Tensor, z: Tensor, s: ScheduleFreeStep) -> None:
    """One step for one parameter (the reference engine)."""
    g = grad.add(y, alpha=s.weight_decay) if s.weight_decay != 0 else grad
    y.lerp_(end=z, weight=s.ckp1)
    y.add_(g, alpha=s.lr * (s.momentum * (1 - s.ckp1) - 1))
    z.sub_(g, alpha=s.lr)


def update_list(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor], s: ScheduleFreeStep) -> None:
    """One step for a list of same-device, same-dtype parameters (the multi-tensor engine)."""
    gs = torch._foreach_add(grads, ys, alpha=s.weight_decay) if s.weight_decay != 0 else grads
    torch._foreach_lerp_(ys, zs, weight=s.ckp1)
    torch._foreach_add_(ys, gs, alpha=s.lr * (s.momentum * (1 - s.ckp1) - 1))
    torch._foreach_sub_(zs, gs, alpha=s.lr)


def to_average_(y: Tensor, z: Tensor, momentum: float) -> None:
    """eval(): the parameter moves from y to the average x."""
    y.lerp_(end=z, weight=1 - 1 / momentum)


def to_interpolation_(x: Tensor, z: Tensor, momentum: float) -> None:
    """train(): the parameter moves from the average x back to y."""
    x.lerp_(end=z, weight=1 - momentum)
