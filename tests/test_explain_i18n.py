"""``torchsgd explain`` in Chinese: the same tables and numbers as in English, chosen by --lang or the locale;
and the two tutorials it links to, which must carry the same snippets."""

from __future__ import annotations

import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from test_cli import column, run_cli
from torchsgd.cli.messages import LOCALE_VARIABLES, MESSAGES, locale_language

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = (ROOT / "docs" / "tutorial.md", ROOT / "docs" / "tutorial.zh-CN.md")
ZH_TITLES = ("普通 SGD", "动量", "带阻尼的动量", "Nesterov 动量")
EN_TITLES = ("plain SGD", "momentum", "momentum with dampening", "Nesterov")
ZH_NOTE_TITLE = "原文的计算与 PyTorch 公式的差别"
EN_NOTE_TITLE = "Where the article's arithmetic differs"
HAN = re.compile(r"[\u4e00-\u9fff]")
# A number, with its sign only where the sign stands apart (" -0.5", "(+3)", "变化 -2"), not "step-2" or "θ_(t−1)".
NUMBER = re.compile(r"(?:(?<![^\s(（│=，、：“\"])[-+])?\d+(?:\.\d+)?")


@pytest.fixture(autouse=True)
def wide_english_console(monkeypatch):
    # Wide enough that rich never wraps a line (so the tables parse), and an English locale unless a test
    # says otherwise.
    monkeypatch.setenv("COLUMNS", "200")
    set_locale(monkeypatch)


def set_locale(monkeypatch, **variables: str) -> None:
    for name in LOCALE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def tables_by_title(text: str, titles: tuple[str, ...]) -> dict[str, list[list[float | None]]]:
    """The rows of every step table, by title, in any language (test_cli's parser with these titles)."""
    from test_cli import step_tables

    return step_tables(text, titles)


def explain_output(capsys, *argv: str) -> str:
    code, out, err = run_cli(capsys, "explain", *argv)
    assert code == 0 and err == ""
    return out


def is_chinese(out: str) -> bool:
    return ZH_NOTE_TITLE in out or "动量缓冲区 b" in out


def is_english(out: str) -> bool:
    return "momentum buffer b" in out and not HAN.search(out)


# --------------------------------------------------------------------------------------------- the output


def test_chinese_output_has_the_tables_the_formulas_and_the_note(capsys):
    out = explain_output(capsys, "--lang", "zh")
    tables = tables_by_title(out, ZH_TITLES)
    assert set(tables) == set(ZH_TITLES)
    for header in ("步", "梯度 ∇", "动量缓冲区 b", "更新方向 d", "参数 θ"):
        assert header in out, header
    # The same rule's numbers under the Chinese headings.
    assert column(tables["动量"], 2) == [5, 7.5, 12.75]
    assert column(tables["带阻尼的动量"], 2) == pytest.approx([5, 6, 8.4])
    assert column(tables["Nesterov 动量"], 3) == pytest.approx([9.5, 9.75, 17.475])
    assert column(tables["普通 SGD"], 4) == pytest.approx([-0.5, -0.8, -1.4])
    for formula in (
        "b_1 = ∇_1   （第一步：不加阻尼）",
        "b_t = 0.9·b_(t−1) + 0.5·∇_t   （t ≥ 2）",
        "d_t = ∇_t + 0.9·b_t   （Nesterov 动量）",
        "b_3 = 6 + 0.9·3 + 0.81·5 = 12.75：过去的每个梯度都还留在动量缓冲区里，每过一步就被乘以一次 μ = 0.9 而缩小。",
    ):
        assert formula in out, formula

    note = " ".join(out[out.index(ZH_NOTE_TITLE) :].split())
    for fact in (
        "原文写作“5 → 3 → 0.9·3 + 3 = 5.7”",
        "b2 = 0.9·5 + 3 = 7.5",
        "b3 = 0.9·7.5 + 6 = 12.75",
        "它用 0.9 去乘第 2 步的梯度（3），而不是第 2 步的缓冲区（7.5）",
        "它加上的是梯度的变化量（+3），而不是新梯度本身（6）",
        "所以原文算的是 μ·g2 + (g3 − g2) = 5.7；PyTorch 算的是 b3 = μ·b2 + g3 = 6 + 0.9·3 + 0.81·5 = 12.75",
        "b1 = 5，而不是 (1 − τ)·5",
    ):
        assert fact in note, fact
    # Nothing left in English but the names and the formulas.
    for english in ("momentum buffer", "every past gradient", EN_NOTE_TITLE, "step", "differs", "gradient"):
        assert english not in out, english


