"""Stochastic rounding on FSDP2 shards, bitwise the single-process run; DCP carries torchsgd's counters.

The noise of stochastic rounding is keyed by (seed, step, parameter, element index), the element index
being the position in the whole row-major parameter (torchsgd.rules.rounding). A ``Shard(0)`` local tensor
is a slice of rows of the whole, so a rank draws the noise from its first element's global index
(``shard_rows``): an FSDP2 run rounds exactly as one process does.

Two jobs, of 2 and of 3 gloo ranks (under torchrun), train a small MLP whose layers FSDP2 shards unevenly
(5 and 7 rows: 3 + 2 and 4 + 3 on 2 ranks, 2 + 2 + 1 and 3 + 3 + 1 on 3; the last layer's 2 rows leave
rank 2 of 3 an empty shard). Every rank computes the loss of the full batch, and the gradients are reduced
in float64 (``MixedPrecisionPolicy(reduce_dtype=torch.float64)``): the average of W identical bfloat16 or
float32 gradients is then exact (FSDP2 divides by 2 before the sum and by W/2 after it: g/2, W·g/2 and
their quotient need at most 2 more bits than g), so the sharded run sees the gradients of one process,
and its parameters and momentum buffers, gathered at the end, must be that process's bits. (Reduced in
the parameters' own dtype, 3·g rounds and the average is off by an ulp: a reduction order, not the step.)

The jobs also resume through torch.distributed.checkpoint (the counters travel in the param groups), check
what is refused (Shard(1); a 2-D mesh with Replicate + Shard(0)), and run round-to-nearest groups on the
native kernel through their local tensors (KERNEL_RUNS), against the multi-tensor path they took before.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import torchsgd
from test_distributed import (
    assert_all_bitwise,
    bitwise_equal,
    full,
    init_process_group,
    layout,
    one_thread,
    run_bounded,
    torchrun_command,
    worker_env,
)
from torchsgd.engines import base
from torchsgd.rules.rounding import BUFFER, PARAM, element_hash, shard_rows, stochastic_round, stream_key

STEPS = 4
RESUME_AT = 2
BATCH = 16
SEED = 1234  # the optimizers' noise seed
LR = 0.1
SIZES = (8, 5, 7, 2)  # Linear 8 -> 5 -> 7 -> 2
JOB_TIMEOUT = 120
PG_TIMEOUT = 30

NESTEROV = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}
# name -> (parameter dtype, optimizer options, LIFTED_CHUNK for the run or None)
RUNS: dict[str, tuple[torch.dtype, dict[str, Any], int | None]] = {
    "bf16 nesterov SR": (torch.bfloat16, {**NESTEROV, "stochastic_rounding": True}, None),
    # the reference engine, and pieces of one row: each piece of a shard draws from its own global start
    "bf16 dampened SR, row pieces": (
        torch.bfloat16,
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2, "stochastic_rounding": True, "foreach": False},
        4,
    ),
    "bf16 plain SR": (torch.bfloat16, {"weight_decay": 1e-2, "stochastic_rounding": True, "foreach": True}, None),
    "fp32, bf16 momentum SR": (
        torch.float32,
        {**NESTEROV, "momentum_dtype": torch.bfloat16, "stochastic_rounding": True},
        None,
    ),
    "fp32, bf16 momentum nearest": (torch.float32, {**NESTEROV, "momentum_dtype": torch.bfloat16}, None),
}
WRONG_OFFSET = "bf16 nesterov SR, every shard from element 0"  # the negative control
# Round-to-nearest runs that the default (fused) engine steps on the native kernel, through each shard's
# local tensors; each has a "... today" twin on the path DTensor groups took before (fused=False: the
# multi-tensor engine through DTensor's pointwise rules). name -> (dtype, options, LIFTED_CHUNK or None).
KERNEL_RUNS: dict[str, tuple[torch.dtype, dict[str, Any], None]] = {
    "fp32 nesterov on the kernel": (torch.float32, NESTEROV, None),
    "fp32 dampened, decoupled decay, on the kernel": (
        torch.float32,
        {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2, "decoupled_weight_decay": True},
        None,
    ),
    "fp32 plain on the kernel": (torch.float32, {"weight_decay": 1e-2}, None),
    "bf16 nesterov nearest on the kernel": (torch.bfloat16, NESTEROV, None),
}
TODAY = " today"
# bfloat16 at torch's per-operation rounding: the kernel follows torch's vectorised arithmetic, whose scalar
# tail loop rounds a little differently (the README's fused-engine bound), and a shard's last elements are a
# tail there. The kernel is position-independent, so on shards it is bitwise the one-process kernel run; the
# multi-tensor path is held to 4 bfloat16 ulps of it (at the tensor's scale) after the run.
NEAR_TODAY = {"bf16 nesterov nearest on the kernel"}


def make_model(dtype: torch.dtype, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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


def build_optimizer(params: Any, options: dict[str, Any], seed: int = SEED) -> torchsgd.SGD:
    return torchsgd.SGD(params, lr=LR, seed=seed, **options)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        F.mse_loss(model(x), y).backward()  # the full batch on every rank
        optimizer.step()
        optimizer.zero_grad()


def outcome(model: nn.Module, optimizer: torchsgd.SGD) -> dict[str, Any]:
    params = list(model.parameters())
    buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
    return {
        "params": [full(p) for p in params],
        "buffers": [full(b) for b in buffers],
        "param_layouts": [layout(p) for p in params],
        "buffer_layouts": [layout(b) for b in buffers],
        "counters": (optimizer.seed, optimizer.rounding_step),
        "engines": [(r["ran"], r["reason"]) for r in optimizer.engine_report()],
    }


# --------------------------------------------------------------------------------------- the worker side


def shard(model: nn.Module, mesh: Any = None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.float64)  # exact averages of identical gradients
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def sharded_run(dtype: torch.dtype, options: dict[str, Any], chunk: int | None) -> dict[str, Any]:
    model = make_model(dtype)
    shard(model)
    optimizer = build_optimizer(model.parameters(), options)
    previous = base.LIFTED_CHUNK
    base.LIFTED_CHUNK = chunk or previous
    try:
        train(model, optimizer, make_batches(dtype))
    finally:
        base.LIFTED_CHUNK = previous
    return outcome(model, optimizer)


def dcp_resume(folder: Path) -> dict[str, Any]:
    """Save after RESUME_AT steps through torch.distributed.checkpoint (and train on to STEPS), then load into
    a new model (other weights) and optimizer (other seed) and train to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    dtype, options, _ = RUNS["bf16 nesterov SR"]
    batches = make_batches(dtype)
    model = make_model(dtype)
    shard(model)
    optimizer = build_optimizer(model.parameters(), options)
    train(model, optimizer, batches[:RESUME_AT])
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(folder))
    del state
    train(model, optimizer, batches[RESUME_AT:])
    saver = outcome(model, optimizer)

    model = make_model(dtype, seed=123)
    shard(model)
    optimizer = build_optimizer(model.parameters(), options, seed=99)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    loaded = {
        "counters": (optimizer.seed, optimizer.rounding_step),
        "group_keys": sorted(optimizer.param_groups[0]),
    }
    train(model, optimizer, batches[RESUME_AT:])
    return {"saver": saver, "resumed": outcome(model, optimizer), "loaded": loaded}


