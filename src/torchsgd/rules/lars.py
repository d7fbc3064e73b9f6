"""The LARS trust ratio (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks").

Each layer's step is scaled by how large its weights are relative to its gradient::

    t = η·‖θ‖ / (‖∇‖ + λ·‖θ‖ + ε)        (t = 1 where ‖θ‖ = 0 or ‖∇‖ = 0)
    t = min(t / γ, 1)                     with trust_clip (LARC: the local rate never exceeds the global)

and the SGD rule then uses g ← t·(∇ + λθ) in place of ∇ + λθ (rules/sgd.py, ``trust_ratio``).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor

from torchsgd.rules.gradients import by_device_and_dtype


def trust_ratios(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    lr: float,
    trust_clip: bool,
) -> list[Tensor]:
    """One 0-d trust ratio per parameter, in the parameter's dtype (computed per device and dtype at once)."""
    ratios: list[Tensor | None] = [None] * len(params)
    grouped = by_device_and_dtype([params, grads], with_indices=True)
    for (device_params, device_grads), indices in grouped.values():
        param_norms = torch.stack(torch._foreach_norm(device_params))
        grad_norms = torch.stack(torch._foreach_norm(device_grads))
        denominator = grad_norms + weight_decay * param_norms + eps
        ratio = trust_coefficient * param_norms / denominator
        ratio = torch.where((param_norms > 0) & (grad_norms > 0), ratio, torch.ones_like(ratio))
        if trust_clip:
            ratio = torch.clamp(ratio / lr, max=1.0)
        for i, value in zip(indices, ratio.unbind()):
            ratios[i] = value
    return cast("list[Tensor]", ratios)  # every index is set: each parameter is in one group
