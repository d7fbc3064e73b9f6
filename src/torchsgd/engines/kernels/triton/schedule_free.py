# mypy: ignore-errors
# (Triton's kernel language has no type stubs, and @triton.jit functions take untyped DSL values.)
"""The Triton kernel of ScheduleFreeSGD's training step (rules/schedule_free.py): one pass over y, z and the
gradient, many tensors per launch, where the Python engines run four torch operations (five with weight
decay), each a pass over memory.

A launch table row is SGD's (kernels/triton/sgd.py: the parameter y, its gradient, its z where SGD has
its buffer, a piece of at most CHUNK elements, the parameter's index in the optimizer). Each line is the
torch operation it mirrors, with torch's CPU roundings as kernels/cpu/schedule_free.h documents them:
an add's alpha rounded to the tensor's dtype and fused (x + alpha·other as one fma), the lerp weight in
the compute type (fma(w, z − y, y) when |w| < 0.5, else fma(w − 1, z − y, z)), every result rounded to the
tensor's dtype; with stochastic rounding (LIFTED, 16-bit tensors) float32 throughout and y and z each
rounded once, y with a parameter's noise and z with a buffer's (rules/rounding.py).
"""

import triton
import triton.language as tl

from torchsgd.engines.kernels.triton.sgd import (
    BF16,
    BUFFER_ADDRESS,
    COUNT,
    F16,
    GRAD_ADDRESS,
    KEY,
    PARAM_ADDRESS,
    ROW,
    START,
    _alpha,
    _factor,
    _hash,
    _load,
    _pointer,
    _round,
    _store,
    _stream_key,
)


@triton.jit
def schedule_free_kernel(
    table,  # int64 [rows, ROW]: one piece of one tensor per row (kernels/triton/sgd.py's columns)
    scalars,  # float64 [5]: c (ckp1), γ·(μ·(1 − c) − 1), γ, λ, and the step's noise key (int64 bits)
    P: tl.constexpr,  # storage code of y, z and the gradients
    WEIGHT_DECAY: tl.constexpr,  # λ != 0 (the scalars are the host's numbers)
    LIFTED: tl.constexpr,  # float32 arithmetic, y and z each rounded once (stochastic rounding)
    STOCHASTIC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = table + tl.program_id(0) * ROW
    y_pointer = _pointer(tl.load(row + PARAM_ADDRESS), P)
    grad = _pointer(tl.load(row + GRAD_ADDRESS), P)
    z_pointer = _pointer(tl.load(row + BUFFER_ADDRESS), P)
    start = tl.load(row + START)
    count = tl.load(row + COUNT)

    # The lerp weight in the compute type, as torch's lerp takes it, and the side its fma starts from.
    weight = _factor(tl.load(scalars), P)
    small = tl.abs(weight) < 0.5
    coefficient = tl.where(small, weight, weight - 1.0)
    y_alpha = _alpha(tl.load(scalars + 1), P, LIFTED)
    neg_lr = _alpha(-tl.load(scalars + 2), P, LIFTED)
    wd = _alpha(tl.load(scalars + 3), P, LIFTED)
    if STOCHASTIC:  # the parameter's noise key (rules/rounding.stream_key), from its index in the optimizer
        step_key = tl.load(scalars.to(tl.pointer_type(tl.int64), bitcast=True) + 4).to(tl.uint64, bitcast=True)
        key = _stream_key(step_key, tl.load(row + KEY).to(tl.uint64, bitcast=True))

    for offset in range(0, count, BLOCK):
        local = offset + tl.arange(0, BLOCK)
        mask = local < count
        offsets = start + local  # the element's place in its tensor's memory: its noise index too
        g = _load(grad, offsets, mask, P)
        y = _load(y_pointer, offsets, mask, P)
        z = _load(z_pointer, offsets, mask, P)
        if WEIGHT_DECAY:
            g = _round(tl.fma(y, wd, g), P, LIFTED)  # g = grad.add(y, alpha=λ)
        lerped = _round(tl.fma(coefficient, z - y, tl.where(small, y, z)), P, LIFTED)  # y.lerp_(z, c)
        new_y = tl.fma(g, y_alpha, lerped)  # y.add_(g, alpha=γ·(μ·(1 − c) − 1))
        new_z = tl.fma(g, neg_lr, z)  # z.sub_(g, alpha=γ)
        bf16_noise_y = 0
        bf16_noise_z = 0
        f16_bits_y = 0
        f16_bits_z = 0
        if STOCHASTIC:
            index = offsets.to(tl.uint32)
            if P == BF16:  # one hash serves both: y takes the high 16 bits, z the low
                h = _hash(index, key)
                bf16_noise_y = h >> 16
                bf16_noise_z = h & 0xFFFF
            if P == F16:  # rules/rounding.py's salts of a parameter's and a buffer's store
                f16_bits_y = _hash(index, key ^ 0x68E31DA4)
                f16_bits_z = _hash(index, key ^ 0xB5297A4D)
        _store(y_pointer, offsets, new_y, mask, P, STOCHASTIC, bf16_noise_y, f16_bits_y)
        _store(z_pointer, offsets, new_z, mask, P, STOCHASTIC, bf16_noise_z, f16_bits_z)
