"""What every engine is: a way of running the SGD rule over the tensors of one param group."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor
from torch.optim import Optimizer

from torchsgd.rules.sgd import SGDHyper


class Engine(Protocol):
    """Runs one SGD step over one param group of an optimizer, keeping torch's state format."""

    name: str

    def step_group(self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper) -> None: ...


class TensorListEngine:
    """An engine that works on the lists torch's ``_init_group`` collects (params with a gradient).

    Subclasses implement :meth:`step`: update ``params`` in place and fill ``momentum_buffers`` (one entry
    per parameter, None where the parameter has no buffer yet) with the new or updated buffers.
    """

    name = "tensor-list"

    def step_group(self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momentum_buffers: list[Tensor | None] = []
        optimizer._init_group(group, params, grads, momentum_buffers)
        if not params:
            return
        self.step(params, grads, momentum_buffers, hyper)
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
    ) -> None:
        raise NotImplementedError
