"""The lifted step with 8-bit momentum (``momentum_dtype=torch.int8``) for the Python engines.

Each tensor, in pieces of whole blocks: dequantize its buffer (rules/quantize.py), run the engine's own
rule on float32 copies (float64 for float64 parameters), store the parameter rounded once (stochastically
with ``stochastic_rounding``) and the buffer quantized again (to nearest, or stochastically with
``stochastic_rounding``). The step uses the buffer's float32 value; only what is kept is quantized.
The native CPU kernel (kernels/cpu/quantized.h) and the Triton engine run the same step in one pass; the
groups they cannot take (a parameter that is not contiguous, float64, DTensor shards) come here, and
their report says why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import Tensor

from torchsgd.engines.base import PLAIN_TYPES
from torchsgd.rules.quantize import BLOCK, DEFAULT_CODE, QUANTIZE, QuantizedMomentum, dequantize, quantize
from torchsgd.rules.rounding import PARAM, round_to_dtype, stream_key
from torchsgd.rules.sgd import Rounding, SGDHyper

# Elements of one piece of a contiguous tensor: whole blocks, and float32 copies of a few MB.
PIECE = (1 << 17) // BLOCK * BLOCK


def step_quantized(
    engine: Any,
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Any],
    hyper: SGDHyper,
    trust_ratios: list[Tensor | None] | None,
    indices: list[int],
) -> None:
    """``engine.step_rounded`` for a rounding whose momentum_dtype is torch.int8 (see the module docstring).

    ``momentum_buffers`` hold :class:`QuantizedMomentum` (None before a parameter's first step); a new one
    is put in the list, as a float buffer would be.
    """
    rounding = cast(Rounding, hyper.rounding)
    for p, g in zip(params, grads):
        if type(p) not in PLAIN_TYPES or type(g) not in PLAIN_TYPES:
            raise NotImplementedError(
                "momentum_dtype=torch.int8 takes plain tensors (not DTensor or other tensor subclasses) yet"
            )
        if g.is_sparse or p.is_complex():
            raise RuntimeError("momentum_dtype=torch.int8 does not take sparse gradients or complex parameters")
    plain = dataclasses.replace(hyper, rounding=None)
    stochastic = rounding.stochastic_rounding
    for i, (p, g) in enumerate(zip(params, grads)):
        buffer = momentum_buffers[i]
        first = buffer is None
        if first:
            buffer = QuantizedMomentum.empty_like(p)
        key = stream_key(rounding.seed, rounding.step, indices[i]) if stochastic else None
        compute = torch.promote_types(p.dtype, torch.float32)
        numel = p.numel()
        contiguous = p.is_contiguous() and g.is_contiguous()
        pieces = [(a, min(a + PIECE, numel)) for a in range(0, numel, PIECE)] if contiguous else [(0, numel)]
        for a, b in pieces:
            if contiguous:
                p_piece, g_piece = p.detach().view(-1)[a:b], g.view(-1)[a:b]
            else:
                p_piece, g_piece = p.detach().reshape(-1), g.reshape(-1)
            lifted_p = [p_piece.to(compute, copy=True)]
            lifted_g = [g_piece.to(compute, copy=True)]
            codes = buffer.codes.view(-1)[a:b]
            scales = buffer.scales[a // BLOCK : -(-b // BLOCK)]
            lifted_b: list[Tensor | None] = [None if first else dequantize(codes, scales, DEFAULT_CODE).to(compute)]
            trust = None if trust_ratios is None else [trust_ratios[i]]
            engine.step(lifted_p, lifted_g, lifted_b, plain, trust)

            stored = round_to_dtype(lifted_p[0], p.dtype, key, PARAM, a) if p.dtype != compute else lifted_p[0]
            if contiguous:
                p_piece.copy_(stored)
            else:
                p.detach().copy_(stored.view(p.shape))
            new_codes, new_scales = quantize(
                cast(Tensor, lifted_b[0]).float(), DEFAULT_CODE, None if key is None else key ^ QUANTIZE, a
            )
            codes.copy_(new_codes)
            scales.copy_(new_scales)
        if first:
            momentum_buffers[i] = buffer
