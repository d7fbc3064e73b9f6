"""``step_in_backward``: each parameter is updated inside ``backward()`` as soon as its gradient is
accumulated, and the gradient is freed at once, so no model-sized set of gradients ever exists.

The optimizer owns one :class:`StepInBackward`. Its state is one object that the optimizer's attribute
refers to, so a wrapper that copies the optimizer's ``__dict__`` (Lightning's ``LightningOptimizer``)
shares it: ``accumulate()`` through the wrapper then reaches the hooks.

Where its semantics would silently change training it warns or refuses, naming the fix: a second backward
without a ``step()`` (gradients are not accumulated), a framework that clips the gradients it already spent
(optim/frameworks.py), a GradScaler (the update ran before the scaler could unscale or skip).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from torchsgd.optim import amp

__all__ = ["StepInBackward", "check_combination"]


def check_combination(max_grad_norm: float | None, skip_nonfinite: bool, differentiable: bool) -> None:
    """Refuse at construction what step_in_backward cannot do."""
    if max_grad_norm is not None:
        raise ValueError(
            "step_in_backward cannot clip by the global norm (max_grad_norm): the norm needs every gradient "
            "before the first update, and step_in_backward updates each parameter as its gradient arrives"
        )
    if skip_nonfinite:
        raise ValueError(
            "step_in_backward cannot skip non-finite steps (skip_nonfinite): some parameters are already "
            "updated when a later gradient turns out to be NaN or Inf"
        )
    if differentiable:
        raise ValueError("step_in_backward does not support differentiable=True")
    check_not_data_parallel()


def check_not_data_parallel() -> None:
    if (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        raise ValueError(
            "step_in_backward cannot run under torch.distributed data parallelism: DDP reduces gradients "
            "across ranks after the per-parameter hooks fire, so each rank would step on its local gradient"
        )


class StepInBackward:
    """The hooks of one optimizer, and what they need to know between backward passes."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = weakref.ref(optimizer)
        self.hooks: list[Any] = []
        self.accumulating = False
        self.end_queued = False  # this backward pass's end-of-backward callback is queued
        self.backward_without_step = False  # a backward updated, and no step() ran since
        self.warned_accumulation = False
        self.checked_frameworks = False

    def register(self, index: int) -> None:
        """Hook the parameters of param group ``index``."""
        optimizer = self._optimizer()
        assert optimizer is not None, "registered by the optimizer itself"
        state = weakref.ref(self)

        def update(param: Tensor) -> None:
            hooks = state()
            if hooks is not None and not hooks.accumulating:
                hooks.update(param, index)

        for p in optimizer.param_groups[index]["params"]:
            if p.requires_grad:
                self.hooks.append(p.register_post_accumulate_grad_hook(update))

    def update(self, param: Tensor, index: int) -> None:
        optimizer = self._optimizer()
        if optimizer is None:
            return
        if not self.end_queued:
            # Once per backward pass: an optimizer built before init_process_group passed the constructor's
            # check, and must not step each rank on its local gradients now.
            check_not_data_parallel()
            # One rounding step per backward pass, as one optimizer step would be.
            self.end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if self.backward_without_step:
                self._warn_backward_without_step(type(optimizer).__name__)
        # By index: load_state_dict replaces the group dicts, and the update must read the new ones (their
        # lr, as a scheduler or a resume set it).
        optimizer._step_one(param, optimizer.param_groups[index])
        param.grad = None  # the gradient is spent: free it now

    def _end_of_backward(self) -> None:
        self.end_queued = False
        self.backward_without_step = True
        optimizer = self._optimizer()
        if optimizer is not None:
            optimizer.rounding_step += 1

    def after_step(self, optimizer: Any) -> None:
        """step() with step_in_backward: the updates ran in backward; refuse or warn where that misleads."""
        if amp.scaler_active(optimizer):
            raise RuntimeError(
                f"{type(optimizer).__name__}(step_in_backward=True) cannot be used with a GradScaler: each "
                "parameter was updated inside backward with the scaled gradient, before the scaler could "
                "unscale it or skip an overflowing step. Drop the GradScaler (bfloat16 autocast needs none) "
                "or step_in_backward"
            )
        if not self.checked_frameworks:
            from torchsgd.optim.frameworks import spent_gradient_clipping

            self.checked_frameworks = True
            message = spent_gradient_clipping(optimizer)
            if message is not None:
                warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of optimizer.step()
        self.backward_without_step = False

    def _warn_backward_without_step(self, name: str) -> None:
        if self.warned_accumulation:
            return
        self.warned_accumulation = True
        warnings.warn(
            f"{name}(step_in_backward=True): a second backward() ran without a step() in between, and every "
            "backward updates the parameters, so gradients were not accumulated. For gradient accumulation "
            "run all but the last micro-batch under `with optimizer.accumulate():`; for Lightning's "
            "accumulate_grad_batches, HF Trainer's gradient_accumulation_steps and accelerate, see the "
            "recipes in docs/integrations.md. Otherwise call optimizer.step() after each backward. Shown once.",
            RuntimeWarning,
            stacklevel=2,
        )

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        previous = self.accumulating
        self.accumulating = True
        try:
            yield
        finally:
            self.accumulating = previous

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
