"""The optimizer database: every torchsgd optimizer, its configurations, how to step it, and its oracle.

Modelled on torch's ``OptimizerInfo`` (torch/testing/_internal/common_optimizers.py): one
:class:`OptimizerInfo` per optimizer in :data:`OPTIMIZER_DB`, each with its configurations
(``optim_inputs_func``: constructor keywords, torchsgd's extras included where the optimizer takes them),
the engines it runs on, how to prepare it for a step (ScheduleFreeSGD steps in train mode only) and for a
checkpoint, and its oracle (torch.optim.SGD(foreach=False) for the configurations of SGD that use only
torch's options; the optimizer's own reference engine, ``foreach=False``, otherwise).

A generic test takes its cases from :func:`optimizer_cases` and runs the same check on every optimizer and
configuration. They are:

- test_generic.py: state_dict round trips (into a fresh optimizer, into and out of the oracle), pickle
  and deepcopy, every hook, closures, the global generator, an invalid add_param_group changes nothing;
- test_hardening.py: an invalid load_state_dict raises naming the entry and changes nothing (atomic),
  exact resume in a fresh process, no growth in objects or memory over long runs.

Every configuration's parameters are float32, float64 or (where ``momentum_dtype`` or
``stochastic_rounding`` lift the arithmetic to float32, so every engine is bitwise) bfloat16, so that every
comparison in the generic tests is bitwise. The engine bounds of float16/bfloat16 are the parity suite's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import torchsgd
from helpers import ENGINES, clone_options, seeded_grads, take_step

# The options torch.optim.SGD has: a configuration of SGD that uses nothing else has torch as its oracle.
TORCH_SGD_OPTIONS = frozenset(
    ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach", "differentiable", "fused")
)
# The engines of an optimizer without a fused flag (ScheduleFreeSGD).
ENGINES_WITHOUT_FUSED = tuple(name for name, flags in ENGINES.items() if "fused" not in flags)


@dataclass(frozen=True)
class OptimizerInput:
    """One configuration: constructor keywords (engine flags aside) and the parameters' dtype."""

    kwargs: dict[str, Any]
    desc: str
    dtype: torch.dtype = torch.float32

    @property
    def step_in_backward(self) -> bool:
        return bool(self.kwargs.get("step_in_backward"))

    @property
    def skip_nonfinite(self) -> bool:
        return bool(self.kwargs.get("skip_nonfinite"))


def _no_preparation(optimizer: torch.optim.Optimizer) -> None:
    return None


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer of torchsgd and what generic tests need to know about it."""

    name: str
    cls: type[torch.optim.Optimizer]
    optim_inputs_func: Callable[[], list[OptimizerInput]]
    engines: tuple[str, ...]
    # The per-parameter state it keeps (torch's SGD: the momentum buffer; schedule-free: the iterate z).
    state_keys: tuple[str, ...]
    # Before a training step (ScheduleFreeSGD: train()), and before a checkpoint or evaluation (eval()).
    prepare_step: Callable[[torch.optim.Optimizer], None] = _no_preparation
    prepare_checkpoint: Callable[[torch.optim.Optimizer], None] = _no_preparation
    # Group options whose invalid values add_param_group must refuse (on top of the shared ones).
    invalid_group_options: tuple[tuple[str, dict[str, Any]], ...] = ()
    torch_oracle: bool = field(default=False)  # whether torch.optim.SGD is the oracle (SGD only)

    def make(
        self, params: Any, config: OptimizerInput, engine: str = "default", **overrides: Any
    ) -> torch.optim.Optimizer:
        """This optimizer over ``params`` with ``config``'s keywords, ``engine``'s flags and ``overrides``."""
        assert engine in self.engines, f"{self.name} has no {engine} engine"
        kwargs = {**clone_options(config.kwargs), **overrides}
        return self.cls(params, **kwargs, **ENGINES[engine])

    @staticmethod
    def oracle_kwargs(config: OptimizerInput) -> dict[str, Any]:
        """The oracle's keywords: the configuration's, except that it steps after backward (the ordinary
        step, itself held to torch, is step_in_backward's oracle)."""
        return {k: v for k, v in config.kwargs.items() if k != "step_in_backward"}

    def oracle_is_torch(self, config: OptimizerInput) -> bool:
        return self.torch_oracle and set(self.oracle_kwargs(config)) <= TORCH_SGD_OPTIONS

    def oracle_name(self, config: OptimizerInput) -> str:
        return "torch.optim.SGD(foreach=False)" if self.oracle_is_torch(config) else f"{self.name}(foreach=False)"

    def make_oracle(self, params: Any, config: OptimizerInput) -> torch.optim.Optimizer:
        """The optimizer the configuration's numbers are held to, over ``params``."""
        kwargs = clone_options(self.oracle_kwargs(config))
        if self.oracle_is_torch(config):
            return torch.optim.SGD(params, **kwargs, foreach=False)
        return self.cls(params, **kwargs, **ENGINES["reference"])

    def step(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """One training step with these gradients: prepared, then :func:`helpers.take_step`."""
        self.prepare_step(optimizer)
        with warnings.catch_warnings():
            # A poisoned step under skip_nonfinite warns that it was skipped; that is what it is for.
            warnings.filterwarnings("ignore", ".*a gradient holds NaN or Inf", RuntimeWarning)
            take_step(optimizer, params, grads)


# ---------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------
def optim_inputs_func_sgd() -> list[OptimizerInput]:
    bf16 = torch.bfloat16
    return [
        # The first configuration of each optimizer runs on every engine also where the others do not.
        OptimizerInput({"lr": 0.1, "momentum": 0.9}, "momentum"),
        OptimizerInput({"lr": 0.1}, "plain"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, "nesterov, weight_decay"),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True},
            "dampening, maximize, float64",
            torch.float64,
        ),
        OptimizerInput({"lr": torch.tensor(0.05), "momentum": 0.9, "weight_decay": 1e-3}, "Tensor lr"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "max_grad_norm": 0.5}, "max_grad_norm"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "skip_nonfinite": True}, "skip_nonfinite"),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "momentum_dtype": bf16}, "momentum_dtype=bfloat16"
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "stochastic_rounding": True, "seed": 11},
            "stochastic_rounding, bfloat16",
            bf16,
        ),
        # Everything that lives in the state_dict's "torchsgd" entry at once: the seed and rounding step, the
        # guard's count of skipped steps; and buffers in another dtype than the parameters'.
        OptimizerInput(
            {
                "lr": 0.1,
                "momentum": 0.9,
                "max_grad_norm": 1.0,
                "skip_nonfinite": True,
                "stochastic_rounding": True,
                "seed": 7,
                "momentum_dtype": torch.float32,
            },
            "every extra of the step, bfloat16",
            bf16,
        ),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "nesterov": True, "step_in_backward": True}, "step_in_backward"),
        OptimizerInput(
            {
                "lr": 0.1,
                "momentum": 0.9,
                "step_in_backward": True,
                "stochastic_rounding": True,
                "seed": 14,
                "momentum_dtype": bf16,
            },
            "step_in_backward, stochastic_rounding, bfloat16",
            bf16,
        ),
    ]


