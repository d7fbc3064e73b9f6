"""The Triton engine: a param group's step in one kernel launch per dtype pair, for CUDA groups.

The kernel (kernels/triton/sgd.py) reads and writes every tensor in its own dtype and computes in float32
registers (float64 for float64 tensors), one line per torch operation of the rule, with torch's roundings
(the default) or the lifted storage's (momentum_dtype, stochastic rounding with rules/rounding.py's noise).
A launch covers many tensors: a table of (parameter, gradient, buffer) addresses, one row per piece of at
most CHUNK elements, so thousands of small tensors cost one launch, not thousands. A step allocates its
first-step buffers and its small launch tables, nothing else, and never waits for the device: a Tensor lr,
weight decay or clip coefficient is read by the kernel. 8-bit momentum (momentum_dtype=torch.int8,
rules/quantize.py) runs there too: its pieces are whole blocks of a tensor, so each tile dequantizes,
steps and quantizes again blocks of one tensor, bitwise engines/quantized.py's step on the reference.
ScheduleFreeSGD's training step has its kernel too (kernels/triton/schedule_free.py, one pass over y, z
and the gradient): :func:`schedule_free_step`, with native_extras.schedule_free_step's contract.

Triton is optional (``pip install 'torchsgd[cuda]'``). A group the kernel cannot take as it is runs on the
multi-tensor engine (the native CPU kernel's engine for CPU groups), and :class:`Ran` says why. With
TRITON_INTERPRET=1 set before the kernels are first loaded, the engine runs on CPU tensors through
Triton's interpreter: that is how it is tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from types import ModuleType
from typing import Any, cast

import torch
from torch import Tensor

from torchsgd.engines.base import (
    OVERLAP_REASON,
    PLAIN_TYPES,
    GroupOwner,
    Ran,
    TensorListEngine,
    TrustRatios,
    memory_overlaps,
)
from torchsgd.engines.foreach import ForeachEngine
from torchsgd.engines.fused import ZERO_D_CLIP_REASON, FusedEngine, clips_a_0d_parameter_in_float64
from torchsgd.engines.native_extras import NO_STATE
from torchsgd.rules.gradients import GradScalerInStep, unscale_or_skip
from torchsgd.rules.quantize import BLOCK as QUANTUM
from torchsgd.rules.quantize import QuantizedMomentum
from torchsgd.rules.rounding import dense, step_key
from torchsgd.rules.sgd import SGDHyper

logger = logging.getLogger("torchsgd")

CHUNK = 1 << 16  # elements of one table row: one program's piece of a tensor
BLOCK = 1024  # elements a program computes at once

# The storage codes of kernels/triton/sgd.py (int8: a buffer of codes and scales, rules/quantize.py).
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3, torch.int8: 4}
_STORED = (torch.float32, torch.bfloat16, torch.float16, torch.int8)  # what the lifted storage stores
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _quantized_tiles() -> tuple[int, int]:
    """(CHUNK, BLOCK) of an 8-bit momentum launch: whole blocks of QUANTUM elements (BLOCK a power of two)."""
    block = max(BLOCK, QUANTUM)
    return max(block, CHUNK // block * block), block


_kernels: ModuleType | None = None
_failure: str | None = None
_logged_unavailable = False
_schedule_free_kernels: ModuleType | None = None
schedule_free_launches = 0  # ScheduleFreeSGD kernel launches so far (tests check that the kernel ran)


def kernels() -> ModuleType | None:
    """The kernel module, imported (and so its kernels defined) on first use; None when Triton is not usable."""
    global _kernels, _failure
    if _kernels is None and _failure is None:
        try:
            _kernels = importlib.import_module("torchsgd.engines.kernels.triton.sgd")
        except Exception as error:  # ImportError, or a broken installation failing at import
            _failure = f"{type(error).__name__}: {error}"
    return _kernels


def schedule_free_kernels() -> ModuleType | None:
    """kernels/triton/schedule_free.py, imported on first use (after :func:`kernels`); None without Triton."""
    global _schedule_free_kernels
    if _schedule_free_kernels is None and kernels() is not None:
        _schedule_free_kernels = importlib.import_module("torchsgd.engines.kernels.triton.schedule_free")
    return _schedule_free_kernels


def triton_failure() -> str | None:
    """Why the Triton kernels cannot be loaded (None when they can)."""
    kernels()
    return _failure


def _unavailable_reason() -> str:
    return f"triton is not importable ({triton_failure()}); pip install 'torchsgd[cuda]'"


def _log_unavailable_once(reason: str) -> None:
    global _logged_unavailable
    if not _logged_unavailable:
        _logged_unavailable = True
        logger.warning("torchsgd: CUDA param groups run the multi-tensor engine (foreach): %s", reason)


def device_type(group: dict[str, Any]) -> str:
    """The device type of a param group's first parameter ("cpu" for an empty group)."""
    params = group["params"]
    return str(params[0].device.type) if params else "cpu"


