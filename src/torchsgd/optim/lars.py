"""torchsgd.LARS: layer-wise adaptive rate scaling on top of torchsgd's SGD rule and engines."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from torchsgd.engines import Ran, native_extras, select_engine
from torchsgd.optim.options import LARS_GROUP_OPTIONS
from torchsgd.optim.sgd import SGD
from torchsgd.optim.validation import check_flag, check_sgd_hyperparameters, scalar_value
from torchsgd.rules.lars import trust_ratios
from torchsgd.rules.sgd import Rounding, SGDHyper

__all__ = ["LARS"]

_SPARSE_REASON = "LARS does not support sparse gradients (the trust ratio needs dense norms)"


class LARS(SGD):
    r"""LARS (You, Gitman & Ginsburg 2017): SGD whose step is scaled per layer by a trust ratio.

    For each parameter θ that is adapted (by default: every parameter with more than one dimension)::

        t = η·‖θ‖ / (‖∇‖ + λ·‖θ‖ + ε)          (t = 1 where ‖θ‖ = 0 or ‖∇‖ = 0)
        t = min(t / γ, 1)                       (trust_clip=True: LARC)
        g ← t·(∇ + λ·θ)
        b ← g on the first step, else μ·b + (1 − τ)·g;   g ← g + μ·b if nesterov else b
        θ ← θ − γ·g

    Parameters with one dimension or none (biases, normalization weights) take the plain SGD step with
    no weight decay and no adaptation (``exclude_1d=False`` adapts and decays them too). Momentum follows
    torch's convention (the buffer starts as the first direction).

    Args:
        params: parameters or param groups.
        lr: global learning rate γ (required).
        momentum: μ (default 0.9). dampening: τ (default 0). weight_decay: λ, coupled (default 0).
        nesterov: Nesterov momentum.
        trust_coefficient: η (default 0.001).
        eps: ε in the denominator (default 1e-8).
        trust_clip: clip the local rate at the global one (LARC).
        exclude_1d: leave 0-/1-D parameters out of adaptation and weight decay (default True).
        maximize, foreach, fused, max_grad_norm, skip_nonfinite: as in :class:`torchsgd.SGD`, and its
            memory options (momentum_dtype, stochastic_rounding, seed, step_in_backward) as keywords.

    Published figures (torchlars README, ResNet-50 on ImageNet, top-1): 73.79 at batch 256, 73.78 at 8K,
    73.36 at 16K, 72.26 at 32K.
    """

    _GROUP_OPTIONS = LARS_GROUP_OPTIONS

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_1d: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        max_grad_norm: float | None = None,
        skip_nonfinite: bool = False,
        **precision: Any,
    ) -> None:
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            max_grad_norm=max_grad_norm,
            skip_nonfinite=skip_nonfinite,
            **precision,
            _subclass_defaults={
                "trust_coefficient": trust_coefficient,
                "eps": eps,
                "trust_clip": trust_clip,
                "exclude_1d": exclude_1d,
            },
        )

    @staticmethod
    def _check_options(options: dict[str, Any]) -> None:
        check_sgd_hyperparameters(options)
        if options.get("differentiable"):
            raise ValueError("LARS does not support differentiable=True")
        if options.get("decoupled_weight_decay"):
            raise ValueError("LARS takes coupled weight decay only (its trust ratio includes λ‖θ‖)")
        coefficient = scalar_value("trust_coefficient", options["trust_coefficient"])
        if not (math.isfinite(coefficient) and coefficient > 0):
            raise ValueError(
                f"Invalid trust_coefficient value: {options['trust_coefficient']} (must be finite and > 0)"
            )
        eps = scalar_value("eps", options["eps"])
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"Invalid eps value: {options['eps']} (must be finite and >= 0)")
        check_flag("trust_clip", options["trust_clip"])
        check_flag("exclude_1d", options["exclude_1d"])

    def _step_group(
        self,
        group: dict[str, Any],
        clip_coefficient: Tensor | None,
        rounding: Rounding | None,
        scaler: object = None,
    ) -> Ran:
        # scaler: SGD hands a GradScaler's in-step unscale only to its own _step_group; LARS reads the
        # gradients' norms before the update, so its gradients arrive unscaled and scaler is always None.
        if scaler is not None:
            raise RuntimeError("LARS takes no in-kernel GradScaler unscale (its norms need unscaled gradients)")
        engine = select_engine(group)
        hyper = SGDHyper.from_group(group, clip_coefficient, rounding)
        adapted, plain = self._partition(group)
        ran = Ran(engine.name)
        if plain:
            ran = self._keep_buffers(
                engine.step_group(self, {**group, "params": plain}, dataclasses.replace(hyper, weight_decay=0))
            )
        if adapted:
            grads: list[Tensor] = [cast(Tensor, p.grad) for p in adapted]  # each has one: sorted above
            if clip_coefficient is not None:  # the norms of the clipped gradients, as clip-then-step would see
                grads = cast("list[Tensor]", torch._foreach_mul(grads, clip_coefficient))  # a list (stubs: tuple)
            options = dict(
                weight_decay=float(group["weight_decay"]),
                trust_coefficient=float(group["trust_coefficient"]),
                eps=float(group["eps"]),
                lr=float(group["lr"]),
                trust_clip=group["trust_clip"],
            )
            created = None
            if engine.name == "fused" and clip_coefficient is None and hyper.rounding is None:
                # The whole step in the kernel, one pass per tensor (norms, ratio, update while θ and ∇ are
                # in cache): the numbers of the ratios and the fused step below, which run where it declines.
                created = native_extras.lars_step(
                    adapted,
                    self.state,
                    momentum=float(hyper.momentum),
                    dampening=float(hyper.dampening),
                    nesterov=bool(hyper.nesterov),
                    maximize=bool(hyper.maximize),
                    reserve=self.reserved_buffers,
                    **options,
                )
            if created is not None:
                adapted_ran = self._keep_buffers(Ran(engine.name, new_buffers=tuple(created)))
            else:
                ratios = None
                if engine.name == "fused" and clip_coefficient is None:
                    # The kernel's norms (one read of θ and ∇, tensors in parallel) and ratios: the same bits
                    # as trust_ratios, which runs wherever the kernel does not take the tensors (or clips).
                    ratios = native_extras.lars_trust_ratios(adapted, **options)
                if ratios is None:
                    ratios = trust_ratios(adapted, grads, **options)
                # cast: the engines take list[Tensor | None] (list is invariant) and only read it
                adapted_ran = self._keep_buffers(
                    engine.step_group(self, {**group, "params": adapted}, hyper, cast("list[Tensor | None]", ratios))
                )
            if ran.reason is None:  # report a fallback of either part
                ran = adapted_ran
        return ran

    @staticmethod
    def _partition(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """One pass over the group's parameters that have a gradient: (adapted, plain SGD), in the group's
        order; raises on a sparse gradient before anything has changed.

        Thousands of small tensors are common, and this pass is most of LARS's time over SGD's there: about
        0.3 µs a parameter, most of it the first read of each fresh ``p.grad`` (a cache miss per tensor), so
        one pass with nothing else in the loop. (A sort kept between steps was measured slower: its checks
        still read every gradient and ndim, in more passes.)"""
        adapted: list[Tensor] = []
        plain: list[Tensor] = []
        add_adapted, add_plain = adapted.append, plain.append
        min_ndim = 2 if group["exclude_1d"] else 0  # the adapted parameters' least number of dimensions
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(_SPARSE_REASON)
            (add_adapted if p.ndim >= min_ndim else add_plain)(p)
        return adapted, plain
