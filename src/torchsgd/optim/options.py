"""Every option of torchsgd's optimizers, declared once: its name, default, scope and check.

A **group** option lives in each param group (torch's lr, momentum, ...; torchsgd's
``decoupled_weight_decay``; LARS's trust options): a group may override it. An **optimizer-wide** option
holds for the whole optimizer (clipping by the global norm, the guard, how state is stored, the step inside
backward): a param group that sets one is refused. The constructors, ``add_param_group``, pickling and
``load_state_dict`` all read these declarations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torchsgd.optim.validation import check_flag, check_max_grad_norm, check_momentum_dtype, check_seed

__all__ = ["Option", "OPTIMIZER_WIDE", "RUNNING_STATE", "SGD_GROUP_OPTIONS", "LARS_GROUP_OPTIONS", "wide_names"]


@dataclass(frozen=True)
class Option:
    """One option: ``check(value)`` raises for a value the optimizer cannot take.

    ``kept`` is the value an optimizer restored from a pickle without this entry holds (for ``seed``, whose
    argument default None means "draw one", the drawn value is kept; without noise it is 0).
    """

    name: str
    default: Any
    check: Callable[[Any], None]
    doc: str
    kept: Any = None

    @property
    def restored_default(self) -> Any:
        return self.default if self.kept is None else self.kept


def _flag(name: str) -> Callable[[Any], None]:
    return lambda value: check_flag(name, value)


# Options of the whole optimizer (SGD, SGDW and LARS take them all).
OPTIMIZER_WIDE: tuple[Option, ...] = (
    Option("max_grad_norm", None, check_max_grad_norm, "clip all gradients together by their global L2 norm"),
    Option("skip_nonfinite", False, _flag("skip_nonfinite"), "skip the whole step when a gradient holds NaN/Inf"),
    Option("momentum_dtype", None, check_momentum_dtype, "store momentum buffers in this dtype"),
    Option("stochastic_rounding", False, _flag("stochastic_rounding"), "round low-precision stores stochastically"),
    Option("seed", None, check_seed, "the stochastic rounding noise's seed", kept=0),
    Option("step_in_backward", False, _flag("step_in_backward"), "update each parameter inside backward()"),
)
# Counters of the whole optimizer, kept through pickling (and, where they matter, in the state_dict).
RUNNING_STATE: dict[str, int] = {"skipped_steps": 0, "rounding_step": 0}

# Group options of torchsgd's own, beyond torch's (lr, momentum, dampening, weight_decay, nesterov, maximize,
# foreach, differentiable, fused: checked together by validation.check_sgd_hyperparameters, in torch's order).
# A torch.optim.SGD checkpoint lacks them: loading it keeps the optimizer's setting for that group.
SGD_GROUP_OPTIONS: tuple[str, ...] = ("decoupled_weight_decay",)
LARS_GROUP_OPTIONS: tuple[str, ...] = (*SGD_GROUP_OPTIONS, "trust_coefficient", "eps", "trust_clip", "exclude_1d")


def wide_names() -> tuple[str, ...]:
    """The optimizer-wide names kept through pickling: the options and the counters."""
    return (*(option.name for option in OPTIMIZER_WIDE), *RUNNING_STATE)
