"""`torchsgd bench --device`: the GPU step bench (cli/bench_device.py). Without a GPU it refuses --device cuda
clearly, and --device cpu runs the very same code as a smoke run, so the module cannot rot unseen."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("rich")

from torchsgd.cli import bench, bench_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_device_is_refused_with_a_clear_message(capsys) -> None:
    assert bench.main(["--device", "cuda"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "no CUDA device here" in out and "torchsgd[cuda]" in out


def test_an_unknown_device_is_refused(capsys) -> None:
    assert bench.main(["--device", "meta"]) == 2
    assert "cuda or cpu" in capsys.readouterr().out


def test_the_device_bench_runs_on_the_cpu(capsys) -> None:
    assert bench.main(["--device", "cpu", "--quick", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    for name in bench_device.QUICK_WORKLOADS:
        assert name in out
    assert "n/a (CPU)" in out and "copy floor" in out


def test_the_copy_floor_is_a_bandwidth() -> None:
    bandwidth = bench_device.copy_bandwidth(torch.device("cpu"), 1 << 20, rounds=3)
    assert 1e8 < bandwidth < 1e13  # bytes per second: between 0.1 GB/s and 10 TB/s


def test_the_peers_bench_times_every_installed_peer_and_names_the_missing(monkeypatch, capsys) -> None:
    from torchsgd.cli import bench_peers

    real = bench_peers._peer
    # heavyball compiles its step at first use (a minute here): the test leaves it out, as if not installed
    monkeypatch.setattr(
        bench_peers, "_peer", lambda module, name: None if module == "heavyball" else real(module, name)
    )
    assert bench.main(["--peers", "--quick", "--rounds", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in ("torchsgd.SGD", "torchsgd.SGDW", "torchsgd.LARS", "torchsgd.ScheduleFreeSGD", "torch fused SGD"):
        assert name in out
    assert "Not installed, left out: heavyball.SGD" in out


def test_the_targets_table_marks_only_the_issues_targets() -> None:
    """Issue 17: on ResNet-50 / GPT-2 shapes every ratio has its target; on 2000x1000 only the ratio to the peer
    has one (0.3x), and the ratios to torchsgd.SGD there are shown with no target, never ok/over."""
    from torchsgd.cli import bench_peers

    def run(sgd: float, sf: float, sf_peer: float, lars: float, lars_peer: float) -> dict[str, dict[str, float]]:
        return {
            "torchsgd.ScheduleFreeSGD": {
                "torchsgd.SGD": sgd,
                "torchsgd.ScheduleFreeSGD": sf,
                "schedulefree.SGDScheduleFree": sf_peer,
            },
            "torchsgd.LARS": {"torchsgd.SGD": sgd, "torchsgd.LARS": lars, "pytorch_optimizer.LARS": lars_peer},
        }

    per_workload = {"resnet50": run(10, 12, 20, 14, 50), "2000x1000": run(5, 8.7, 56, 6.7, 34)}
    groups = {
        comparison: {w: medians[comparison] for w, medians in per_workload.items()}
        for comparison in ("torchsgd.ScheduleFreeSGD", "torchsgd.LARS")
    }
    table = bench_peers.targets_table(groups)
    assert table.columns == ["ratio", "target", "resnet50", "2000x1000"]
    rows = {row[0]: row[2:] for row in table.rows}
    assert rows["ScheduleFreeSGD ÷ schedulefree"] == ["0.60 ok (≤ 0.65)", "0.16 ok (≤ 0.3)"]
    assert rows["ScheduleFreeSGD ÷ torchsgd.SGD"] == ["1.20 over (≤ 1.1)", "1.74 (no target)"]
    assert rows["LARS ÷ torchsgd.SGD"] == ["1.40 ok (≤ 1.5)", "1.34 (no target)"]
    assert rows["LARS ÷ pytorch_optimizer.LARS"] == ["0.28 ok (≤ 0.35)", "0.20 ok (≤ 0.3)"]
    assert "no target" in table.note and "0.3x" in table.note
    # a peer that is not installed leaves its cells empty
    del groups["torchsgd.LARS"]["2000x1000"]["pytorch_optimizer.LARS"]
    rows = {row[0]: row[2:] for row in bench_peers.targets_table(groups).rows}
    assert rows["LARS ÷ pytorch_optimizer.LARS"] == ["0.28 ok (≤ 0.35)", "—"]
