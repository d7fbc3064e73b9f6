"""The reference engine: the rule applied one tensor at a time (torch's single-tensor path).

Bitwise equal to ``torch.optim.SGD(foreach=False)`` for everything torch supports: every dtype, complex,
sparse gradients, ``differentiable=True``.
"""

from __future__ import annotations

from torch import Tensor

from torchsgd.engines.base import TensorListEngine, TrustRatios
from torchsgd.rules.sgd import TENSOR, SGDHyper, sgd_update


class ReferenceEngine(TensorListEngine):
    name = "reference"

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None = None,
    ) -> None:
        with_momentum = hyper.momentum != 0
        for i, (param, grad) in enumerate(zip(params, grads)):
            buffer = momentum_buffers[i] if with_momentum else None
            trust = trust_ratios[i] if trust_ratios is not None else None
            buffer = sgd_update(TENSOR, param, grad, buffer, hyper, trust)
            if with_momentum:
                momentum_buffers[i] = buffer
