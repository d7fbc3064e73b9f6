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

OVERLAP_REASON = "parameters share memory (one listed twice, or views that overlap): torch's loop, in order"


@dataclasses.dataclass(frozen=True)
class Ran:
    """What updated a param group: the engine's name, and why it is not the engine selected (or None)."""

    engine: str
    reason: str | None = None


class Engine(Protocol):
    """Runs one SGD step over one param group of an optimizer, keeping torch's state format."""

    name: str

    def step_group(
        self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> Ran: ...


def memory_overlaps(tensors: list[Tensor]) -> bool:
    """Whether any two of these tensors share memory (the same tensor twice, or overlapping views).

    Updating such tensors is order-dependent (each update reads what an earlier one wrote), so a group
    holding them runs torch's per-tensor loop. Tensors on different devices never overlap; a tensor's span
    is the bytes from its first to its last element, so interleaved views (x[::2], x[1::2]) count as
    overlapping too, which costs speed, never correctness.
    """
    from torchsgd.engines.build import native_module

    kernel = native_module()
    verdict = None if kernel is None else kernel.overlapping(tensors)
    if verdict is not None:
        return verdict
    spans = []
    for t in tensors:
        if _is_dtensor(t):
            t = t.to_local()
        if t.numel() == 0 or t.is_sparse or t.is_meta:
            continue
        start = t.data_ptr()
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) * t.element_size()
        spans.append((str(t.device), start, start + last + t.element_size()))
    spans.sort()
    return any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]))


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
        ran = Ran(self.name)
        if not params:
            return ran
        if trust_ratios is not None:
            trust_ratios = [t for p, t in zip(group["params"], trust_ratios) if p.grad is not None]
        with_momentum = hyper.momentum != 0
        engine: TensorListEngine = self
        # (Not while torch.compile traces the step: the check reads addresses, which a graph cannot.)
        if self.name != "reference" and len(params) > 1 and not torch.compiler.is_compiling() and memory_overlaps(params):
            from torchsgd.engines.reference import ReferenceEngine

            engine, ran = ReferenceEngine(), Ran("reference", OVERLAP_REASON)
        if hyper.storage is None:
            engine.step(params, grads, momentum_buffers, hyper, trust_ratios)
        else:
            engine._lifted_step(optimizer, params, grads, momentum_buffers, hyper, trust_ratios)
        if with_momentum:
            state = optimizer.state
            for p, buffer in zip(params, momentum_buffers):
                state[p]["momentum_buffer"] = buffer
        return ran

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

