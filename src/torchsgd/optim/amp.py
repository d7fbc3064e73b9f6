"""GradScaler inside the step: the unscale and the overflow skip, as torch's fused optimizers take them.

An optimizer that sets ``_step_supports_amp_scaling`` (``fused=True``, as torch's fused SGD does) is handed
the scale and the overflow flag as ``optimizer.grad_scale`` and ``optimizer.found_inf`` instead of having
GradScaler unscale its gradients: one pass over the gradients fewer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["scaler_active", "unscale_or_skip", "unscale_"]


def scaler_active(optimizer: Any) -> bool:
    """Whether a GradScaler handed this step its scale or its overflow flag."""
    return getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None


def unscale_or_skip(optimizer: Any, grads: list[Tensor]) -> bool:
    """Apply what GradScaler handed the step: True when the step is to be skipped (an overflow)."""
    found_inf: Tensor | None = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf.item()):
        return True  # the whole step is skipped, state included
    grad_scale: Tensor | None = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        unscale_(grads, grad_scale)
    return False


def unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients by GradScaler's scale in place, with the numbers of ``GradScaler.unscale_``."""
    inv_scale = grad_scale.double().reciprocal().float()
    per_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        per_device.setdefault(grad.device, []).append(grad._values() if grad.is_sparse else grad)
    for device, device_grads in per_device.items():
        torch._foreach_mul_(device_grads, inv_scale.to(device))