def optim_inputs_func_sgdw() -> list[OptimizerInput]:
    return [
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}, "momentum"),
        OptimizerInput({"lr": 0.1, "weight_decay": 0.1}, "decay without momentum"),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "maximize": True}, "nesterov, maximize"
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "max_grad_norm": 0.5, "skip_nonfinite": True},
            "max_grad_norm, skip_nonfinite",
        ),
        OptimizerInput(
            {
                "lr": 0.1,
                "momentum": 0.9,
                "weight_decay": 0.05,
                "stochastic_rounding": True,
                "seed": 21,
                "momentum_dtype": torch.float32,
            },
            "stochastic_rounding, momentum_dtype, bfloat16",
            torch.bfloat16,
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05, "step_in_backward": True}, "step_in_backward"
        ),
    ]


def optim_inputs_func_lars() -> list[OptimizerInput]:
    return [
        OptimizerInput({"lr": 0.1, "weight_decay": 1e-3, "trust_coefficient": 0.02}, "default momentum"),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2, "trust_clip": True},
            "nesterov, trust_clip",
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "exclude_1d": False, "eps": 0.0},
            "exclude_1d=False, dampening, eps=0",
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "max_grad_norm": 1.0, "skip_nonfinite": True},
            "max_grad_norm, skip_nonfinite",
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "trust_clip": True, "stochastic_rounding": True, "seed": 15},
            "stochastic_rounding, bfloat16",
            torch.bfloat16,
        ),
        OptimizerInput(
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "step_in_backward": True}, "step_in_backward"
        ),
    ]


def optim_inputs_func_schedule_free() -> list[OptimizerInput]:
    return [
        OptimizerInput({"lr": 1.0}, "default"),
        OptimizerInput({"lr": 0.5, "weight_decay": 1e-3, "warmup_steps": 3}, "weight_decay, warmup"),
        OptimizerInput({"lr": 0.5, "momentum": 0.8, "r": 0.5, "weight_lr_power": 1.0}, "r, weight_lr_power"),
    ]


def _train_mode(optimizer: torch.optim.Optimizer) -> None:
    optimizer.train()  # type: ignore[attr-defined]


def _eval_mode(optimizer: torch.optim.Optimizer) -> None:
    optimizer.eval()  # type: ignore[attr-defined]


_SGD_FAMILY_BAD_GROUPS = (
    ("dampening > 1", {"dampening": 2.0}),
    ("nesterov, no momentum", {"momentum": 0.0, "nesterov": True}),
    ("non-bool maximize", {"maximize": "yes"}),
    ("an optimizer-wide option", {"max_grad_norm": 1.0}),
)

