"""torchsgd.overlap_with_ddp: each DDP bucket updated as soon as its all-reduce completes, on 2 gloo ranks.

One torchrun job of 2 ranks trains a small MLP (small buckets: several per backward) from the same weights on
the same batches twice for every case: DDP followed by ``optimizer.step()``, and the overlapped step. The
tests compare what the ranks wrote: parameters, momentum buffers and ``.grad`` after every step, and the
optimizer's counters, bitwise, over STEPS steps. Cases: the three engine flags; Nesterov, dampened and plain
SGD; SGDW; two param groups (no weight decay on biases) with a learning-rate schedule; bfloat16 momentum
buffers; pure bfloat16 with stochastic rounding; ``gradient_as_bucket_view=True``; gradient accumulation
under ``no_sync()``. The job also records what is refused, and that a refusal leaves things as they were.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import torchsgd
from test_distributed import bitwise_equal, init_process_group, run_bounded, torchrun_command, worker_env

WORLD = 2
STEPS = 12
BATCH = 8
SIZES = (8, 16, 16, 7)
LR = 0.05
BUCKET_MB = 0.0004  # 400 bytes: about one parameter a bucket, so a backward completes several buckets
THREE_RANK_CASES = ("nesterov default", "bucket views", "no_sync accumulation")
JOB_TIMEOUT = 180
PG_TIMEOUT = 30

NESTEROV = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
# name -> (parameter dtype, optimizer options, DDP options, micro-batches per step, grouped + schedule)
CASES: dict[str, tuple[torch.dtype, dict[str, Any], dict[str, Any], int, bool]] = {
    "nesterov default": (torch.float32, NESTEROV, {}, 1, False),
    "nesterov foreach=True": (torch.float32, {**NESTEROV, "foreach": True}, {}, 1, False),
    "nesterov foreach=False": (torch.float32, {**NESTEROV, "foreach": False}, {}, 1, False),
    "dampened default": (torch.float32, {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}, {}, 1, False),
    "plain default": (torch.float32, {"weight_decay": 1e-2}, {}, 1, False),
    "sgdw": (torch.float32, {"momentum": 0.9, "weight_decay": 1e-1, "decoupled_weight_decay": True}, {}, 1, False),
    "groups and a schedule": (torch.float32, NESTEROV, {}, 1, True),
    "bucket views": (torch.float32, NESTEROV, {"gradient_as_bucket_view": True}, 1, False),
    "no_sync accumulation": (torch.float32, NESTEROV, {}, 2, False),
    "bf16 momentum": (torch.float32, {**NESTEROV, "momentum_dtype": torch.bfloat16}, {}, 1, False),
    "pure bf16 SR": (torch.bfloat16, {**NESTEROV, "stochastic_rounding": True, "seed": 7}, {}, 1, False),
}


def make_model(dtype: torch.dtype) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        a, b, c, d = SIZES
        return nn.Sequential(nn.Linear(a, b), nn.Tanh(), nn.Linear(b, c), nn.Tanh(), nn.Linear(c, d)).to(dtype)


def make_batches(dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, SIZES[0], generator=generator).to(dtype),
            torch.randn(BATCH, SIZES[-1], generator=generator).to(dtype),
        )
        for _ in range(STEPS)
    ]


def build(case: str, overlap: bool, comm_hook: Any = None) -> tuple[nn.Module, torchsgd.SGD, Any]:
    from torch.nn.parallel import DistributedDataParallel

    dtype, options, ddp_options, _, grouped = CASES[case]
    model = make_model(dtype)
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB, **ddp_options)
    params: Any = ddp.parameters()
    if grouped:
        params = torchsgd.param_groups(model, weight_decay=options["weight_decay"])
    optimizer = torchsgd.SGD(params, lr=LR, **options)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5) if grouped else None
    if overlap:
        torchsgd.overlap_with_ddp(ddp, optimizer, comm_hook=comm_hook)
    return ddp, optimizer, schedule


def train(case: str, overlap: bool, comm_hook: Any = None) -> dict[str, Any]:
    """STEPS steps on this rank's rows; the parameters, buffers and gradients after every step."""
    dtype, _, _, micro, _ = CASES[case]
    rank = torch.distributed.get_rank()
    ddp, optimizer, schedule = build(case, overlap, comm_hook)
    trail = []
    moved_in_backward: list[int] = []  # per step: how many parameters backward() changed, and step()
    moved_in_step: list[int] = []
    buckets = []
    if overlap:
        overlapped = optimizer._torchsgd_ddp_overlap
        update = overlapped._update

        def counted(index: int, *args: Any) -> None:
            buckets.append(index)
            update(index, *args)

        overlapped._update = counted
    for x, y in make_batches(dtype):
        world = torch.distributed.get_world_size()
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)  # 4 + 4 rows, or 2 + 3 + 3
        pieces = torch.arange(mine.stop - mine.start).tensor_split(micro)
        before = [p.detach().clone() for p in ddp.parameters()]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                F.mse_loss(ddp(x[mine][piece]), y[mine][piece]).backward()
        after_backward = [p.detach().clone() for p in ddp.parameters()]
        optimizer.step()
        moved_in_backward.append(sum(not bitwise_equal(a, b) for a, b in zip(before, after_backward)))
        moved_in_step.append(sum(not bitwise_equal(a, p.detach()) for a, p in zip(after_backward, ddp.parameters())))
        if schedule is not None:
            schedule.step()
        params = list(ddp.parameters())
        trail.append(
            {
                "params": [p.detach().clone() for p in params],
                "grads": [None if p.grad is None else p.grad.clone() for p in params],
                "buffers": [_clone(optimizer.state.get(p, {}).get("momentum_buffer")) for p in params],
            }
        )
        optimizer.zero_grad()
    return {
        "trail": trail,
        "counters": (optimizer.seed, optimizer.rounding_step),
        "engines": [(r["ran"], r["reason"]) for r in optimizer.engine_report()],
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "moved": (moved_in_backward, moved_in_step),
        "bucket updates": buckets,
    }


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