def replicated_steps(wrap: Any = None, stochastic: bool = True) -> dict[str, Any]:
    """STEPS steps (stochastically rounded, or to nearest) of one bfloat16 (6, 4) parameter, a plain tensor or
    (``wrap``) a Replicate DTensor, on the same gradients."""
    wrap = wrap or (lambda t: t)
    generator = torch.Generator().manual_seed(2)
    weight = nn.Parameter(wrap(torch.randn(6, 4, generator=generator).bfloat16()))
    optimizer = build_optimizer([weight], {**NESTEROV, "stochastic_rounding": stochastic})
    for _ in range(STEPS):
        weight.grad = wrap(torch.randn(6, 4, generator=generator).bfloat16())
        optimizer.step()
    buffer = optimizer.state[weight]["momentum_buffer"]
    return {
        "param": full(weight),
        "buffer": full(buffer),
        "buffer_layout": layout(buffer),
        "engine": optimizer.engine_report()[0]["ran"],
    }


def replicated(stochastic: bool = True) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return replicated_steps(lambda t: distribute_tensor(t, mesh, [Replicate()]), stochastic)


def refusals() -> dict[str, str | None]:
    """The errors of stochastic rounding on placements it does not support (None: it was not refused)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    world = torch.distributed.get_world_size()
    errors: dict[str, str | None] = {}

    def first_step(params: list[Tensor]) -> str | None:
        optimizer = build_optimizer(params, {**NESTEROV, "stochastic_rounding": True})
        try:
            optimizer.step()
        except NotImplementedError as error:
            return str(error)
        return None

    mesh = init_device_mesh("cpu", (world,))
    weight = nn.Parameter(distribute_tensor(torch.ones(4, 6, dtype=torch.bfloat16), mesh, [Shard(1)]))
    weight.grad = distribute_tensor(torch.ones(4, 6, dtype=torch.bfloat16), mesh, [Shard(1)])
    errors["Shard(1)"] = first_step([weight])

    model = make_model(torch.bfloat16)
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    shard(model, mesh=hsdp)  # HSDP: Replicate over 1 rank, Shard(0) over all
    F.mse_loss(model(torch.ones(2, SIZES[0], dtype=torch.bfloat16)), torch.zeros(2, SIZES[-1]).bfloat16()).backward()
    errors["2-D mesh"] = first_step(list(model.parameters()))
    return errors


def job(out: Path) -> None:
    init_process_group(PG_TIMEOUT)
    rank = torch.distributed.get_rank()
    results: dict[str, Any] = {name: sharded_run(*run) for name, run in RUNS.items()}
    for name, (dtype, options, chunk) in KERNEL_RUNS.items():
        results[name] = sharded_run(dtype, options, chunk)
        results[name + TODAY] = sharded_run(dtype, {**options, "fused": False}, chunk)
    original = base._shard_start
    base._shard_start = lambda p, index: 0  # type: ignore[assignment]  # the bug this file guards against
    try:
        results[WRONG_OFFSET] = sharded_run(*RUNS["bf16 nesterov SR"])
    finally:
        base._shard_start = original
    results["dcp"] = dcp_resume(out / "checkpoint")
    results["replicated"] = replicated()
    results["replicated nearest"] = replicated(stochastic=False)
    results["refusals"] = refusals()
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------- the launcher side


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory) -> list[dict[str, Any]]:
    world = request.param
    out = tmp_path_factory.mktemp(f"rounding-{world}")
    command = [*torchrun_command(), "--standalone", "--nproc-per-node", str(world), __file__, str(out)]
    done = run_bounded(command, worker_env(), JOB_TIMEOUT)
    if done.returncode != 0:
        pytest.fail(f"the {world}-rank job failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def single_process(name: str) -> dict[str, Any]:
    dtype, options, _ = {**RUNS, **KERNEL_RUNS}[name]
    with one_thread():
        model = make_model(dtype)
        optimizer = build_optimizer(model.parameters(), options)
        train(model, optimizer, make_batches(dtype))
        return outcome(model, optimizer)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp2_rounding_is_the_single_process_runs(ranks, name):
    """Parameters and momentum buffers, gathered, are bitwise one process's, on every rank; the buffers are
    DTensors laid out as their parameters, in the storage dtype."""
    expected = single_process(name)
    world = len(ranks)
    for rank, results in enumerate(ranks):
        ours = results[name]
        assert_all_bitwise(ours["params"], expected["params"], f"rank {rank} of {world}: parameters")
        assert_all_bitwise(ours["buffers"], expected["buffers"], f"rank {rank} of {world}: momentum buffers")
        assert ours["counters"] == expected["counters"] == (SEED, STEPS)
        local_rows = [shape[2][0] for shape in ours["param_layouts"]]
        assert local_rows == [shard_rows(p.shape[0], world, rank)[1] for p in expected["params"]]
        if world == 3 and rank == 2:
            assert local_rows[-2:] == [0, 0]  # the 2-row layer: an empty shard
        dtype, options, _ = RUNS[name]
        if options.get("momentum"):
            buffer_dtype = str(options.get("momentum_dtype", dtype))
            assert ours["buffer_layouts"] == [(*p[:3], buffer_dtype) for p in ours["param_layouts"]]
        else:
            assert ours["buffer_layouts"] == [None] * len(ours["params"])


@pytest.mark.parametrize("name", list(KERNEL_RUNS))
def test_fsdp2_groups_step_on_the_native_kernel(ranks, name):
    """The default engine steps DTensor groups on the native kernel, through their local tensors: bitwise
    the single process and (but bfloat16 at torch's rounding, NEAR_TODAY) the path they took before (the
    multi-tensor engine on DTensors), on 2 and 3 ranks with uneven and empty shards; new buffers are DTensors
    laid out as their parameters."""
    expected = single_process(name)
    world = len(ranks)
    for rank, results in enumerate(ranks):
        ours, today = results[name], results[name + TODAY]
        where = f"rank {rank} of {world}"
        assert ours["engines"] == [("fused", None)], (where, ours["engines"])
        assert today["engines"] == [("foreach", None)], (where, today["engines"])
        for what in ("params", "buffers"):
            assert_all_bitwise(ours[what], expected[what], f"{where}: {what}, kernel vs one process")
            if name not in NEAR_TODAY:
                assert_all_bitwise(ours[what], today[what], f"{where}: {what}, kernel vs the multi-tensor path")
                continue
            for a, b in zip(ours[what], today[what]):
                if a is not None:
                    bound = 4 * torch.finfo(a.dtype).eps * a.abs().max().float().item()
                    assert (a.float() - b.float()).abs().max().item() <= bound, f"{where}: {what} beyond 4 ulps"
        assert ours["buffer_layouts"] == today["buffer_layouts"]
        if KERNEL_RUNS[name][1].get("momentum"):
            assert ours["buffer_layouts"] == ours["param_layouts"]
            assert all(layout[0] == "DTensor" for layout in ours["buffer_layouts"])


def test_stochastic_rounding_on_shards_reports_why_it_is_not_on_the_kernel(ranks):
    """The kernel numbers a tensor's noise from its element 0: stochastic rounding on Shard(0) DTensors runs
    on the multi-tensor engine's local-shard path, and engine_report() says so."""
    from torchsgd.engines.fused import SHARD_NOISE_REASON

    for results in ranks:
        assert results["bf16 nesterov SR"]["engines"] == [("foreach", SHARD_NOISE_REASON)]