OPTIMIZER_DB: tuple[OptimizerInfo, ...] = (
    OptimizerInfo(
        "SGD",
        torchsgd.SGD,
        optim_inputs_func_sgd,
        tuple(ENGINES),
        ("momentum_buffer",),
        invalid_group_options=_SGD_FAMILY_BAD_GROUPS,
        torch_oracle=True,
    ),
    OptimizerInfo(
        "SGDW",
        torchsgd.SGDW,
        optim_inputs_func_sgdw,
        tuple(ENGINES),
        ("momentum_buffer",),
        invalid_group_options=_SGD_FAMILY_BAD_GROUPS,
    ),
    OptimizerInfo(
        "LARS",
        torchsgd.LARS,
        optim_inputs_func_lars,
        tuple(ENGINES),
        ("momentum_buffer",),
        invalid_group_options=(
            *_SGD_FAMILY_BAD_GROUPS,
            ("a negative trust_coefficient", {"trust_coefficient": -1.0}),
            ("decoupled decay", {"decoupled_weight_decay": True}),
        ),
    ),
    OptimizerInfo(
        "ScheduleFreeSGD",
        torchsgd.ScheduleFreeSGD,
        optim_inputs_func_schedule_free,
        ENGINES_WITHOUT_FUSED,
        ("z",),
        prepare_step=_train_mode,
        prepare_checkpoint=_eval_mode,
        invalid_group_options=(("a momentum of 1", {"momentum": 1.0}), ("a negative warmup", {"warmup_steps": -1})),
    ),
)
OPTIMIZERS_BY_NAME = {info.name: info for info in OPTIMIZER_DB}


def optimizer_cases(*, engines: str = "default", optimizers: Sequence[str] | None = None) -> list:
    """pytest params ``(info, config, engine)`` over the database.

    ``engines="default"``: every configuration on the default engine (no flags). ``"all"``: every
    configuration on every engine the optimizer has. ``"first"``: every configuration on the default
    engine, and the first configuration on every other engine too (where a check is about the optimizer,
    not the engine, but an engine could still keep something of its own).
    """
    assert engines in ("default", "all", "first"), engines
    cases = []
    for info in OPTIMIZER_DB:
        if optimizers is not None and info.name not in optimizers:
            continue
        for index, config in enumerate(info.optim_inputs_func()):
            on = info.engines if engines == "all" or (engines == "first" and index == 0) else ("default",)
            for engine in on:
                cases.append(pytest.param(info, config, engine, id=f"{info.name}-{config.desc}-{engine}"))
    return cases


def find_config(optimizer: str, desc: str) -> tuple[OptimizerInfo, OptimizerInput]:
    info = OPTIMIZERS_BY_NAME[optimizer]
    return info, next(config for config in info.optim_inputs_func() if config.desc == desc)


# ---------------------------------------------------------------------------------------------------------
# Parameters and gradients every generic test uses
# ---------------------------------------------------------------------------------------------------------
def make_params(config: OptimizerInput, seed: int = 0) -> list[Tensor]:
    """A (3, 2) matrix and a (4,) vector (LARS adapts the first and leaves the second plain), leaves that
    require grad (step_in_backward updates only those), in the configuration's dtype."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (4,)]
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(config.dtype).requires_grad_() for s in shapes]


def two_groups(params: Sequence[Tensor]) -> list[dict[str, Any]]:
    """The matrix in one group, the vector in another with its own lr."""
    return [{"params": [params[0]]}, {"params": [params[1]], "lr": 0.05}]


def training_grads(config: OptimizerInput, params: Sequence[Tensor], steps: int, seed: int) -> list[list[Tensor]]:
    """``steps`` gradient lists; with ``skip_nonfinite`` the second holds a NaN (a skipped step)."""
    grads = seeded_grads(params, steps, seed=seed)
    if config.skip_nonfinite and steps > 1:
        grads[1][0] = grads[1][0].clone()
        grads[1][0].view(-1)[0] = math.nan
    return grads


def trained(
    info: OptimizerInfo, config: OptimizerInput, engine: str = "default", *, seed: int = 0, steps: int = 3
) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """The optimizer over :func:`two_groups`, after ``steps`` steps of :func:`training_grads` (state in
    every configuration that keeps any; a skipped step under ``skip_nonfinite``)."""
    params = make_params(config, seed)
    optimizer = info.make(two_groups(params), config, engine)
    for grads in training_grads(config, params, steps, seed=seed + 100):
        info.step(optimizer, params, grads)
    return optimizer, params


def group_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters, in order (those of a pickled or deep-copied optimizer are its own)."""
    return [p for group in optimizer.param_groups for p in group["params"]]
