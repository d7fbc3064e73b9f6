"""Shared pieces of the parity suite: the engines, the one comparison, and twin runs against torch.

Every numeric test compares torchsgd.SGD against the oracle, ``torch.optim.SGD(foreach=False)``, fed the
very same gradients. :func:`assert_same_as_reference` is the only place that decides what "the same"
means; today it is bitwise for every engine and dtype. A faster engine that is allowed a stated ulp bound
for one dtype gets one line in :data:`ENGINE_BOUNDS`, and nothing else in the suite changes.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import types
import unittest
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import torchsgd

# The engines torchsgd.SGD offers, by the constructor flags that select them (torch's meaning of the flags).
ENGINES: dict[str, dict[str, Any]] = {
    "reference": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
}
ENGINE_NAMES = tuple(ENGINES)

# torch's options, one set each, that the native kernels' tests sweep (test_fused_engine, test_triton).
KERNEL_OPTIONS = [
    dict(),
    dict(weight_decay=0.1),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, dampening=0.5, weight_decay=1e-3, maximize=True),
    dict(momentum=0.9, nesterov=True, maximize=True),
]

REAL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)

# (engine, dtype) -> the largest distance allowed from the reference, per element and per step, in ulps of
# the dtype at the scale of the step's operands (see ulps_at_scale: a result that cancels to near zero is
# not held to the ulps of its own tiny magnitude). Twin runs of an engine with a bound compare after every
# step and then restart from torch's numbers. Absent means bitwise. The README states these bounds: the fused
# engine follows torch's vectorised fp16/bf16 arithmetic, and torch's own scalar tail rounds differently.
ENGINE_BOUNDS: dict[tuple[str, torch.dtype], int] = {
    (engine, dtype): 4 for engine in ("fused", "default") for dtype in (torch.float16, torch.bfloat16)
}

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def engine_dtype_cases(engines: Iterable[str] = ENGINE_NAMES, dtypes: Iterable[torch.dtype] = REAL_DTYPES) -> list:
    """pytest params ``(engine, dtype)``, one per pair, with readable ids."""
    import pytest

    dtypes = tuple(dtypes)
    return [
        pytest.param(engine, dtype, id=f"{engine}-{str(dtype).removeprefix('torch.')}")
        for engine in engines
        for dtype in dtypes
    ]


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------
def _real_view(t: Tensor) -> Tensor:
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t


def ulp_distance(actual: Tensor, expected: Tensor) -> Tensor:
    """Elementwise distance in units in the last place of the (common, floating) dtype; NaN pairs count 0."""
    a, e = _real_view(actual).contiguous(), _real_view(expected).contiguous()
    int_dtype = _INT_OF_WIDTH[a.element_size()]

    def ordered(x: Tensor) -> Tensor:
        # IEEE floats ordered as sign-magnitude integers; map to a monotonic two's-complement line.
        bits = x.view(int_dtype).to(torch.int64)
        sign_mask = 1 << (8 * x.element_size() - 1)
        return torch.where(bits < 0, -(bits & (sign_mask - 1)), bits)

    distance = (ordered(a) - ordered(e)).abs()
    both_nan = torch.isnan(a) & torch.isnan(e)
    return torch.where(both_nan, torch.zeros_like(distance), distance)


def ulps_at_scale(actual: Tensor, expected: Tensor, scale: Tensor | None = None) -> Tensor:
    """Elementwise |actual - expected| in ulps of the dtype at max(|expected|, |scale|) (float64).

    Pass the step's operands as ``scale`` (e.g. max(|before|, |after - before|)): one rounding more or
    less anywhere in ``p - lr·d`` then counts about 1, also where the result cancels to near zero (where
    :func:`ulp_distance` counts thousands). Equal values (infinities too) and NaN pairs count 0.
    """
    a, e = _real_view(actual), _real_view(expected)
    magnitude = e.abs() if scale is None else torch.maximum(e.abs(), _real_view(scale).abs().to(e.dtype))
    spacing = (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).double()
    distance = (a.double() - e.double()).abs() / spacing
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    return torch.where(same, torch.zeros_like(distance), distance)


def assert_same_as_reference(
    actual: Tensor,
    expected: Tensor,
    *,
    engine: str,
    dtype: torch.dtype,
    what: str = "tensor",
    scale: Tensor | None = None,
) -> None:
    """Assert that ``actual`` (torchsgd) equals ``expected`` (torch's loop) as the engine promises.

    Bitwise (``torch.equal`` on the values, identical NaN positions and identical signs of zero) unless
    :data:`ENGINE_BOUNDS` grants ``(engine, dtype)`` a bound, checked with :func:`ulps_at_scale`.
    """
    assert isinstance(actual, Tensor), f"{what}: expected a Tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != torch's {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}"
    assert actual.is_sparse == expected.is_sparse, f"{what}: layout {actual.layout} != torch's {expected.layout}"
    a, e = _real_view(actual), _real_view(expected)
    a_nan, e_nan = torch.isnan(a), torch.isnan(e)
    assert torch.equal(a_nan, e_nan), (
        f"{what} ({engine}, {dtype}): NaN at {a_nan.sum().item()} positions, torch has {e_nan.sum().item()}"
    )
    bound = ENGINE_BOUNDS.get((engine, dtype), 0)
    if bound == 0:
        finite_a, finite_e = a[~a_nan], e[~e_nan]
        same = torch.equal(finite_a, finite_e) and torch.equal(torch.signbit(finite_a), torch.signbit(finite_e))
        if not same:
            differ = (finite_a != finite_e) | (torch.signbit(finite_a) != torch.signbit(finite_e))
            worst = ulp_distance(a, e).max().item() if a.is_floating_point() else "n/a"
            raise AssertionError(
                f"{what} ({engine}, {dtype}) is not bitwise torch's: {int(differ.sum())} of {finite_e.numel()} "
                f"elements differ, by up to {worst} ulp (max abs {(finite_a.double() - finite_e.double()).abs().max().item():.3g})"
            )
        return
    worst = ulps_at_scale(a, e, scale).max().item() if a.numel() else 0
    assert worst <= bound, (
        f"{what} ({engine}, {dtype}) is {worst:.3g} ulp (at operand scale) from torch's; the bound is {bound}"
    )


def assert_optimizers_match(
    ours: torch.optim.Optimizer,
    theirs: torch.optim.Optimizer,
    our_params: Sequence[Tensor],
    their_params: Sequence[Tensor],
    *,
    engine: str,
    what: str = "",
    scales: Sequence[tuple[Tensor | None, Tensor | None]] | None = None,
) -> None:
    """Params and per-parameter state of two optimizers over twin parameter lists are the same, state keys too.

    The momentum buffer is held to the engine's promise (``scales``, per parameter the operand scale of its
    update and of its buffer's, only matters where :data:`ENGINE_BOUNDS` allows a bound); any other state
    (ScheduleFreeSGD's ``z``) must be bitwise. The counters of torchsgd's options (``skipped_steps``;
    ``rounding_step`` under stochastic rounding) must be equal where both optimizers have them.
    """
    assert len(our_params) == len(their_params)
    scales = scales or [(None, None)] * len(their_params)
    for i, (p, q) in enumerate(zip(our_params, their_params)):
        assert_same_as_reference(p, q, engine=engine, dtype=q.dtype, what=f"{what}param {i}", scale=scales[i][0])
        our_state, their_state = ours.state.get(p, {}), theirs.state.get(q, {})
        assert set(our_state) == set(their_state), (
            f"{what}param {i}: state keys {set(our_state)} != torch's {set(their_state)}"
        )
        for key, c in their_state.items():
            b = our_state[key]
            if c is None:
                assert b is None, f"{what}param {i}: {key} is a Tensor, torch's is None"
            elif key == "momentum_buffer":
                assert_same_as_reference(
                    b, c, engine=engine, dtype=c.dtype, what=f"{what}momentum_buffer {i}", scale=scales[i][1]
                )
            elif isinstance(c, Tensor):
                assert_same_as_reference(b, c, engine="reference", dtype=c.dtype, what=f"{what}{key} {i}")
            else:
                assert_values_equal(b, c, what=f"{what}{key} {i}")
    # The counters of torchsgd's options, where both run them (the rounding step keys the noise of
    # stochastic rounding only; without it a state_dict does not carry it).
    counters = ["skipped_steps"] + (["rounding_step"] if getattr(theirs, "stochastic_rounding", False) else [])
    for name in counters:
        if hasattr(ours, name) and hasattr(theirs, name):
            assert getattr(ours, name) == getattr(theirs, name), (
                f"{what}{name} {getattr(ours, name)} != {getattr(theirs, name)}"
            )


def assert_state_dicts_equal(actual: dict, expected: dict, *, engine: str = "reference") -> None:
    """Two optimizer state_dicts are identical: same keys, same group entries, tensors bitwise equal, and
    any further entry (torchsgd's "torchsgd") equal."""
    assert set(actual) == set(expected), f"state_dict keys {sorted(actual)} != {sorted(expected)}"
    for key in set(expected) - {"state", "param_groups"}:
        assert_values_equal(actual[key], expected[key], what=f"state_dict[{key!r}]")
    assert len(actual["param_groups"]) == len(expected["param_groups"])
    for i, (g, h) in enumerate(zip(actual["param_groups"], expected["param_groups"])):
        assert set(g) == set(h), f"group {i}: keys {sorted(g)} != {sorted(h)}"
        for key in h:
            assert_values_equal(g[key], h[key], what=f"group {i} {key!r}")
    assert set(actual["state"]) == set(expected["state"]), (
        f"state keys {set(actual['state'])} != {set(expected['state'])}"
    )
    for index, entry in expected["state"].items():
        assert set(actual["state"][index]) == set(entry), (
            f"state {index}: {set(actual['state'][index])} != {set(entry)}"
        )
        for key, value in entry.items():
            other = actual["state"][index][key]
            if isinstance(value, Tensor):
                assert_same_as_reference(other, value, engine=engine, dtype=value.dtype, what=f"state {index} {key}")
            else:
                assert_values_equal(other, value, what=f"state {index} {key}")


def assert_values_equal(actual: Any, expected: Any, *, what: str) -> None:
    assert type(actual) is type(expected), f"{what}: {type(actual).__name__} != {type(expected).__name__}"
    if isinstance(expected, Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), f"{what}: {actual} != {expected}"
    else:
        assert actual == expected, f"{what}: {actual!r} != {expected!r}"


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------
def random_tensor(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    """Normal values, drawn in float64 and rounded once to ``dtype`` (complex dtypes get both parts)."""
    if dtype.is_complex:
        real_dtype = torch.float32 if dtype == torch.complex64 else torch.float64
        parts = torch.randn((*shape, 2), generator=generator, dtype=torch.float64) * scale
        return torch.view_as_complex(parts.to(real_dtype).contiguous())
    return (torch.randn(tuple(shape), generator=generator, dtype=torch.float64) * scale).to(dtype)


def with_layout(values: Tensor, layout: str) -> Tensor:
    """A new tensor equal to ``values`` whose memory layout is ``layout``.

    ``contiguous``: row major. ``transposed``: dense, dimensions stored in reverse order (the memory of a
    transposed matrix). ``strided``: not dense, every other element of a larger buffer.
    """
    if layout == "contiguous" or values.dim() == 0:
        return values.clone(memory_format=torch.contiguous_format)
    if layout == "transposed":
        order = list(range(values.dim() - 1, -1, -1))
        return values.permute(order).contiguous().permute(order)
    if layout == "strided":
        buffer = torch.zeros((*values.shape[:-1], 2 * values.shape[-1]), dtype=values.dtype)
        view = buffer[..., ::2]
        view.copy_(values)
        return view
    raise ValueError(layout)


def clone_param(p: Tensor) -> Tensor:
    """An independent copy of a parameter, with the same values, layout and requires_grad."""
    q = p.detach().clone(memory_format=torch.preserve_format)
    q.requires_grad_(p.requires_grad)
    return q


def clone_option(value: Any) -> Any:
    """Hyperparameters may be Tensors; each optimizer gets its own (a scheduler mutates them in place)."""
    return value.detach().clone() if isinstance(value, Tensor) else value


def clone_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: clone_option(v) for k, v in options.items()}


# ---------------------------------------------------------------------------------------------------------
# Twin runs: torchsgd.SGD next to torch.optim.SGD(foreach=False)
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Twins:
    """torchsgd.SGD (``ours``) and torch.optim.SGD(foreach=False) (``theirs``) over twin parameters."""

    ours: torchsgd.SGD
    theirs: torch.optim.SGD
    our_params: list[Tensor]
    their_params: list[Tensor]
    engine: str
    steps_taken: int = field(default=0)

    def set_grads(self, grads: Sequence[Tensor | None] | Callable[[], Sequence[Tensor | None]]) -> None:
        """Give both sides the same gradients, each its own copy with the same memory layout.

        ``grads`` is either a list (copied with :func:`copy_grad`) or a function called once per side, which
        must build the same values each time (use it when the layout cannot be copied, e.g. strided views).
        """
        for params in (self.our_params, self.their_params):
            fresh = grads() if callable(grads) else [copy_grad(g) for g in grads]
            assert len(fresh) == len(params)
            for p, g in zip(params, fresh):
                p.grad = g

    def step(self, grads: Sequence[Tensor | None] | Callable[[], Sequence[Tensor | None]] | None = None) -> None:
        if grads is not None:
            self.set_grads(grads)
        bounded = any(engine == self.engine for engine, _ in ENGINE_BOUNDS)
        before = self._values() if bounded else None
        self.ours.step()
        self.theirs.step()
        self.steps_taken += 1
        if bounded:
            # A bound is per step: check this step at its operands' scale, then start the next one from
            # torch's numbers.
            after = self._values()
            scales = [self._operand_scales(q, b, a) for q, b, a in zip(self.their_params, before, after)]
            self.assert_match(scales=scales)
            self.resync()

    def _operand_scales(self, q: Tensor, before: tuple, after: tuple) -> tuple[Tensor | None, Tensor | None]:
        """The operand scales of one parameter's step (param, buffer), from torch's side.

        The step's operands: the direction d = ∇ + λ·θ, the buffer before and after (μ·b + (1 − τ)·d),
        the parameter before and its change (θ − γ·(d + μ·b) or θ − γ·b). A first-step buffer is d itself,
        which may cancel to near zero (∇ ≈ −λθ): it is held to the ulps of d's operands, not of its own.
        """
        (p0, b0), (p1, b1) = before, after
        param = _step_scale(p0, p1)
        buffer = _step_scale(b0, b1) if b0 is not None else (None if b1 is None else b1.abs())
        grad = q.grad
        if grad is None or param is None:
            return param, buffer
        group = next(g for g in self.theirs.param_groups if any(x is q for x in g["params"]))
        decay, lr, momentum = (float(group[k]) for k in ("weight_decay", "lr", "momentum"))
        grad = grad.to_dense() if grad.is_sparse else grad
        direction = torch.maximum(grad.abs(), (decay * p0).abs()).to(param.dtype)
        buffer = direction if buffer is None else torch.maximum(buffer, direction.to(buffer.dtype))
        param = torch.maximum(param, (lr * (1 + momentum) * buffer).to(param.dtype))
        return param, None if b1 is None else buffer

    def _values(self) -> list[tuple[Tensor, Tensor | None]]:
        """torch's parameters and dense momentum buffers (or None), copied."""
        return param_values(self.theirs, self.their_params)

    def resync(self) -> None:
        """Copy torch's parameters and momentum buffers into ours (a no-op while they are bitwise equal)."""
        with torch.no_grad():
            for p, q in zip(self.our_params, self.their_params):
                p.copy_(q)
                ours, theirs = self.ours.state.get(p, {}), self.theirs.state.get(q, {})
                if isinstance(theirs.get("momentum_buffer"), Tensor) and not theirs["momentum_buffer"].is_sparse:
                    ours["momentum_buffer"].copy_(theirs["momentum_buffer"])

    def assert_match(self, what: str = "", scales: Sequence[tuple[Tensor | None, Tensor | None]] | None = None) -> None:
        label = what or f"after {self.steps_taken} steps: "
        assert_optimizers_match(
            self.ours, self.theirs, self.our_params, self.their_params, engine=self.engine, what=label, scales=scales
        )
        for i, (p, q) in enumerate(zip(self.our_params, self.their_params)):
            # The optimizer must not touch gradients (GradScaler's in-step unscale aside).
            if q.grad is None:
                assert p.grad is None, f"{label}grad {i} is set, torch's is None"
            else:
                assert_same_as_reference(
                    p.grad, q.grad, engine=self.engine, dtype=q.grad.dtype, what=f"{label}grad {i}"
                )


def _step_scale(before: Tensor | None, after: Tensor | None) -> Tensor | None:
    """The operand scale of an update ``before -> after``: max(|before|, |after - before|)."""
    if before is None or after is None:
        return None
    return torch.maximum(before.abs(), (after - before).abs())


def copy_grad(g: Tensor | None) -> Tensor | None:
    if g is None:
        return None
    if g.is_sparse:
        return g.detach().clone()
    copied = g.detach().clone(memory_format=torch.preserve_format)  # keeps the strides of a dense tensor
    if copied.stride() != g.stride():
        raise ValueError("copy a non-dense gradient by passing a function that builds it")
    return copied


def split_into_groups(params: Sequence[Tensor], groups: Sequence[tuple[Sequence[int], dict[str, Any]]] | None) -> list:
    if groups is None:
        return list(params)
    return [{"params": [params[i] for i in indices], **clone_options(options)} for indices, options in groups]


def make_twins(
    initial: Sequence[Tensor],
    *,
    engine: str = "reference",
    groups: Sequence[tuple[Sequence[int], dict[str, Any]]] | None = None,
    **defaults: Any,
) -> Twins:
    """torchsgd.SGD with ``ENGINES[engine]`` and torch.optim.SGD(foreach=False), same options, twin params.

    ``groups`` is a list of ``(parameter indices, group options)``; None puts every parameter in one group.
    """
    our_params = [clone_param(p) for p in initial]
    their_params = [clone_param(p) for p in initial]
    ours = torchsgd.SGD(split_into_groups(our_params, groups), **clone_options(defaults), **ENGINES[engine])
    theirs = torch.optim.SGD(split_into_groups(their_params, groups), **clone_options(defaults), foreach=False)
    return Twins(ours, theirs, our_params, their_params, engine)


def run_twins(
    initial: Sequence[Tensor],
    grad_sequence: Iterable[Sequence[Tensor | None]],
    *,
    engine: str,
    groups: Sequence[tuple[Sequence[int], dict[str, Any]]] | None = None,
    check_every_step: bool = True,
    **defaults: Any,
) -> Twins:
    """Run both optimizers over the same gradients, comparing params and buffers after every step."""
    twins = make_twins(initial, engine=engine, groups=groups, **defaults)
    for grads in grad_sequence:
        twins.step(grads)
        if check_every_step:
            twins.assert_match()
    twins.assert_match()
    return twins


def seeded_grads(params: Sequence[Tensor], steps: int, seed: int, scale: float = 1.0) -> list[list[Tensor]]:
    """``steps`` lists of dense, contiguous gradients for ``params`` (deterministic in ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    return [[random_tensor(p.shape, p.dtype, generator, scale) for p in params] for _ in range(steps)]


def param_values(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[tuple[Tensor, Tensor | None]]:
    """Copies of each parameter and of its dense momentum buffer (None where it has none, or a sparse one)."""
    values = []
    for p in params:
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        dense = isinstance(buffer, Tensor) and not buffer.is_sparse
        values.append((p.detach().clone(), buffer.detach().clone() if dense else None))
    return values


# ---------------------------------------------------------------------------------------------------------
# Stepping, training, and "nothing changed"
# ---------------------------------------------------------------------------------------------------------
def take_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """One step with exactly these gradients (each parameter gets its own copy, with the same strides, dense
    or not; None: no gradient).

    With ``step_in_backward`` the gradients are made by ``backward()`` of Σ (p·g).sum(), whose gradient is
    exactly g in p's dtype, so that the hooks see them; then ``step()`` (which runs the step hooks).
    """
    if getattr(optimizer, "step_in_backward", False):
        terms = [(p * g).sum().double() for p, g in zip(params, grads) if g is not None]
        torch.stack(terms).sum().backward()
        assert all(p.grad is None for p in params), "step_in_backward left a gradient behind"
    else:
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.empty_strided(g.shape, g.stride(), dtype=g.dtype).copy_(g)
    optimizer.step()


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    data: tuple[Tensor, Tensor],
    *,
    before_zero_grad: Callable[[int], Any] | None = None,
    before_step: Callable[[int], Any] | None = None,
    scheduler: Any = None,
) -> None:
    """``steps`` steps of cross-entropy on ``data`` (inputs cast to the model's dtype, logits to float32).

    With ``maximize`` the objective is the negated loss, so that every run stays bounded. The callbacks
    get the step's index: ``before_zero_grad`` first, ``before_step`` between backward and step.
    """
    x, y = data
    dtype = next(model.parameters()).dtype
    maximize = bool(optimizer.param_groups[0].get("maximize"))
    for step in range(steps):
        if before_zero_grad is not None:
            before_zero_grad(step)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        (-loss if maximize else loss).backward()
        if before_step is not None:
            before_step(step)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread for the block. For many steps on small tensors (which no kernel splits):
    with two threads, on two cores shared with other processes, each tiny op can wait for a descheduled
    OpenMP thread, and a 250-step run took 18 s instead of 0.14 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# The optimizer-wide settings and counters of torchsgd's optimizers (public attributes).
OPTIMIZER_WIDE = (
    "max_grad_norm",
    "skip_nonfinite",
    "skipped_steps",
    "momentum_dtype",
    "stochastic_rounding",
    "seed",
    "rounding_step",
    "step_in_backward",
)


def snapshot(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What :func:`assert_unchanged` compares: the state_dict, the param groups (their very parameters), the
    identity of every state tensor, and the optimizer-wide settings."""
    return {
        "state_dict": copy.deepcopy(optimizer.state_dict()),
        "groups": [
            {k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in optimizer.param_groups
        ],
        "state_ids": {id(p): {k: id(v) for k, v in s.items()} for p, s in optimizer.state.items()},
        "globals": {name: getattr(optimizer, name) for name in OPTIMIZER_WIDE if hasattr(optimizer, name)},
    }


def assert_unchanged(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    before: dict[str, Any],
    twin: tuple[torch.optim.Optimizer, Sequence[Tensor]],
    *,
    step: Callable[[torch.optim.Optimizer, Sequence[Tensor], Sequence[Tensor | None]], None] = take_step,
) -> None:
    """Bitwise the optimizer it was at :func:`snapshot`: its state_dict, param_groups, own state tensors and
    settings, and its next ``step`` equals that of ``twin``, an untouched optimizer with the same history."""
    after = optimizer.state_dict()
    assert_state_dicts_equal(after, before["state_dict"])
    assert len(optimizer.param_groups) == len(before["groups"])
    for g, h in zip(optimizer.param_groups, before["groups"]):
        assert set(g) == set(h), f"group keys {sorted(g)} != {sorted(h)}"
        for key in h:
            if key == "params":
                assert len(g["params"]) == len(h["params"]) and all(x is y for x, y in zip(g["params"], h["params"]))
            else:
                assert_values_equal(g[key], h[key], what=key)
    state_ids = {id(p): {k: id(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    assert state_ids == before["state_ids"], "state replaced"
    assert {name: getattr(optimizer, name) for name in OPTIMIZER_WIDE if hasattr(optimizer, name)} == before["globals"]
    twin_optimizer, twin_params = twin
    grads = seeded_grads(params, 1, seed=99)[0]
    step(optimizer, params, grads)
    step(twin_optimizer, twin_params, grads)
    assert_optimizers_match(
        optimizer, twin_optimizer, params, twin_params, engine="reference", what="after the failed call: "
    )


def with_flags_of(state_dict: dict[str, Any], receiver: torch.optim.Optimizer) -> dict[str, Any]:
    """A copy of ``state_dict`` whose groups keep the receiver's engine flags (which engine runs is the
    receiver's choice; torch's load_state_dict would take the checkpoint's)."""
    state_dict = copy.deepcopy(state_dict)
    for group, own in zip(state_dict["param_groups"], receiver.param_groups):
        for key in ("foreach", "fused", "differentiable"):
            if key in own:
                group[key] = own[key]
    return state_dict


def capture_error(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as error:
        return error
    return None


def assert_same_error(ours: Callable[[], Any], theirs: Callable[[], Any]) -> BaseException:
    """Both calls raise, with the same exception type and the same message; returns torch's error."""
    their_error = capture_error(theirs)
    assert their_error is not None, "torch no longer raises here: this test's premise changed"
    our_error = capture_error(ours)
    assert our_error is not None, f"torch raises {type(their_error).__name__}: {their_error}, torchsgd does not"
    assert type(our_error) is type(their_error), (
        f"{type(our_error).__name__}: {our_error} != torch's {type(their_error).__name__}: {their_error}"
    )
    assert str(our_error) == str(their_error), f"message {str(our_error)!r} != torch's {str(their_error)!r}"
    return their_error


def import_common_optimizers() -> types.ModuleType:
    """``torch.testing._internal.common_optimizers``; its import chain wants ``expecttest``, a test-only
    package torch's wheel does not depend on. Without it, a stand-in with the one name used is installed."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        stand_in.ACCEPT = False  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stand_in
    argv = list(sys.argv)
    try:
        from torch.testing._internal import common_optimizers
    finally:
        sys.argv[:] = argv  # common_utils parses (and trims) the command line at import
    return common_optimizers


def resynchronise(
    opt: torch.optim.Optimizer, ref: torch.optim.Optimizer, ours: list[Tensor], theirs: list[Tensor]
) -> None:
    """Copy the reference's parameters and momentum buffers into ours, so that a bound is checked per step."""
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
            if b in ref.state:
                opt.state[a]["momentum_buffer"].copy_(ref.state[b]["momentum_buffer"])


# ---- random parameters and gradients made in float64 and rounded once, bitwise comparison, op recording ----


def make_params(shapes: Sequence[Sequence[int]], dtype: torch.dtype, seed: int = 0) -> list[Tensor]:
    """One tensor per shape, drawn in float64 and rounded once to ``dtype`` (the same values for every dtype)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in shapes]


def grads_for(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, steps: int, seed: int = 1, late: Sequence[int] = ()
) -> list[list[Tensor | None]]:
    """Per step, one gradient per parameter (None where it has none: the indices in ``late`` until step 2)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [
            None if (i in late and step < 2) else torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)
            for i, s in enumerate(shapes)
        ]
        for step in range(steps)
    ]


def bits(t: Tensor) -> Tensor:
    """A tensor's elements as the integers of their bits (flattened)."""
    t = t.detach().reshape(-1)
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def assert_bitwise(actual: Tensor, expected: Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    differing = int((bits(actual) != bits(expected)).sum())
    assert differing == 0, f"{what}: {differing} of {actual.numel()} elements differ from the reference"


@contextlib.contextmanager
def recorded_ops() -> Iterator[list[tuple[str, int]]]:
    """Inside: every ATen operation torch runs, as (its name, the bytes of its outputs), appended to the list."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[tuple[str, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            seen.extend((str(func), t.numel() * t.element_size()) for t in outs if isinstance(t, torch.Tensor))
            return out

    with Record():
        yield seen
