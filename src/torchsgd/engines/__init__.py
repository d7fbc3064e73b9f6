"""Engines: interchangeable ways of running an update rule over memory.

- ``reference``: one tensor at a time; bitwise torch.optim.SGD(foreach=False). Everything runs here.
- ``foreach``: lists of same-device, same-dtype tensors through torch's _foreach kernels.
- ``fused``: one native pass over a whole param group (CPU), falling back to ``foreach`` otherwise.

:func:`select_engine` maps a param group's ``foreach`` / ``fused`` flags to an engine, keeping torch's
meaning of the flags.
"""

from __future__ import annotations

from typing import Any

import torch

from torchsgd.engines.base import Engine, Ran, TensorListEngine
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.engines.fused import FusedEngine
from torchsgd.engines.reference import ReferenceEngine

__all__ = [
    "Engine",
    "Ran",
    "TensorListEngine",
    "ReferenceEngine",
    "ForeachEngine",
    "FusedEngine",
    "select_engine",
    "REFERENCE",
    "FOREACH",
    "FUSED",
]

REFERENCE = ReferenceEngine()
FOREACH = ForeachEngine()
FUSED = FusedEngine()


def select_engine(group: dict[str, Any]) -> Engine:
    """The engine for one step of one param group, from its flags.

    ``foreach=False`` (and ``fused`` not True) is the reference engine; ``foreach=True`` the multi-tensor
    engine; ``fused=True`` and the default (both None) the fused engine, which hands any group it cannot
    take as it is to the multi-tensor engine. ``fused=False`` with ``foreach=None`` is the multi-tensor
    engine. Autograd through the step (``differentiable``) always runs on the reference engine, and
    torch.compile traces the multi-tensor engine.
    """
    if group["differentiable"]:
        return REFERENCE
    fused, foreach = group["fused"], group["foreach"]
    if foreach:  # also with fused=True (a group's flag against the defaults'): torch then runs foreach too
        return FOREACH
    if fused:
        return FOREACH if torch.compiler.is_compiling() else FUSED
    if foreach is False:
        return REFERENCE
    if fused is False or torch.compiler.is_compiling():
        return FOREACH
    return FUSED
