"""What every engine is: a way of running the SGD rule over the tensors of one param group."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

from torchsgd.precision import BUFFER, PARAM, store, stream_key
from torchsgd.rules.sgd import SGDHyper

# One trust ratio per entry of group["params"] (LARS), None where a parameter is not adapted.
TrustRatios = list[Tensor | None]


class Engine(Protocol):
    """Runs one SGD step over one param group of an optimizer, keeping torch's state format."""

    name: str

    def step_group(
        self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> None: ...


def _is_dtensor(t: Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no tensor can be a DTensor
    return module is not None and isinstance(t, module.DTensor)


def param_index(optimizer: Optimizer, param: Tensor) -> int:
    """The parameter's position in the optimizer (its key in the state_dict): its noise stream."""
    index = getattr(optimizer, "_param_index", None)
    if index is None or id(param) not in index:
        index = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        optimizer._param_index = index
    return index[id(param)]


class TensorListEngine:
    """An engine that works on the lists torch's ``_init_group`` collects (params with a gradient).

    Subclasses implement :meth:`step`: update ``params`` in place and fill ``momentum_buffers`` (one entry
    per parameter, None where the parameter has no buffer yet) with the new or updated buffers.
    """

    name = "tensor-list"

    def step_group(
        self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momentum_buffers: list[Tensor | None] = []
        optimizer._init_group(group, params, grads, momentum_buffers)
        if not params:
            return
        if trust_ratios is not None:
            trust_ratios = [t for p, t in zip(group["params"], trust_ratios) if p.grad is not None]
        if hyper.storage is None:
            self.step(params, grads, momentum_buffers, hyper, trust_ratios)
        else:
            self._lifted_step(optimizer, params, grads, momentum_buffers, hyper, trust_ratios)
        if hyper.momentum != 0:
            state = optimizer.state
            for p, buffer in zip(params, momentum_buffers):
                state[p]["momentum_buffer"] = buffer

    def _lifted_step(
        self,
        optimizer: Optimizer,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None,
    ) -> None:
        """Run the rule on float32 (float64) copies, then store each result rounded once (see Storage)."""
        storage = hyper.storage
        if storage.stochastic_rounding and any(_is_dtensor(p) for p in params):
            # The noise is drawn per element of a whole plain tensor (precision.element_hash); on a DTensor's
            # shard that fails inside DTensor dispatch with an unrelated message, and drawing it per local
            # shard would give every shard the same noise. Refuse clearly until shards draw their own slice.
            raise NotImplementedError(
                "stochastic_rounding does not support DTensor parameters (FSDP2 fully_shard, tensor parallel) "
                "yet; use round-to-nearest (stochastic_rounding=False; momentum_dtype works) or keep float32 "
                "parameters"
            )
        compute = [torch.promote_types(p.dtype, torch.float32) for p in params]
        lifted_params = [p.detach().to(c) for p, c in zip(params, compute)]
        lifted_grads = [g.to(c) for g, c in zip(grads, compute)]
        with_momentum = hyper.momentum != 0
        lifted_buffers = [b if b is None else b.to(c) for b, c in zip(momentum_buffers, compute)] if with_momentum else []
        self.step(lifted_params, lifted_grads, lifted_buffers, dataclasses.replace(hyper, storage=None), trust_ratios)

        for i, p in enumerate(params):
            key = stream_key(storage.seed, storage.step, param_index(optimizer, p)) if storage.stochastic_rounding else None
            if p.dtype != compute[i]:
                p.detach().copy_(store(lifted_params[i], p.dtype, key, PARAM))
            if with_momentum:
                dtype = storage.momentum_dtype or p.dtype
                value = store(lifted_buffers[i], dtype, key, BUFFER)
                if momentum_buffers[i] is None:
                    momentum_buffers[i] = value
                elif value is not momentum_buffers[i]:
                    momentum_buffers[i].copy_(value)

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None = None,
    ) -> None:
        raise NotImplementedError
