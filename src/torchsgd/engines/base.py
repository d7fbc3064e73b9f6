"""What every engine is: a way of running the SGD rule over the tensors of one param group."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from torchsgd.rules.sgd import SGDHyper


class Engine(Protocol):
    """Runs one SGD step over a param group's tensors that have a gradient.

    ``momentum_buffers`` holds one entry per parameter (None where the parameter has no buffer yet);
    the engine updates the buffers in place, puts new buffers into the list, and updates ``params`` in
    place. With ``momentum == 0`` the list is ignored.
    """

    name: str

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
    ) -> None: ...
