"""What every engine is: a way of running the SGD rule over the tensors of one param group."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor
from torch.optim import Optimizer

from torchsgd.rules.sgd import SGDHyper

# One trust ratio per entry of group["params"] (LARS), None where a parameter is not adapted.
TrustRatios = list[Tensor | None]


class Engine(Protocol):
    """Runs one SGD step over one param group of an optimizer, keeping torch's state format."""

    name: str

    def step_group(
        self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> None: ...


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
        self.step(params, grads, momentum_buffers, hyper, trust_ratios)
        if hyper.momentum != 0:
            state = optimizer.state
            for p, buffer in zip(params, momentum_buffers):
                state[p]["momentum_buffer"] = buffer

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None = None,
    ) -> None:
        raise NotImplementedError