def test_weight_decay_formula_and_column_in_chinese(capsys):
    out = explain_output(
        capsys, "--lang", "zh", "--grads", "5,3", "--momentum", "0", "--weight-decay", "0.1", "--start", "1"
    )
    (rows,) = tables_by_title(out, ZH_TITLES).values()
    assert column(rows, 2) == pytest.approx([5.1, 3.049])
    assert "g_t = ∇_t + 0.1·θ_(t−1)   （权重衰减）" in out
    assert ZH_NOTE_TITLE not in out  # one configuration: no note, as in English


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--grads", "1,2,3", "--momentum", "0.5", "--dampening", "0.5"],
        ["--grads", "5,3", "--momentum", "0", "--weight-decay", "0.1", "--start", "1"],
        ["--nesterov", "--weight-decay", "0.01", "--lr", "0.05"],
        ["--grads=-1,2.5,-3,4,5,6,7,8", "--momentum", "0.8"],
    ],
)
@pytest.mark.parametrize("columns", ["200", "80"])
def test_chinese_and_english_print_the_same_numbers_in_the_same_order(capsys, monkeypatch, argv, columns):
    monkeypatch.setenv("COLUMNS", columns)  # at 80 rich wraps the note: the numbers must survive it
    english = explain_output(capsys, "--lang", "en", *argv)
    chinese = explain_output(capsys, "--lang", "zh", *argv)
    assert is_english(english) and is_chinese(chinese)
    assert numbers(chinese) == numbers(english)
    assert len(numbers(english)) > 15  # the tables and formulas, not a handful


def test_the_number_comparison_can_fail():
    # The extraction keeps signs and order, so a translation that drops or reorders a number is caught.
    assert numbers("b2 = 0.9·5 + 3 = 7.5 (−2) -0.5 │ -1.25 │") == ["2", "0.9", "5", "3", "7.5", "2", "-0.5", "-1.25"]
    assert numbers("the step-2 buffer (+3)") == ["2", "+3"]
    assert numbers("第 2 步，变化 -2 和 +3") == ["2", "-2", "+3"]
    assert numbers("第 2 步的缓冲区（7.5）") != numbers("the buffer (7.5) of step 2")


# ----------------------------------------------------------------------------------- choosing the language


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, "en"),
        ({"LANG": "zh_CN.UTF-8"}, "zh"),
        ({"LANG": "zh"}, "zh"),
        ({"LANG": "en_US.UTF-8"}, "en"),
        ({"LC_MESSAGES": "zh_TW.UTF-8", "LANG": "en_US.UTF-8"}, "zh"),
        ({"LC_ALL": "zh_CN.UTF-8", "LC_MESSAGES": "en_US.UTF-8", "LANG": "en_US.UTF-8"}, "zh"),
        # LC_ALL decides before LANG, even when it says English or C.
        ({"LC_ALL": "C.UTF-8", "LANG": "zh_CN.UTF-8"}, "en"),
        ({"LC_ALL": "en_GB.UTF-8", "LC_MESSAGES": "zh_CN.UTF-8"}, "en"),
        # An empty variable counts as unset, as in gettext.
        ({"LC_ALL": "", "LC_MESSAGES": "", "LANG": "zh_CN.UTF-8"}, "zh"),
    ],
)
def test_the_locale_chooses_the_language(capsys, monkeypatch, variables, expected):
    set_locale(monkeypatch, **variables)
    assert locale_language() == expected
    out = explain_output(capsys)
    assert (is_chinese(out), is_english(out)) == (expected == "zh", expected == "en")


def test_locale_language_reads_the_mapping_it_is_given():
    assert locale_language({"LANG": "zh_CN.GB2312"}) == "zh"
    assert locale_language({"LC_MESSAGES": "fr_FR", "LANG": "zh_CN"}) == "en"  # fr is not spoken: English
    assert locale_language({}) == "en"


def test_lang_overrides_the_locale(capsys, monkeypatch):
    set_locale(monkeypatch, LC_ALL="zh_CN.UTF-8", LANG="zh_CN.UTF-8")
    out = explain_output(capsys, "--lang", "en")
    assert is_english(out) and EN_NOTE_TITLE in out
    assert set(tables_by_title(out, EN_TITLES)) == set(EN_TITLES)

    set_locale(monkeypatch, LC_ALL="en_US.UTF-8")
    out = explain_output(capsys, "--lang", "zh")
    assert is_chinese(out) and ZH_NOTE_TITLE in out


