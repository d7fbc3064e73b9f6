"""The native CPU kernel's ScheduleFreeSGD step and LARS step and trust ratios, seen from Python (SGD's is
engines/fused.py).

Both hand back the reason a group cannot run in the kernel (None: it ran), so that the optimizer runs its
Python path instead and says why in ``engine_report()``, as the fused SGD engine does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchsgd.engines.build import native_failure, native_module

# torch's CPU vector width for the capabilities whose 2-norm summation order kernels/cpu/lars.h follows
# (measured bitwise: the remainder loop is the compiler's, so each build is its own). torch 2.13's AVX512
# build sums a 2-norm in the AVX2 build's order (measured bitwise on an AMD EPYC with AVX-512: float32,
# float64 and bfloat16, 1 to 38.6M elements, tests/test_native_lars.py's sweeps). Any other capability
# (the default build, ARM): the trust ratios stay in rules/lars.py.
VECTOR_BYTES = {"AVX2": 32, "AVX512": 32}

# The elements of one iteration of torch's vectorised bfloat16 elementwise loop (two vectors), for the
# capabilities whose scalar remainder kernels/cpu/schedule_free.h emulates (measured): bitwise there, and
# within one ulp a step elsewhere. The AVX512 build's loop runs 32 elements too (measured: 64 fails
# tests/test_native_schedule_free.py's bitwise sweeps, 32 passes them).
BF16_LOOP_ELEMENTS = {"AVX2": 32, "AVX512": 32}
# The same for float16 (torch's Vectorized<Half>, also 16 lanes with AVX2): measured bitwise with AVX2 and
# AVX512 over random states, sizes and 1-2 threads; elsewhere each element of torch's scalar remainder is
# within a bound of it (tests/test_native_schedule_free.py, FLOAT16_REMAINDER_ULPS).
F16_LOOP_ELEMENTS = {"AVX2": 32, "AVX512": 32}


def unavailable() -> str | None:
    """Why the kernel cannot run anything, or None."""
    if native_module() is None:
        return f"the native CPU kernel is unavailable ({native_failure()})"
    return None


def schedule_free_step(
    params: list[Tensor],
    state: Any,
    *,
    ckp1: float,
    y_alpha: float,
    lr: float,
    weight_decay: float,
    rounding: tuple[int, int, list[int]] | None = None,
) -> str | None:
    """One schedule-free step of the parameters that have a gradient (same-dtype CPU tensors, each with its
    ``state[p]["z"]``) in one pass; None, or why nothing ran (:data:`NO_STATE`: some z does not exist yet).

    ``rounding`` = (seed, step, indices: one per parameter) selects the lifted storage with stochastic
    rounding (see kernels/cpu/schedule_free.h)."""
    kernel = native_module()
    if kernel is None:
        return unavailable()
    options: dict[str, Any] = {}
    if rounding is not None:
        seed, step, indices = rounding
        options = {"stochastic_rounding": True, "seed": seed, "rounding_step": step, "indices": indices}
    dtype = next((p.dtype for p in params if isinstance(p, Tensor) and p.grad is not None), None)
    loop_elements = F16_LOOP_ELEMENTS if dtype == torch.float16 else BF16_LOOP_ELEMENTS
    torch_vector = loop_elements.get(torch.backends.cpu.get_cpu_capability(), 0)
    code = kernel.schedule_free_step(
        params,
        state,
        ckp1=ckp1,
        y_alpha=y_alpha,
        lr=lr,
        weight_decay=weight_decay,
        torch_vector=torch_vector,
        **options,
    )
    if code >= 0:
        return None
    return str(kernel.REASONS.get(code, f"code {code}"))


NO_STATE = "a parameter has no schedule-free z yet (its first step)"  # kernels/cpu/reasons.h, kNoState


def lars_trust_ratios(
    params: list[Tensor], *, weight_decay: float, trust_coefficient: float, eps: float, lr: float, trust_clip: bool
) -> list[Tensor] | None:
    """rules.lars.trust_ratios computed in the kernel (norms of θ and ∇ in one read, on torch's threads),
    bitwise; None where the kernel does not take these tensors (the caller computes them in Python)."""
    kernel = native_module()
    vector_bytes = VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability())
    if kernel is None or vector_bytes is None:
        return None
    values = torch.empty(len(params), dtype=torch.float64)
    taken = kernel.lars_trust_ratios(
        params,
        values,
        weight_decay=weight_decay,
        trust_coefficient=trust_coefficient,
        eps=eps,
        lr=lr,
        trust_clip=trust_clip,
        vector_bytes=vector_bytes,
    )
    if not taken:
        return None
    # 0-d tensors of each parameter's dtype, as trust_ratios gives them, so that every engine takes them
    # (each value is exactly representable in it: the kernel rounded it there).
    dtype = params[0].dtype if params else torch.float64
    if all(p.dtype == dtype for p in params):
        return list(values.to(dtype).unbind())
    return [values[i].to(p.dtype) for i, p in enumerate(params)]


def lars_step(
    params: list[Tensor],
    state: Any,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    reserve: dict[Tensor, Any] | None = None,
) -> list[tuple[Tensor, Tensor]] | None:
    """The LARS step of the adapted parameters (each with a gradient) in the kernel, one pass per tensor:
    its norms, its trust ratio (bitwise :func:`lars_trust_ratios`) and its update with the ratio (bitwise the
    fused engine's step), while the tensor is in cache. torch's rounding of every operation, no clipping.
    Returns the (parameter, buffer) pairs of the momentum buffers it created, or None, with nothing changed,
    where the kernel does not take the group as it is (the caller then runs the ratios and the step apart,
    which say why). ``reserve``: memory for new buffers, as the fused engine hands the kernel's step
    (GroupOwner.reserved_buffers)."""
    kernel = native_module()
    vector_bytes = VECTOR_BYTES.get(torch.backends.cpu.get_cpu_capability())
    if kernel is None or vector_bytes is None:
        return None
    created: list[tuple[Tensor, Tensor]] = []
    handled = kernel.lars_step(
        params,
        state,
        created,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        trust_coefficient=trust_coefficient,
        eps=eps,
        trust_clip=trust_clip,
        vector_bytes=vector_bytes,
        reserve=reserve or None,
    )
    return None if handled is None else created
