"""torchsgd.ScheduleFreeSGD: schedule-free SGD with train()/eval(), same numbers and state as `schedulefree`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from torchsgd.engines import forced_engine, native_extras
from torchsgd.engines import triton as triton_engine
from torchsgd.engines.base import bounded_pieces
from torchsgd.optim.base import LazyDynamoOptimizer
from torchsgd.optim.checkpoint import check_restored_state
from torchsgd.optim.validation import check_finite, check_flag, scalar_value
from torchsgd.rules import schedule_free as rule
from torchsgd.rules.gradients import by_device_and_dtype
from torchsgd.rules.rounding import stream_key
from torchsgd.rules.sgd import LIST, TENSOR

__all__ = ["ScheduleFreeSGD"]


WEIGHT_DECAY_PIECE = 1 << 20  # elements: 4 MB of float32, below glibc's largest mmap threshold


class ScheduleFreeSGD(LazyDynamoOptimizer):
    r"""Schedule-free SGD (Defazio et al. 2024): no learning-rate schedule to tune.

    The parameters hold the interpolation y while training and the average x while evaluating, so the
    optimizer must be told which: call ``optimizer.train()`` before training steps and ``optimizer.eval()``
    before evaluating or saving a checkpoint (stepping in eval mode raises). It starts in eval mode, as
    the ``schedulefree`` package does. See :mod:`torchsgd.rules.schedule_free` for the update.

    Schedule-free SGD wants larger learning rates than classical SGD (the reference implementation
    advises 10-50x).

    Args:
        params: parameters or param groups.
        lr: learning rate γ (default 1.0).
        momentum: interpolation μ, strictly between 0 and 1 (default 0.9).
        weight_decay: L2 penalty λ, evaluated at y (default 0).
        warmup_steps: linear warmup of the lr over this many steps (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: the average weights grow as lr_max to this power (default 2).
        foreach: ``None`` (default): CPU groups take the native kernel's one pass over y, z and the
            gradient (bitwise the schedulefree package for float32 and float64, and with AVX2 for
            bfloat16 and float16, within a stated bound elsewhere: docs/performance.md; whatever the
            kernel cannot take runs in Python, said in :meth:`engine_report`), CUDA groups the Triton kernel's (docs/cuda.md); ``True``: lists at
            once; ``False``: tensor by tensor (same numbers).
        stochastic_rounding: bfloat16/float16 parameters step in float32 and y and z are rounded once
            each, stochastically (noise keyed by ``seed``, the group's step count k and the parameter's
            index, as rules/rounding.py draws it). Default False: torch's rounding of every operation.
        seed: the stochastic rounding's seed (default 0). Both are optimizer-wide, kept by pickling
            and not by state_dict (whose layout stays schedulefree's): pass them again when resuming.

    The state_dict has the layout of ``schedulefree.SGDScheduleFree`` (state ``z`` per parameter, the
    schedule's bookkeeping in each group), so checkpoints move between the two.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        foreach: bool | None = None,
        stochastic_rounding: bool = False,
        seed: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            r=r,
            k=0,
            warmup_steps=warmup_steps,
            train_mode=False,
            weight_sum=0.0,
            lr_max=-1.0,
            scheduled_lr=0.0,
            weight_lr_power=weight_lr_power,
            weight_decay=weight_decay,
            foreach=foreach,
        )
        self._check_options(defaults)
        check_flag("stochastic_rounding", stochastic_rounding)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        super().__init__(params, defaults)
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._ran: dict[int, tuple[str, str | None]] = {}

    @staticmethod
    def _check_options(options: dict[str, Any]) -> None:
        lr = scalar_value("lr", options["lr"])
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {options['lr']}")
        check_finite("lr", "Invalid learning rate", lr)
        momentum = scalar_value("momentum", options["momentum"])
        if not 0 < momentum < 1:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {options['momentum']}")
        weight_decay = scalar_value("weight_decay", options["weight_decay"])
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {options['weight_decay']}")
        check_finite("weight_decay", "Invalid weight_decay value", weight_decay)
        warmup = options["warmup_steps"]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup!r} (must be an int >= 0)")
        for name in ("r", "weight_lr_power"):
            check_finite(name, f"Invalid {name} value", scalar_value(name, options[name]))
        check_flag("foreach", options.get("foreach"), optional=True)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            self._check_options({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @property
    def training(self) -> bool:
        """True between train() and eval()."""
        return bool(self.param_groups[0]["train_mode"])

    @torch.no_grad()
    def eval(self) -> None:
        """Move the parameters to the average x (for evaluation and checkpoints)."""
        for group in self.param_groups:
            if group["train_mode"]:
                rule.to_average_(*self._with_z(group), group["momentum"])
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Move the parameters back to the interpolation y (for training steps)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                rule.to_interpolation_(*self._with_z(group), group["momentum"])
                group["train_mode"] = True

    def _with_z(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a z (stepped at least once), and their z on the parameter's
        device (a z loaded elsewhere is read there, not moved)."""
        params: list[Tensor] = []
        zs: list[Tensor] = []
        for p in group["params"]:
            z = self.state[p].get("z")  # (as schedulefree reads it: a parameter never stepped gets an empty entry)
            if z is not None:
                params.append(p)
                zs.append(z if z.device == p.device else z.to(p.device))
        return params, zs

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One schedule-free step; the optimizer must be in train mode."""
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(
                "ScheduleFreeSGD.step() was called in eval mode: call optimizer.train() before training steps "
                "and optimizer.eval() before evaluation or saving (the parameters hold different points in "
                "the two modes)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        offset = 0  # the index in the optimizer of the group's first parameter (the noise stream of SR)
        for group in self.param_groups:
            scalars, bookkeeping = rule.advance_schedule(group)
            group.update(bookkeeping)
            step, first = bookkeeping["k"] - 1, offset
            offset += len(group["params"])
            selected = self._selected_engine(group)
            if selected in ("fused", "triton") and self._native_group(group, scalars, step, first, selected) is None:
                self._ran_log()[id(group)] = (selected, None)
                continue
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "z" not in self.state[p]:
                    self.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
            if not params:
                continue
            grads = [p.grad for p in params]
            zs = [self.state[p]["z"] for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("ScheduleFreeSGD does not support sparse gradients")
            self._ran_log()[id(group)] = self._step_lists(group, params, grads, zs, scalars, step)
        return loss

    @staticmethod
    def _selected_engine(group: dict[str, Any]) -> str:
        """The engine a group's flags choose: reference, foreach, fused (the native CPU kernel) or triton (CUDA
        groups' kernel); TORCHSGD_ENGINE forces one."""
        forced = forced_engine()
        if forced is not None and forced.name in ("reference", "foreach", "triton"):
            return forced.name
        if torch.compiler.is_compiling():
            return "foreach"
        if forced is not None:
            return "fused"
        one_pass = "triton" if triton_engine.device_type(group) == "cuda" else "fused"
        return {False: "reference", True: "foreach"}.get(group["foreach"], one_pass)

    def _step_lists(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        zs: list[Tensor],
        s: rule.ScheduleFreeStep,
        rounding_step: int,
    ) -> tuple[str, str | None]:
        """One group's step, one list per device and dtype: in the native kernel where the group's engine
        is the fused one and the kernel takes the list, else in Python. Returns (what ran, why not fused)."""
        selected = self._selected_engine(group)
        ran, reason = selected, None
        index = self._param_indices() if self.stochastic_rounding else {}
        for (ys, gs, zz), _ in by_device_and_dtype([params, grads, zs]).values():
            sr = self.stochastic_rounding and ys[0].dtype in (torch.bfloat16, torch.float16)
            if selected in ("fused", "triton"):
                rounding = (self.seed, rounding_step, [index[id(y)] for y in ys]) if sr else None
                why = self._native_list(ys, s, rounding, selected)
                if why is None:
                    continue
                ran, reason = "foreach", reason or why
            else:
                ran = selected
            if sr:
                for y, g, z in zip(ys, gs, zz):
                    rule.schedule_free_update_rounded(y, g, z, s, stream_key(self.seed, rounding_step, index[id(y)]))
            elif selected == "reference":
                for y, g, z in zip(ys, gs, zz):
                    rule.schedule_free_update(TENSOR, y, g, z, s)
            elif s.weight_decay == 0:
                rule.schedule_free_update(LIST, ys, gs, zz, s)
            else:
                # g + λ·y is a temporary the size of the list: in pieces of WEIGHT_DECAY_PIECE elements it
                # is reused memory, where a whole-list one page-faults fresh memory every step (2x
                # schedulefree's step on GPT-2 shapes, which adds into .grad in place; the same bits).
                for y_piece, g_piece, z_piece in bounded_pieces([ys, gs, zz], WEIGHT_DECAY_PIECE):
                    rule.schedule_free_update(LIST, y_piece, g_piece, z_piece, s)
        return ran, reason

    def _native_group(
        self, group: dict[str, Any], s: rule.ScheduleFreeStep, step: int, first: int, engine: str = "fused"
    ) -> str | None:
        """The whole group in one call of the native kernel, or the Triton kernel with ``engine="triton"`` (the
        z of a first step made here); None, or why it cannot take the group as it is (nothing has changed;
        the caller splits it by dtype)."""
        params = group["params"]
        rounding = (self.seed, step, list(range(first, first + len(params)))) if self.stochastic_rounding else None
        reason = self._native_list(params, s, rounding, engine)
        if reason == native_extras.NO_STATE:
            for p in params:
                if p.grad is not None and "z" not in self.state[p]:
                    self.state[p]["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
            reason = self._native_list(params, s, rounding, engine)
        return reason

    def _native_list(
        self,
        ys: list[Tensor],
        s: rule.ScheduleFreeStep,
        rounding: tuple[int, int, list[int]] | None,
        engine: str = "fused",
    ) -> str | None:
        """The step of the parameters in ``ys`` that have a gradient, in the native kernel (the Triton kernel
        with ``engine="triton"``); None, or why it cannot take them (then nothing has changed)."""
        if any(isinstance(x, Tensor) for x in (s.lr, s.ckp1, s.weight_decay)):
            return "a Tensor lr or weight_decay (the kernel takes numbers)"
        if rounding is not None and not all(y.is_contiguous() for y in ys):
            return "stochastic rounding of a non-contiguous parameter (its noise follows row-major order)"
        kernel = triton_engine.schedule_free_step if engine == "triton" else native_extras.schedule_free_step
        return kernel(
            ys,
            self.state,
            ckp1=float(s.ckp1),
            y_alpha=float(s.lr * (s.momentum * (1 - s.ckp1) - 1)),
            lr=float(s.lr),
            weight_decay=float(s.weight_decay),
            rounding=rounding,
        )

    def _ran_log(self) -> dict[int, tuple[str, str | None]]:
        return self.__dict__.setdefault("_ran", {})  # absent on a copy made by unpickling

    def _param_indices(self) -> dict[int, int]:
        """id(parameter) -> its index in the optimizer (the stochastic rounding's noise stream)."""
        return {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}

    def engine_report(self) -> list[dict[str, Any]]:
        """What ran for each param group at its last step, as :meth:`torchsgd.SGD.engine_report` says it:
        ``selected`` (from the flags), ``ran`` (None before the first step) and ``reason`` (why ``ran``
        differs from ``selected``). ``"fused"`` is the native CPU kernel's one pass."""
        ran = self._ran_log()
        report = []
        for i, group in enumerate(self.param_groups):
            engine, reason = ran.get(id(group), (None, None))
            report.append({"group": i, "selected": self._selected_engine(group), "ran": engine, "reason": reason})
        return report

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["rounding_options"] = (getattr(self, "stochastic_rounding", False), getattr(self, "seed", 0))
        return state

    # The per-parameter state (schedulefree's layout): the SGD iterate z.
    _STATE_KEYS = ("z",)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict (and unpickling) ends here: check everything before anything is replaced, so a
        # state_dict that does not fit raises, naming the entry, and leaves the optimizer as it was.
        if "rounding_options" in state:  # unpickling; load_state_dict keeps the optimizer's own
            state = dict(state)
            self.stochastic_rounding, self.seed = state.pop("rounding_options")
        for group in state["param_groups"]:
            group.setdefault("foreach", None)  # a schedulefree.SGDScheduleFree checkpoint has none
        defaults = state.get("defaults", getattr(self, "defaults", {}))
        # torch's Optimizer.__setstate__ adds "differentiable" to the defaults (a second load would then
        # require it); a schedule-free group never holds it.
        required = [key for key in defaults if key != "differentiable"]
        check_restored_state(state, self._check_loaded_group, [*required, "params"], self._STATE_KEYS, nullable=())
        super().__setstate__(state)

    @classmethod
    def _check_loaded_group(cls, group: dict[str, Any]) -> None:
        """A loaded group: its options, and the schedule's bookkeeping (k, weight_sum, lr_max, ...)."""
        cls._check_options(group)
        for name in ("weight_sum", "lr_max", "scheduled_lr"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        k = group["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        check_flag("train_mode", group["train_mode"])
