"""The multi-tensor engine: the rule applied to lists of same-device, same-dtype tensors at once.

It runs the very same rule as the reference engine through torch's ``_foreach`` kernels, so on CPU it is
bitwise equal to the reference. Parameters whose momentum buffer does not exist yet (their first step)
form their own list, so "first step" stays a per-parameter notion.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from torchsgd.engines.base import TensorListEngine, TrustRatios
from torchsgd.engines.reference import ReferenceEngine
from torchsgd.rules.sgd import COMPILED_LIST, LIST, SGDHyper, sgd_update

_reference = ReferenceEngine()


T = TypeVar("T")


def take(items: list[T], positions: list[int]) -> list[T]:
    return [items[k] for k in positions]


def pick(items: list[T] | None, positions: list[int]) -> list[T] | None:
    return take(items, positions) if items is not None else None


class ForeachEngine(TensorListEngine):
    name = "foreach"

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None = None,
    ) -> None:
        if not params:
            return
        if (
            any(g.is_sparse for g in grads)
            or len(set(map(id, params))) != len(params)
            or (trust_ratios is not None and any(t is None for t in trust_ratios))
        ):
            # _foreach kernels take no sparse tensors, a parameter listed twice must be updated twice in
            # sequence (as torch's loop does), and a partly adapted list has no single formula: such
            # groups run tensor by tensor.
            _reference.step(params, grads, momentum_buffers, hyper, trust_ratios)
            return
        with_momentum = hyper.momentum != 0
        grouped: dict[Any, tuple[Any, list[int]]]
        if torch.compiler.is_compiling():
            grouped = {None: ((params, grads), list(range(len(params))))}
            algebra = COMPILED_LIST  # a scheduled momentum stays a graph input (see _CompiledTensorList)
        else:
            grouped = _group_tensors_by_device_and_dtype(
                [cast("list[Tensor | None]", params), cast("list[Tensor | None]", grads)], with_indices=True
            )
            algebra = LIST
        for tensors, device_indices in grouped.values():
            device_params, device_grads = cast("tuple[list[Tensor], list[Tensor]]", tuple(tensors))
            device_trust = cast("list[Tensor] | None", pick(trust_ratios, device_indices))  # no None: see above
            if not with_momentum:
                sgd_update(algebra, device_params, device_grads, None, hyper, device_trust)
                continue
            # Split by whether the buffer exists: the first step clones, later steps accumulate.
            existing = [k for k, i in enumerate(device_indices) if momentum_buffers[i] is not None]
            fresh = [k for k, i in enumerate(device_indices) if momentum_buffers[i] is None]
            if existing:
                sgd_update(
                    algebra,
                    take(device_params, existing),
                    take(device_grads, existing),
                    [cast(Tensor, momentum_buffers[device_indices[k]]) for k in existing],
                    hyper,
                    pick(device_trust, existing),
                )
            if fresh:
                new_buffers = sgd_update(
                    algebra,
                    take(device_params, fresh),
                    take(device_grads, fresh),
                    None,
                    hyper,
                    pick(device_trust, fresh),
                )
                for k, buffer in zip(fresh, cast("list[Tensor]", new_buffers)):
                    momentum_buffers[device_indices[k]] = buffer
