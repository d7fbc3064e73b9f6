"""``torchsgd explain``: the article's momentum example, computed step by step with torchsgd's own rule.

The numbers come from :func:`torchsgd.rules.sgd.sgd_update` (the rule every engine runs), in float64 so
that the printed values are the exact arithmetic, not float32 rounding.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.padding import Padding
from rich.table import Table

import torchsgd
from torchsgd.cli.common import console, finite_float, float_list
from torchsgd.rules.sgd import TENSOR, SGDHyper, sgd_direction, sgd_update

ARTICLE_GRADS = (5.0, 3.0, 6.0)
ARTICLE_MOMENTUM = 0.9
OVERVIEW_DAMPENING = 0.5  # the dampening shown in the four-variant overview


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grads",
        type=float_list,
        default=ARTICLE_GRADS,
        metavar="G1,G2,...",
        help="the gradient at each step, comma-separated (default: 5,3,6, the article's)",
    )
    parser.add_argument("--momentum", type=float, default=ARTICLE_MOMENTUM, help="momentum μ (default: 0.9)")
    parser.add_argument(
        "--dampening",
        type=float,
        default=None,
        help="dampening τ. Giving --dampening or --nesterov shows that one configuration; without either, "
        f"explain shows plain SGD, momentum, momentum with dampening {OVERVIEW_DAMPENING} and Nesterov",
    )
    parser.add_argument("--nesterov", action="store_true", help="Nesterov momentum (see --dampening)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate γ (default: 0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay λ (default: 0)")
    parser.add_argument("--start", type=finite_float, default=0.0, help="initial parameter θ₀ (default: 0)")


@dataclass(frozen=True)
class Step:
    """One row of a step table; ``decayed`` is the gradient after weight decay, ∇ + λ·θ."""

    step: int
    gradient: float
    decayed: float
    buffer: float | None
    direction: float
    parameter: float


@dataclass(frozen=True)
class Variant:
    title: str
    hyper: SGDHyper


def trace(grads: Sequence[float], hyper: SGDHyper, start: float = 0.0) -> list[Step]:
    """Run the library's rule on a one-element parameter and record every quantity of every step."""
    param = torch.tensor([start], dtype=torch.float64)
    decay_only = SGDHyper(lr=hyper.lr, weight_decay=hyper.weight_decay)
    buffer = None
    steps = []
    for index, value in enumerate(grads, start=1):
        grad = torch.tensor([value], dtype=torch.float64)
        # The rule updates the buffer (and, for decoupled decay, the parameter) in place, so the gradient
        # after decay and the direction are read on copies before the real step.
        decayed, _ = sgd_direction(TENSOR, param.clone(), grad, None, decay_only)
        direction, _ = sgd_direction(TENSOR, param.clone(), grad, None if buffer is None else buffer.clone(), hyper)
        buffer = sgd_update(TENSOR, param, grad, buffer, hyper)
        steps.append(
            Step(
                index, value, decayed.item(), None if buffer is None else buffer.item(), direction.item(), param.item()
            )
        )
    return steps


def variants(args: argparse.Namespace) -> list[Variant]:
    """The configurations to show: the one given, or the four-variant overview."""
    common = {"lr": args.lr, "weight_decay": args.weight_decay}
    if not is_overview(args):
        hyper = SGDHyper(momentum=args.momentum, dampening=args.dampening or 0.0, nesterov=args.nesterov, **common)
        return [Variant(title_of(hyper), hyper)]
    return [
        Variant("plain SGD", SGDHyper(**common)),
        Variant("momentum", SGDHyper(momentum=args.momentum, **common)),
        Variant("momentum with dampening", SGDHyper(momentum=args.momentum, dampening=OVERVIEW_DAMPENING, **common)),
        Variant("Nesterov", SGDHyper(momentum=args.momentum, nesterov=True, **common)),
    ]


def is_overview(args: argparse.Namespace) -> bool:
    """Without --dampening or --nesterov (and with momentum), explain shows the four variants and the note."""
    return args.dampening is None and not args.nesterov and args.momentum != 0


def title_of(hyper: SGDHyper) -> str:
    if hyper.momentum == 0:
        return "plain SGD"
    if hyper.nesterov:
        return "Nesterov"
    return "momentum with dampening" if hyper.dampening else "momentum"


def formulas(hyper: SGDHyper) -> list[str]:
    """The rule's lines for this configuration, with its numbers in."""
    μ, τ, λ = hyper.momentum, hyper.dampening, hyper.weight_decay
    lines = [f"g_t = ∇_t + {λ:g}·θ_(t−1)   (weight decay)"] if λ else []
    g = "g_t" if λ else "∇_t"
    if μ == 0:
        return [*lines, f"d_t = {g}", f"θ_t = θ_(t−1) − {hyper.lr:g}·d_t"]
    first = g.replace("_t", "_1")
    new = g if τ == 0 else f"{1 - τ:g}·{g}"
    lines += [f"b_1 = {first}   (first step: no dampening)", f"b_t = {μ:g}·b_(t−1) + {new}   (t ≥ 2)"]
    lines.append(f"d_t = {g} + {μ:g}·b_t   (Nesterov)" if hyper.nesterov else "d_t = b_t")
    return [*lines, f"θ_t = θ_(t−1) − {hyper.lr:g}·d_t"]


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def step_table(variant: Variant, steps: list[Step], start: float) -> Table:
    hyper = variant.hyper
    settings = f"μ={hyper.momentum:g} τ={hyper.dampening:g} γ={hyper.lr:g} λ={hyper.weight_decay:g} θ₀={start:g}"
    table = Table(title=f"{variant.title}  ({settings})", caption="\n".join(formulas(hyper)), caption_justify="left")
    table.add_column("step", justify="right")
    table.add_column("gradient ∇", justify="right")
    if hyper.weight_decay:
        table.add_column("∇ + λ·θ", justify="right")
    table.add_column("momentum buffer b", justify="right")
    table.add_column("direction d", justify="right")
    table.add_column("parameter θ", justify="right")
    for s in steps:
        decayed = [number(s.decayed)] if hyper.weight_decay else []
        table.add_row(
            str(s.step), number(s.gradient), *decayed, number(s.buffer), number(s.direction), number(s.parameter)
        )
    return table


