"""Engines: interchangeable ways of running an update rule over memory.

- ``reference``: one tensor at a time; bitwise torch.optim.SGD(foreach=False). Everything runs here.
- ``foreach``: lists of same-device, same-dtype tensors through torch's _foreach kernels.
- ``fused``: one native pass over a whole param group (CPU), falling back to ``foreach`` otherwise.
- ``triton``: one Triton launch per dtype pair over a whole param group (CUDA; CPU under Triton's
  interpreter), falling back to ``foreach`` otherwise. Needs the ``cuda`` extra (``pip install
  'torchsgd[cuda]'``).

:func:`select_engine` maps a param group's ``foreach`` / ``fused`` flags to an engine, keeping torch's
meaning of the flags; the ``TORCHSGD_ENGINE`` environment variable overrides them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from torchsgd.engines import triton as _triton
from torchsgd.engines.base import Engine, Ran, TensorListEngine
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.engines.fused import FusedEngine
from torchsgd.engines.reference import ReferenceEngine
from torchsgd.engines.triton import TritonEngine

__all__ = [
    "Engine",
    "Ran",
    "TensorListEngine",
    "ReferenceEngine",
    "ForeachEngine",
    "FusedEngine",
    "TritonEngine",
    "select_engine",
    "forced_engine",
    "ENGINE_VARIABLE",
    "REFERENCE",
    "FOREACH",
    "FUSED",
    "TRITON",
]

REFERENCE = ReferenceEngine()
FOREACH = ForeachEngine()
FUSED = FusedEngine()
TRITON = TritonEngine()

ENGINE_VARIABLE = "TORCHSGD_ENGINE"
_BY_NAME: dict[str, Engine] = {"reference": REFERENCE, "foreach": FOREACH, "fused": FUSED, "triton": TRITON}


def forced_engine() -> Engine | None:
    """The engine ``TORCHSGD_ENGINE`` names (None when it is unset or empty), read at every call.

    Read per step, so a test or a benchmark can set it between steps; an unknown name is an error.
    """
    name = os.environ.get(ENGINE_VARIABLE, "").strip()
    if not name:
        return None
    engine = _BY_NAME.get(name.lower())
    if engine is None:
        raise ValueError(
            f"{ENGINE_VARIABLE}={name!r} names no engine: expected one of {', '.join(_BY_NAME)} (or unset it)"
        )
    return engine


def select_engine(group: dict[str, Any]) -> Engine:
    """The engine for one step of one param group, from its flags.

    ``foreach=False`` (and ``fused`` not True) is the reference engine; ``foreach=True`` the multi-tensor
    engine; ``fused=True`` and the default (both None) the fused engine for CPU groups and the Triton
    engine for CUDA groups, each of which hands any group it cannot take as it is to the multi-tensor
    engine (saying why in ``SGD.engine_report()``; without Triton installed, one log line says so too).
    ``fused=False`` with ``foreach=None`` is the multi-tensor engine.

    ``TORCHSGD_ENGINE=reference|foreach|fused|triton`` in the environment forces that engine for every
    group, whatever its flags (for tests, benchmarks and bug reports; read at every step). Two things
    hold even then: autograd through the step (``differentiable``) runs on the reference engine, and
    torch.compile traces the multi-tensor engine where a native or Triton engine is asked for.
    """
    if group["differentiable"]:
        return REFERENCE
    forced = forced_engine()
    if forced is not None:
        if forced in (FUSED, TRITON) and torch.compiler.is_compiling():
            return FOREACH
        return forced
    fused, foreach = group["fused"], group["foreach"]
    if foreach:  # also with fused=True (a group's flag against the defaults'): torch then runs foreach too
        return FOREACH
    if fused:
        return FOREACH if torch.compiler.is_compiling() else _native(group)
    if foreach is False:
        return REFERENCE
    if fused is False or torch.compiler.is_compiling():
        return FOREACH
    return _native(group)


def _native(group: dict[str, Any]) -> Engine:
    """The one-pass engine for the group's device: Triton for CUDA, the native CPU kernel otherwise."""
    return TRITON if _triton.device_type(group) == "cuda" else FUSED