def test_the_comparison_can_fail(ranks):
    """Stochastic rounding changed the bits (the same run rounded to nearest ends elsewhere), and shards that
    drew their noise from element 0 of their local tensor do not reach the single process's bits."""
    sr = single_process("bf16 nesterov SR")
    dtype, options, _ = RUNS["bf16 nesterov SR"]
    with one_thread():
        model = make_model(dtype)
        optimizer = build_optimizer(model.parameters(), {**options, "stochastic_rounding": False})
        train(model, optimizer, make_batches(dtype))
    assert not all(bitwise_equal(p.detach(), q) for p, q in zip(model.parameters(), sr["params"]))
    wrong = ranks[0][WRONG_OFFSET]
    assert not all(bitwise_equal(a, b) for a, b in zip(wrong["params"], sr["params"]))


def test_dcp_resume_is_the_uninterrupted_run(ranks):
    """Through dcp.save / dcp.load and get/set_optimizer_state_dict the seed and the rounding step come back
    (into an optimizer built with another seed): the resumed run, and the one that saved and went on, are
    bitwise the uninterrupted run on every rank. The loaded groups do not keep the counters."""
    uninterrupted = single_process("bf16 nesterov SR")
    for rank, results in enumerate(ranks):
        dcp = results["dcp"]
        assert dcp["loaded"]["counters"] == (SEED, RESUME_AT)
        assert "torchsgd" not in dcp["loaded"]["group_keys"]
        for who in ("saver", "resumed"):
            assert_all_bitwise(dcp[who]["params"], uninterrupted["params"], f"rank {rank}: {who}'s parameters")
            assert_all_bitwise(dcp[who]["buffers"], uninterrupted["buffers"], f"rank {rank}: {who}'s buffers")
            assert dcp[who]["counters"] == (SEED, STEPS)
            assert dcp[who]["buffer_layouts"] == results["bf16 nesterov SR"]["buffer_layouts"]


