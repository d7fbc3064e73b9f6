# mypy: ignore-errors
# (Triton's kernel language has no type stubs, and @triton.jit functions take untyped DSL values.)
"""The Triton kernel of the SGD rule: many tensors per launch, every tensor read and written in its dtype.

One program takes one row of a launch table (the addresses of a parameter, its gradient and its momentum
buffer, the first element and the count of a piece of at most CHUNK elements, the parameter's index in the
optimizer (its noise stream), whether it is the parameter's first step, its slot in the trust-ratio table) and walks that piece BLOCK elements at a time.
Arithmetic runs in float32 registers (float64 for float64 tensors), one line per torch operation of
rules/sgd.py, in the order and with the roundings of the CPU kernel (kernels/cpu/rule.h, which documents
torch's): with torch's rounding each intermediate is rounded to the tensor's dtype; with the lifted
storage (momentum_dtype, stochastic rounding) intermediates stay float32 and each stored value is rounded
once, to nearest or stochastically with the counter hash of rules/rounding.py.

With 8-bit momentum (B == I8, rules/quantize.py's linear code) the buffer is int8 codes and a float32
scale per QUANTUM elements of each tensor, row-major (a table row's ninth column: the scales' address).
A launch's pieces start on a block of their tensor and BLOCK is a multiple of QUANTUM, so each tile is
whole blocks of one tensor, held as a (BLOCK // QUANTUM, QUANTUM) array: a row per block. The tile dequantizes (c · (s / 127)), runs the rule in float32, reduces
|b| over each row to its new scale and stores the codes (round(b · (127 / s)), half to even, or
⌊b · (127 / s) + u⌋ stochastically), each division once a block and correctly rounded, as the reference.

Scalars come from memory (a 1-element tensor each), so a Tensor lr, weight decay or clip coefficient is
read on the device and the host never waits for it. Importing this module defines the kernels: set
TRITON_INTERPRET=1 before the first import to run them on CPU tensors (tests).
"""

import triton
import triton.language as tl

from torchsgd.rules import quantize

# Storage codes of a tensor (the launch's P and B).
F32 = tl.constexpr(0)
BF16 = tl.constexpr(1)
F16 = tl.constexpr(2)
F64 = tl.constexpr(3)
I8 = tl.constexpr(4)  # a buffer of 8-bit codes and per-block scales (B only)

# Weight decay modes (the launch's WEIGHT_DECAY).
NO_DECAY = tl.constexpr(0)
COUPLED = tl.constexpr(1)
DECOUPLED = tl.constexpr(2)

# Columns of a launch-table row (int64 each); KEY holds the parameter's index in the optimizer. (A kernel may
# read only constexpr globals: the GPU compiler rejects a plain int, which the interpreter lets through.)
ROW = tl.constexpr(8)
PARAM_ADDRESS = tl.constexpr(0)
GRAD_ADDRESS = tl.constexpr(1)
BUFFER_ADDRESS = tl.constexpr(2)
START = tl.constexpr(3)
COUNT = tl.constexpr(4)
KEY = tl.constexpr(5)
FIRST = tl.constexpr(6)
SLOT = tl.constexpr(7)
QUANTIZED_ROW = tl.constexpr(9)  # an 8-bit momentum launch's rows add one column:
SCALES_ADDRESS = tl.constexpr(8)  # the address of the buffer's float32 scales

# rules/quantize.py's linear code: elements per scale, the smallest scale that gets codes, the noise salt.
QUANTUM = tl.constexpr(quantize.BLOCK)
SCALE_FLOOR = tl.constexpr(quantize.FLOOR)
QUANTIZE_SALT = tl.constexpr(quantize.QUANTIZE)

INTERPRETED = triton.knobs.runtime.interpret  # whether these kernels run on CPU memory (TRITON_INTERPRET=1)


@triton.jit
def _pointer(address, CODE: tl.constexpr):
    # bfloat16 is moved as its raw bits: its conversions are written out below, as c10's.
    if CODE == BF16:
        pointer = address.to(tl.pointer_type(tl.uint16))
    elif CODE == F16:
        pointer = address.to(tl.pointer_type(tl.float16))
    elif CODE == F64:
        pointer = address.to(tl.pointer_type(tl.float64))
    elif CODE == I8:
        pointer = address.to(tl.pointer_type(tl.int8))
    else:
        pointer = address.to(tl.pointer_type(tl.float32))
    return pointer


