"""8-bit momentum: a buffer stored as one int8 code per element and one float32 scale per block.

Block-wise quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): the
buffer's elements, in row-major order, are cut into blocks of BLOCK; each block keeps its absolute maximum
as its scale, and each element a code. The default code book, LINEAR, in float32 arithmetic::

    s = max |b| over the block              (a float32 per block; 0 for an all-zero block)
    c = round(b · (127 / s))                (an int8 per element, −127..127; half to even; 127 / s once a block)
    b̂ = c · (s / 127)                       (s / 127 once a block: a kernel dequantizes with one multiply)

With stochastic rounding c = ⌊b · (127 / s) + u⌋ instead, u uniform in [0, 1) from the counter noise of
rules/rounding.py (so the choice is reproducible and the same on every engine): E[b̂] = b. A block whose
scale is below FLOOR (2^-120, where 127 / s would overflow float32) is stored as zero codes; a block holding
a non-finite value gets a NaN scale and zero codes, so it dequantizes to NaN, as a float32 buffer holding
one would poison its update. Every element is within half a step, s / 254, of its value (one step
stochastically), up to the two float32 roundings of 127 / s and s / 127 (a few ulps of the scale).

DYNAMIC, a second book for comparison (benchmarks/int8_momentum_codes.py; the optimizer uses LINEAR): a
signed code that spends its bits on magnitudes, as the paper's dynamic tree code (64 values in each of
(0.1, 1], 32 in (0.01, 0.1], ..., 1 in (1e-7, 1e-6], and 0); each element takes the entry nearest b / s.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import Tensor

from torchsgd.rules.rounding import element_hash

__all__ = [
    "BLOCK",
    "FLOOR",
    "CODES",
    "DEFAULT_CODE",
    "QuantizedMomentum",
    "blocks",
    "code_values",
    "quantize",
    "dequantize",
]

BLOCK = 256  # elements per scale: 4 bytes of scale per 256 of codes, 1.016 bytes a parameter in all

CODES = ("linear", "dynamic")
DEFAULT_CODE = "linear"  # what trained better on the digits task: benchmarks/int8_momentum_codes.py

FLOOR = 2.0**-120  # scales below it are stored as zero codes: 127 / s would overflow float32

QUANTIZE = 0x3C6EF372  # the noise stream of a quantized buffer (rules/rounding.py's PARAM and BUFFER are others)


def blocks(numel: int) -> int:
    """The number of blocks (scales) of a buffer of ``numel`` elements."""
    return -(-numel // BLOCK)


@functools.cache
def _values(code: str) -> tuple[float, ...]:
    if code == "linear":
        return tuple(c / 127 for c in range(-127, 128))
    if code == "dynamic":
        magnitudes: list[float] = []
        for decade in range(7):  # 64, 32, ..., 1 values per decade, evenly spaced within it
            count = 64 >> decade
            top = 10.0**-decade
            magnitudes += [top * (0.1 + 0.9 * (k + 1) / count) for k in range(count)]
        magnitudes.sort()
        return tuple([-m for m in reversed(magnitudes)] + [0.0] + magnitudes)
    raise ValueError(f"unknown int8 code {code!r}: expected one of {', '.join(CODES)}")


def code_values(code: str, device: torch.device | str = "cpu") -> Tensor:
    """The 255 values of a code book, ascending, as float32: code c (an int8, −127..127) means entry c + 127."""
    return torch.tensor(_values(code), dtype=torch.float32, device=device)


def _flat_blocks(x: Tensor) -> tuple[Tensor, int]:
    """``x`` (float32) in row-major order, zero-padded to whole blocks, as (blocks, BLOCK); and its numel."""
    flat = x.reshape(-1)
    numel = flat.numel()
    pad = blocks(numel) * BLOCK - numel
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK), numel


def quantize(x: Tensor, code: str = DEFAULT_CODE, key: int | None = None, start: int = 0) -> tuple[Tensor, Tensor]:
    """``x`` (float32, any shape) as int8 codes of its shape and float32 scales, one per block.

    To nearest without ``key`` (linear: round(b · (127 / s)), half to even; dynamic: the nearest entry, ties
    to the lower); stochastically (linear: ⌊b · (127 / s) + u⌋, u uniform in [0, 1)) with the noise of
    ``rules.rounding.element_hash(key, ...)`` (``start``: the element index of ``x``'s first element in
    the whole buffer, a multiple of BLOCK) otherwise. A non-finite value gives a non-finite scale: the
    block then dequantizes to NaN, as a float32 buffer holding one would poison its update.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize takes float32 values, got {x.dtype}")
    if start % BLOCK:
        raise ValueError(f"start must be a multiple of BLOCK ({BLOCK}), got {start}")
    rows, numel = _flat_blocks(x)
    scales = rows.abs().amax(dim=1)
    finite = torch.isfinite(scales)
    u = None
    if key is not None:
        bits = element_hash(key, rows.numel(), x.device, start).view(rows.shape)
        u = (bits >> 8).to(torch.float32) * 2.0**-24  # 24 random bits in [0, 1)
    if code == "linear":  # c = round(b · (127 / s)), half to even; stochastically ⌊b · (127 / s) + u⌋
        usable = finite & (scales >= FLOOR)
        # (A division, correctly rounded: torch's ``127.0 / t`` is t.reciprocal() * 127, two roundings.)
        inverse = torch.where(usable, torch.full_like(scales, 127.0).div(torch.where(usable, scales, 1.0)), 0.0)
        scaled = torch.where(finite[:, None], rows * inverse[:, None], 0.0)
        chosen = (torch.round(scaled) if u is None else torch.floor(scaled + u)).clamp_(-127, 127).to(torch.int64) + 127
    else:
        safe = torch.where((scales > 0) & finite, scales, torch.ones_like(scales))
        y = (rows / safe[:, None]).clamp_(-1.0, 1.0)
        y = torch.where(finite[:, None], y, torch.zeros_like(y))
        values = code_values(code, x.device)
        # The entry at or below y, and the one above it (the top entry is its own upper neighbour).
        lower = (torch.searchsorted(values, y.contiguous(), right=True) - 1).clamp_(0, values.numel() - 1)
        upper = (lower + 1).clamp_(max=values.numel() - 1)
        v_lower, v_upper = values[lower], values[upper]
        gap = v_upper - v_lower
        if u is None:
            chosen = torch.where(y - v_lower > v_upper - y, upper, lower)
        else:
            p_upper = torch.where(gap > 0, (y - v_lower) / torch.where(gap > 0, gap, 1.0), 0.0)
            chosen = torch.where(u < p_upper, upper, lower)
    codes = (chosen - 127).to(torch.int8).view(-1)[:numel].view(x.shape)
    return codes, torch.where(finite, scales, torch.full_like(scales, math.nan))


