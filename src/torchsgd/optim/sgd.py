"""torchsgd.SGD: a drop-in for torch.optim.SGD that validates, keeps torch's state and dispatches to an engine."""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from torchsgd.engines import FUSED, select_engine
from torchsgd.engines.build import native_module
from torchsgd.optim.validation import (
    check_flag,
    check_max_grad_norm,
    check_momentum_dtype,
    check_seed,
    check_sgd_hyperparameters,
    warn_unknown_keys,
)
from torchsgd.rules.gradients import all_finite, clip_coefficient, global_norm
from torchsgd.rules.sgd import SGDHyper, Storage

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
        momentum_dtype: store momentum buffers in this dtype (e.g. ``torch.bfloat16``: half the memory of
            float32 buffers). The update then runs in float32 and each stored value is rounded once.
        stochastic_rounding: round float16/bfloat16 parameters and buffers stochastically when the
            float32 result is stored (unbiased: E[round(x)] = x), for pure low-precision training.
        seed: the stochastic rounding noise's seed (default: drawn from torch's global generator, so
            ``torch.manual_seed`` makes runs repeatable). The state_dict carries it and the step count.
        step_in_backward: update each parameter inside ``backward()`` as soon as its gradient is
            accumulated, and free the gradient at once: no model-sized set of gradients ever exists.
            ``step()`` then only runs the closure and the hooks. Each ``backward()`` updates the
            parameters; run micro-batches for gradient accumulation under ``with optimizer.accumulate():``
            (all but the last). Cannot be combined with ``max_grad_norm``, ``skip_nonfinite`` (they need
            every gradient before any update), ``differentiable``, or a GradScaler.

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
        momentum_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        step_in_backward: bool = False,
        _subclass_defaults: dict[str, Any] | None = None,
    ) -> None:
        check_flag("decoupled_weight_decay", decoupled_weight_decay)
        check_max_grad_norm(max_grad_norm)
        check_flag("skip_nonfinite", skip_nonfinite)
        check_momentum_dtype(momentum_dtype)
        check_flag("stochastic_rounding", stochastic_rounding)
        check_seed(seed)
        check_flag("step_in_backward", step_in_backward)
        if step_in_backward:
            _check_step_in_backward(max_grad_norm, skip_nonfinite, differentiable)
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
        self.momentum_dtype = momentum_dtype
        self.stochastic_rounding = stochastic_rounding
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.rounding_step = 0  # advances once per update; keys the stochastic rounding noise
        self.step_in_backward = step_in_backward
        self._accumulating = False
        self._hooks: list[Any] = []
        super().__init__(params, defaults)
        if fused and not step_in_backward:
            # GradScaler then hands the scale and the overflow flag to step() instead of unscaling itself.
            self._step_supports_amp_scaling = True

    # Options that hold for the whole optimizer (not per group), kept through pickling and deepcopy.
    _GLOBAL_OPTIONS = (
        "max_grad_norm",
        "skip_nonfinite",
        "skipped_steps",
        "momentum_dtype",
        "stochastic_rounding",
        "seed",
        "rounding_step",
        "step_in_backward",
    )
    _GLOBAL_DEFAULTS = dict(
        max_grad_norm=None,
        skip_nonfinite=False,
        skipped_steps=0,
        momentum_dtype=None,
        stochastic_rounding=False,
        seed=0,
        rounding_step=0,
        step_in_backward=False,
    )
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
        self._param_index = None
        if self.step_in_backward:
            self._register_hooks(self.param_groups[-1])

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if self.stochastic_rounding:
            # The noise is a function of (seed, step): with these, a resumed run rounds exactly as an
            # uninterrupted one. torch's load_state_dict ignores the extra key.
            state_dict["torchsgd"] = {"seed": self.seed, "rounding_step": self.rounding_step}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("torchsgd") if isinstance(state_dict, dict) else None
        if extra is not None:
            if not (isinstance(extra, dict) and all(isinstance(extra.get(k), int) for k in ("seed", "rounding_step"))):
                raise ValueError(f"loaded state dict: 'torchsgd' must hold int 'seed' and 'rounding_step', got {extra!r}")
        super().load_state_dict(state_dict)
        if extra is not None and self.stochastic_rounding:
            self.seed, self.rounding_step = extra["seed"], extra["rounding_step"]

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
                setattr(self, name, self._GLOBAL_DEFAULTS[name])
        for name, value in (("last_grad_norm", None), ("_accumulating", False), ("_hooks", [])):
            if not hasattr(self, name):
                setattr(self, name, value)
        self._param_index = None
        if self.momentum_dtype is not None:  # e.g. a torch checkpoint's float32 buffers
            for entry in self.state.values():
                buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
                if isinstance(buffer, Tensor) and buffer.dtype != self.momentum_dtype:
                    entry["momentum_buffer"] = buffer.to(self.momentum_dtype)
        if self.step_in_backward and not self._hooks:  # an unpickled copy owns new parameters
            for group in self.param_groups:
                self._register_hooks(group)

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
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        With ``step_in_backward`` the parameters were already updated inside backward: this runs the
        closure (whose backward updates them) and the step hooks only.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.step_in_backward:
            if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
                raise RuntimeError("step_in_backward cannot be used with a GradScaler: updates happen before it unscales")
            return loss

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

        storage = self._storage()
        for group in self.param_groups:
            self._step_group(group, grad_factor, storage)
        self.rounding_step += 1
        return loss

    def _storage(self) -> Storage | None:
        if self.momentum_dtype is None and not self.stochastic_rounding:
            return None  # torch's rounding after every operation
        return Storage(self.momentum_dtype, self.stochastic_rounding, self.seed, self.rounding_step)

    def _step_group(self, group: dict[str, Any], grad_factor: Tensor | None, storage: Storage | None) -> None:
        select_engine(group).step_group(self, group, SGDHyper.from_group(group, grad_factor, storage))

    # ------------------------------------------------------------------------------- step in backward

    def _register_hooks(self, group: dict[str, Any]) -> None:
        optimizer = weakref.ref(self)

        def update(param: Tensor) -> None:
            opt = optimizer()
            if opt is not None and not opt._accumulating:
                opt._update_in_backward(param, group)

        for p in group["params"]:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(update))

    def _update_in_backward(self, param: Tensor, group: dict[str, Any]) -> None:
        if not getattr(self, "_end_of_backward_queued", False):
            # One rounding step per backward pass, as one optimizer step would be.
            self._end_of_backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        with torch.no_grad():
            self._step_group({**group, "params": [param]}, None, self._storage())
        param.grad = None  # the gradient is spent: free it now

    def _end_of_backward(self) -> None:
        self._end_of_backward_queued = False
        self.rounding_step += 1

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """With ``step_in_backward``: backward passes inside this block only accumulate gradients.

        The first backward after the block updates with the accumulated gradients::

            for micro_batch in batches[:-1]:
                with optimizer.accumulate():
                    loss_fn(model(micro_batch)).backward()
            loss_fn(model(batches[-1])).backward()     # updates and frees the gradients
        """
        previous = self._accumulating
        self._accumulating = True
        try:
            yield
        finally:
            self._accumulating = previous

    def remove_hooks(self) -> None:
        """Detach the step-in-backward hooks from the parameters (the optimizer stops updating them)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

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


def _check_step_in_backward(max_grad_norm: float | None, skip_nonfinite: bool, differentiable: bool) -> None:
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
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError(
            "step_in_backward cannot run under torch.distributed data parallelism: DDP reduces gradients "
            "across ranks after the per-parameter hooks fire, so each rank would step on its local gradient"
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
