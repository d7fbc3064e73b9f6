"""torchsgd.SGD: a drop-in for torch.optim.SGD that validates, keeps torch's state and dispatches to an engine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from torchsgd.engines import select_engine
from torchsgd.optim.validation import check_sgd_hyperparameters, warn_unknown_keys
from torchsgd.rules.sgd import SGDHyper

__all__ = ["SGD"]

# Keys torch's SGD back-fills when a state_dict from an older torch lacks them.
_BACKFILL = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}


def grad_mode_for_step(step: Callable) -> Callable:
    """Run ``step`` with autograd on only for ``differentiable=True`` (torch's ``_use_grad_for_differentiable``).

    Under torch.compile it breaks the graph around the step, as torch does, so that the compiled update
    is an inference graph that updates parameters in place.
    """

    @functools.wraps(step)
    def wrapper(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        previous = torch.is_grad_enabled()
        compiling = torch.compiler.is_compiling()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            if compiling:
                torch._dynamo.graph_break()
            return step(self, *args, **kwargs)
        finally:
            if compiling:
                torch._dynamo.graph_break()
            torch.set_grad_enabled(previous)

    return wrapper


class SGD(Optimizer):
    r"""Stochastic gradient descent, optionally with momentum: ``torch.optim.SGD``, exactly.

    For each parameter θ with gradient ∇ (γ = lr, λ = weight_decay, μ = momentum, τ = dampening)::

        g ← −∇ if maximize else ∇
        g ← g + λ·θ                      (if λ ≠ 0)
        b ← g on the parameter's first step, else  b ← μ·b + (1 − τ)·g      (if μ ≠ 0)
        g ← g + μ·b if nesterov else b               (if μ ≠ 0)
        θ ← θ − γ·g

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs, or of param-group dicts.
        lr: learning rate γ, a float or a 1-element Tensor (default 1e-3).
        momentum: momentum factor μ (default 0).
        dampening: dampening τ of the momentum, in [0, 1] (default 0). Not applied on the first step.
        weight_decay: L2 penalty λ, added to the gradient (default 0).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximize the objective instead of minimizing it.
        foreach: ``False`` runs the per-tensor reference engine (bitwise torch's loop);
            ``True`` the multi-tensor engine (bitwise the reference on CPU).
        differentiable: run the step under autograd so gradients flow through it (reference engine).
        fused: ``True`` runs the fused engine. It supports GradScaler's in-step unscale and skip, like
            torch's fused SGD. Until the one-pass kernel lands, it runs the multi-tensor engine.

    With ``foreach=None`` and ``fused=None`` (the default) the engine is chosen per param group for the
    tensors at hand; every choice gives torch's numbers within the bound documented in the README.

    Example:
        >>> import torch, torchsgd
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
        >>> model(torch.ones(2, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        # Engine-flag conflicts are torch's RuntimeErrors raised after the params are read; every
        # group is checked again, merged with these defaults, in add_param_group.
        check_sgd_hyperparameters({**defaults, "fused": None, "foreach": None})
        super().__init__(params, defaults)
        if fused:
            # GradScaler then hands the scale and the overflow flag to step() instead of unscaling itself.
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its options are validated like the constructor's before anything changes."""
        if isinstance(param_group, dict):
            options = {**self.defaults, **param_group}
            check_sgd_hyperparameters(options)
            warn_unknown_keys(param_group, self.defaults, type(self).__name__)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here with the state it built: check it before anything is replaced, so a
        # bad state_dict leaves the optimizer exactly as it was.
        for group in state["param_groups"]:
            for key, value in _BACKFILL.items():
                group.setdefault(key, value)
        _check_loaded_state(state)
        super().__setstate__(state)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffer_list: list[Tensor | None],
    ) -> bool:
        """Collect the group's parameters that have a gradient; return whether any gradient is sparse."""
        has_sparse_grad = False
        with_momentum = group["momentum"] != 0
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            params.append(p)
            grads.append(grad)
            has_sparse_grad = has_sparse_grad or grad.is_sparse
            if with_momentum:
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))
        return has_sparse_grad

    @grad_mode_for_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Set by GradScaler when _step_supports_amp_scaling (fused=True): skip on overflow, else unscale.
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.item()):
            return loss  # the whole step is skipped, state included
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            _unscale_([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], grad_scale)

        for group in self.param_groups:
            select_engine(group).step_group(self, group, SGDHyper.from_group(group))
        return loss


def _unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients by GradScaler's scale in place, with the numbers of ``GradScaler.unscale_``."""
    inv_scale = grad_scale.double().reciprocal().float()
    per_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        per_device.setdefault(grad.device, []).append(grad._values() if grad.is_sparse else grad)
    for device, device_grads in per_device.items():
        torch._foreach_mul_(device_grads, inv_scale.to(device))


def _check_loaded_state(state: dict[str, Any]) -> None:
    """Reject a loaded state that does not fit the parameters, naming the offending entry."""
    params = {p: (i, j) for i, group in enumerate(state["param_groups"]) for j, p in enumerate(group["params"])}
    for i, group in enumerate(state["param_groups"]):
        try:
            check_sgd_hyperparameters(group)
        except (ValueError, TypeError, RuntimeError) as error:
            raise type(error)(f"loaded state dict, param group {i}: {error}") from None
    for key, entry in state["state"].items():
        if key not in params:
            raise ValueError(f"loaded state dict has state for {key!r}, which is not a parameter of the optimizer")
        if not isinstance(entry, dict):
            raise TypeError(f"loaded state dict: state of parameter {params[key]} must be a dict, got {type(entry).__name__}")
        buffer = entry.get("momentum_buffer")
        if buffer is None:
            continue
        where = "group {}, parameter {}".format(*params[key])
        if not isinstance(buffer, Tensor):
            raise TypeError(f"loaded state dict: momentum_buffer of {where} must be a Tensor, got {type(buffer).__name__}")
        if buffer.shape != key.shape:
            raise ValueError(
                f"loaded state dict: momentum_buffer of {where} has shape {tuple(buffer.shape)}, "
                f"the parameter has shape {tuple(key.shape)}"
            )
