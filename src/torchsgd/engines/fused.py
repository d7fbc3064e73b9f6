"""The fused engine: one pass over memory per step for a whole param group, with no per-tensor dispatch.

On CPU it runs torchsgd's native kernel (kernels/cpu/, binding.cpp): a single call reads every parameter's
gradient and momentum buffer, checks layouts, creates first-step buffers (handed back in Ran), and
updates all tensors in one parallel loop on torch's own thread pool. float32/float64 results are bitwise
those of the reference engine; bfloat16/float16 compute in float32 and round every intermediate as torch
does (bound in the README).

A group the kernel cannot take as it is (CUDA or mixed devices, sparse or complex gradients, tensor
subclasses such as DTensor, gradients laid out unlike their parameter) runs on the multi-tensor engine
instead, with the same numbers; so does every group when the kernel cannot be built. A group whose
parameters share memory runs torch's per-tensor loop (the reference engine), whose order it depends on.
What ran, and why, is the :class:`Ran` each step returns (``SGD.engine_report()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import Tensor

from torchsgd.engines.base import GroupOwner, Ran, TrustRatios
from torchsgd.engines.build import native_failure, native_module
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.engines.reference import ReferenceEngine
from torchsgd.rules.sgd import SGDHyper, _as_number

# The kernel's reasons for handing a group back are its own: kernel.REASONS (code -> text, from
# kernels/cpu/reasons.h); kernel.OVERLAPPING is the code whose text is engines.base.OVERLAP_REASON.
ZERO_D_CLIP_REASON = "a 0-d parameter narrower than the float64 clip coefficient (torch clips it in float64)"


class FusedEngine:
    name = "fused"

    def __init__(self) -> None:
        self.fallback = ForeachEngine()
        self.in_order = ReferenceEngine()

    def step_group(
        self, optimizer: GroupOwner, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> Ran:
        kernel = native_module()
        reason = None
        if kernel is None:
            reason = f"the native CPU kernel is unavailable ({native_failure()})"
        elif clips_a_0d_parameter_in_float64(group, hyper):
            kernel, reason = None, ZERO_D_CLIP_REASON
        elif trust_ratios is not None and any(t is None for t in trust_ratios):
            kernel, reason = None, "some parameters of the group are LARS-adapted and some are not"
        if kernel is not None:
            clip = hyper.clip_coefficient
            rounding: dict[str, Any] = {}
            if hyper.rounding is not None:  # float32 arithmetic, each stored value rounded once
                s = hyper.rounding
                rounding = {
                    "momentum_dtype": s.momentum_dtype,  # the kernel refuses a dtype it does not store
                    "stochastic_rounding": s.stochastic_rounding,
                    "seed": s.seed,
                    "rounding_step": s.step,
                    "indices": [optimizer.param_index(p) for p in group["params"]],
                }
            created: list[tuple[Tensor, Tensor]] = []
            handled = kernel.step(
                group["params"],
                optimizer.state,
                created,
                lr=float(_as_number(hyper.lr)),
                momentum=float(hyper.momentum),
                dampening=float(hyper.dampening),
                weight_decay=float(_as_number(hyper.weight_decay)),
                nesterov=bool(hyper.nesterov),
                maximize=bool(hyper.maximize),
                decoupled_weight_decay=bool(hyper.decoupled_weight_decay),
                clip_coefficient=1.0 if clip is None else float(_as_number(clip)),
                trust=None if trust_ratios is None else [float(cast(Tensor, t)) for t in trust_ratios],
                **rounding,
            )
            if handled >= 0:
                return Ran(self.name, new_buffers=tuple(created))
            reason = kernel.REASONS.get(handled, f"code {handled}")
            if handled == kernel.OVERLAPPING:
                ran = self.in_order.step_group(optimizer, group, hyper, trust_ratios)
                return dataclasses.replace(ran, reason=reason)
        ran = self.fallback.step_group(optimizer, group, hyper, trust_ratios)
        return dataclasses.replace(ran, reason=reason if ran.reason is None else f"{reason}; {ran.reason}")


def clips_a_0d_parameter_in_float64(group: dict[str, Any], hyper: SGDHyper) -> bool:
    """Whether clipping this group would multiply a 0-d gradient in float64 where the kernel uses float32.

    clip_grad_norm_ multiplies each gradient in place by the clip coefficient, which has the dtype of the
    global norm: float64 when the model has float64 parameters. For an n-d float32 gradient torch uses the
    coefficient's float32 rounding (a 0-d tensor does not promote a dimensioned one), as the kernel does;
    for a 0-d one both operands are 0-d, the product is taken in float64 and rounded back, which the kernel
    (one float coefficient) cannot reproduce. Such groups, rare, run on the multi-tensor engine."""
    factor = hyper.clip_coefficient
    if not isinstance(factor, torch.Tensor) or factor.dtype != torch.float64:
        return False
    return any(p.ndim == 0 and p.dtype != torch.float64 and p.grad is not None for p in group["params"])
