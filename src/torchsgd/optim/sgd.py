"""torchsgd.SGD: a drop-in for torch.optim.SGD that validates, keeps torch's state and dispatches to an engine."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

import warnings

from torchsgd.engines import FUSED, select_engine
from torchsgd.engines.build import native_module
from torchsgd.optim.validation import check_flag, check_max_grad_norm, check_sgd_hyperparameters, warn_unknown_keys
from torchsgd.rules.gradients import all_finite, clip_coefficient, global_norm
from torchsgd.rules.sgd import SGDHyper

__all__ = ["SGD", "SGDW"]

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
        g ← c·g,  c = min(max_norm / (‖∇‖ + 1e-6), 1)     (if max_grad_norm; ‖∇‖ over all parameters)
        θ ← θ·(1 − γλ)                   (if decoupled_weight_decay) ...
        g ← g + λ·θ                      ... else (if λ ≠ 0)
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
        fused: ``True`` runs the fused engine (one native pass over each param group on CPU; groups it
            cannot take run on the multi-tensor engine). Like torch's fused SGD it takes GradScaler's
            in-step unscale and skip.
        decoupled_weight_decay: decay the weights directly, θ ← θ·(1 − γλ), instead of adding λθ to the
            gradient (SGDW; the convention of torch.optim.AdamW). Per param group.
        max_grad_norm: clip all gradients together by their global L2 norm inside the step, with the
            numbers of ``torch.nn.utils.clip_grad_norm_`` followed by a step. The pre-clip norm of the
            last step is ``optimizer.last_grad_norm``. The gradients in ``.grad`` are left as they are.
        skip_nonfinite: if any gradient holds a NaN or an infinity, skip the whole step (parameters and
            state stay bitwise unchanged), count it in ``optimizer.skipped_steps`` and warn once.

    With ``foreach=None`` and ``fused=None`` (the default) the fused engine runs; every engine gives
    torch's numbers (bitwise for float32/float64; the bound for float16/bfloat16 is in the README).

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
        decoupled_weight_decay: bool = False,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        _subclass_defaults: dict[str, Any] | None = None,
    ) -> None:
        check_flag("decoupled_weight_decay", decoupled_weight_decay)
        check_max_grad_norm(max_grad_norm)
        check_flag("skip_nonfinite", skip_nonfinite)
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
        if decoupled_weight_decay:
            # Only when used, so that a plain SGD's state_dict has exactly torch's keys.
            defaults["decoupled_weight_decay"] = True
        defaults.update(_subclass_defaults or {})
        # Engine-flag conflicts are torch's RuntimeErrors raised after the params are read; every
        # group is checked again, merged with these defaults, in add_param_group.
        self._check_options({**defaults, "fused": None, "foreach": None})
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_grad_norm: Tensor | None = None
        super().__init__(params, defaults)
        if fused:
            # GradScaler then hands the scale and the overflow flag to step() instead of unscaling itself.
            self._step_supports_amp_scaling = True

    # Options that hold for the whole optimizer (not per group), kept through pickling and deepcopy.
    _GLOBAL_OPTIONS = ("max_grad_norm", "skip_nonfinite", "skipped_steps")
    _GROUP_OPTIONS = ("decoupled_weight_decay",)

    @staticmethod
    def _check_options(options: dict[str, Any]) -> None:
        """Validate one group's options (subclasses add their own)."""
        check_sgd_hyperparameters(options)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["torchsgd"] = {name: getattr(self, name) for name in self._GLOBAL_OPTIONS}
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its options are validated like the constructor's before anything changes."""
        if isinstance(param_group, dict):
            options = {**self.defaults, **param_group}
            self._check_options(options)
            warn_unknown_keys(param_group, [*self.defaults, *self._GROUP_OPTIONS], type(self).__name__)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here with the state it built: check it before anything is replaced, so a
        # bad state_dict leaves the optimizer exactly as it was.
        for group in state["param_groups"]:
            for key, value in _BACKFILL.items():
                group.setdefault(key, value)
        _check_loaded_state(state, self._check_options)
        options = state.pop("torchsgd", {})
        super().__setstate__(state)
        for name in self._GLOBAL_OPTIONS:  # from a pickle; load_state_dict keeps the running options
            if name in options:
                setattr(self, name, options[name])
            elif not hasattr(self, name):
                setattr(self, name, 0 if name == "skipped_steps" else None if name == "max_grad_norm" else False)
        if not hasattr(self, "last_grad_norm"):
            self.last_grad_norm = None

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
            _unscale_(self._all_grads(), grad_scale)

        grad_factor = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            finite, grad_factor = self._check_gradients()
            if not finite and self.skip_nonfinite:
                self._skip_step()
                return loss

        for group in self.param_groups:
            self._step_group(group, grad_factor)
        return loss

    def _step_group(self, group: dict[str, Any], grad_factor: Tensor | None) -> None:
        select_engine(group).step_group(self, group, SGDHyper.from_group(group, grad_factor))

    def _all_grads(self) -> list[Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _check_gradients(self) -> tuple[bool, Tensor | None]:
        """Whether every gradient is finite, and the clip coefficient (None without clipping).

        With clipping the global norm is computed anyway and is finite exactly when the gradients are, so
        the non-finite guard costs nothing more; without it, one read of the gradients decides.
        """
        if self.max_grad_norm is not None:
            total_norm = global_norm(self._all_grads())
            self.last_grad_norm = total_norm
            return bool(torch.isfinite(total_norm).item()), clip_coefficient(total_norm, self.max_grad_norm)
        kernel = native_module() if any(select_engine(g) is FUSED for g in self.param_groups) else None
        for group in self.param_groups:
            verdict = kernel.grads_finite(group["params"]) if kernel is not None else None
            if verdict is None:
                verdict = all_finite([p.grad for p in group["params"] if p.grad is not None])
            if not verdict:
                return False, None
        return True, None

    def _skip_step(self) -> None:
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(
                f"{type(self).__name__}: a gradient holds NaN or Inf; the step was skipped and parameters and "
                "state are unchanged (skip_nonfinite=True). Skipped steps are counted in "
                "optimizer.skipped_steps; this warning is shown once.",
                RuntimeWarning,
                stacklevel=4,
            )


def _unscale_(grads: list[Tensor], grad_scale: Tensor) -> None:
    """Divide gradients by GradScaler's scale in place, with the numbers of ``GradScaler.unscale_``."""
    inv_scale = grad_scale.double().reciprocal().float()
    per_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        per_device.setdefault(grad.device, []).append(grad._values() if grad.is_sparse else grad)
    for device, device_grads in per_device.items():
        torch._foreach_mul_(device_grads, inv_scale.to(device))


def _check_loaded_state(state: dict[str, Any], check_options: Callable[[dict[str, Any]], None]) -> None:
    """Reject a loaded state that does not fit the parameters, naming the offending entry."""
    params = {p: (i, j) for i, group in enumerate(state["param_groups"]) for j, p in enumerate(group["params"])}
    for i, group in enumerate(state["param_groups"]):
        try:
            check_options(group)
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


class SGDW(SGD):
    r"""SGD with decoupled weight decay: ``SGD(..., decoupled_weight_decay=True)``.

    The decay shrinks the weights directly and never enters the gradient or the momentum buffer
    (the convention of torch.optim.AdamW; Loshchilov & Hutter, "Decoupled Weight Decay Regularization")::

        θ ← θ·(1 − γλ)
        b ← g on the first step, else μ·b + (1 − τ)·g
        θ ← θ − γ·(g + μ·b if nesterov else b)

    Under a changing lr the two differ: coupled L2 (λθ added to g) is accumulated in the momentum buffer
    and so keeps acting with old learning rates; decoupled decay acts with the current lr only.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, **kwargs)