def _same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether element k of a's memory is element k of b's: same shape, same strides where a dim has size > 1."""
    if a.shape != b.shape:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()) if size != 1)


class Refused(ValueError):
    """A tensor the kernel cannot take as it is; raised before the step writes anything (the group falls back)."""


def _check(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None] | None,
    device: torch.device,
    lifted: bool,
    momentum_dtype: torch.dtype | None,
) -> None:
    """Raise :class:`Refused` unless the kernel can walk every (parameter, gradient, buffer) as flat memory.

    Cheapest checks first: this runs every step over every parameter.
    """
    if not all(type(p) in PLAIN_TYPES for p in params) or not all(
        type(g) in PLAIN_TYPES and g.layout is torch.strided for g in grads
    ):
        raise Refused("a parameter or gradient is sparse or a tensor subclass (e.g. DTensor)")
    dtypes = [p.dtype for p in params]
    if not all(d in _PARAM_DTYPES for d in dtypes):
        raise Refused(
            f"dtype {next(d for d in dtypes if d not in _PARAM_DTYPES)}: the kernel takes float32, bfloat16, "
            "float16 and float64"
        )
    if not all(g.dtype is d for g, d in zip(grads, dtypes)):
        raise Refused("a gradient of another dtype than its parameter")
    if lifted and torch.float64 in dtypes:
        raise Refused("float64 parameters with momentum_dtype or stochastic rounding (the kernel lifts to float32)")
    if not all(p.device == device for p in params) or not all(g.device == device for g in grads):
        raise Refused("the group's parameters are on more than one device")
    for p, grad in zip(params, grads):
        if (
            not (p.is_contiguous() and grad.is_contiguous())
            and p.numel() != 0
            and not (dense(p) and _same_layout(p, grad))
        ):
            raise Refused("a gradient laid out unlike its parameter (or a parameter with gaps in memory)")
    if momentum_buffers is not None and momentum_dtype is torch.int8:
        _check_quantized(params, grads, momentum_buffers, device)
    elif momentum_buffers is not None:
        for p, dtype, buffer in zip(params, dtypes, momentum_buffers):
            if buffer is not None and (
                type(buffer) not in PLAIN_TYPES
                or buffer.dtype is not (momentum_dtype or dtype)
                or buffer.device != device
                or not _same_layout(p, buffer)
            ):
                raise Refused("a momentum buffer of another dtype, device or layout than its parameter's step writes")


def _check_quantized(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Any], device: torch.device
) -> None:
    """The 8-bit momentum part of :func:`_check`: row-major tensors (a block is consecutive memory), and
    buffers of int8 codes shaped as the parameter and one float32 scale per block, on its device."""
    for p, grad, buffer in zip(params, grads, momentum_buffers):
        if not (p.is_contiguous() and grad.is_contiguous()):
            raise Refused("8-bit momentum with a parameter or gradient that is not row-major (contiguous)")
        if buffer is None:
            continue
        if not isinstance(buffer, QuantizedMomentum):
            raise Refused("a momentum buffer of floats where 8-bit momentum keeps codes and scales")
        codes, scales = buffer.codes, buffer.scales
        if not (
            type(codes) in PLAIN_TYPES
            and type(scales) in PLAIN_TYPES
            and codes.dtype is torch.int8
            and codes.shape == p.shape
            and codes.is_contiguous()
            and scales.dtype is torch.float32
            and scales.is_contiguous()
            and scales.numel() == -(-p.numel() // QUANTUM)
            and codes.device == device
            and scales.device == device
        ):
            raise Refused("an 8-bit momentum buffer whose codes or scales are not what its parameter's step writes")


class TritonEngine(TensorListEngine):
    name = "triton"

    def __init__(self) -> None:
        self.fallback = ForeachEngine()
        self.cpu_fallback = FusedEngine()
        self.launches = 0  # kernel launches so far (tests check that the kernel, not a fallback, ran)

    def step_group(
        self, optimizer: GroupOwner, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> Ran:
        reason = self.refusal(group, hyper, trust_ratios)
        if reason is None and hyper.scaler is not None:
            reason = _scaler_refusal(group, hyper.scaler)
        if reason is None:
            try:
                return super().step_group(optimizer, group, hyper, trust_ratios)
            except Refused as refused:  # raised by the per-tensor checks, before anything is written
                reason = str(refused)
        fallback = self.cpu_fallback if device_type(group) == "cpu" else self.fallback
        if hyper.scaler is not None:  # the fallback engines take unscaled gradients: GradScaler's part on the host
            if unscale_or_skip([p.grad for p in group["params"] if p.grad is not None], hyper.scaler):
                return Ran(fallback.name, reason)
            hyper = dataclasses.replace(hyper, scaler=None)
        ran = fallback.step_group(optimizer, group, hyper, trust_ratios)
        return dataclasses.replace(ran, reason=reason if ran.reason is None else f"{reason}; {ran.reason}")

    def refusal(self, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None) -> str | None:
        """Why the kernel cannot take this group, from what holds for the whole group (None when it can).

        What each tensor must be (its dtype, layout, buffer) is checked where the step walks the tensors
        anyway (:meth:`_launch`), which raises :class:`Refused` before writing anything.
        """
        module = kernels()
        if module is None:
            reason = _unavailable_reason()
            if device_type(group) == "cuda":
                _log_unavailable_once(reason)
            return reason
        first = next((p for p in group["params"] if p.grad is not None), None)
        if first is None:
            return None
        device = first.device
        if device.type == "cpu" and not module.INTERPRETED:
            return (
                "CPU tensors run the Triton kernels only under Triton's interpreter: set TRITON_INTERPRET=1 "
                "before torchsgd first loads them"
            )
        if device.type == "cuda" and module.INTERPRETED:
            return "the Triton kernels were loaded under TRITON_INTERPRET=1, which runs on CPU memory only"
        if device.type not in ("cpu", "cuda"):
            return f"the Triton engine runs on CUDA devices, not {device.type}"
        if trust_ratios is not None and any(t is None for t in trust_ratios):
            return "some parameters of the group are LARS-adapted and some are not"
        if clips_a_0d_parameter_in_float64(group, hyper):
            return ZERO_D_CLIP_REASON
        rounding = hyper.rounding
        if rounding is not None and rounding.momentum_dtype is not None and rounding.momentum_dtype not in _STORED:
            return f"momentum_dtype {rounding.momentum_dtype}: the kernel stores float32, bfloat16, float16 or int8"
        return None

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None = None,
    ) -> None:
        self._launch(params, grads, momentum_buffers, hyper, trust_ratios, None)

    def step_rounded(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None,
        indices: list[int],
    ) -> None:
        """The lifted storage in the kernel: float32 arithmetic, each stored value rounded once there."""
        self._launch(params, grads, momentum_buffers, hyper, trust_ratios, indices)

    def _launch(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None,
        indices: list[int] | None,
    ) -> None:
        module = kernels()
        assert module is not None  # refusal() said so
        if not params:
            return
        device = params[0].device
        rounding = hyper.rounding if indices is not None else None
        lifted = rounding is not None
        stochastic = rounding is not None and rounding.stochastic_rounding
        with_momentum = hyper.momentum != 0
        momentum_dtype = rounding.momentum_dtype if rounding is not None and with_momentum else None
        quantized = momentum_dtype is torch.int8  # codes and scales (rules/quantize.py)
        _check(params, grads, momentum_buffers if with_momentum else None, device, lifted, momentum_dtype)
        first = [with_momentum and momentum_buffers[i] is None for i in range(len(params))]
        scaler = hyper.scaler
        # A skipped first step leaves no state (torch's fused kernel leaves garbage buffers, its bug 2): a step
        # that creates buffers reads the flag on the host first (first steps only; later ones never do).
        if scaler is not None and scaler.found_inf is not None and any(first) and bool(scaler.found_inf.item()):
            return
        buffer_list: list[Any] = momentum_buffers  # (QuantizedMomentum with 8-bit momentum)
        for i, grad in enumerate(grads):
            if first[i] and quantized:
                buffer_list[i] = QuantizedMomentum.empty_like(params[i])
            elif first[i]:  # laid out like the gradient, as torch's clone of it is
                momentum_buffers[i] = torch.empty_like(grad, dtype=momentum_dtype or params[i].dtype)

        # The scalars: one small float64 table from the host, and any Tensor read where it lies.
        values = [0.0, 0.0, 1.0, float(hyper.momentum), 1.0 - float(hyper.dampening), 0.0]
        tensors: list[tuple[int, Tensor]] = []
        for slot, value in enumerate((hyper.lr, hyper.weight_decay, hyper.clip_coefficient)):
            if isinstance(value, Tensor):
                tensors.append((slot, value))
            elif value is not None:
                values[slot] = float(value)
        host = torch.tensor(values, dtype=torch.float64)
        if stochastic and rounding is not None:  # the step's part of every parameter's key (rules/rounding.py)
            host.view(torch.int64)[5] = _signed64(step_key(rounding.seed, rounding.step))
        scalars = _to_device(host, device)
        pointers: list[Tensor] = [scalars[0:1], scalars[1:2], scalars[2:3]]
        for slot, value in tensors:
            if value.device == device and value.dtype in (torch.float32, torch.float64) and value.numel() == 1:
                pointers[slot] = value.detach()
            else:  # copied on the device's stream, no wait
                scalars[slot : slot + 1].copy_(value.detach().reshape(1), non_blocking=True)

        trust = scalars
        if trust_ratios is not None:
            # One float64 table: the ratios (0-d, each in its parameter's dtype) are exact in it.
            trust = torch.cat([t.detach().reshape(1) for t in trust_ratios if t is not None]).to(device, torch.float64)

        weight_decay = hyper.weight_decay
        decays = isinstance(weight_decay, Tensor) or weight_decay != 0
        mode = 0 if not decays else (2 if hyper.decoupled_weight_decay else 1)

        # One launch per (parameter dtype, buffer dtype); a row per piece of each non-empty tensor, built
        # column by column (a comprehension per column costs a fraction of a loop building rows).
        count = len(params)
        buffers: list[Any] = momentum_buffers if with_momentum else [None] * count
        numels = [p.numel() for p in params]
        columns = [
            [p.data_ptr() for p in params],
            [g.data_ptr() for g in grads],
            [b.codes.data_ptr() for b in buffers] if quantized else [0 if b is None else b.data_ptr() for b in buffers],
            [0] * count,
            numels,
            [_signed64(k) for k in indices] if stochastic and indices is not None else [0] * count,
            [int(f) for f in first],
            list(range(count)),
        ]
        chunk, block = _quantized_tiles() if quantized else (CHUNK, BLOCK)
        if quantized:  # (its rows' ninth column: a row's pieces start on a block, chunk being whole blocks)
            columns.append([b.scales.data_ptr() for b in buffers])
            pairs = [(p.dtype, torch.int8) for p in params]
        else:
            pairs = [(p.dtype, p.dtype if b is None else b.dtype) for p, b in zip(params, buffers)]
        launches: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
        for i, pair in enumerate(pairs):
            if numels[i]:
                launches.setdefault(pair, []).append(i)
        rows: dict[tuple[torch.dtype, torch.dtype], Tensor] = {}
        for pair, members in launches.items():
            if len(members) == count and max(numels) <= chunk:  # the usual group: a row per tensor, as listed
                table = torch.tensor(columns, dtype=torch.int64).t()
            else:
                flat: list[list[int]] = []
                for i in members:
                    row = [column[i] for column in columns]
                    for start in range(0, numels[i], chunk):
                        row[3], row[4] = start, min(chunk, numels[i] - start)
                        flat.append(list(row))
                table = torch.tensor(flat, dtype=torch.int64)
            rows[pair] = _to_device(table.contiguous(), device)
        grad_scale = scaler.grad_scale if scaler is not None else None
        found_inf = scaler.found_inf if scaler is not None else None
        for (param_dtype, buffer_dtype), table in rows.items():
            module.sgd_kernel[(table.shape[0],)](
                table,
                trust,
                pointers[0],
                pointers[1],
                pointers[2],
                scalars[3:],
                pointers[0] if grad_scale is None else grad_scale,
                pointers[0] if found_inf is None else found_inf,
                P=_CODES[param_dtype],
                B=_CODES[buffer_dtype],
                MOMENTUM=with_momentum,
                NESTEROV=bool(hyper.nesterov) and with_momentum,
                WEIGHT_DECAY=mode,
                MAXIMIZE=bool(hyper.maximize),
                CLIP=hyper.clip_coefficient is not None,
                TRUST=trust_ratios is not None,
                LIFTED=lifted,
                STOCHASTIC=stochastic,
                UNSCALE=grad_scale is not None,
                SKIP=found_inf is not None,
                BLOCK=block,
                num_warps=4,
                enable_fp_fusion=False,  # the kernel says where torch fuses (tl.fma); nowhere else
            )
            self.launches += 1


def _scaler_refusal(group: dict[str, Any], scaler: GradScalerInStep) -> str | None:
    """Why the kernel cannot apply GradScaler's scale and skip to this group (None when it can)."""
    flags = [t for t in (scaler.grad_scale, scaler.found_inf) if t is not None]
    params = [p for p in group["params"] if p.grad is not None]
    if not all(t.dtype is torch.float32 and t.numel() == 1 and t.device == p.device for t in flags for p in params):
        return "GradScaler's scale or flag is not one float32 element on the parameters' device"
    if len(params) > 1 and memory_overlaps(params):
        return OVERLAP_REASON
    return None