def refusals(prebuilt: torchsgd.SGD, prebuilt_ddp_model: nn.Module) -> dict[str, Any]:
    """What overlap_with_ddp refuses, and what each refusal leaves as it was."""
    from torch.nn.parallel import DistributedDataParallel

    found: dict[str, Any] = {}

    def fresh(**ddp_options: Any) -> Any:
        return DistributedDataParallel(make_model(torch.float32), **ddp_options)

    def error_of(call: Any) -> str | None:
        try:
            call()
        except (ValueError, TypeError, RuntimeError) as error:
            return f"{type(error).__name__}: {error}"
        return None

    for name, options in {
        "max_grad_norm": {"max_grad_norm": 1.0},
        "skip_nonfinite": {"skip_nonfinite": True},
        "differentiable": {"differentiable": True},
    }.items():
        ddp = fresh()
        optimizer = torchsgd.SGD(ddp.parameters(), lr=LR, momentum=0.9, **options)
        found[name] = error_of(lambda ddp=ddp, optimizer=optimizer: torchsgd.overlap_with_ddp(ddp, optimizer))
        # nothing changed: the model takes another hook, and the optimizer steps as usual
        ddp.register_comm_hook(None, _plain_allreduce)
        found[f"{name} left the optimizer alone"] = not hasattr(optimizer, "_step_supports_amp_scaling")
    found["step_in_backward"] = error_of(lambda: torchsgd.overlap_with_ddp(prebuilt_ddp_model, prebuilt))
    ddp = fresh()
    found["LARS"] = error_of(lambda: torchsgd.overlap_with_ddp(ddp, torchsgd.LARS(ddp.parameters(), lr=LR)))
    found["not DDP"] = error_of(
        lambda: torchsgd.overlap_with_ddp(
            make_model(torch.float32), torchsgd.SGD(make_model(torch.float32).parameters())
        )
    )
    ddp = fresh(find_unused_parameters=True)
    found["find_unused_parameters"] = error_of(
        lambda: torchsgd.overlap_with_ddp(ddp, torchsgd.SGD(ddp.parameters(), lr=LR))
    )
    ddp = DistributedDataParallel(nn.Sequential(nn.Embedding(5, 3, sparse=True)))
    found["sparse"] = error_of(lambda: torchsgd.overlap_with_ddp(ddp, torchsgd.SGD(ddp.parameters(), lr=LR)))
    ddp = fresh()
    outside = nn.Parameter(torch.ones(3))
    found["outside"] = error_of(
        lambda: torchsgd.overlap_with_ddp(ddp, torchsgd.SGD([*ddp.parameters(), outside], lr=LR))
    )
    ddp = fresh()
    optimizer = torchsgd.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    torchsgd.overlap_with_ddp(ddp, optimizer)
    found["twice"] = error_of(lambda: torchsgd.overlap_with_ddp(ddp, optimizer))
    other = torchsgd.SGD(ddp.parameters(), lr=LR)
    found["hooked model"] = error_of(lambda: torchsgd.overlap_with_ddp(ddp, other))
    found["hooked model left the optimizer alone"] = not hasattr(other, "_step_supports_amp_scaling")

    # step(closure): refused before the closure runs, the parameters untouched
    x, y = make_batches(torch.float32)[0]
    F.mse_loss(ddp(x), y).backward()
    before = [p.detach().clone() for p in ddp.parameters()]
    ran = []
    found["closure"] = error_of(lambda: optimizer.step(lambda: ran.append(1)))
    found["closure did not run"] = not ran
    found["closure left the parameters"] = all(bitwise_equal(a, p.detach()) for a, p in zip(before, ddp.parameters()))
    optimizer.step()
    optimizer.zero_grad()

    # a second backward without step(): warned (every backward updates)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.mse_loss(ddp(x), y).backward()
        F.mse_loss(ddp(x), y).backward()
    found["second backward"] = [str(w.message) for w in caught if w.category is RuntimeWarning]
    optimizer.step()
    optimizer.zero_grad()

    # a GradScaler: refused at step()
    scaler = torch.amp.GradScaler("cpu")
    ddp = fresh()
    optimizer = torchsgd.SGD(ddp.parameters(), lr=LR, momentum=0.9)
    overlap = torchsgd.overlap_with_ddp(ddp, optimizer)
    scaler.scale(F.mse_loss(ddp(x), y)).backward()
    found["GradScaler"] = error_of(lambda: scaler.step(optimizer))

    # remove(): step() updates again, the hook only all-reduces
    overlap.remove()
    optimizer.zero_grad()
    before = [p.detach().clone() for p in ddp.parameters()]
    F.mse_loss(ddp(x), y).backward()
    found["removed: backward did not update"] = all(
        bitwise_equal(a, p.detach()) for a, p in zip(before, ddp.parameters())
    )
    optimizer.step()
    found["removed: step updates"] = not all(bitwise_equal(a, p.detach()) for a, p in zip(before, ddp.parameters()))
    found["removed: amp flag gone"] = not hasattr(optimizer, "_step_supports_amp_scaling")
    return found