def test_a_replicated_parameter_is_the_plain_ones(ranks):
    """A Replicate DTensor on a 1-D mesh rounds as the whole tensor it holds: bitwise one process's."""
    with one_thread():
        expected = replicated_steps()
    for rank, results in enumerate(ranks):
        for what in ("param", "buffer"):
            assert bitwise_equal(results["replicated"][what], expected[what]), f"rank {rank}: {what}"


def test_a_replicated_parameter_steps_on_the_kernel(ranks):
    """Round to nearest, a Replicate DTensor runs on the native kernel through its local tensor: bitwise the
    plain tensor's run, and its new buffer is a Replicate DTensor."""
    with one_thread():
        expected = replicated_steps(stochastic=False)
    for rank, results in enumerate(ranks):
        ours = results["replicated nearest"]
        assert ours["engine"] == "fused" == expected["engine"]
        assert ours["buffer_layout"] == ("DTensor", ("Replicate()",), (6, 4), "torch.bfloat16")
        for what in ("param", "buffer"):
            assert bitwise_equal(ours[what], expected[what]), f"rank {rank}: {what}"


def test_unsupported_placements_are_refused(ranks):
    for results in ranks:
        errors = results["refusals"]
        for what, placements in (("Shard(1)", "(Shard(dim=1),)"), ("2-D mesh", "(Replicate(), Shard(dim=0))")):
            assert errors[what] is not None, f"{what} was not refused"
            assert errors[what].startswith(base.SHARD_SUPPORT), errors[what]
            assert placements in errors[what], errors[what]


