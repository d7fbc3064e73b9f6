"""The SGD update rule of torch.optim.SGD, written once.

The rule is written against a small tensor algebra (:class:`TensorAlgebra`) so that the same lines run on
one tensor (the reference engine) or on a list of tensors at once (the multi-tensor engine). Every line is
one rounded operation, in the order torch evaluates it, which is what makes the reference engine bitwise
equal to ``torch.optim.SGD(foreach=False)``.

The formula, for one parameter θ with gradient ∇ (γ = lr, λ = weight_decay, μ = momentum,
τ = dampening), :data:`FORMULA`::

{FORMULA}

Example (the worked example of the article torchsgd grew from)::

    >>> import torch
    >>> from torchsgd.rules.sgd import SGDHyper, sgd_update, TENSOR
    >>> p = torch.zeros(1); hyper = SGDHyper(lr=1.0, momentum=0.9)
    >>> buf = sgd_update(TENSOR, p, torch.tensor([5.0]), None, hyper)     # first step: b = g = 5
    >>> buf = sgd_update(TENSOR, p, torch.tensor([3.0]), buf, hyper)      # b = 0.9·5 + 3 = 7.5
    >>> round(buf.item(), 4), round(p.item(), 4)
    (7.5, -12.5)
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Generic, Protocol, TypeGuard, TypeVar, cast

import torch
from torch import Tensor

from torchsgd.rules.gradients import GradScalerInStep

__all__ = [
    "FORMULA",
    "SGDHyper",
    "Rounding",
    "TensorAlgebra",
    "TENSOR",
    "LIST",
    "COMPILED_LIST",
    "sgd_update",
    "sgd_direction",
]

X = TypeVar("X")  # one tensor, or a list of tensors

# The update, written once: sgd_direction and sgd_update below run it line by line. This module's
# docstring and torchsgd.SGD's are generated from it; docs/api.md shows it and tests/test_docs.py checks it.
FORMULA = """\
g ← −∇ if maximize else ∇
g ← c·g               if clipping: c = min(max_norm / (‖∇‖ + 1e-6), 1), ‖∇‖ over all parameters
θ ← θ·(1 − γ·λ)       if decoupled_weight_decay (SGDW: decay kept out of g and of b) ...
g ← g + λ·θ           ... else, if λ ≠ 0 (coupled L2 decay, after the sign flip)
g ← t·g               if a trust ratio t is given (LARS, per tensor)
b ← g                 if μ ≠ 0, on this parameter's first step (no dampening)
b ← μ·b + (1 − τ)·g   if μ ≠ 0, on every later step
g ← g + μ·b           if μ ≠ 0: if nesterov, else g ← b
θ ← θ − γ·g
"""


def with_formula(doc: str | None, indent: str = "    ") -> str:
    """``doc`` with its ``{FORMULA}`` line replaced by :data:`FORMULA`, indented like that line."""
    if doc is None:  # python -OO strips docstrings
        return ""
    lines = []
    for line in doc.splitlines(keepends=True):
        if line.strip() == "{FORMULA}":
            lines.append(textwrap.indent(FORMULA, line[: len(line) - len(line.lstrip())] or indent))
        else:
            lines.append(line)
    return "".join(lines)


__doc__ = with_formula(__doc__)


@dataclass(frozen=True)
class Rounding:
    """How results are stored when they are not stored the way torch does.

    With a Rounding the rule runs in float32 (float64 for float64 parameters) on lifted copies and each
    stored value is rounded once: the momentum buffer to ``momentum_dtype`` (default: the parameter's
    dtype), and both to nearest or, with ``stochastic_rounding``, stochastically with noise keyed by
    (seed, step, parameter index). Without one (the default) every operation rounds like torch's.
    """

    momentum_dtype: torch.dtype | None = None
    stochastic_rounding: bool = False
    seed: int = 0
    step: int = 0


@dataclass(frozen=True)
class SGDHyper:
    """The hyperparameters of one param group, as the rule reads them."""

    lr: float | Tensor = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float | Tensor = 0.0
    nesterov: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False
    clip_coefficient: float | Tensor | None = None  # global clip coefficient; None: no clipping
    rounding: Rounding | None = None  # None: torch's rounding after every operation
    # GradScaler's scale and overflow flag for the engine to apply (only the Triton engine is handed them:
    # optim/amp.py); None: the gradients are unscaled already.
    scaler: GradScalerInStep | None = None

    @classmethod
    def from_group(
        cls,
        group: dict,
        clip_coefficient: float | Tensor | None = None,
        rounding: Rounding | None = None,
        scaler: GradScalerInStep | None = None,
    ) -> SGDHyper:
        return cls(
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            decoupled_weight_decay=group.get("decoupled_weight_decay", False),
            clip_coefficient=clip_coefficient,
            rounding=rounding,
            scaler=scaler,
        )


class TensorAlgebra(Protocol, Generic[X]):
    """The operations the rule needs; each is one rounded torch operation."""

    def neg(self, x: X) -> X: ...

    def add(self, x: X, y: X, alpha: float | Tensor) -> X:
        """x + alpha·y, out of place."""

    def add_(self, x: X, y: X, alpha: float | Tensor) -> X:
        """x ← x + alpha·y, in place."""

    def mul_add_(self, x: X, beta: float, y: X, alpha: float) -> X:
        """x ← beta·x + alpha·y, in place, as two roundings: (x·beta) then + alpha·y."""

    def mul(self, x: X, factor: float | Tensor | X) -> X:
        """x·factor, out of place, in x's dtype (a list algebra also takes one 0-d factor per tensor).

        In x's dtype as torch's in-place ``clip_grad_norm_`` leaves a gradient: a 0-d float16 gradient
        times the float32 clip coefficient of a mixed-dtype model would otherwise promote to float32.
        """

    def mul_(self, x: X, factor: float | Tensor) -> X:
        """x ← x·factor, in place."""

    def lerp_(self, x: X, end: X, weight: float) -> X:
        """x ← x + weight·(end − x), in place (torch.lerp)."""

    def clone(self, x: X) -> X: ...


def _needs_graph(scalar: float | Tensor) -> TypeGuard[Tensor]:
    return isinstance(scalar, Tensor) and scalar.requires_grad


def _as_number(scalar: float | Tensor) -> float | Tensor:
    # A 1-element Tensor lr/weight_decay is read as a Python number, as torch does, unless it is part of
    # an autograd graph (differentiable=True: grad mode on), where it must stay a Tensor for d/dlr to flow.
    # A Tensor that requires grad outside differentiable mode records nothing: a number too.
    if (
        isinstance(scalar, Tensor)
        and not (scalar.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
    ):
        return scalar.item()
    return scalar


class _OneTensor:
    """The algebra on a single tensor: torch's single-tensor (for-loop) path."""

    def neg(self, x: Tensor) -> Tensor:
        return torch.neg(x)

    def add(self, x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
        if _needs_graph(alpha):
            # autograd keeps y for d/dalpha, and y (the parameter, for weight decay) is updated in place
            # later in the step: multiply a copy, as torch does.
            return torch.addcmul(x, y.clone(), alpha)
        return x.add(y, alpha=alpha)  # type: ignore[arg-type]  # torch takes a 0-d Tensor alpha (under torch.compile)

    def add_(self, x: Tensor, y: Tensor, alpha: float | Tensor) -> Tensor:
        if _needs_graph(alpha):
            return x.addcmul_(y, alpha)
        return x.add_(y, alpha=alpha)  # type: ignore[arg-type]  # torch takes a 0-d Tensor alpha (under torch.compile)

    def mul_add_(self, x: Tensor, beta: float, y: Tensor, alpha: float) -> Tensor:
        return x.mul_(beta).add_(y, alpha=alpha)

    def mul(self, x: Tensor, factor: float | Tensor) -> Tensor:
        product = torch.mul(x, factor)
        return product if product.dtype == x.dtype else product.to(x.dtype)

    def mul_(self, x: Tensor, factor: float | Tensor) -> Tensor:
        return x.mul_(factor)

    def lerp_(self, x: Tensor, end: Tensor, weight: float) -> Tensor:
        return x.lerp_(end, weight)

    def clone(self, x: Tensor) -> Tensor:
        return x.detach().clone()


_REDUCED_FLOATS = (torch.float16, torch.bfloat16)


class _TensorList:
    """The algebra on a list of same-device, same-dtype tensors: torch's _foreach kernels.

    torch's stubs type the out-of-place _foreach ops as returning a tuple; they return a list (the casts,
    one per list operation, are typing only).
    """

    def neg(self, x: list[Tensor]) -> list[Tensor]:
        return cast("list[Tensor]", torch._foreach_neg(x))

    def add(self, x: list[Tensor], y: list[Tensor], alpha: float | Tensor) -> list[Tensor]:
        if _needs_graph(alpha):
            return cast(
                "list[Tensor]", torch._foreach_addcmul(x, y, [alpha] * len(y))
            )  # pragma: no cover - differentiable uses TENSOR
        if isinstance(alpha, Tensor):  # under torch.compile a Tensor lr stays a Tensor
            return cast("list[Tensor]", torch._foreach_add(x, torch._foreach_mul(y, alpha)))
        return cast("list[Tensor]", torch._foreach_add(x, y, alpha=alpha))

    def add_(self, x: list[Tensor], y: list[Tensor], alpha: float | Tensor) -> list[Tensor]:
        if isinstance(alpha, Tensor):
            torch._foreach_add_(x, torch._foreach_mul(y, alpha))
        else:
            torch._foreach_add_(x, y, alpha=alpha)
        return x

    @staticmethod
    def _factor(x: list[Tensor], factor: float | Tensor | list[Tensor]) -> float | Tensor | list[Tensor]:
        # On CPU, _foreach_mul_ with a Python scalar rounds the scalar to fp16/bf16 before multiplying,
        # while the per-tensor mul_ (torch's loop) multiplies by it in float32; a 0-d float32 Tensor
        # scalar makes _foreach_mul_ do the same.
        if isinstance(factor, (int, float)) and x and x[0].dtype in _REDUCED_FLOATS:
            return torch.tensor(factor, dtype=torch.float32, device=x[0].device)
        return factor

    def mul_add_(self, x: list[Tensor], beta: float, y: list[Tensor], alpha: float) -> list[Tensor]:
        torch._foreach_mul_(x, self._factor(x, beta))
        torch._foreach_add_(x, y, alpha=alpha)
        return x

    def mul(self, x: list[Tensor], factor: float | Tensor | list[Tensor]) -> list[Tensor]:
        products = torch._foreach_mul(x, self._factor(x, factor))
        return [p if p.dtype == t.dtype else p.to(t.dtype) for p, t in zip(products, x)]

    def mul_(self, x: list[Tensor], factor: float | Tensor) -> list[Tensor]:
        torch._foreach_mul_(x, self._factor(x, factor))
        return x

    def lerp_(self, x: list[Tensor], end: list[Tensor], weight: float) -> list[Tensor]:
        torch._foreach_lerp_(x, end, weight=weight)
        return x

    def clone(self, x: list[Tensor]) -> list[Tensor]:
        return [t.detach().clone() for t in x]


class _CompiledTensorList(_TensorList):
    """The list algebra as torch.compile traces it: the momentum update runs per tensor.

    Dynamo passes a param group's float (the momentum OneCycleLR or CyclicLR writes every step) into the
    graph as a symbolic float. AOTAutograd's tensorify pass keeps it a graph input where aten.mul takes it,
    but specialises it, guarded on its value, where a _foreach op takes it as its Scalar: a changing
    momentum then recompiles every step until the recompile limit. Per tensor, as torch's single-tensor
    path does it (and settles); inductor fuses the loop as it fuses the _foreach ops.
    """

    def mul_add_(self, x: list[Tensor], beta: float, y: list[Tensor], alpha: float) -> list[Tensor]:
        for t, u in zip(x, y):
            t.mul_(beta).add_(u, alpha=alpha)
        return x


TENSOR: TensorAlgebra[Tensor] = _OneTensor()
LIST: TensorAlgebra[list[Tensor]] = _TensorList()
COMPILED_LIST: TensorAlgebra[list[Tensor]] = _CompiledTensorList()  # LIST under torch.compile


def sgd_direction(
    algebra: TensorAlgebra[X],
    param: X,
    grad: X,
    momentum_buffer: X | None,
    hyper: SGDHyper,
    trust_ratio: float | Tensor | X | None = None,
) -> tuple[X, X | None]:
    """Return ``(direction, momentum_buffer)``: the step is ``θ ← θ − lr·direction``.

    ``momentum_buffer`` is None on the parameter's first step (a new buffer is returned then) and is
    updated in place otherwise. With ``momentum == 0`` the returned buffer is None. With decoupled weight
    decay, ``param`` is decayed here, in place.
    """
    g = algebra.neg(grad) if hyper.maximize else grad
    if hyper.clip_coefficient is not None:
        g = algebra.mul(g, hyper.clip_coefficient)
    weight_decay = _as_number(hyper.weight_decay)
    if weight_decay != 0:
        if hyper.decoupled_weight_decay:
            algebra.mul_(param, 1 - _as_number(hyper.lr) * weight_decay)
        else:
            g = algebra.add(g, param, alpha=weight_decay)
    if trust_ratio is not None:
        g = algebra.mul(g, trust_ratio)
    if hyper.momentum == 0:
        return g, None
    if momentum_buffer is None:
        momentum_buffer = algebra.clone(g)
    else:
        momentum_buffer = algebra.mul_add_(momentum_buffer, hyper.momentum, g, 1 - hyper.dampening)
    if hyper.nesterov:
        # In place when g is this step's own temporary (the same bits): torch's foreach step does the same,
        # and one full-size temporary fewer is what its peak memory needs. Never on the gradient itself.
        add = algebra.add_ if g is not grad else algebra.add
        g = add(g, momentum_buffer, alpha=hyper.momentum)
    else:
        g = momentum_buffer
    return g, momentum_buffer


def sgd_update(
    algebra: TensorAlgebra[X],
    param: X,
    grad: X,
    momentum_buffer: X | None,
    hyper: SGDHyper,
    trust_ratio: float | Tensor | X | None = None,
) -> X | None:
    """Apply one SGD step to ``param`` in place and return its momentum buffer (None without momentum)."""
    direction, momentum_buffer = sgd_direction(algebra, param, grad, momentum_buffer, hyper, trust_ratio)
    algebra.add_(param, direction, alpha=-_as_number(hyper.lr))
    return momentum_buffer
