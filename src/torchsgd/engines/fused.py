"""The fused engine: one pass over memory per step for a whole param group, with no per-tensor dispatch.

On CPU it runs torchsgd's native kernel (kernels/cpu/, binding.cpp): a single call reads every parameter's
gradient and momentum buffer, checks layouts, creates first-step buffers (handed back in Ran), and
updates all tensors in one parallel loop on torch's own thread pool. float32/float64 results are bitwise
those of the reference engine; bfloat16/float16 compute in float32 and round every intermediate as torch
does (bound in the README).

A group of DTensors (FSDP2's ``fully_shard``: Shard(0); Replicate) runs on the kernel through the plain
local tensors of its parameters, gradients and buffers (the update is elementwise, so each rank's step of
its elements is the whole step's), and the buffers it creates come back as DTensors laid out as their
parameters. Stochastic rounding on DTensors stays on the multi-tensor engine's local-shard path: its noise
is keyed by each element's global index, and the kernel numbers a tensor's elements from 0 (it takes no
offset). A group the kernel cannot take as it is (CUDA or mixed devices, sparse or complex gradients,
other tensor subclasses, a Partial placement, gradients laid out unlike their parameter) runs on the
multi-tensor engine instead, with the same numbers; so does every group when the kernel cannot be built. A group whose
parameters share memory runs torch's per-tensor loop (the reference engine), whose order it depends on.
What ran, and why, is the :class:`Ran` each step returns (``SGD.engine_report()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import Tensor

from torchsgd.engines.base import (
    PLAIN_TYPES,
    GroupOwner,
    Ran,
    TrustRatios,
    _is_dtensor,
    dtensor_like,
    local_elementwise_mismatch,
    replicated,
    replicated_hyper,
)
from torchsgd.engines.build import native_failure, native_module
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.engines.reference import ReferenceEngine
from torchsgd.rules.quantize import QuantizedMomentum
from torchsgd.rules.sgd import SGDHyper, _as_number

# The kernel's reasons for handing a group back are its own: kernel.REASONS (code -> text, from
# kernels/cpu/reasons.h); kernel.OVERLAPPING is the code whose text is engines.base.OVERLAP_REASON.
ZERO_D_CLIP_REASON = "a 0-d parameter narrower than the float64 clip coefficient (torch clips it in float64)"
QUANTIZED_SHARD_REASON = "8-bit momentum of DTensor parameters (not taken yet)"
SHARD_NOISE_REASON = (
    "stochastic rounding on DTensor parameters: the native kernel numbers a tensor's noise from element 0 and "
    "takes no global offset, so shards run on the multi-tensor engine's local-shard path"
)


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
            # (A DTensor hyperparameter, e.g. the clip coefficient of DTensor gradients, as its plain value.)
            kernel_hyper = replicated_hyper(hyper)
            kernel_trust = None if trust_ratios is None else [replicated(t) for t in trust_ratios]
            # The group as it is first: a plain group pays nothing for the DTensor case below.
            handled, created = _kernel_step(
                kernel, optimizer, group, group["params"], optimizer.state, kernel_hyper, kernel_trust
            )
            owners: dict[int, Tensor] = {}  # id(local alias) -> its DTensor parameter
            if (
                handled < 0
                and handled == _tensor_subclass_code(kernel)
                and any(_is_dtensor(p) for p in group["params"])
            ):
                rounding = hyper.rounding
                if rounding is not None and rounding.momentum_dtype is torch.int8:
                    local: Any = QUANTIZED_SHARD_REASON
                elif rounding is not None and rounding.stochastic_rounding:
                    local = SHARD_NOISE_REASON
                else:
                    local = on_local_tensors(group["params"], optimizer.state)
                if isinstance(local, str):
                    kernel, reason = None, local
                else:  # the plain local tensors of the shards
                    params, state, owners = local
                    handled, created = _kernel_step(kernel, optimizer, group, params, state, kernel_hyper, kernel_trust)
        if kernel is not None:
            if handled >= 0:
                # A DTensor parameter's new buffer: its local tensor, as a DTensor laid out as the parameter.
                kept = []
                for alias, buffer in created:
                    param = owners.get(id(alias))
                    kept.append((alias, buffer) if param is None else (param, dtensor_like(param)(buffer)))
                return Ran(self.name, new_buffers=tuple(kept))
            reason = kernel.REASONS.get(handled, f"code {handled}")
            if handled == kernel.OVERLAPPING:
                ran = self.in_order.step_group(optimizer, group, hyper, trust_ratios)
                return dataclasses.replace(ran, reason=reason)
        ran = self.fallback.step_group(optimizer, group, hyper, trust_ratios)
        return dataclasses.replace(ran, reason=reason if ran.reason is None else f"{reason}; {ran.reason}")


# The kernel's text for a tensor subclass among the parameters (reasons.h), after which the engine tries
# a DTensor group's local tensors. (The module exports only OVERLAPPING's code; the text is the contract.)
TENSOR_SUBCLASS_REASON = "a parameter is a tensor subclass"


def _tensor_subclass_code(kernel: Any) -> int | None:
    return next((code for code, text in kernel.REASONS.items() if text == TENSOR_SUBCLASS_REASON), None)


def _kernel_step(
    kernel: Any,
    optimizer: GroupOwner,
    group: dict[str, Any],
    params: list[Tensor],
    state: Any,
    hyper: SGDHyper,
    trust_ratios: list[Any] | None,
) -> tuple[int, list[tuple[Tensor, Any]]]:
    """One kernel.step over ``params`` (the group's, or their local aliases) with ``state`` holding their
    buffers: the kernel's return code and the (parameter, buffer) pairs it created."""
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
    created: list[Any] = []
    reserve = optimizer.reserved_buffers
    handled = kernel.step(
        params,
        state,
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
        reserve=reserve or None,
        **rounding,
    )
    # 8-bit momentum's new buffers come as (param, codes, scales).
    return int(handled), [(c[0], QuantizedMomentum(c[1], c[2])) if len(c) == 3 else c for c in created]


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


def on_local_tensors(
    params: list[Tensor], state: Any
) -> tuple[list[Tensor], dict[Tensor, dict[str, Any]], dict[int, Tensor]] | str:
    """A group with DTensor parameters as the kernel takes it: plain tensors, each holding its gradient.

    A DTensor parameter becomes an alias of its local tensor (the same memory) whose ``.grad`` is the local
    tensor of the DTensor gradient, and its momentum buffer the local tensor of the DTensor buffer (in a
    state dict of the aliases: nothing of the optimizer's state is written). Plain parameters stay as they
    are. Also returned: id(alias) -> its DTensor parameter. Or, where a parameter cannot step on its local
    tensor, why (a reason for the report)."""
    from torch.distributed.tensor import DTensor

    local_params: list[Tensor] = []
    local_state: dict[Tensor, dict[str, Any]] = {}
    owners: dict[int, Tensor] = {}
    for p in params:
        entry = state.get(p)  # (.get: a defaultdict must not grow entries here)
        buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        grad = p.grad
        if not isinstance(p, DTensor):
            if isinstance(grad, DTensor) or isinstance(buffer, DTensor):
                return "a plain parameter has a DTensor gradient or momentum buffer"
            local_params.append(p)
            if entry is not None:
                local_state[p] = entry
            continue
        why = local_elementwise_mismatch(p, grad, buffer)
        if why is not None:
            return why
        alias = _local(p).detach()  # no autograd edge, the same storage
        if grad is not None:
            alias.grad = _local(grad)
        if buffer is not None:
            local_state[alias] = {"momentum_buffer": _local(buffer)}
        local_params.append(alias)
        owners[id(alias)] = p
    return local_params, local_state, owners


def _local(t: Any) -> Tensor:
    """A DTensor's local tensor. (``to_local()`` is an autograd function that makes a view each call, a few
    microseconds a tensor that a group of thousands of shards pays three times per step.)"""
    local = getattr(t, "_local_tensor", None)
    return cast(Tensor, t.to_local() if local is None else local)


def reserve_buffers(params: list[Tensor], momentum_dtype: torch.dtype | None) -> dict[Tensor, Any]:
    """Memory for the first-step momentum buffers of ``params``, as the kernel's ``reserve``: one allocation
    for all of them (one for the codes and one for the scales with 8-bit momentum), each parameter's entry a
    view laid out as the buffer the kernel would create (the parameter's shape and strides in
    ``momentum_dtype``, None: the parameter's; int8: contiguous codes and float32 scales, one a block).

    step_in_backward creates each parameter's buffer in its own hook, one allocation per parameter between
    backward's gradients, which glibc's heap then fragments: the process peak of the same run varied by up
    to 25% (docs/performance.md). Reserved up front, the state takes one region. Only plain contiguous CPU
    tensors get an entry; the others' buffers are allocated by the step as before. An entry that never
    becomes state (a parameter that gets no gradient) is memory kept for nothing, one buffer's worth."""
    from torchsgd.rules.quantize import blocks

    chosen = [
        p for p in params if type(p) in PLAIN_TYPES and p.device.type == "cpu" and p.is_contiguous() and p.numel() > 0
    ]
    if not chosen:
        return {}
    align = 64  # elements: each view starts 64 elements (at least 64 bytes) into an aligned allocation

    def span(n: int) -> int:
        return -(-n // align) * align

    reserve: dict[Tensor, Any] = {}
    if momentum_dtype is torch.int8:
        codes = torch.empty(sum(span(p.numel()) for p in chosen), dtype=torch.int8)
        scales = torch.empty(sum(blocks(p.numel()) for p in chosen), dtype=torch.float32)
        at = scale_at = 0
        for p in chosen:
            n, k = p.numel(), blocks(p.numel())
            reserve[p] = (codes[at : at + n].view(p.shape), scales[scale_at : scale_at + k])
            at, scale_at = at + span(n), scale_at + k
        return reserve
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in chosen:
        by_dtype.setdefault(p.dtype if momentum_dtype is None else momentum_dtype, []).append(p)
    for dtype, group in by_dtype.items():
        flat = torch.empty(sum(span(p.numel()) for p in group), dtype=dtype)
        at = 0
        for p in group:
            reserve[p] = flat[at : at + p.numel()].view(p.shape)
            at += span(p.numel())
    return reserve
