"""Low-precision storage: round-to-nearest or stochastic rounding when fp32 results are written back.

Stochastic rounding (SR) rounds x up or down to the two neighbouring values of the storage dtype with
probabilities proportional to the distance, so E[round(x)] = x: tiny updates that round-to-nearest would
erase (θ + γg rounding back to θ in bfloat16) survive on average. That is what lets pure-bf16 training
match fp32 (Zamirai et al. 2020, "Revisiting BFloat16 Training").

The random bits are a counter-based hash of (seed, step, stream, element index), not a stateful
generator: the same seed gives the same bits on every engine (this module is the reference; the native
kernel computes the same hash), and resuming needs only (seed, step).

- bfloat16: add 16 random bits below the bf16 mantissa of the float32 bit pattern, then truncate
  (±inf stay infinite, NaN stays NaN).
- float16: pick between the two float16 neighbours of x with probability (x − lo) / (hi − lo).

Each parameter has one key per step; one 32-bit hash per element serves both of its bfloat16 stores (the
parameter takes the high 16 bits, its momentum buffer the low 16), and a float16 store hashes the key
salted by its role, since it needs 24 bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "PARAM",
    "BUFFER",
    "step_key",
    "stream_key",
    "dense",
    "element_hash",
    "shard_rows",
    "stochastic_round",
    "round_to_dtype",
]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


PARAM, BUFFER = "param", "buffer"
_SALT = {PARAM: 0x68E31DA4, BUFFER: 0xB5297A4D}


def step_key(seed: int, step: int) -> int:
    """The 64-bit part of every parameter's noise key that depends on the step alone (see stream_key)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def stream_key(seed: int, step: int, stream: int) -> int:
    """The 32-bit key of one parameter's noise (stream: its index in the optimizer) at one step."""
    return _splitmix64(step_key(seed, step) ^ (stream & _MASK64)) & _MASK32


def element_hash(
    key: int, numel: int, device: torch.device | str = "cpu", start: int = 0, index: Tensor | None = None
) -> Tensor:
    """32 random bits per element (as int64 in [0, 2³²)): murmur3's finalizer of index·φ + key.

    The index of an element is its position in memory in the whole tensor, as the native kernel walks it:
    by default ``start, start + 1, ...`` (a row-major tensor, or a slice of rows of one from element
    ``start``); ``index`` gives each element's own (see :func:`memory_index`).
    """
    positions = torch.arange(start, start + numel, dtype=torch.int64, device=device) if index is None else index
    x = (positions.reshape(-1) * 0x9E3779B1 + key) & _MASK32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK32
    x ^= x >> 16
    return x


def shard_rows(rows: int, shards: int, coordinate: int) -> tuple[int, int]:
    """The rows of dim 0 that shard ``coordinate`` of ``shards`` holds: (first row, number of rows).

    The split of DTensor's ``Shard(0)`` (and so of FSDP2's ``fully_shard``), that of ``torch.chunk``: every
    shard but the last ones holds ceil(rows / shards) rows; the last holds what is left, and shards past
    the end hold none (7 rows over 3: 3, 3, 1; 2 rows over 3: 1, 1, 0). FSDP2 pads its shards to equal
    size in memory, but the DTensor's local tensor is the unpadded rows. A shard's elements are a slice of
    rows of the whole row-major tensor, so its noise is :func:`element_hash` from ``start`` = first row ×
    elements per row, bitwise that of the same elements of the whole tensor.
    """
    if rows < 0 or shards < 1 or not 0 <= coordinate < shards:
        raise ValueError(f"shard_rows: {rows} rows, shard {coordinate} of {shards}")
    per_shard = -(-rows // shards)
    first = min(coordinate * per_shard, rows)
    return first, min(per_shard, rows - first)


def dense(t: Tensor) -> bool:
    """Whether ``t`` covers a block of memory exactly, in some order of its dims (torch's non-overlapping and dense)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def memory_index(view: Tensor, whole: Tensor) -> Tensor | None:
    """Each element's noise index, when ``view`` (a view of the parameter ``whole``) is not row-major.

    A dense parameter laid out in another order (a transpose, channels_last) is walked in memory order by
    the native kernel, so an element's index is its memory offset in ``whole``; that is what this returns.
    None where the row-major position is the index: a contiguous parameter (then ``start`` suffices), or
    one with gaps, which only the Python engines run (all of them the same way).
    """
    if whole.is_contiguous() or not dense(whole):
        return None
    offset = view.storage_offset() - whole.storage_offset()
    index = torch.full(view.shape, offset, dtype=torch.int64, device=view.device)  # type: ignore[arg-type]  # a SymInt under compile
    for dim, (size, stride) in enumerate(zip(view.shape, view.stride())):
        shape = [1] * view.dim()
        shape[dim] = size
        index += (torch.arange(size, dtype=torch.int64, device=view.device) * stride).view(shape)
    return index


def stochastic_round(
    x: Tensor, dtype: torch.dtype, key: int, role: str = PARAM, start: int = 0, index: Tensor | None = None
) -> Tensor:
    """Round float32 ``x`` to ``dtype`` (bfloat16 or float16) stochastically; NaN and ±inf stay as they are.

    ``role`` picks which noise of the key's element hashes this store uses (see the module's docstring);
    ``start`` and ``index`` say which elements of the parameter ``x`` holds (see :func:`element_hash`).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes float32 values, got {x.dtype}")
    if role not in _SALT:
        raise ValueError(f"role must be {PARAM!r} or {BUFFER!r}, got {role!r}")
    if dtype == torch.bfloat16:
        bits = element_hash(key, x.numel(), x.device, start, index).view(x.shape)
        noise = (bits >> 16) if role == PARAM else (bits & 0xFFFF)
        # Infinities stay infinite under the bit arithmetic itself (their low 16 bits are zero). A NaN whose
        # payload fills the high mantissa bits (float16's NaN widened by torch is 0x7FFFFFFF) would carry
        # into the sign bit and come out as ±0: NaN is kept NaN explicitly.
        pattern = x.view(torch.int32).to(torch.int64)
        rounded = ((pattern + noise) & -65536).to(torch.int32).view(torch.float32).to(dtype)
        return torch.where(torch.isnan(x), x.to(dtype), rounded)
    if dtype == torch.float16:
        bits = element_hash(key ^ _SALT[role], x.numel(), x.device, start, index).view(x.shape)
        nearest = x.to(dtype)
        finite = torch.isfinite(x)
        near = nearest.float()
        toward = torch.where(near < x, torch.inf, -torch.inf).to(dtype)
        other = torch.nextafter(nearest, toward).float()
        lo, hi = torch.minimum(near, other), torch.maximum(near, other)
        p_hi = (x - lo) / (hi - lo)
        u = (bits >> 8).to(torch.float32) * 2.0**-24
        rounded = torch.where(u < p_hi, hi, lo).to(dtype)
        return torch.where(finite & (near != x), rounded, nearest)
    raise TypeError(f"stochastic rounding targets bfloat16 or float16, got {dtype}")


def round_to_dtype(
    x: Tensor, dtype: torch.dtype, key: int | None, role: str = PARAM, start: int = 0, index: Tensor | None = None
) -> Tensor:
    """``x`` (float32) in ``dtype``: stochastically rounded when ``key`` is given and dtype is 16-bit."""
    if key is not None and dtype in (torch.bfloat16, torch.float16):
        return stochastic_round(x.float(), dtype, key, role, start, index)
    return x.to(dtype)