@pytest.mark.parametrize("value", ["fr", "ZH", "zh_CN", ""])
def test_a_bad_lang_is_a_usage_error(capsys, value):
    code, out, err = run_cli(capsys, "explain", "--lang", value)
    assert code == 2 and out == ""
    assert err.startswith("usage: torchsgd explain")
    assert f"torchsgd explain: error: argument --lang: invalid choice: '{value}' (choose from" in err
    assert "Traceback" not in err


def test_a_bad_lang_in_a_real_process_exits_2():
    bad = subprocess.run(
        [sys.executable, "-m", "torchsgd", "explain", "--lang", "de"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    assert "argument --lang: invalid choice: 'de'" in bad.stderr and "Traceback" not in bad.stderr


def test_help_names_the_lang_option_and_links_both_tutorials(capsys):
    code, out, _ = run_cli(capsys, "explain", "--help")
    assert code == 0
    assert "--lang {en,zh}" in out
    for tutorial in TUTORIALS:
        name = tutorial.relative_to(ROOT).as_posix()
        assert name in out, name  # whole, not broken at the hyphen of zh-CN
        assert tutorial.is_file(), f"--help links {name}, which does not exist"


# ------------------------------------------------------------------------------------ the message templates


def placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def test_every_language_has_every_message_with_the_same_placeholders():
    english = MESSAGES["en"]
    for lang, messages in MESSAGES.items():
        assert messages.keys() == english.keys(), lang
        for key, template in messages.items():
            assert placeholders(template) == placeholders(english[key]), (lang, key)


def test_chinese_messages_are_translated():
    # Only the language-neutral ones (a formula, a layout) may be the same in both.
    same = {key for key, text in MESSAGES["zh"].items() if text == MESSAGES["en"][key]}
    assert same == {"table.title", "column.decayed", "formula.later_steps"}
    layouts = {"formula.note"}  # only the brackets change: （…）
    for key, text in MESSAGES["zh"].items():
        assert key in same | layouts or HAN.search(text), key


# ------------------------------------------------------------------------------------------- the tutorials


def fenced_blocks(path: Path, info: str) -> list[str]:
    """The bodies of the fenced blocks whose info string is exactly ``info``."""
    blocks, body, inside = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if inside is None and line.startswith("```"):
            inside, body = line[3:].strip(), []
        elif inside is not None and line.rstrip() == "```":
            if inside == info:
                blocks.append("\n".join(body))
            inside = None
        elif inside is not None:
            body.append(line)
    return blocks


def prose_of(markdown: str) -> str:
    """The Markdown outside fenced blocks."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return "\n".join(lines)


def headings_of(markdown: str) -> list[str]:
    """The Markdown headings, outside fenced blocks (where "# ..." is a comment)."""
    return [line for line in prose_of(markdown).splitlines() if line.startswith("#")]


def test_the_chinese_tutorial_has_the_same_snippets_and_outputs():
    english, chinese = TUTORIALS
    snippets = fenced_blocks(english, "python")
    assert len(snippets) >= 8  # why stochastic gradients, then each argument
    assert fenced_blocks(chinese, "python") == snippets
    assert fenced_blocks(chinese, "text") == fenced_blocks(english, "text")
    assert any("assert buffers == [5.0, 7.5, 12.75]" in snippet for snippet in snippets)


def test_the_chinese_tutorial_is_a_translation():
    english = TUTORIALS[0].read_text(encoding="utf-8")
    chinese = TUTORIALS[1].read_text(encoding="utf-8")
    for term in ("随机梯度", "学习率", "动量", "阻尼", "权重衰减", "Nesterov 动量", "动量缓冲区"):
        assert term in chinese, term
    # The same sections in the same order, and the same numbers stated in the prose.
    headings, zh_headings = headings_of(english), headings_of(chinese)
    assert len(headings) >= 8
    assert [h.split()[0] for h in zh_headings] == [h.split()[0] for h in headings]  # "##", "###", ...
    assert all(HAN.search(h) for h in zh_headings[1:]), zh_headings
    # Every number the English prose states, the Chinese states too (in its own order), and no other.
    assert Counter(re.findall(r"\d+(?:\.\d+)?", prose_of(chinese))) == Counter(
        re.findall(r"\d+(?:\.\d+)?", prose_of(english))
    )
    english_prose, chinese_prose = (" ".join(prose_of(text).split()) for text in (english, chinese))
    for fact in ("5, 7.5, 12.75", "−0.95, −1.925, −3.6725", "0.99, 0.9801, 0.970299", "5 → 3 → 0.9·3 + 3 = 5.7"):
        assert fact in english_prose, fact
        assert fact.replace(", ", "、") in chinese_prose, fact
