"""Engines: interchangeable ways of running an update rule over memory.

- ``reference``: one tensor at a time; bitwise torch.optim.SGD(foreach=False). Everything runs here.
- ``foreach``: lists of same-device, same-dtype tensors through torch's _foreach kernels.

:func:`select_engine` maps a param group's ``foreach`` / ``fused`` flags to an engine, keeping torch's
meaning of the flags.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchsgd.engines.base import Engine
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.engines.reference import ReferenceEngine

__all__ = ["Engine", "ReferenceEngine", "ForeachEngine", "select_engine", "REFERENCE", "FOREACH"]

REFERENCE = ReferenceEngine()
FOREACH = ForeachEngine()


def select_engine(group: dict[str, Any], params: list[Tensor], *, has_sparse_grad: bool) -> Engine:
    """The engine for one step of one param group.

    ``foreach=False`` (and ``fused`` not True) is the reference engine; ``foreach=True`` the multi-tensor
    engine; ``fused=True`` the fused engine; both None the fastest engine that is correct for ``params``.
    Autograd through the step (``differentiable``) and sparse gradients always run on the reference engine.
    """
    if group["differentiable"] or has_sparse_grad:
        return REFERENCE
    fused, foreach = group["fused"], group["foreach"]
    if torch.compiler.is_compiling():
        return FOREACH
    if fused:
        return FOREACH
    if foreach:
        return FOREACH
    if foreach is False:
        return REFERENCE
    return FOREACH
