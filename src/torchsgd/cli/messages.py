"""The words of ``torchsgd explain`` in each language it speaks, kept in one place.

Each message is a ``str.format`` template. The numbers are formatted once, by explain.py, and passed in as
strings, so every language prints the same numbers; a translation only chooses the words around them (and
keeps the numbers in the same order, which tests/test_explain_i18n.py checks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGE = "en"
# Where gettext looks for the language of messages, most specific first (LANGUAGE, a GNU list, is left out).
LOCALE_VARIABLES = ("LC_ALL", "LC_MESSAGES", "LANG")

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        # the four configurations
        "variant.plain": "plain SGD",
        "variant.momentum": "momentum",
        "variant.dampened": "momentum with dampening",
        "variant.nesterov": "Nesterov",
        # a step table
        "table.title": "{title}  ({settings})",
        "column.step": "step",
        "column.gradient": "gradient ∇",
        "column.decayed": "∇ + λ·θ",
        "column.buffer": "momentum buffer b",
        "column.direction": "direction d",
        "column.parameter": "parameter θ",
        # the formulas under it
        "formula.note": "{formula}   ({note})",
        "formula.weight_decay": "weight decay",
        "formula.first_step": "first step: no dampening",
        "formula.later_steps": "t ≥ 2",
        "formula.nesterov": "Nesterov",
        "unrolled": "{equation}: every past gradient stays in the buffer, shrunk by μ = {mu} each step.",
        # the note on the article
        "note.title": "Where the article's arithmetic differs from PyTorch's formula",
        "note.start": "The article starts from gradient {g1}, then changes of {d2} and {d3}, so the gradients "
        'are {g1}, {g2}, {g3}, and it writes "5 → 3 → 0.9·3 + 3 = 5.7".',
        "note.buffer": "PyTorch (and torchsgd) keep a momentum buffer b that adds each new gradient to μ times the "
        "previous buffer: b1 = g1 = {b1};  b2 = {mu}·{b1} + {g2} = {b2};  b3 = {mu}·{b2} + {g3} = {b3}.",
        "note.differs": "The article's {article} = {mu}·{g2} + {change} differs in two places:",
        "note.point1": "  1. It multiplies {mu} by the step-2 gradient ({g2}) instead of the step-2 buffer ({b2}). "
        'At step 2 it wrote the bare gradient {g2} ("→ 3"), with no momentum at all, so the first gradient '
        "{g1} has dropped out of the sum.",
        "note.point2": "  2. It adds the change of the gradient ({d3}) instead of the new gradient itself ({g3}). "
        "Momentum accumulates gradients, not differences between them.",
        "note.so": "So the article computed μ·g2 + (g3 − g2) = {article}; PyTorch computes b3 = μ·b2 + g3 = "
        "{g3} + {mu}·{g2} + {mu2}·{g1} = {b3}.",
        "note.dampening": "With dampening τ, PyTorch scales the new gradient by (1 − τ) from step 2 on, never on "
        "step 1: b1 = {g1}, not (1 − τ)·{g1}. With Nesterov the step uses g + μ·b instead of b.",
    },
    "zh": {
        "variant.plain": "普通 SGD",
        "variant.momentum": "动量",
        "variant.dampened": "带阻尼的动量",
        "variant.nesterov": "Nesterov 动量",
        "table.title": "{title}  ({settings})",
        "column.step": "步",
        "column.gradient": "梯度 ∇",
        "column.decayed": "∇ + λ·θ",
        "column.buffer": "动量缓冲区 b",
        "column.direction": "更新方向 d",
        "column.parameter": "参数 θ",
        "formula.note": "{formula}   （{note}）",
        "formula.weight_decay": "权重衰减",
        "formula.first_step": "第一步：不加阻尼",
        "formula.later_steps": "t ≥ 2",
        "formula.nesterov": "Nesterov 动量",
        "unrolled": "{equation}：过去的每个梯度都还留在动量缓冲区里，每过一步就被乘以一次 μ = {mu} 而缩小。",
        "note.title": "原文的计算与 PyTorch 公式的差别",
        "note.start": "原文从梯度 {g1} 出发，随后梯度变化 {d2} 和 {d3}，所以三步的梯度依次是 {g1}、{g2}、{g3}；"
        "原文写作“5 → 3 → 0.9·3 + 3 = 5.7”。",
        "note.buffer": "PyTorch（以及 torchsgd）维护一个动量缓冲区 b，每一步先用 μ 乘以上一步的缓冲区，再加上新的梯度："
        "b1 = g1 = {b1}；  b2 = {mu}·{b1} + {g2} = {b2}；  b3 = {mu}·{b2} + {g3} = {b3}。",
        "note.differs": "原文的 {article} = {mu}·{g2} + {change} 有两处与之不同：",
        "note.point1": "  1. 它用 {mu} 去乘第 2 步的梯度（{g2}），而不是第 2 步的缓冲区（{b2}）。"
        "第 2 步它只写下了梯度本身 {g2}（“→ 3”），根本没有动量，于是第一个梯度 {g1} 就从和式中消失了。",
        "note.point2": "  2. 它加上的是梯度的变化量（{d3}），而不是新梯度本身（{g3}）。"
        "动量累加的是梯度，而不是梯度之间的差。",
        "note.so": "所以原文算的是 μ·g2 + (g3 − g2) = {article}；PyTorch 算的是 b3 = μ·b2 + g3 = "
        "{g3} + {mu}·{g2} + {mu2}·{g1} = {b3}。",
        "note.dampening": "有阻尼 τ 时，PyTorch 把新梯度乘以 (1 − τ)，但只从第 2 步开始，第 1 步从不缩放："
        "b1 = {g1}，而不是 (1 − τ)·{g1}。使用 Nesterov 动量时，更新用的是 g + μ·b 而不是 b。",
    },
}


def message(lang: str, key: str, **values: str) -> str:
    """The message ``key`` in ``lang`` with ``values`` filled in."""
    return MESSAGES[lang][key].format(**values)


def locale_language(environ: Mapping[str, str] | None = None) -> str:
    """The language the locale asks for: the first of LC_ALL, LC_MESSAGES, LANG that is set and not empty
    decides, as in gettext; ``zh`` when it starts with ``zh`` (zh_CN.UTF-8, zh_TW, zh), else English."""
    environ = os.environ if environ is None else environ
    for name in LOCALE_VARIABLES:
        value = environ.get(name)
        if value:
            return "zh" if value.lower().startswith("zh") else DEFAULT_LANGUAGE
    return DEFAULT_LANGUAGE