def dequantize(codes: Tensor, scales: Tensor, code: str = DEFAULT_CODE, start: int = 0) -> Tensor:
    """The float32 values of int8 ``codes`` (any shape, row-major blocks) with their blocks' ``scales``.

    ``start`` is the element index of ``codes``' first element in the whole buffer (a multiple of BLOCK);
    ``scales`` are those of the blocks ``codes`` covers, from that block on.
    """
    if start % BLOCK:
        raise ValueError(f"start must be a multiple of BLOCK ({BLOCK}), got {start}")
    numel = codes.numel()
    per_block = scales[: blocks(numel)]
    if code == "linear":  # c · (s / 127)
        flat = codes.reshape(-1).to(torch.float32)
        steps = (per_block / 127.0).repeat_interleave(BLOCK)[:numel]
        return (flat * steps).view(codes.shape)
    values = code_values(code, codes.device)
    flat = values[codes.reshape(-1).to(torch.int64) + 127]
    per_element = per_block.repeat_interleave(BLOCK)[:numel]
    return (flat * per_element).view(codes.shape)


@dataclasses.dataclass
class QuantizedMomentum:
    """A parameter's 8-bit momentum buffer: int8 ``codes`` of the parameter's shape (contiguous, row-major
    blocks) and float32 ``scales``, one per block. In the optimizer's state as ``momentum_codes`` and
    ``momentum_scales``; engines see it where a float buffer would be (None before the first step)."""

    codes: Tensor
    scales: Tensor

    CODES_KEY = "momentum_codes"
    SCALES_KEY = "momentum_scales"

    @classmethod
    def empty_like(cls, param: Tensor) -> QuantizedMomentum:
        codes = torch.empty(param.shape, dtype=torch.int8, device=param.device)
        return cls(codes, torch.empty(blocks(param.numel()), dtype=torch.float32, device=param.device))

    @classmethod
    def from_state(cls, state: dict) -> QuantizedMomentum | None:
        codes = state.get(cls.CODES_KEY)
        return None if codes is None else cls(codes, state[cls.SCALES_KEY])

    def into_state(self, state: dict) -> None:
        state[self.CODES_KEY] = self.codes
        state[self.SCALES_KEY] = self.scales

    def dequantize(self, code: str = DEFAULT_CODE) -> Tensor:
        """The buffer's float32 values (the parameter's shape)."""
        return dequantize(self.codes, self.scales, code)

    @classmethod
    def of(cls, values: Tensor, code: str = DEFAULT_CODE) -> QuantizedMomentum:
        """``values`` (any float dtype) quantized to nearest: how a float buffer is converted (a checkpoint)."""
        codes, scales = quantize(values.detach().float().contiguous(), code)
        return cls(codes, scales)