def unrolled(grads: Sequence[float], hyper: SGDHyper, last_buffer: float | None) -> str | None:
    """The last buffer as a weighted sum of all gradients, e.g. ``b_3 = 6 + 0.9·3 + 0.81·5 = 12.75``."""
    if last_buffer is None or hyper.weight_decay or len(grads) < 2:
        return None
    n, μ = len(grads), hyper.momentum
    # b_n = μ^(n−1)·g_1 + (1 − τ)·Σ_{k≥2} μ^(n−k)·g_k : the first gradient is never dampened.
    weights = [μ ** (n - 1)] + [(1 - hyper.dampening) * μ ** (n - k) for k in range(2, n + 1)]
    terms = [
        (f"{w:.6g}·" if w != 1 else "") + (f"{g:g}" if g >= 0 else f"({g:g})")
        for w, g in reversed(list(zip(weights, grads)))
    ]
    shown = terms if len(terms) <= 6 else [*terms[:5], "…"]
    return (
        f"b_{n} = {' + '.join(shown)} = {number(last_buffer)}: "
        f"every past gradient stays in the buffer, shrunk by μ = {μ:g} each step."
    )


def article_note() -> list[str]:
    """Where the article's "5 → 3 → 0.9·3 + 3 = 5.7" parts from PyTorch's formula, with the rule's numbers."""
    g1, g2, g3 = ARTICLE_GRADS
    μ = ARTICLE_MOMENTUM
    b1, b2, b3 = (s.buffer for s in trace(ARTICLE_GRADS, SGDHyper(momentum=μ)))
    article = μ * g2 + (g3 - g2)
    return [
        "Where the article's arithmetic differs from PyTorch's formula",
        f"The article starts from gradient {g1:g}, then changes of {g2 - g1:+g} and {g3 - g2:+g}, so the gradients "
        f'are {g1:g}, {g2:g}, {g3:g}, and it writes "5 → 3 → 0.9·3 + 3 = 5.7".',
        f"PyTorch (and torchsgd) keep a momentum buffer b that adds each new gradient to μ times the previous buffer: "
        f"b1 = g1 = {number(b1)};  b2 = {μ:g}·{number(b1)} + {g2:g} = {number(b2)};  "
        f"b3 = {μ:g}·{number(b2)} + {g3:g} = {number(b3)}.",
        f"The article's {article:g} = {μ:g}·{g2:g} + {g3 - g2:g} differs in two places:",
        f"  1. It multiplies {μ:g} by the step-2 gradient ({g2:g}) instead of the step-2 buffer ({number(b2)}). "
        f'At step 2 it wrote the bare gradient {g2:g} ("→ 3"), with no momentum at all, so the first gradient '
        f"{g1:g} has dropped out of the sum.",
        f"  2. It adds the change of the gradient ({g3 - g2:+g}) instead of the new gradient itself ({g3:g}). "
        "Momentum accumulates gradients, not differences between them.",
        f"So the article computed μ·g2 + (g3 − g2) = {article:g}; PyTorch computes b3 = μ·b2 + g3 = "
        f"{g3:g} + {μ:g}·{g2:g} + {μ * μ:g}·{g1:g} = {number(b3)}.",
        "With dampening τ, PyTorch scales the new gradient by (1 − τ) from step 2 on, never on step 1: "
        f"b1 = {g1:g}, not (1 − τ)·{g1:g}. With Nesterov the step uses g + μ·b instead of b.",
    ]


def run(args: argparse.Namespace) -> int:
    shown = variants(args)
    for variant in shown:  # the optimizer's own checks and messages ("Invalid momentum value: -1.0")
        h = variant.hyper
        torchsgd.SGD(
            [torch.zeros(1)],
            lr=h.lr,
            momentum=h.momentum,
            dampening=h.dampening,
            weight_decay=h.weight_decay,
            nesterov=h.nesterov,
        )
    term = console()
    for variant in shown:
        steps = trace(args.grads, variant.hyper, args.start)
        term.print(step_table(variant, steps, args.start))
        summary = unrolled(args.grads, variant.hyper, steps[-1].buffer)
        if summary:
            term.print(summary)
        term.print()
    if is_overview(args):
        print_note(term)
    return 0


def print_note(term: Console) -> None:
    title, *paragraphs = article_note()
    term.rule(title)
    for paragraph in paragraphs:
        # Numbered points keep their indent when the console wraps them.
        indent = len(paragraph) - len(paragraph.lstrip())
        term.print(Padding(paragraph.lstrip(), (0, 0, 0, indent)))
