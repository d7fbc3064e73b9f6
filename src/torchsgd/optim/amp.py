"""GradScaler inside the step: the unscale and the overflow skip, as torch's fused optimizers take them.

An optimizer that sets ``_step_supports_amp_scaling`` (``fused=True``, as torch's fused SGD does) is handed
the scale and the overflow flag as ``optimizer.grad_scale`` and ``optimizer.found_inf`` instead of having
GradScaler unscale its gradients: one pass over the gradients fewer. Where every param group runs the
Triton engine, its kernel reads the flag and the scale on the device (:func:`for_the_kernel`), so the step
never waits for the device; otherwise the step reads the flag on the host, then unscales
(rules.gradients.unscale_or_skip).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from torchsgd.engines import TRITON, select_engine
from torchsgd.rules import gradients
from torchsgd.rules.gradients import GradScalerInStep

__all__ = ["scaler_active", "handed", "unscale_or_skip", "for_the_kernel"]


def scaler_active(optimizer: Any) -> bool:
    """Whether a GradScaler handed this step its scale or its overflow flag."""
    return getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None


def handed(optimizer: Any) -> GradScalerInStep:
    """What GradScaler handed this step."""
    return GradScalerInStep(getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))


def unscale_or_skip(optimizer: Any, grads: list[Tensor]) -> bool:
    """Apply what GradScaler handed the step, on the host: True when the step is to be skipped (an overflow)."""
    return gradients.unscale_or_skip(grads, handed(optimizer))


def for_the_kernel(optimizer: Any) -> GradScalerInStep | None:
    """What GradScaler handed, for the Triton engine to apply; None where the host must apply it first.

    Handed to the engine when every param group with a gradient runs the Triton engine (which applies it
    in its kernel, or on the host for a group it cannot take) and nothing in the step needs the unscaled
    gradients before the update: no in-step clipping or non-finite guard (they read every gradient
    first), no stochastic rounding (its noise counter counts the updates taken, which the host knows only
    by reading the flag).
    """
    if optimizer.max_grad_norm is not None or optimizer.skip_nonfinite or optimizer.stochastic_rounding:
        return None
    groups = [g for g in optimizer.param_groups if any(p.grad is not None for p in g["params"])]
    if not groups or any(select_engine(group) is not TRITON for group in groups):
        return None
    return handed(optimizer)
