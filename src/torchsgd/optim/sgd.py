"""torchsgd.SGD: a drop-in for torch.optim.SGD that validates, keeps torch's state and dispatches to an engine."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from torchsgd.engines import FUSED, Ran, select_engine
from torchsgd.engines.build import native_module
from torchsgd.engines.fused import reserve_buffers
from torchsgd.optim import amp, checkpoint
from torchsgd.optim.base import LazyDynamoOptimizer
from torchsgd.optim.in_backward import StepInBackward, check_combination
from torchsgd.optim.options import OPTIMIZER_WIDE, RUNNING_STATE, SGD_GROUP_OPTIONS, wide_names
from torchsgd.optim.validation import check_engine_flags, check_flag, check_sgd_hyperparameters, warn_unknown_keys
from torchsgd.rules.gradients import GradScalerInStep, all_finite, clip_coefficient, global_norm, scaled_global_norm
from torchsgd.rules.quantize import QuantizedMomentum
from torchsgd.rules.sgd import Rounding, SGDHyper, with_formula

__all__ = ["SGD", "SGDW"]


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


class SGD(LazyDynamoOptimizer):
    r"""Stochastic gradient descent, optionally with momentum: ``torch.optim.SGD``, exactly.

    For each parameter θ with gradient ∇ (γ = lr, λ = weight_decay, μ = momentum, τ = dampening), the
    rule of :mod:`torchsgd.rules.sgd` (its ``FORMULA``)::

        {FORMULA}

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
            ``torch.int8``: 8-bit momentum, a quarter of float32's memory: one int8 code per element and a
            float32 scale per block of 256 (rules/quantize.py), quantized to nearest (stochastically with
            ``stochastic_rounding``); its state is ``momentum_codes`` and ``momentum_scales``, and
            :meth:`torch_state_dict` exports torch's format.
        stochastic_rounding: round float16/bfloat16 parameters and buffers stochastically when the
            float32 result is stored (unbiased: E[round(x)] = x), for pure low-precision training.
        seed: the stochastic rounding noise's seed (default: drawn from torch's global generator when
            stochastic_rounding is on, so ``torch.manual_seed`` makes runs repeatable; without it the
            generator is not touched, as with torch.optim.SGD). The state_dict carries it and the step count.
        step_in_backward: update each parameter inside ``backward()`` as soon as its gradient is
            accumulated, and free the gradient at once: no model-sized set of gradients ever exists.
            ``step()`` then only runs the closure and the hooks. Each ``backward()`` updates the
            parameters; run micro-batches for gradient accumulation under ``with optimizer.accumulate():``
            (all but the last). Cannot be combined with ``max_grad_norm``, ``skip_nonfinite`` (they need
            every gradient before any update), ``differentiable``, or a GradScaler. With momentum, the
            first hook of a group sets the group's first-step buffers aside in one allocation (so they do
            not fragment the heap between gradients); ``reserved_buffers`` holds the entries not used yet.

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
        wide = {
            "max_grad_norm": max_grad_norm,
            "skip_nonfinite": skip_nonfinite,
            "momentum_dtype": momentum_dtype,
            "stochastic_rounding": stochastic_rounding,
            "seed": seed,
            "step_in_backward": step_in_backward,
        }
        for option in OPTIMIZER_WIDE:
            option.check(wide[option.name])
        if step_in_backward:
            check_combination(max_grad_norm, skip_nonfinite, differentiable)
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
        # Every group is checked again, merged with these defaults, in add_param_group.
        self._check_options(defaults)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self.last_grad_norm: Tensor | None = None
        self.momentum_dtype = momentum_dtype
        self.stochastic_rounding = stochastic_rounding
        if seed is not None:
            self.seed = int(seed)
        elif stochastic_rounding:
            self.seed = int(torch.randint(0, 2**62, ()).item())
        else:  # no noise to seed: torch's global generator is left as torch.optim.SGD leaves it
            self.seed = 0
        self.rounding_step = 0  # advances once per update; keys the stochastic rounding noise
        self.step_in_backward = step_in_backward
        self._in_backward = StepInBackward(self) if step_in_backward else None
        self._ran: dict[int, Ran] = {}  # id(param group) -> what its last step ran (engine_report)
        self._sparse_buffers = False  # whether a momentum buffer may be sparse
        # step_in_backward: memory for first-step buffers, set aside at the first backward (GroupOwner)
        self.reserved_buffers: dict[Tensor, Any] = {}
        self._reserved_groups: set[int] = set()  # id() of the groups whose buffers were set aside
        super().__init__(params, defaults)
        # torch checks the engine flags on the constructor's arguments only, after reading the params.
        check_engine_flags(defaults)
        if fused or step_in_backward:
            # GradScaler then hands the scale and the overflow flag to step() instead of unscaling itself
            # (with step_in_backward, step() refuses it before GradScaler's own checks fail obscurely).
            self._step_supports_amp_scaling = True

    # Options that hold for the whole optimizer (not per group), kept through pickling and deepcopy.
    _GLOBAL_OPTIONS = wide_names()
    _GROUP_OPTIONS: tuple[str, ...] = SGD_GROUP_OPTIONS
    # The per-parameter state the optimizer keeps (torch's SGD: the momentum buffer only).
    # (With momentum_dtype=torch.int8 the buffer is kept as int8 codes and float32 scales instead.)
    _STATE_KEYS: tuple[str, ...] = ("momentum_buffer", QuantizedMomentum.CODES_KEY, QuantizedMomentum.SCALES_KEY)
    _param_index: dict[int, int] | None = None  # id(parameter) -> its position: see param_index

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
            wide = [key for key in param_group if key in self._GLOBAL_OPTIONS]
            if wide:
                raise ValueError(
                    f"param group option {wide[0]!r} is an optimizer-wide option of {type(self).__name__}: "
                    f"pass it to the constructor, where it applies to every group (a group cannot set it)"
                )
            options = {**self.defaults, **param_group}
            self._check_options(options)
            warn_unknown_keys(param_group, [*self.defaults, *self._GROUP_OPTIONS], type(self).__name__)
        super().add_param_group(param_group)
        self._param_index = None
        if self.param_groups[-1]["fused"]:
            self._need_device_dtype_check_for_fused = True
        if self._in_backward is not None:
            self._in_backward.register(len(self.param_groups) - 1)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        extra: dict[str, int] = {}
        if self.stochastic_rounding:
            # The noise is a function of (seed, step): with these, a resumed run rounds exactly as an
            # uninterrupted one.
            extra.update(seed=self.seed, rounding_step=self.rounding_step)
        if self.skip_nonfinite:
            extra["skipped_steps"] = self.skipped_steps
        if extra:
            state_dict["torchsgd"] = extra  # torch's load_state_dict ignores this key
            # And in every param group too: torch.distributed.checkpoint's get/set_optimizer_state_dict keep
            # only "state" and "param_groups" (a group's entries are saved and loaded like its lr).
            for group in state_dict["param_groups"]:
                group[checkpoint.GROUP_KEY] = dict(extra)
        return state_dict

    def torch_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` in torch.optim.SGD's format, for torch to resume from.

        The same as :meth:`state_dict` but for 8-bit momentum (``momentum_dtype=torch.int8``), whose codes
        and scales become a float32 ``momentum_buffer`` (their dequantized values)::

            >>> import torch, torchsgd
            >>> p = torch.nn.Parameter(torch.ones(300)); p.grad = torch.ones(300)
            >>> opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
            >>> opt.step()
            >>> sorted(opt.state_dict()["state"][0])
            ['momentum_codes', 'momentum_scales']
            >>> resumed = torch.optim.SGD([p], lr=0.1, momentum=0.9)
            >>> resumed.load_state_dict(opt.torch_state_dict())
            >>> resumed.state[p]["momentum_buffer"].dtype
            torch.float32
        """
        return checkpoint.torch_format(self.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, atomic: a state_dict that does not fit raises and changes nothing.

        Where torch rejects a state_dict (a missing 'state' or 'param_groups', a group without 'params',
        a different number of groups or of parameters in a group) the error is torch's, word for word,
        with a note naming the offending entry. torchsgd also rejects, naming the entry: state for a
        parameter id no group lists or an id listed twice, per-parameter state keys the optimizer does
        not keep, a momentum_buffer that is not a Tensor, has another shape, or is complex for a real
        parameter (real for a complex one), a group missing an option or with an invalid one (non-finite
        included), and a malformed "torchsgd" entry.

        The "torchsgd" entry (seed, rounding_step, skipped_steps) is also in every param group of the
        state_dict, which is what torch.distributed.checkpoint keeps: a state_dict without the top-level
        entry takes the groups' (which must agree); with both, the top-level one counts. Checks run after the load_state_dict pre-hooks, on
        what torch would load, and before anything of the optimizer changes.

        A group option of torchsgd's own (``decoupled_weight_decay``; LARS's options) that the loaded
        group lacks (a torch.optim.SGD checkpoint) keeps the optimizer's setting for that group. With
        ``momentum_dtype``, buffers are converted from the checkpoint's own values (torch first casts
        them to the parameter's dtype, which would round a float32 buffer of a bfloat16 parameter).
        With ``momentum_dtype=torch.int8`` a float buffer (torch's checkpoint) is quantized to nearest;
        without it, 8-bit codes and scales are dequantized (see :meth:`torch_state_dict` for the other way).
        """
        state_dict = checkpoint.convert_momentum(self, checkpoint.lift_group_counters(state_dict))
        extra = checkpoint.load_state_dict(self, state_dict, super().load_state_dict)
        if self.stochastic_rounding and "seed" in extra:
            self.seed, self.rounding_step = extra["seed"], extra["rounding_step"]
        if "skipped_steps" in extra:
            self.skipped_steps = extra["skipped_steps"]
        self.reserved_buffers.clear()  # the loaded state replaces what was set aside for first steps

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here with the state it built (and unpickling starts here): check it before
        # anything is replaced, so a bad state_dict leaves the optimizer exactly as it was.
        current = self.__dict__.get("param_groups")  # None when unpickling
        defaults = state.get("defaults", getattr(self, "defaults", {}))
        for i, group in enumerate(state["param_groups"]):
            for key, value in checkpoint.BACKFILL.items():
                group.setdefault(key, value)
            if current is not None and i < len(current):
                for key in self._GROUP_OPTIONS:  # e.g. a torch.optim.SGD checkpoint loaded into SGDW
                    if key not in group and key in current[i]:
                        group[key] = current[i][key]
        checkpoint.check_restored_state(state, self._check_options, [*defaults, "params"], self._STATE_KEYS)
        options = state.pop("torchsgd", {})
        super().__setstate__(state)
        # From a pickle: its options; load_state_dict keeps the running ones (its extras come after).
        restored = {**{o.name: o.restored_default for o in OPTIMIZER_WIDE}, **RUNNING_STATE}
        for name in self._GLOBAL_OPTIONS:
            if name in options:
                setattr(self, name, options[name])
            elif not hasattr(self, name):
                setattr(self, name, restored[name])
        defaults_of_a_copy: dict[str, Any] = {
            "last_grad_norm": None,
            "_ran": {},
            "_sparse_buffers": False,
            "reserved_buffers": {},
            "_reserved_groups": set(),
        }
        for name, value in defaults_of_a_copy.items():
            if not hasattr(self, name):
                setattr(self, name, value)
        self._param_index = None
        if self.step_in_backward and getattr(self, "_in_backward", None) is None:  # an unpickled copy
            self._in_backward = StepInBackward(self)
            for index in range(len(self.param_groups)):
                self._in_backward.register(index)
        elif not self.step_in_backward:
            self._in_backward = None

    def param_index(self, param: Tensor) -> int:
        """The parameter's position in the optimizer (its key in the state_dict): its noise stream."""
        index = self._param_index
        if index is None or id(param) not in index:
            index = {}
            for group in self.param_groups:
                for p in group["params"]:
                    index.setdefault(id(p), len(index))
            self._param_index = index
        return index[id(param)]

    def collect(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None]
    ) -> bool:
        """What an engine steps (engines.base.GroupOwner): torch's ``_init_group``."""
        return self._init_group(group, params, grads, momentum_buffers)

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
        quantized = self.momentum_dtype is torch.int8  # 8-bit momentum: codes and scales (rules/quantize.py)
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            params.append(p)
            grads.append(grad)
            has_sparse_grad = has_sparse_grad or grad.is_sparse
            if with_momentum:
                if quantized:
                    momentum_buffer_list.append(cast(Any, QuantizedMomentum.from_state(self.state[p])))
                else:
                    momentum_buffer_list.append(self.state[p].get("momentum_buffer"))
        if has_sparse_grad and with_momentum:
            self._sparse_buffers = True  # torch's first step clones a sparse gradient: a sparse buffer
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
        if self._in_backward is not None:
            self._in_backward.after_step(self)
            return loss
        # Set by GradScaler when _step_supports_amp_scaling (fused=True): skip on overflow, else unscale; in
        # the Triton kernel where it takes them (no host wait), else here.
        scaler = None
        if amp.scaler_active(self):
            # (Not for a subclass with its own group step: LARS reads the gradients' norms before the update.)
            scaler = amp.for_the_kernel(self) if type(self)._step_group is SGD._step_group else None
            if scaler is None and amp.unscale_or_skip(self, self._all_grads()):
                return loss

        clip_coefficient = None
        if self.max_grad_norm is not None or self.skip_nonfinite:
            finite, clip_coefficient = self._check_gradients()
            if not finite and self.skip_nonfinite:
                self._skip_step()
                return loss

        if self._sparse_buffers:
            self._check_sparse_buffers()
        if getattr(self, "_need_device_dtype_check_for_fused", False):
            _check_fused_devices(self.param_groups)
            self._need_device_dtype_check_for_fused = False
        rounding = self._rounding()
        for group in self.param_groups:
            if scaler is None:  # (a subclass's _step_group, e.g. LARS's, takes no scaler: it never has one)
                self._ran[id(group)] = self._step_group(group, clip_coefficient, rounding)
            else:
                self._ran[id(group)] = self._step_group(group, clip_coefficient, rounding, scaler)
        self.rounding_step += 1
        return loss

    def _check_sparse_buffers(self) -> None:
        """A sparse momentum buffer (torch keeps one for sparse gradients) cannot take a dense gradient."""
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                buffer = self.state[p].get("momentum_buffer") if p in self.state else None
                if isinstance(buffer, Tensor) and buffer.is_sparse and p.grad is not None and not p.grad.is_sparse:
                    raise ValueError(
                        f"state of param group {i}, parameter {j}: 'momentum_buffer' is sparse (torch keeps "
                        "sparse buffers for sparse gradients) and the gradient is dense, which the step cannot "
                        "add to it. Keep that parameter's gradients sparse, or drop the buffer: "
                        "del optimizer.state[param]['momentum_buffer']"
                    )

    def _rounding(self) -> Rounding | None:
        if self.momentum_dtype is None and not self.stochastic_rounding:
            return None  # torch's rounding after every operation
        return Rounding(self.momentum_dtype, self.stochastic_rounding, self.seed, self.rounding_step)

    def _step_group(
        self,
        group: dict[str, Any],
        clip_coefficient: Tensor | None,
        rounding: Rounding | None,
        scaler: GradScalerInStep | None = None,
    ) -> Ran:
        hyper = SGDHyper.from_group(group, clip_coefficient, rounding, scaler)
        return self._keep_buffers(select_engine(group).step_group(self, group, hyper))

    def _keep_buffers(self, ran: Ran) -> Ran:
        """Store the momentum buffers an engine created (its only output besides the updated tensors); a
        parameter's reserved buffer is spent then, whether the engine took it or made its own."""
        reserved = self.reserved_buffers
        for param, buffer in ran.new_buffers:
            if reserved:
                reserved.pop(param, None)
            if isinstance(buffer, QuantizedMomentum):
                buffer.into_state(self.state[param])
            else:
                self.state[param]["momentum_buffer"] = buffer
        return ran.without_buffers()

    def engine_report(self) -> list[dict[str, Any]]:
        """What ran for each param group at its last step: the engine, and why it is not the one selected.

        One dict per group, in order: ``selected`` (the engine the group's flags choose, see
        :func:`torchsgd.engines.select_engine`), ``ran`` (the engine that updated the group at its last
        step, None before the first), and ``reason`` (why ``ran`` differs from ``selected``, else None).
        ``"fused"`` is the native CPU kernel; a group it could not take, or every group when the kernel
        could not be built, reports the engine that ran instead and why::

            >>> import torch, torchsgd
            >>> p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)
            >>> opt = torchsgd.SGD([p], lr=0.1, momentum=0.9)
            >>> opt.step()
            >>> opt.engine_report()[0]["selected"]
            'fused'
        """
        report = []
        for i, group in enumerate(self.param_groups):
            ran = self._ran.get(id(group))
            report.append(
                {
                    "group": i,
                    "selected": select_engine(group).name,
                    "ran": None if ran is None else ran.engine,
                    "reason": None if ran is None else ran.reason,
                }
            )
        return report

    # ------------------------------------------------------------------------------- step in backward

    def _step_one(self, param: Tensor, group: dict[str, Any]) -> None:
        """Update one parameter of ``group`` now (step_in_backward's hook, inside backward)."""
        with torch.no_grad():
            if param not in self.reserved_buffers and not self.state.get(param) and group["momentum"] != 0:
                self._reserve_first_buffers(group)
            self._ran[id(group)] = self._step_group({**group, "params": [param]}, None, self._rounding())

    def _reserve_first_buffers(self, group: dict[str, Any]) -> None:
        """Set aside, in one allocation, the first-step buffers of ``group``'s parameters that have none
        yet: step_in_backward would otherwise create them one hook at a time, between the gradients, where
        the heap fragments (engines/fused.py reserve_buffers). Once per group: a parameter left without a
        reserved buffer (not on the kernel's engine, or not contiguous) is allocated by its step."""
        if id(group) in self._reserved_groups or select_engine(group) is not FUSED:
            return
        self._reserved_groups.add(id(group))
        params = [p for p in group["params"] if p.requires_grad and not self.state.get(p)]
        self.reserved_buffers.update(reserve_buffers(params, self.momentum_dtype))

    def accumulate(self) -> contextlib.AbstractContextManager[None]:
        """With ``step_in_backward``: backward passes inside this block only accumulate gradients.

        The first backward after the block updates with the accumulated gradients::

            for micro_batch in batches[:-1]:
                with optimizer.accumulate():
                    loss_fn(model(micro_batch)).backward()
            loss_fn(model(batches[-1])).backward()     # updates and frees the gradients
            optimizer.step()                           # the step hooks; a schedule steps after it

        Outside this block, a second backward without a ``step()`` in between warns (once): each
        backward updates, so gradients are not accumulated.
        """
        if self._in_backward is None:  # without step_in_backward gradients accumulate until step() anyway
            return contextlib.nullcontext()
        return self._in_backward.accumulate()

    def remove_hooks(self) -> None:
        """Detach the step-in-backward hooks from the parameters (the optimizer stops updating them)."""
        if self._in_backward is not None:
            self._in_backward.remove()

    def _all_grads(self) -> list[Tensor]:
        return [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _check_gradients(self) -> tuple[bool, Tensor | None]:
        """Whether every gradient is finite, and the clip coefficient (None without clipping).

        With clipping the global norm is computed anyway and is finite exactly when the gradients are, so
        the non-finite guard costs nothing more; without it, one read of the gradients decides.
        """
        if self.max_grad_norm is not None:
            grads = self._all_grads()
            total_norm = global_norm(grads)
            if not bool(torch.isfinite(total_norm).item()):
                if not all_finite(grads):
                    self.last_grad_norm = total_norm
                    return False, clip_coefficient(total_norm, self.max_grad_norm)
                # Finite gradients whose sum of squares overflows the norm's dtype (float16 60000 x 1000):
                # torch's clip would multiply them by 0. Clip them by their true norm instead.
                dtype = total_norm.dtype
                self.last_grad_norm = total_norm = scaled_global_norm(grads)
                return True, clip_coefficient(total_norm, self.max_grad_norm).to(dtype)
            self.last_grad_norm = total_norm
            return True, clip_coefficient(total_norm, self.max_grad_norm)
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


def _check_fused_devices(groups: list[dict[str, Any]]) -> None:
    """torch's check that ``fused=True`` has parameters it can fuse (floating point, a fused device)."""
    from torch.optim.optimizer import _device_dtype_check_for_fused

    for group in groups:
        if group["fused"]:
            for p in group["params"]:
                if p.grad is not None:
                    _device_dtype_check_for_fused(p)


SGD.__doc__ = with_formula(SGD.__doc__)


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
