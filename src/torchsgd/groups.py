"""Param-group helpers: keep weight decay off biases and normalization weights.

Decaying a bias or a norm layer's scale pulls it toward 0, which is rarely wanted; the usual recipe (BERT,
ResNet training with LARS, timm) puts them in a group with ``weight_decay=0``. The groups this returns
feed any torch optimizer, torchsgd's or torch's.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

__all__ = ["param_groups", "NORM_LAYERS"]

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    exclude: Iterable[str] = (),
    exclude_1d: bool = True,
    exclude_norm: bool = True,
    named: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a decayed group and a ``weight_decay=0`` group.

    A parameter gets no decay when any rule matches:

    - ``exclude_1d``: it has at most one dimension (every bias, every norm layer's weight);
    - ``exclude_norm``: it belongs to a normalization layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...);
    - ``exclude``: its qualified name matches one of these shell-style patterns, e.g. ``"*.bias"``,
      ``"pos_embed"``, ``"*embedding*"``.

    Args:
        model: the module whose ``named_parameters()`` are grouped (frozen parameters are left out; a
            parameter shared by several modules appears once).
        weight_decay: the decay of the decayed group.
        named: give ``(name, parameter)`` pairs, so the optimizer's state_dict records the names.
        options: any other option to put in both groups (e.g. ``lr=0.1``).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay, ...}, {"params": others, "weight_decay": 0.0,
        ...}]``, leaving out a group that would be empty.

    Example:
        >>> import torch, torchsgd
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        >>> groups = torchsgd.param_groups(model, weight_decay=5e-4)
        >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
        ([2, 4], [0.0005, 0.0])
        >>> opt = torchsgd.SGD(groups, lr=0.1, momentum=0.9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    norm_params: set[int] = set()  # the ids of the norm layers' parameters
    if exclude_norm:
        for module in model.modules():
            if isinstance(module, NORM_LAYERS):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    decayed: list[Any] = []
    undecayed: list[Any] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            (exclude_1d and param.ndim <= 1)
            or id(param) in norm_params
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        )
        (undecayed if skip else decayed).append((name, param) if named else param)
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay, **options})
    if undecayed:
        groups.append({"params": undecayed, "weight_decay": 0.0, **options})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups
