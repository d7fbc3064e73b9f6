"""The fused engine: one pass over memory per step for a whole param group, with no per-tensor dispatch.

On CPU it runs torchsgd's native kernel (kernels/sgd_cpu.cpp): a single call reads every parameter's
gradient and momentum buffer, checks layouts, creates first-step buffers in the optimizer's state, and
updates all tensors in one parallel loop on torch's own thread pool. float32/float64 results are bitwise
those of the reference engine; bfloat16/float16 compute in float32 and round every intermediate as torch
does (bound in the README).

A group the kernel cannot take as it is (CUDA or mixed devices, sparse or complex gradients, tensor
subclasses such as DTensor, gradients laid out unlike their parameter, duplicate parameters) runs on the
multi-tensor engine instead, with the same numbers; so does every group when the kernel cannot be built.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

import torch

from torchsgd.engines.base import TrustRatios, param_index
from torchsgd.engines.build import native_module
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.rules.sgd import SGDHyper, _as_number

# The kernel's reasons for handing a group back (engines/kernels/sgd_cpu.cpp, enum Ineligible).
FALLBACK_REASONS = {
    -1: "params is not a list or state is not a dict",
    -2: "a parameter is a tensor subclass",
    -3: "unsupported or mixed dtypes",
    -4: "a tensor is not on the CPU",
    -5: "a parameter is not dense (overlapping or with gaps)",
    -6: "a gradient is laid out differently from its parameter",
    -7: "a momentum buffer is laid out differently from its parameter",
    -8: "a parameter appears twice in the group",
    -9: "a gradient is sparse",
}
ZERO_D_CLIP_REASON = "a 0-d parameter narrower than the float64 clip coefficient (torch clips it in float64)"


# torch.dtype -> c10::ScalarType code, for the buffer dtypes the kernel stores (others fall back).
_DTYPE_CODES = {torch.float32: 6, torch.bfloat16: 15, torch.float16: 5}
_MASK64 = (1 << 64) - 1


class FusedEngine:
    name = "fused"

    def __init__(self) -> None:
        self.fallback = ForeachEngine()
        self.last_fallback_reason: str | None = None

    def step_group(
        self, optimizer: Optimizer, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> None:
        kernel = native_module()
        if _clips_a_0d_parameter_in_float64(group, hyper):
            kernel = None
            self.last_fallback_reason = ZERO_D_CLIP_REASON
        storable = hyper.storage is None or hyper.storage.momentum_dtype in (None, *_DTYPE_CODES)
        if kernel is not None and storable and (trust_ratios is None or all(t is not None for t in trust_ratios)):
            grad_factor = 1.0 if hyper.grad_factor is None else float(_as_number(hyper.grad_factor))
            trust = None if trust_ratios is None else [float(t) for t in trust_ratios]
            storage = None
            if hyper.storage is not None:
                s = hyper.storage
                code = -1 if s.momentum_dtype is None else _DTYPE_CODES[s.momentum_dtype]
                indices = [param_index(optimizer, p) for p in group["params"]]
                storage = (code, s.stochastic_rounding, s.seed & _MASK64, s.step & _MASK64, indices)
            handled = kernel.step(
                group["params"],
                optimizer.state,
                float(_as_number(hyper.lr)),
                float(hyper.momentum),
                float(hyper.dampening),
                float(_as_number(hyper.weight_decay)),
                bool(hyper.nesterov),
                bool(hyper.maximize),
                bool(hyper.decoupled_weight_decay),
                grad_factor,
                trust,
                storage,
            )
            if handled >= 0:
                return
            self.last_fallback_reason = FALLBACK_REASONS.get(handled, f"code {handled}")
        self.fallback.step_group(optimizer, group, hyper, trust_ratios)


def _clips_a_0d_parameter_in_float64(group: dict[str, Any], hyper: SGDHyper) -> bool:
    """Whether clipping this group would multiply a 0-d gradient in float64 where the kernel uses float32.

    clip_grad_norm_ multiplies each gradient in place by the clip coefficient, which has the dtype of the
    global norm: float64 when the model has float64 parameters. For an n-d float32 gradient torch uses the
    coefficient's float32 rounding (a 0-d tensor does not promote a dimensioned one), as the kernel does;
    for a 0-d one both operands are 0-d, the product is taken in float64 and rounded back, which the kernel
    (one float coefficient) cannot reproduce. Such groups, rare, run on the multi-tensor engine."""
    factor = hyper.grad_factor
    if not isinstance(factor, torch.Tensor) or factor.dtype != torch.float64:
        return False
    return any(p.ndim == 0 and p.dtype != torch.float64 and p.grad is not None for p in group["params"])