def _plain_allreduce(state, bucket):  # (unannotated: DDP checks a hook's annotations as objects)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.allreduce_hook(None, bucket)


def job(out: Path) -> None:
    # step_in_backward is refused under a process group: built before it exists
    prebuilt_model = make_model(torch.float32)
    prebuilt = torchsgd.SGD(prebuilt_model.parameters(), lr=LR, momentum=0.9, step_in_backward=True)
    init_process_group(PG_TIMEOUT)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results: dict[str, Any] = {}
    for case in CASES if world == WORLD else THREE_RANK_CASES:
        results[case] = {"ddp then step": train(case, False), "overlapped": train(case, True)}
    if world == WORLD:
        results["refusals"] = refusals(prebuilt, DistributedDataParallel(prebuilt_model))
    else:  # the control: torch's allreduce_hook divides by 3, which is not DDP's multiplication by 1/3
        results["allreduce_hook"] = train("nesterov default", True, default_hooks.allreduce_hook)
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------- the launcher side


def launch(tmp_path_factory: Any, world: int) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp(f"ddp-overlap-{world}")
    command = [*torchrun_command(), "--standalone", "--nproc-per-node", str(world), __file__, str(out)]
    done = run_bounded(command, worker_env(), JOB_TIMEOUT)
    if done.returncode != 0:
        pytest.fail(f"the {world}-rank job failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return launch(tmp_path_factory, WORLD)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    return launch(tmp_path_factory, 3)


def assert_same_trail(ours: dict[str, Any], theirs: dict[str, Any], rank: int) -> None:
    for step, (a, b) in enumerate(zip(ours["trail"], theirs["trail"])):
        for what in ("params", "buffers", "grads"):
            for i, (x, y) in enumerate(zip(a[what], b[what])):
                assert bitwise_equal(x, y), f"rank {rank}, step {step}: {what} {i} differ"


@pytest.mark.parametrize("case", THREE_RANK_CASES)
def test_on_three_ranks_too(three_ranks, case):
    """A world size that is not a power of two: the average is DDP's own (times 1/3, then the sum), bitwise;
    torch's allreduce_hook (divided by 3) is not, which shows the comparison can fail."""
    for rank, results in enumerate(three_ranks):
        assert_same_trail(results[case]["overlapped"], results[case]["ddp then step"], rank)
        assert results[case]["overlapped"]["moved"] == ([6] * STEPS, [0] * STEPS)
    divided = three_ranks[0]["allreduce_hook"]["trail"][-1]["params"]
    ddp = three_ranks[0]["nesterov default"]["ddp then step"]["trail"][-1]["params"]
    assert not all(bitwise_equal(a, b) for a, b in zip(divided, ddp))


@pytest.mark.parametrize("case", list(CASES))
def test_overlapped_step_is_ddp_then_step(ranks, case):
    """After every one of STEPS steps: parameters, momentum buffers and gradients bitwise; the same counters,
    engines and learning rates."""
    for rank, results in enumerate(ranks):
        ours, theirs = results[case]["overlapped"], results[case]["ddp then step"]
        assert_same_trail(ours, theirs, rank)
        assert ours["counters"] == theirs["counters"]
        assert ours["engines"] == theirs["engines"]
        assert ours["lrs"] == theirs["lrs"]
        first, last = theirs["trail"][0]["params"], theirs["trail"][-1]["params"]
        assert not all(bitwise_equal(x, y) for x, y in zip(first, last)), "training did not move"
    for a, b in zip(
        ranks[0][case]["overlapped"]["trail"][-1]["params"], ranks[1][case]["overlapped"]["trail"][-1]["params"]
    ):
        assert bitwise_equal(a, b), "the ranks' replicas differ"


@pytest.mark.parametrize("case", list(CASES))
def test_the_update_runs_in_backward_bucket_by_bucket(ranks, case):
    """The controls: with overlap, backward() moves all 6 parameters and step() none, over several bucket
    updates a backward; without it, backward moves none and step() all."""
    for results in ranks:
        ours, theirs = results[case]["overlapped"], results[case]["ddp then step"]
        assert ours["moved"] == ([6] * STEPS, [0] * STEPS)
        assert theirs["moved"] == ([0] * STEPS, [6] * STEPS)
        updates = ours["bucket updates"]
        assert len(updates) >= 2 * (STEPS - 1) and len(set(updates)) >= 2, updates  # (DDP rebuilds after step 1)
        assert theirs["bucket updates"] == []


def test_the_engines_are_the_ones_selected(ranks):
    expected = {"nesterov default": "fused", "nesterov foreach=True": "foreach", "nesterov foreach=False": "reference"}
    for results in ranks:
        for case, engine in expected.items():
            assert results[case]["overlapped"]["engines"] == [(engine, None)]


def test_what_cannot_combine_is_refused_and_leaves_things_as_they_were(ranks):
    for results in ranks:
        found = results["refusals"]
        assert found["max_grad_norm"].startswith("ValueError: overlap_with_ddp: cannot clip by the global norm")
        assert found["skip_nonfinite"].startswith("ValueError: overlap_with_ddp: cannot skip non-finite steps")
        assert found["differentiable"] == "ValueError: overlap_with_ddp: does not support differentiable=True"
        for name in ("max_grad_norm", "skip_nonfinite", "differentiable"):
            assert found[f"{name} left the optimizer alone"], name
        assert "step_in_backward=True" in found["step_in_backward"]
        assert found["LARS"].startswith("ValueError: overlap_with_ddp: takes a torchsgd.SGD or torchsgd.SGDW")
        assert found["not DDP"].startswith("TypeError: overlap_with_ddp: model must be a DistributedDataParallel")
        assert "find_unused_parameters=True is not supported" in found["find_unused_parameters"]
        assert found["sparse"].startswith("ValueError: overlap_with_ddp: sparse gradients")
        assert "parameter 6 of param group 0 is not one DDP reduces" in found["outside"]
        assert found["twice"] == "ValueError: overlap_with_ddp: this optimizer is already overlapped with a DDP model"
        assert found["hooked model"] is not None and "only be called once" in found["hooked model"]
        assert found["hooked model left the optimizer alone"]
        assert found["closure"].startswith("ValueError: overlap_with_ddp: step() takes no closure")
        assert found["closure did not run"] and found["closure left the parameters"]
        assert len(found["second backward"]) == 1 and "no_sync()" in found["second backward"][0]
        assert found["GradScaler"].startswith("RuntimeError: overlap_with_ddp cannot be used with a GradScaler")
        assert found["removed: step updates"] and found["removed: amp flag gone"]
        assert found["removed: backward did not update"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    job(Path(sys.argv[1]))
