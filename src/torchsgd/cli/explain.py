"""``torchsgd explain``: the article's momentum example, computed step by step with torchsgd's own rule.

The numbers come from :func:`torchsgd.rules.sgd.sgd_update` (the rule every engine runs), in float64 so
that the printed values are the exact arithmetic, not float32 rounding. The words are in English or Chinese
(``--lang``, or the locale); their templates live in :mod:`torchsgd.cli.messages`.
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
from torchsgd.cli.messages import LANGUAGES, LOCALE_VARIABLES, locale_language, message
from torchsgd.rules.sgd import TENSOR, SGDHyper, sgd_direction, sgd_update

ARTICLE_GRADS = (5.0, 3.0, 6.0)
ARTICLE_MOMENTUM = 0.9
OVERVIEW_DAMPENING = 0.5  # the dampening shown in the four-variant overview
TUTORIALS = ("docs/tutorial.md", "docs/tutorial.zh-CN.md")

EPILOG = f"""\
A walkthrough of SGD and of each argument (lr, momentum, dampening, weight_decay,
nesterov) on this example and on the digits data, every snippet runnable:
  {TUTORIALS[0]:<24}English
  {TUTORIALS[1]:<24}简体中文 (the same walkthrough in Chinese)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Raw epilog: argparse would otherwise reflow it and may break docs/tutorial.zh-CN.md at its hyphen.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
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
    parser.add_argument(
        "--lang",
        choices=LANGUAGES,
        default=None,
        help="language of the output: en (English) or zh (简体中文). Default: from the locale, "
        f"the first of {', '.join(LOCALE_VARIABLES)} that is set; zh when it starts with zh, else en",
    )


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
    """A configuration to show; ``kind`` names its title in :mod:`torchsgd.cli.messages` (``variant.<kind>``)."""

    kind: str
    hyper: SGDHyper

    def title(self, lang: str = "en") -> str:
        return message(lang, f"variant.{self.kind}")


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
        return [Variant(kind_of(hyper), hyper)]
    return [
        Variant("plain", SGDHyper(**common)),
        Variant("momentum", SGDHyper(momentum=args.momentum, **common)),
        Variant("dampened", SGDHyper(momentum=args.momentum, dampening=OVERVIEW_DAMPENING, **common)),
        Variant("nesterov", SGDHyper(momentum=args.momentum, nesterov=True, **common)),
    ]


def is_overview(args: argparse.Namespace) -> bool:
    """Without --dampening or --nesterov (and with momentum), explain shows the four variants and the note."""
    return args.dampening is None and not args.nesterov and args.momentum != 0


def kind_of(hyper: SGDHyper) -> str:
    if hyper.momentum == 0:
        return "plain"
    if hyper.nesterov:
        return "nesterov"
    return "dampened" if hyper.dampening else "momentum"


def formulas(hyper: SGDHyper, lang: str = "en") -> list[str]:
    """The rule's lines for this configuration, with its numbers in."""
    μ, τ, λ = hyper.momentum, hyper.dampening, hyper.weight_decay

    def noted(formula: str, note: str) -> str:
        return message(lang, "formula.note", formula=formula, note=message(lang, f"formula.{note}"))

    lines = [noted(f"g_t = ∇_t + {λ:g}·θ_(t−1)", "weight_decay")] if λ else []
    g = "g_t" if λ else "∇_t"
    if μ == 0:
        return [*lines, f"d_t = {g}", f"θ_t = θ_(t−1) − {hyper.lr:g}·d_t"]
    first = g.replace("_t", "_1")
    new = g if τ == 0 else f"{1 - τ:g}·{g}"
    lines += [noted(f"b_1 = {first}", "first_step"), noted(f"b_t = {μ:g}·b_(t−1) + {new}", "later_steps")]
    lines.append(noted(f"d_t = {g} + {μ:g}·b_t", "nesterov") if hyper.nesterov else "d_t = b_t")
    return [*lines, f"θ_t = θ_(t−1) − {hyper.lr:g}·d_t"]


def number(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def step_table(variant: Variant, steps: list[Step], start: float, lang: str = "en") -> Table:
    hyper = variant.hyper
    settings = f"μ={hyper.momentum:g} τ={hyper.dampening:g} γ={hyper.lr:g} λ={hyper.weight_decay:g} θ₀={start:g}"
    table = Table(
        title=message(lang, "table.title", title=variant.title(lang), settings=settings),
        caption="\n".join(formulas(hyper, lang)),
        caption_justify="left",
    )
    columns = ["step", "gradient", *(["decayed"] if hyper.weight_decay else []), "buffer", "direction", "parameter"]
    for name in columns:
        table.add_column(message(lang, f"column.{name}"), justify="right")
    for s in steps:
        decayed = [number(s.decayed)] if hyper.weight_decay else []
        table.add_row(
            str(s.step), number(s.gradient), *decayed, number(s.buffer), number(s.direction), number(s.parameter)
        )
    return table


def unrolled(grads: Sequence[float], hyper: SGDHyper, last_buffer: float | None, lang: str = "en") -> str | None:
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
    equation = f"b_{n} = {' + '.join(shown)} = {number(last_buffer)}"
    return message(lang, "unrolled", equation=equation, mu=f"{μ:g}")


NOTE_PARAGRAPHS = ("start", "buffer", "differs", "point1", "point2", "so", "dampening")


def article_note(lang: str = "en") -> list[str]:
    """Where the article's "5 → 3 → 0.9·3 + 3 = 5.7" parts from PyTorch's formula, with the rule's numbers:
    the title, then the paragraphs."""
    g1, g2, g3 = ARTICLE_GRADS
    μ = ARTICLE_MOMENTUM
    b1, b2, b3 = (s.buffer for s in trace(ARTICLE_GRADS, SGDHyper(momentum=μ)))
    article = μ * g2 + (g3 - g2)
    # Every number is formatted here, once, for every language.
    values = {
        "g1": f"{g1:g}",
        "g2": f"{g2:g}",
        "g3": f"{g3:g}",
        "d2": f"{g2 - g1:+g}",
        "d3": f"{g3 - g2:+g}",
        "change": f"{g3 - g2:g}",
        "mu": f"{μ:g}",
        "mu2": f"{μ * μ:g}",
        "b1": number(b1),
        "b2": number(b2),
        "b3": number(b3),
        "article": f"{article:g}",
    }
    return [message(lang, "note.title")] + [message(lang, f"note.{key}", **values) for key in NOTE_PARAGRAPHS]


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
    lang = args.lang or locale_language()
    term = console()
    for variant in shown:
        steps = trace(args.grads, variant.hyper, args.start)
        term.print(step_table(variant, steps, args.start, lang))
        summary = unrolled(args.grads, variant.hyper, steps[-1].buffer, lang)
        if summary:
            term.print(summary)
        term.print()
    if is_overview(args):
        print_note(term, lang)
    return 0


def print_note(term: Console, lang: str = "en") -> None:
    title, *paragraphs = article_note(lang)
    term.rule(title)
    for paragraph in paragraphs:
        # Numbered points keep their indent when the console wraps them.
        indent = len(paragraph) - len(paragraph.lstrip())
        term.print(Padding(paragraph.lstrip(), (0, 0, 0, indent)))
