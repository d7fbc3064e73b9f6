"""`torchsgd bench --write-docs`: each command rewrites its own marked section of the benchmarks file, and the
step bench the README's table, keeping every other line; a second run replaces rather than appends."""

from __future__ import annotations

import pytest

pytest.importorskip("rich")

from torchsgd.cli import bench, memory

README = """# a project

Text above the table.

<!-- bench:readme:start -->
an old table
<!-- bench:readme:end -->

Text below the table.
"""

# The smallest step bench that still prints every table: one tiny parameter set, 4M-element tensors, and no
# timing budget beyond three rounds (a few seconds on 2 cores).
TINY = ["--quick", "--sets", "tiny-mlp", "--budget", "0", "--min-rounds", "3"]


def between(text: str, section: str) -> str:
    start, end = bench.markers(section)
    assert text.count(start) == 1 and text.count(end) == 1, f"section {section} must appear exactly once"
    return text.split(start)[1].split(end)[0]


def outside(text: str, section: str) -> str:
    start, end = bench.markers(section)
    return text.split(start)[0] + text.split(end)[1]


def tables(markdown_text: str) -> list[list[list[str]]]:
    """Every Markdown table in the text, as rows of cells, each checked to be well formed."""
    found, current = [], []
    for line in [*markdown_text.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if current:
            header, rule, *rows = current
            assert all(set(cell) <= set("-:") and "-" in cell for cell in rule), rule
            assert rows and all(len(row) == len(header) == len(rule) for row in rows), current
            found.append([header, *rows])
            current = []
    return found


def number(cell: str) -> float:
    return float(cell.rstrip("M"))


def test_step_bench_writes_its_section_and_the_readme_table_then_replaces_them(tmp_path, capsys):
    docs, readme = tmp_path / "docs" / "benchmarks.md", tmp_path / "README.md"
    readme.write_text(README, encoding="utf-8")
    args = [*TINY, "--write-docs", str(docs), "--readme", str(readme)]
    assert bench.main(args) == 0

    text = docs.read_text(encoding="utf-8")
    assert text.splitlines()[0] == bench.DOCS_HEADER
    assert "not measured yet" in between(text, "memory")  # the other command's section, created empty
    step = between(text, "step")
    assert bench.machine_description() in step
    step_tables = tables(step)
    assert len(step_tables) == 5  # fp32 steps, in-step options, low precision, half precision, training step
    header, *rows = step_tables[0]
    assert header[:2] == ["workload", "config"] and {"torch fused", "torchsgd", "floor", "÷ fused"} <= set(header)
    assert [row[:2] for row in rows] == [["tiny-mlp", name] for name in bench.CONFIGS]
    for row in rows:
        figures = dict(zip(header, row))
        assert all(number(cell) >= 0 for cell in row[2:])
        assert number(figures["÷ fused"]) == pytest.approx(
            number(figures["torchsgd"]) / number(figures["torch fused"]), rel=0.02, abs=0.01
        )

    text_readme = readme.read_text(encoding="utf-8")
    assert outside(text_readme, "readme") == outside(README, "readme")
    (summary,) = tables(between(text_readme, "readme"))
    assert summary[0] == ["workload", "torch fused ms", "torchsgd ms", "ratio"]
    assert len(summary) == 1 + len(bench.CONFIGS)
    for _, fused_ms, ours_ms, ratio in summary[1:]:  # a ratio may round to 0.00 when a step was preempted
        assert number(fused_ms) > 0 and number(ours_ms) > 0
        assert number(ratio) == pytest.approx(number(ours_ms) / number(fused_ms), rel=0.02, abs=0.01)

    # A hand-written line outside the sections survives; a second, smaller run (the fp32 table only)
    # replaces the section whole and appends nothing.
    docs.write_text(text + "\na line below the sections\n", encoding="utf-8")
    assert bench.main([*args, "--no-options", "--no-precision", "--no-train"]) == 0
    again, again_readme = docs.read_text(encoding="utf-8"), readme.read_text(encoding="utf-8")
    assert again.count(bench.DOCS_HEADER) == 1 and again.endswith("\na line below the sections\n")
    assert outside(again, "step") == outside(text + "\na line below the sections\n", "step")
    assert len(tables(between(again, "step"))) == 1
    assert outside(again_readme, "readme") == outside(README, "readme")
    assert len(tables(between(again_readme, "readme"))) == 1


def fake_measure() -> list[tuple[memory.Setup, dict]]:
    peaks = [1721.0, 1393.0, 1104.0, 944.0, 641.0, 850.0, 560.0, 2000.0, 1400.0, 1000.0, 700.0]
    return [
        (setup, {"peak_mb": peak, "baseline_mb": 227.0, "import_mb": 73.0 if i == 0 else 0.0, "params": 100_700_160})
        for i, (setup, peak) in enumerate(zip(memory.SETUPS, peaks))
    ]


def test_memory_bench_replaces_only_its_section(tmp_path, monkeypatch, capsys):
    docs = tmp_path / "benchmarks.md"
    step_body = "## Step time\n\n| a | b |\n|---|---:|\n| x | 1 |"
    bench.write_docs_section(docs, "step", step_body)
    before = docs.read_text(encoding="utf-8")
    monkeypatch.setattr(memory, "measure", fake_measure)  # the real one trains a 100M model in five processes

    for _ in range(2):
        assert bench.main(["--memory", "--write-docs", str(docs)]) == 0
        text = docs.read_text(encoding="utf-8")
        assert between(text, "step") == between(before, "step")
        assert outside(text, "memory") == outside(before, "memory")
        default, foreach = tables(between(text, "memory"))
        for table, name in ((default, "default"), (foreach, "foreach")):
            header, *rows = table
            assert header[:3] == ["setup", "process peak", "÷ torch"]
            assert [row[0] for row in rows] == [s.name.strip() for s in memory.SETUPS if s.table == name]
        assert [row[2] for row in default[1:]] == ["1.00", "0.81", "0.64", "0.55", "0.37", "0.49", "0.33"]
        assert [row[2] for row in foreach[1:]] == ["1.00", "0.70", "0.50", "0.35"]  # against torch's foreach run


def test_a_file_without_the_section_gets_it_appended_once(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# written before sections existed\n", encoding="utf-8")
    for body in ("first", "second"):
        bench.write_docs_section(docs, "memory", body)
    text = docs.read_text(encoding="utf-8")
    assert text.startswith("# written before sections existed\n") and between(text, "memory").strip() == "second"


def test_a_readme_without_markers_is_left_alone(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n", encoding="utf-8")
    assert not bench.write_readme_section(readme, "a table")
    assert readme.read_text(encoding="utf-8") == "# no markers here\n"
