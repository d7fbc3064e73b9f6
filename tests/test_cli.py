"""The command line end to end: every command with small settings, its printed numbers, its PNGs, its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchsgd
from torchsgd.cli import explain, optimizers
from torchsgd.cli.main import main
from torchsgd.rules.sgd import SGDHyper

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPLAIN_TITLES = ("plain SGD", "momentum", "momentum with dampening", "Nesterov")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich wraps at $COLUMNS (80 when unset and not a terminal); fix it so the parsing below is stable.
    monkeypatch.setenv("COLUMNS", "120")
    # explain speaks the locale's language (zh under a Chinese one); these tests read its English.
    monkeypatch.setenv("LC_ALL", "C.UTF-8")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def step_tables(text: str, titles: tuple[str, ...] = EXPLAIN_TITLES) -> dict[str, list[list[float | None]]]:
    """The rows of every explain table, by title: [step, gradient, (decayed,) buffer, direction, parameter]."""
    tables: dict[str, list[list[float | None]]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        for title in titles:
            if stripped.startswith(f"{title}  ("):
                current = title
                tables[current] = []
        if current and stripped.startswith("│"):
            cells = [cell.strip() for cell in stripped.strip("│").split("│")]
            tables[current].append([None if cell == "—" else float(cell) for cell in cells])
    return tables


def column(rows: list[list[float | None]], index: int) -> list[float | None]:
    return [row[index] for row in rows]


def assert_real_png(path: Path, size: tuple[int, int]) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert rgb.std() > 10, "the image is (nearly) one colour"
    # The curves are drawn in colour; axes, text and contour lines are grey. Blank axes would pass the
    # check above but not this one.
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    assert (saturation > 80).mean() > 0.002, "no coloured curves in the image"


# ------------------------------------------------------------------------------------------------ explain


def test_explain_prints_the_real_recurrence_for_the_articles_example(capsys):
    code, out, err = run_cli(capsys, "explain")
    assert code == 0 and err == ""
    tables = step_tables(out)
    assert set(tables) == set(EXPLAIN_TITLES)
    columns = {"step": 0, "gradient": 1, "buffer": 2, "direction": 3, "parameter": 4}

    plain = tables["plain SGD"]
    assert column(plain, columns["gradient"]) == [5, 3, 6]
    assert column(plain, columns["buffer"]) == [None, None, None]
    assert column(plain, columns["direction"]) == [5, 3, 6]
    assert column(plain, columns["parameter"]) == pytest.approx([-0.5, -0.8, -1.4])

    momentum = tables["momentum"]
    # b1 = g1 = 5; b2 = 0.9·5 + 3 = 7.5; b3 = 0.9·7.5 + 6 = 12.75 (not the article's 5.7)
    assert column(momentum, columns["buffer"]) == [5, 7.5, 12.75]
    assert column(momentum, columns["direction"]) == [5, 7.5, 12.75]
    assert column(momentum, columns["parameter"]) == pytest.approx([-0.5, -1.25, -2.525])

    dampened = tables["momentum with dampening"]
    # τ = 0.5, not applied on the first step: 5; 0.9·5 + 0.5·3 = 6; 0.9·6 + 0.5·6 = 8.4
    assert column(dampened, columns["buffer"]) == pytest.approx([5, 6.0, 8.4])

    nesterov = tables["Nesterov"]
    assert column(nesterov, columns["buffer"]) == [5, 7.5, 12.75]
    # d = g + 0.9·b: 5 + 4.5 = 9.5; 3 + 6.75 = 9.75; 6 + 11.475 = 17.475
    assert column(nesterov, columns["direction"]) == pytest.approx([9.5, 9.75, 17.475])
    assert column(nesterov, columns["parameter"]) == pytest.approx([-0.95, -1.925, -3.6725])

    assert "b_3 = 6 + 0.9·3 + 0.81·5 = 12.75" in out
    note = out[out.index("Where the article's arithmetic differs") :]
    for fact in (
        "5 → 3 → 0.9·3 + 3 = 5.7",
        "b2 = 0.9·5 + 3 = 7.5",
        "b3 = 0.9·7.5 + 6 = 12.75",
        "μ·g2 + (g3 − g2) = 5.7",
    ):
        assert fact in " ".join(note.split()), fact


def test_explain_one_configuration_with_dampening_and_weight_decay(capsys):
    code, out, _ = run_cli(capsys, "explain", "--grads", "1,2,3", "--momentum", "0.5", "--dampening", "0.5")
    assert code == 0
    tables = step_tables(out)
    assert list(tables) == ["momentum with dampening"]
    # 1; 0.5·1 + 0.5·2 = 1.5; 0.5·1.5 + 0.5·3 = 2.25
    assert column(tables["momentum with dampening"], 2) == pytest.approx([1, 1.5, 2.25])
    assert "Where the article's arithmetic differs" not in out

    code, out, _ = run_cli(
        capsys, "explain", "--grads", "5,3", "--momentum", "0", "--weight-decay", "0.1", "--start", "1"
    )
    assert code == 0
    (rows,) = step_tables(out).values()
    # g1 = 5 + 0.1·1 = 5.1, θ1 = 1 − 0.1·5.1 = 0.49; g2 = 3 + 0.1·0.49 = 3.049, θ2 = 0.49 − 0.3049 = 0.1851
    assert column(rows, 2) == pytest.approx([5.1, 3.049])
    assert column(rows, 5) == pytest.approx([0.49, 0.1851])


@pytest.mark.parametrize(
    "hyper",
    [
        SGDHyper(lr=0.1),
        SGDHyper(lr=0.1, momentum=0.9),
        SGDHyper(lr=0.1, momentum=0.9, dampening=0.5),
        SGDHyper(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    ],
)
def test_explain_trace_is_torch_optim_sgd(hyper):
    grads = [5.0, 3.0, 6.0, -2.0, 0.5]
    steps = explain.trace(grads, hyper, start=0.3)
    param = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    reference = torch.optim.SGD(
        [param],
        lr=hyper.lr,
        momentum=hyper.momentum,
        dampening=hyper.dampening,
        weight_decay=hyper.weight_decay,
        nesterov=hyper.nesterov,
        foreach=False,
    )
    for step, grad in zip(steps, grads):
        param.grad = torch.tensor([grad], dtype=torch.float64)
        reference.step()
        assert step.parameter == param.item()
        if hyper.momentum:
            assert step.buffer == reference.state[param]["momentum_buffer"].item()


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "--grads", "5,x"], "argument --grads: not a number: 'x'"),
        (["explain", "--grads", "5,,3"], "argument --grads"),
        (["explain", "--grads", "5,inf"], "not a finite number"),
        (["explain", "--momentum", "-1"], "torchsgd explain: error: Invalid momentum value: -1.0"),
        (["explain", "--dampening", "0.5", "--nesterov"], "Nesterov momentum requires a momentum and zero dampening"),
        (["explain", "--lr", "nan"], "Invalid learning rate: nan"),
        (["demo", "--optimizers", "torch,adam"], "unknown optimizer 'adam'"),
        (["demo", "--epochs", "0"], "argument --epochs: must be at least 1"),
        (["demo", "--lr", "-0.1"], "Invalid learning rate: -0.1"),
        (["trajectories", "--steps", "many"], "argument --steps: not an integer"),
        (["trajectories", "--momentum", "-0.5"], "Invalid momentum value: -0.5"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_is_a_message_and_a_nonzero_exit(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code != 0
    assert message in err
    assert "Traceback" not in err + out


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "trajectories", "--steps", "2", "--out", str(blocker))
    assert code != 0
    assert err.strip() == f"torchsgd trajectories: error: --out {blocker}: exists and is not a folder"


def test_missing_bench_module_is_a_clear_message(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsgd.cli.bench", None)  # import fails as if the file were absent
    code, _, err = run_cli(capsys, "bench", "--any", "options")
    assert code == 2
    assert err.strip() == "torchsgd bench: this command is not available in this version of torchsgd"
    code, out, _ = run_cli(capsys, "explain", "--grads", "1")  # the other commands still work
    assert code == 0 and "plain SGD" in out


def test_python_dash_m_and_errors_in_a_real_process():
    help_run = subprocess.run([sys.executable, "-m", "torchsgd", "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0
    for command in ("demo", "explain", "trajectories", "bench"):
        assert command in help_run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "torchsgd", "explain", "--momentum", "-1"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0
    assert bad.stderr.strip() == "torchsgd explain: error: Invalid momentum value: -1.0"


# ---------------------------------------------------------------------------------------- trajectories


def test_trajectories_writes_a_two_panel_png(capsys, tmp_path):
    out = tmp_path / "new" / "folder"  # --out is created when missing
    code, text, err = run_cli(capsys, "trajectories", "--steps", "60", "--out", str(out))
    assert code == 0 and err == ""
    for label in ("SGD", "momentum 0.9", "Nesterov 0.9", "Rosenbrock", "ill-conditioned quadratic"):
        assert label in text
    assert_real_png(out / "trajectories.png", (1200, 500))


def test_trajectories_marks_a_diverging_path(capsys, tmp_path):
    code, text, _ = run_cli(capsys, "trajectories", "--lr", "0.01", "--steps", "20", "--out", str(tmp_path))
    assert code == 0  # lr·curvature 4 on the quadratic's steep side: the paths leave, and the table says so
    assert "diverged" in text


def test_trajectories_draws_schedule_free_exactly_when_the_library_has_it(capsys, tmp_path, monkeypatch):
    schedulefree = pytest.importorskip("schedulefree")
    # The reference implementation stands in for torchsgd.ScheduleFreeSGD: same arguments, train()/eval().
    monkeypatch.setattr(torchsgd, "ScheduleFreeSGD", schedulefree.SGDScheduleFree, raising=False)
    code, text, _ = run_cli(capsys, "trajectories", "--steps", "30", "--out", str(tmp_path))
    assert code == 0
    assert "schedule-free, lr 0.005" in text

    monkeypatch.delattr(torchsgd, "ScheduleFreeSGD")
    code, text, _ = run_cli(capsys, "trajectories", "--steps", "30", "--out", str(tmp_path))
    assert code == 0
    assert "schedule-free" not in text


# ------------------------------------------------------------------------------------------------ demo


def demo_accuracies(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 6 and cells[0] in optimizers.REGISTRY:
            rows[cells[0]] = cells[1]
    return rows


def test_demo_small_run_prints_the_table_and_identical_yes(capsys, tmp_path):
    argv = ["demo", "--epochs", "1", "--train-samples", "160", "--out", str(tmp_path)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    for header in ("optimizer", "test acc", "train loss", "step ms", "peak RSS"):
        assert header in out
    first = demo_accuracies(out)
    assert list(first) == list(optimizers.DEFAULT_OPTIMIZERS)
    assert {"torch", "torchsgd", "torchsgd-momentum", "torchsgd-plain"} <= set(first)
    assert first["torch"] == first["torchsgd"]
    assert "identical: yes" in out
    assert_real_png(tmp_path / "loss_accuracy.png", (1200, 400))

    code, again, _ = run_cli(capsys, *argv)  # the same seed prints the same accuracies
    assert code == 0 and demo_accuracies(again) == first


def test_demo_without_torch_does_not_claim_identity(capsys, tmp_path):
    code, out, _ = run_cli(
        capsys,
        "demo",
        "--epochs",
        "1",
        "--train-samples",
        "64",
        "--optimizers",
        "torchsgd-plain",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    assert list(demo_accuracies(out)) == ["torchsgd-plain"]
    assert "identical: not checked" in out


def test_every_registry_entry_builds_an_optimizer():
    param = torch.zeros(3, requires_grad=True)
    for entry in optimizers.REGISTRY.values():
        optimizer = entry.build([param], 0.1)
        assert isinstance(optimizer, torch.optim.Optimizer)
        assert entry.same_as is None or entry.same_as in optimizers.REGISTRY
    assert set(optimizers.DEFAULT_OPTIMIZERS) <= set(optimizers.REGISTRY)