# ----------------------------------------------------------------------------------- one process, no ranks


@pytest.mark.parametrize("shape", [(7, 5), (5,), (2, 7), (9, 3, 2), (1, 3), (0, 4)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_noise_is_the_whole_tensors(shape, world):
    """shard_rows splits dim 0 as DTensor's Shard(0) does (torch's own split is the oracle), and the noise
    and stochastic rounding of every shard, from its first element's global index, are those elements' of
    the whole tensor."""
    from torch.distributed.tensor import Shard

    key = stream_key(SEED, 3, 2)
    numel = torch.Size(shape).numel()
    per_row = numel // shape[0] if shape[0] else 0
    whole = element_hash(key, numel)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.3
    rounded = {role: stochastic_round(x, torch.bfloat16, key, role) for role in (PARAM, BUFFER)}
    pieces = []
    for rank in range(world):
        first, rows = shard_rows(shape[0], world, rank)
        assert (rows, first) == Shard(0)._local_shard_size_and_offset(shape[0], world, rank)
        start = first * per_row
        noise = element_hash(key, rows * per_row, start=start)
        assert torch.equal(noise, whole[start : start + rows * per_row])
        pieces.append(noise)
        local = x[first : first + rows]
        for role, expected in rounded.items():
            got = stochastic_round(local, torch.bfloat16, key, role, start)
            assert bitwise_equal(got, expected[first : first + rows]), (rank, role)
    assert torch.equal(torch.cat(pieces), whole)
    if world > 1 and shape[0] > 1:  # a shard after the first drawn from element 0 would not be
        first, rows = shard_rows(shape[0], world, 1)
        if rows:
            assert not torch.equal(element_hash(key, rows * per_row), whole[first * per_row : (first + rows) * per_row])


def test_shard_rows_rejects_nonsense():
    for rows, shards, coordinate in ((-1, 2, 0), (4, 0, 0), (4, 2, 2), (4, 2, -1)):
        with pytest.raises(ValueError, match="shard_rows"):
            shard_rows(rows, shards, coordinate)


def sr_optimizer(**options: Any) -> tuple[torchsgd.SGD, list[Tensor]]:
    params = [torch.ones(3, 2, dtype=torch.bfloat16, requires_grad=True), torch.ones(2, dtype=torch.bfloat16)]
    opt = torchsgd.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, momentum=0.9, seed=7, **options)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    opt.step()
    opt.step()
    return opt, params


def test_the_counters_travel_in_the_param_groups():
    """What DCP keeps of a state_dict ("state" and "param_groups") restores seed, step and skipped steps;
    the groups of the loaded optimizer hold no counters; torch.optim.SGD checkpoints load both ways."""
    opt, _ = sr_optimizer(stochastic_rounding=True, skip_nonfinite=True)
    saved = opt.state_dict()
    counters = {"seed": 7, "rounding_step": 2, "skipped_steps": 0}
    assert saved["torchsgd"] == counters
    assert [g["torchsgd"] for g in saved["param_groups"]] == [counters, counters]
    assert "torchsgd" not in opt.param_groups[0]  # only the state_dict carries them

    kept = {"state": saved["state"], "param_groups": saved["param_groups"]}  # what DCP keeps
    fresh, _ = sr_optimizer(stochastic_rounding=True, skip_nonfinite=True)
    fresh.seed, fresh.rounding_step, fresh.skipped_steps = 1, 5, 3
    fresh.load_state_dict(kept)
    assert (fresh.seed, fresh.rounding_step, fresh.skipped_steps) == (7, 2, 0)
    assert all("torchsgd" not in g for g in fresh.param_groups)
    assert fresh.state_dict()["param_groups"] == saved["param_groups"]

    # the top-level entry, where there is one, counts (it is what torch.save of a state_dict holds)
    edited = {**saved, "torchsgd": {**counters, "rounding_step": 9}}
    fresh.load_state_dict(edited)
    assert fresh.rounding_step == 9

    disagreeing = {**kept, "param_groups": [saved["param_groups"][0], {**saved["param_groups"][1], "torchsgd": {}}]}
    with pytest.raises(ValueError, match="param groups 0 and 1 carry different 'torchsgd' counters"):
        fresh.load_state_dict(disagreeing)
    assert fresh.rounding_step == 9  # unchanged

    malformed = {**kept, "param_groups": [{**g, "torchsgd": {"seed": 1}} for g in saved["param_groups"]]}
    with pytest.raises(ValueError, match="must hold both 'seed' and 'rounding_step'"):
        fresh.load_state_dict(malformed)

    # torch.optim.SGD loads it (and ignores the entry); its checkpoint loads into torchsgd.SGD, which keeps
    # its own counters
    theirs = torch.optim.SGD(
        [{"params": [torch.ones(3, 2, dtype=torch.bfloat16)]}, {"params": [torch.ones(2, dtype=torch.bfloat16)]}],
        lr=0.1,
        momentum=0.9,
    )
    theirs.load_state_dict(kept)
    plain = theirs.state_dict()
    plain["param_groups"] = [{k: v for k, v in g.items() if k != "torchsgd"} for g in plain["param_groups"]]
    ours, _ = sr_optimizer(stochastic_rounding=True)
    ours.seed, ours.rounding_step = 11, 5
    ours.load_state_dict(plain)
    assert (ours.seed, ours.rounding_step) == (11, 5)
    assert torch.equal(
        ours.state[ours.param_groups[0]["params"][0]]["momentum_buffer"], saved["state"][0]["momentum_buffer"]
    )

    # without stochastic rounding or the guard a state_dict is torch's, keys and all
    nearest, _ = sr_optimizer()
    assert "torchsgd" not in nearest.state_dict() and "torchsgd" not in nearest.state_dict()["param_groups"][0]


if __name__ == "__main__":
    torch.set_num_threads(1)
    job(Path(sys.argv[1]))


EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "fsdp2_bf16_sr.py"


def test_the_fsdp2_example_trains_in_pure_bf16_with_stochastic_rounding() -> None:
    """docs/distributed.md's torchrun example, as a user runs it: 2 ranks, bfloat16 shards, the loss falls."""
    command = [*torchrun_command(), "--standalone", "--nproc-per-node", "2", str(EXAMPLE)]
    result = run_bounded(command, worker_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks 2, parameters torch.bfloat16, local shard (32, 16) of (64, 16)" in result.stdout, result.stdout
    first, last = (float(v) for v in result.stdout.split("loss: first ")[1].split(", last "))
    assert last < 0.1 * first, result.stdout