def _signed64(value: int) -> int:
    """An integer below 2^64 as the int64 with its bits (a table column is int64)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host table on the device without a wait: through pinned memory, copied on the stream."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


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
    """ScheduleFreeSGD's training step of the parameters that have a gradient in the Triton kernel
    (kernels/triton/schedule_free.py): native_extras.schedule_free_step's contract. None when it ran, else
    why nothing ran (NO_STATE: some z does not exist yet, the caller makes it and calls again).

    ``rounding`` = (seed, step, indices: one per entry of ``params``) selects stochastic rounding for the
    16-bit tensors (float32 arithmetic, y and z each rounded once, as rules/schedule_free.py); other dtypes
    run torch's rounding of every operation, whose numbers float32 and float64 need no rounding for.
    """
    global schedule_free_launches
    module = kernels()
    if module is None:
        return _unavailable_reason()
    chosen = [(i, p) for i, p in enumerate(params) if p.grad is not None]
    if not chosen:
        return None
    if any("z" not in state[p] for _, p in chosen):
        return NO_STATE
    ys = [p for _, p in chosen]
    device = ys[0].device
    if device.type == "cpu" and not module.INTERPRETED:
        return "CPU tensors run the Triton kernels only under Triton's interpreter (TRITON_INTERPRET=1)"
    if device.type == "cuda" and module.INTERPRETED:
        return "the Triton kernels were loaded under TRITON_INTERPRET=1, which runs on CPU memory only"
    if device.type not in ("cpu", "cuda"):
        return f"the Triton engine runs on CUDA devices, not {device.type}"
    grads = [cast(Tensor, p.grad) for p in ys]
    zs = [state[p]["z"] for p in ys]
    for y, grad, z in zip(ys, grads, zs):
        if (
            type(y) not in PLAIN_TYPES
            or type(grad) not in PLAIN_TYPES
            or type(z) not in PLAIN_TYPES
            or grad.layout is not torch.strided
        ):
            return "a parameter, gradient or z is sparse or a tensor subclass (e.g. DTensor)"
        if y.dtype not in _PARAM_DTYPES or grad.dtype is not y.dtype or z.dtype is not y.dtype:
            return (
                f"dtype {y.dtype} (or a gradient or z of another): the kernel takes float32, bfloat16, float16, float64"
            )
        if y.device != device or grad.device != device or z.device != device:
            return "the parameters, gradients and z are on more than one device"
        if y.numel() and not (
            (y.is_contiguous() and grad.is_contiguous() and z.is_contiguous())
            or (dense(y) and _same_layout(y, grad) and _same_layout(y, z))
        ):
            return "a gradient or z laid out unlike its parameter (or a parameter with gaps in memory)"
        if rounding is not None and not y.is_contiguous():
            return "stochastic rounding of a non-contiguous parameter (its noise follows row-major order)"
    if len(ys) > 1 and memory_overlaps(ys):
        return OVERLAP_REASON
    sf = schedule_free_kernels()
    assert sf is not None

    host = torch.tensor([ckp1, y_alpha, lr, weight_decay, 0.0], dtype=torch.float64)
    if rounding is not None:
        host.view(torch.int64)[4] = _signed64(step_key(rounding[0], rounding[1]))
    scalars = _to_device(host, device)
    indices = [_signed64(rounding[2][i]) for i, _ in chosen] if rounding is not None else [0] * len(ys)
    launches: dict[torch.dtype, list[list[int]]] = {}
    for y, grad, z, index in zip(ys, grads, zs, indices):
        numel = y.numel()
        rows = launches.setdefault(y.dtype, [])
        for start in range(0, numel, CHUNK):  # (the columns of kernels/triton/sgd.py: y, grad, z, piece, index)
            rows.append([y.data_ptr(), grad.data_ptr(), z.data_ptr(), start, min(CHUNK, numel - start), index, 0, 0])
    for dtype, rows in launches.items():
        if not rows:  # only empty tensors of this dtype
            continue
        stochastic = rounding is not None and dtype in (torch.bfloat16, torch.float16)
        table = _to_device(torch.tensor(rows, dtype=torch.int64), device)
        sf.schedule_free_kernel[(len(rows),)](
            table,
            scalars,
            P=_CODES[dtype],
            WEIGHT_DECAY=weight_decay != 0,
            LIFTED=stochastic,
            STOCHASTIC=stochastic,
            BLOCK=BLOCK,
            num_warps=4,
            enable_fp_fusion=False,  # the kernel says where torch fuses (tl.fma); nowhere else
        )
        schedule_free_launches += 1
    return None
