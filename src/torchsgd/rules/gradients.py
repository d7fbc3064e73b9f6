"""Whole-model gradient rules: the global L2 norm, the clip coefficient, the finiteness check, and
GradScaler's unscale.

``global_norm`` and ``clip_coefficient`` reproduce ``torch.nn.utils.clip_grad_norm_`` operation for
operation (per-tensor norms grouped by device and dtype, then the norm of their stack), so clipping inside
the step gives the same numbers as clipping before it::

    n = ‖(‖g₁‖, …, ‖gₖ‖)‖₂          c = min(max_norm / (n + 1e-6), 1)          g ← c·g
"""

from __future__ import annotations

import dataclasses
import math
from typing import cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support


def by_device_and_dtype(
    tensorlists: list[list[Tensor]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]]:
    """torch's ``_group_tensors_by_device_and_dtype``, typed for lists that hold no None.

    torch types its lists as ``list[list[Tensor | None]]``, which lists of Tensors do not fit (list is
    invariant), and gives back lists that may hold None; lists without None give lists without None.
    """
    grouped = _group_tensors_by_device_and_dtype(cast("list[list[Tensor | None]]", tensorlists), with_indices)
    return cast("dict[tuple[torch.device, torch.dtype], tuple[list[list[Tensor]], list[int]]]", grouped)


def _dense(grad: Tensor) -> Tensor:
    return grad.coalesce()._values() if grad.is_sparse else grad


def global_norm(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients viewed as one vector, computed as torch's clip_grad_norm_ does."""
    if not grads:
        return torch.tensor(0.0)
    tensors = [_dense(g) for g in grads]
    first_device = tensors[0].device
    norms: list[Tensor] = []
    for (device, _), ([device_tensors], _) in by_device_and_dtype([tensors]).items():
        if _has_foreach_support(device_tensors, device):
            norms.extend(torch._foreach_norm(device_tensors, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(g, norm_type) for g in device_tensors)
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)


def scaled_global_norm(grads: list[Tensor]) -> Tensor:
    """The global L2 norm computed without overflow, as a float64 0-d tensor: s·‖g / s‖ with s = max |g|.

    For finite gradients whose sum of squares overflows their own dtype (float16 values of 60,000), where
    :func:`global_norm` gives inf. Not torch's arithmetic, so only for that case.
    """
    tensors = [_dense(g) for g in grads if _dense(g).numel() > 0]
    if not tensors:
        return torch.tensor(0.0, dtype=torch.float64)
    device = tensors[0].device
    scale = torch.stack([t.abs().amax().to(device, torch.float64) for t in tensors]).amax()
    if scale == 0:
        return scale
    squares = torch.stack([(t.abs().to(torch.float64) / scale.to(t.device)).square().sum().to(device) for t in tensors])
    return scale * squares.sum().sqrt()


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """min(max_norm / (total_norm + 1e-6), 1), as a 0-d tensor (torch multiplies even when it is 1)."""
    return torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)


def all_finite(grads: list[Tensor]) -> bool:
    """True when no gradient holds a NaN or an infinity (one read of every gradient)."""
    grads = [g for g in grads if _dense(g).numel() > 0]  # an empty tensor has no infinity norm
    if not grads:
        return True
    worst = global_norm(grads, math.inf)
    return bool(torch.isfinite(worst).item())


@dataclasses.dataclass(frozen=True)
class GradScalerInStep:
    """What a GradScaler hands a step that takes its scale in the step (torch's ``fused=True`` contract).

    ``grad_scale`` is the scale the gradients carry (None when they were unscaled already, e.g. by
    ``scaler.unscale_`` before clipping); ``found_inf`` is a 1-element float32 tensor, nonzero when some
    gradient overflowed: then the whole step is skipped, state included. Otherwise each gradient is
    divided by the scale in place (p.grad holds the unscaled gradient afterwards, as torch leaves it) and
    the step reads it::

        g ← g · float32(1 / float64(scale))          (GradScaler.unscale_'s numbers)
    """

    grad_scale: Tensor | None
    found_inf: Tensor | None


def inverse_scale(grad_scale: Tensor) -> Tensor:
    """1 / scale as GradScaler computes it: in float64, then rounded to float32."""
    return grad_scale.double().reciprocal().float()


def unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients by GradScaler's scale in place, with the numbers of ``GradScaler.unscale_``."""
    inv_scale = inverse_scale(grad_scale)
    per_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        per_device.setdefault(grad.device, []).append(grad._values() if grad.is_sparse else grad)
    for device, device_grads in per_device.items():
        torch._foreach_mul_(device_grads, inv_scale.to(device))


def unscale_or_skip(grads: list[Tensor], scaler: GradScalerInStep) -> bool:
    """Apply what GradScaler handed the step on the host: True when the step is to be skipped (an overflow).

    Reads ``found_inf`` on the host (a device synchronisation); the Triton engine reads it in its kernel.
    """
    if scaler.found_inf is not None and bool(scaler.found_inf.item()):
        return True  # the whole step is skipped, state included
    if scaler.grad_scale is not None:
        unscale_(grads, scaler.grad_scale)
    return False