@triton.jit
def _load(pointer, offsets, mask, CODE: tl.constexpr):
    """Values of a tensor in its compute type (exact: float32 holds every bfloat16 and float16)."""
    x = tl.load(pointer + offsets, mask=mask, other=0)
    if CODE == BF16:
        value = (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif CODE == F64:
        value = x
    else:
        value = x.to(tl.float32)
    return value


@triton.jit
def _nearest_bf16_bits(x):
    # c10's float -> bfloat16: round to nearest even on the bit pattern.
    u = x.to(tl.uint32, bitcast=True)
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@triton.jit
def _round(x, CODE: tl.constexpr, LIFTED: tl.constexpr):
    """What storing an intermediate in a tensor of dtype CODE does to it (torch's rounding); none when lifted."""
    if LIFTED:
        r = x
    elif CODE == BF16:
        r = (_nearest_bf16_bits(x) << 16).to(tl.float32, bitcast=True)
    elif CODE == F16:
        r = x.to(tl.float16).to(tl.float32)
    else:
        r = x
    return r


@triton.jit
def _alpha(x, CODE: tl.constexpr, LIFTED: tl.constexpr):
    """A float64 scalar as the `alpha` of torch's add: in the compute type, and for 16-bit tensors rounded to
    their dtype first (torch's CPU kernels do; the lifted storage computes in float32)."""
    if CODE == F64:
        a = x
    else:
        a = _round(x.to(tl.float32), CODE, LIFTED)
    return a


@triton.jit
def _factor(x, CODE: tl.constexpr):
    """A float64 scalar as the factor of torch's mul: in the compute type."""
    if CODE == F64:
        f = x
    else:
        f = x.to(tl.float32)
    return f


@triton.jit
def _hash(index, key):
    """rules/rounding.element_hash: murmur3's finaliser of index·φ + key, in 32-bit arithmetic."""
    x = index * 0x9E3779B1 + key
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _stream_key(step_key, index):
    """rules/rounding.stream_key's last round: splitmix64(step_key ^ index), low 32 bits, where the host gives
    step_key = splitmix64(splitmix64(seed) ^ step), the same for every parameter of the step."""
    z = (step_key ^ index) + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return z.to(tl.uint32)


@triton.jit
def _stochastic_half(x, bits):
    """rules/rounding.stochastic_round to float16: one of x's two float16 neighbours, chosen by distance."""
    nearest = x.to(tl.float16)
    near = nearest.to(tl.float32)
    nearest_bits = nearest.to(tl.uint16, bitcast=True).to(tl.uint32)
    up = near < x
    zero = (nearest_bits & 0x7FFF) == 0
    positive = (nearest_bits & 0x8000) == 0
    away = tl.where(positive == up, nearest_bits + 1, nearest_bits - 1)  # torch.nextafter toward x
    from_zero = tl.where(up, 0x0001, 0x8001)
    other_bits = tl.where(zero, from_zero, away) & 0xFFFF
    other = other_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    lo = tl.minimum(near, other)
    hi = tl.maximum(near, other)
    p_hi = tl.math.div_rn(x - lo, hi - lo)  # IEEE division (the default '/' may be approximate on the GPU)
    u = (bits >> 8).to(tl.float32) * 5.9604644775390625e-08  # 24 bits · 2^-24
    chosen = tl.where(u < p_hi, hi, lo).to(tl.float16)
    finite = (x - x) == 0.0
    return tl.where(finite & (near != x), chosen, nearest)


@triton.jit
def _store(pointer, offsets, x, mask, CODE: tl.constexpr, STOCHASTIC: tl.constexpr, bf16_noise, f16_bits):
    """Store x (compute type) in a tensor of dtype CODE: to nearest even, or stochastically (16-bit dtypes)."""
    if CODE == BF16:
        if STOCHASTIC:
            bits = (x.to(tl.uint32, bitcast=True) + bf16_noise) >> 16
        else:
            bits = _nearest_bf16_bits(x)
        bits = tl.where(x != x, 0x7FC0, bits)  # c10's canonical NaN
        tl.store(pointer + offsets, bits.to(tl.uint16), mask=mask)
    elif CODE == F16:
        if STOCHASTIC:
            tl.store(pointer + offsets, _stochastic_half(x, f16_bits), mask=mask)
        else:
            tl.store(pointer + offsets, x.to(tl.float16), mask=mask)
    elif CODE == F64:
        tl.store(pointer + offsets, x, mask=mask)
    else:
        tl.store(pointer + offsets, x.to(tl.float32), mask=mask)


@triton.jit
def _dequantize(codes, scales, offsets, blocks, mask, block_mask):
    """rules/quantize.dequantize of a tile of whole blocks (a row per block): c · (s / 127), s / 127 once a row."""
    c = tl.load(codes + offsets, mask=mask, other=0).to(tl.float32)
    s = tl.load(scales + blocks, mask=block_mask, other=0.0)
    step = tl.math.div_rn(s, tl.full(s.shape, 127.0, tl.float32))  # IEEE division, as torch's s / 127
    return c * step[:, None]


@triton.jit
def _larger(a, b):
    """max's combine for tl.reduce. (Not tl.max: that is a @triton.jit function of triton.language, and
    when triton.language was imported before TRITON_INTERPRET=1 was set, by torch._inductor or another
    test, the interpreter cannot call it; a combine defined here is interpreted with this module's kernels.)"""
    return tl.maximum(a, b)


@triton.jit
def _quantize(codes, scales, offsets, blocks, b, mask, block_mask, STOCHASTIC: tl.constexpr, key):
    """rules/quantize.quantize (linear) of a tile of whole blocks, stored: a scale per row, a code per element."""
    b = tl.where(mask, b, 0.0)  # the padding of a tensor's last block is zeros, as the reference's
    finite = (b - b) == 0.0
    # (Non-finiteness is counted apart: the GPU's max of a NaN and a number is the number.)
    poisoned = tl.reduce(tl.where(finite, 0, 1), 1, _larger) != 0
    s = tl.reduce(tl.abs(b), 1, _larger)
    usable = (s >= SCALE_FLOOR) & (poisoned == 0)  # below the floor 127 / s would overflow: zero codes
    # 127 / s once a block, correctly rounded (not a reciprocal then a multiply: two roundings).
    inverse = tl.where(usable, tl.math.div_rn(tl.full(s.shape, 127.0, tl.float32), tl.where(usable, s, 1.0)), 0.0)
    scaled = tl.where(poisoned[:, None], 0.0, b * inverse[:, None])
    if STOCHASTIC:  # ⌊b · (127 / s) + u⌋, u = 24 bits of the QUANTIZE stream's hash · 2^-24
        u = (_hash(offsets.to(tl.uint32), key ^ QUANTIZE_SALT) >> 8).to(tl.float32) * 5.9604644775390625e-08
        code = tl.floor(scaled + u)
    else:  # round half to even: adding then subtracting 1.5 · 2^23 leaves the integer (|scaled| <= 127 here)
        code = (scaled + 12582912.0) - 12582912.0
    code = tl.minimum(tl.maximum(code, -127.0), 127.0)
    tl.store(codes + offsets, code.to(tl.int8), mask=mask)
    nan = tl.full(s.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True)  # torch's NaN
    tl.store(scales + blocks, tl.where(poisoned, nan, s), mask=block_mask)


@triton.jit
def sgd_kernel(
    table,  # int64 [rows, ROW]: one piece of one tensor per row (columns above)
    trust,  # float64 [tensors]: LARS trust ratios by slot (read only with TRUST)
    lr_pointer,  # 1-element float32/float64 tensors: lr, weight_decay, clip coefficient
    weight_decay_pointer,
    clip_pointer,
    scalars,  # float64 [3]: momentum, 1 - dampening, and the step's noise key (int64 bits)
    grad_scale_pointer,  # 1-element float32 tensors: GradScaler's scale (read with UNSCALE) and overflow
    found_inf_pointer,  # flag (read with SKIP), where it lies: the host never reads the flag
    P: tl.constexpr,  # storage code of the parameters and gradients
    B: tl.constexpr,  # storage code of the momentum buffers (I8: 8-bit codes, the table's rows QUANTIZED_ROW wide)
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,  # NO_DECAY, COUPLED or DECOUPLED
    MAXIMIZE: tl.constexpr,
    CLIP: tl.constexpr,
    TRUST: tl.constexpr,
    LIFTED: tl.constexpr,  # intermediates in float32, each stored value rounded once (rules/sgd.py, Rounding)
    STOCHASTIC: tl.constexpr,  # ... stochastically
    UNSCALE: tl.constexpr,  # divide each gradient by GradScaler's scale, in place (as GradScaler.unscale_)
    SKIP: tl.constexpr,  # write nothing when GradScaler's overflow flag is set
    BLOCK: tl.constexpr,  # with B == I8, a multiple of QUANTUM (and each piece starts on a block)
):
    if B == I8:
        row = table + tl.program_id(0) * QUANTIZED_ROW
        scales = tl.load(row + SCALES_ADDRESS).to(tl.pointer_type(tl.float32))
    else:
        row = table + tl.program_id(0) * ROW
    param = _pointer(tl.load(row + PARAM_ADDRESS), P)
    grad = _pointer(tl.load(row + GRAD_ADDRESS), P)
    buffer = _pointer(tl.load(row + BUFFER_ADDRESS), B)
    start = tl.load(row + START)
    count = tl.load(row + COUNT)
    if SKIP:  # an overflow: the piece is left as it is (its first-step buffers were not created: see the engine)
        count = tl.where(tl.load(found_inf_pointer) != 0.0, 0, count)
    later = tl.load(row + FIRST) == 0  # not the parameter's first step: its buffer holds a value

    # The step's scalars as rules/sgd.py computes them in Python (float64), then as torch's kernels take them.
    lr = tl.load(lr_pointer).to(tl.float64)
    weight_decay = tl.load(weight_decay_pointer).to(tl.float64)
    decays = weight_decay != 0.0  # `if weight_decay != 0` (a Tensor weight decay is only known here)
    neg_lr = _alpha(-lr, P, LIFTED)
    wd = _alpha(weight_decay, P, LIFTED)
    decay = _factor(tl.where(decays, 1.0 - lr * weight_decay, 1.0), P)
    clip = _factor(tl.load(clip_pointer).to(tl.float64), P)
    momentum = tl.load(scalars)
    m_mul = _factor(momentum, P)
    m_add = _alpha(momentum, P, LIFTED)
    one_minus_d = _alpha(tl.load(scalars + 1), P, LIFTED)
    if TRUST:
        trust_ratio = _factor(tl.load(trust + tl.load(row + SLOT)), P)
    if UNSCALE:  # GradScaler's 1 / scale: in float64 (a float64 division is IEEE's on the GPU), then float32
        scale = tl.load(grad_scale_pointer).to(tl.float64)
        inv_scale = _factor((1.0 / scale).to(tl.float32).to(tl.float64), P)
    key = 0
    if STOCHASTIC:  # the parameter's noise key, from its index in the optimizer (its noise stream)
        step_key = tl.load(scalars.to(tl.pointer_type(tl.int64), bitcast=True) + 2).to(tl.uint64, bitcast=True)
        key = _stream_key(step_key, tl.load(row + KEY).to(tl.uint64, bitcast=True))

    for offset in range(0, count, BLOCK):
        if B == I8:  # a row per block of the tensor
            rows = tl.arange(0, BLOCK // QUANTUM)
            local = offset + (rows[:, None] * QUANTUM + tl.arange(0, QUANTUM)[None, :])
            block_mask = offset + rows * QUANTUM < count
            blocks = (start + offset) // QUANTUM + rows
        else:
            local = offset + tl.arange(0, BLOCK)
        mask = local < count
        offsets = start + local  # the element's place in its tensor's memory: its noise index too
        d = _load(grad, offsets, mask, P)
        pv = _load(param, offsets, mask, P)
        if UNSCALE:  # g.mul_(1 / scale): stored in the gradient's dtype, which the step then reads
            d = _round(d * inv_scale, P, False)
            _store(grad, offsets, d, mask, P, False, 0, 0)
        if MAXIMIZE:
            d = -d  # g = -grad
        if CLIP:
            d = _round(d * clip, P, LIFTED)  # g = g·c (the clip coefficient)
        if WEIGHT_DECAY == DECOUPLED:
            pv = _round(pv * decay, P, LIFTED)  # p.mul_(1 - lr·wd)
        if WEIGHT_DECAY == COUPLED:
            d = tl.where(decays, _round(tl.fma(pv, wd, d), P, LIFTED), d)  # g = g.add(p, alpha=wd)
        if TRUST:
            d = _round(d * trust_ratio, P, LIFTED)  # g = g·t (LARS)
        bf16_noise_param = 0
        bf16_noise_buffer = 0
        f16_bits_param = 0
        f16_bits_buffer = 0
        if STOCHASTIC:
            index = offsets.to(tl.uint32)
            if P == BF16 or B == BF16:  # one hash serves both bfloat16 stores
                h = _hash(index, key)
                bf16_noise_param = h >> 16
                bf16_noise_buffer = h & 0xFFFF
            if P == F16:
                f16_bits_param = _hash(index, key ^ 0x68E31DA4)
            if B == F16:
                f16_bits_buffer = _hash(index, key ^ 0xB5297A4D)
        if MOMENTUM:
            # (The interpreter's `&` with a scalar gives int32: tl.where.)
            if B == I8:
                b = _dequantize(
                    buffer, scales, offsets, blocks, tl.where(later, mask, False), tl.where(later, block_mask, False)
                )
            else:
                b = _load(buffer, offsets, tl.where(later, mask, False), B)
            b = _round(b * m_mul, P, LIFTED)  # b.mul_(momentum)
            b = _round(tl.fma(d, one_minus_d, b), P, LIFTED)  # .add_(g, alpha=1 - dampening)
            b = tl.where(later, b, d)  # b = g.clone() on the first step
            if NESTEROV:
                d = _round(tl.fma(b, m_add, d), P, LIFTED)  # g = g.add(b, alpha=momentum)
            else:
                d = b  # g = b
            if B == I8:
                _quantize(buffer, scales, offsets, blocks, b, mask, block_mask, STOCHASTIC, key)
            else:
                _store(buffer, offsets, b, mask, B, STOCHASTIC, bf16_noise_buffer, f16_bits_buffer)
        new_param = tl.fma(d, neg_lr, pv)  # p.add_(g, alpha=-lr)
        _store(param, offsets, new_param, mask, P, STOCHASTIC, bf16_noise_param, f16_bits_param)
