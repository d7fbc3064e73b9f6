"""torch.distributed on CPU: 2 ranks over gloo, against torch and against one process on the full batch.

One job of 2 worker processes (this file, run as a script) trains the same small model from the same
weights on the same batches under every parallel setup, with torchsgd.SGD on every engine flag and with
torch.optim.SGD; the tests here compare what the ranks wrote with each other and with single-process runs:

* **torch under the same setup**: bitwise (parameters and momentum buffers, on every rank).
* **one process, the same reduction order**: bitwise. Each rank's backward sees half of the global batch
  (a mean loss over its rows), and DDP/FSDP2 average the two halves' gradients; with 2 ranks that average
  is ``g0/2 + g1/2``, which equals ``(g0 + g1)/2`` bit for bit (halving is exact). One process that runs
  the two half-batch backward passes and averages them that way must land on the same bits.
* **one process, one backward over the full batch**: within :data:`FULL_BATCH_BOUND`. The mean over 8
  rows is not summed in the order of two means over 4 rows, so the gradients differ by rounding (an ulp
  or so); after :data:`STEPS` steps the parameters may differ by at most that bound (docs/distributed.md).

The setups: DistributedDataParallel (also ``gradient_as_bucket_view=True``), FSDP2 ``fully_shard``
(DTensor parameters: the step runs on the local shards with no collective, and momentum buffers are
DTensors sharded like torch's), and ``ZeroRedundancyOptimizer(optimizer_class=...)`` over DDP (also
``parameters_as_bucket_view=True``). Also: a resume through torch.distributed.checkpoint on the same
trajectory bitwise, step_in_backward's refusal, a failing or hanging rank ending the job in bounded time
(under torchrun, and with gloo alone), and ``torchrun ... -m torchsgd demo --distributed`` end to end.

Every launch is bounded: the process group has a short timeout and the launcher kills what is left at a
deadline, so a hang is a test failure, never a stuck test run.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import torchsgd

WORLD = 2
STEPS = 4  # training steps of every run
RESUME_AT = 2  # the resume test checkpoints after this many steps and continues to STEPS
BATCH = 8  # global batch; each rank takes BATCH // WORLD rows
IN, HIDDEN, OUT = 8, 16, 7  # 7 rows: FSDP2 shards the last Linear unevenly (4 + 3 rows)
LR = 0.1

# After STEPS steps from the same weights, a data-parallel run may differ from one backward over the full
# batch by at most this much in any parameter (absolute; the parameters are at most about 0.4, and training
# moves them by 0.04..0.11). Measured on every mode, config and flag: 2.98e-8, one float32 ulp at 0.25..0.5
# (docs/distributed.md); the bound leaves a margin of about 30 for other CPUs' kernels.
FULL_BATCH_BOUND = 1e-6

CONFIGS: dict[str, dict[str, Any]] = {
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    "dampened": {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
    "plain": {"weight_decay": 1e-2},
}
FLAGS: dict[str, dict[str, Any]] = {
    "foreach=False": {"foreach": False},
    "foreach=True": {"foreach": True},
    "fused=True": {"fused": True},
    "default": {},
}
MODES = ("ddp", "ddp-bucket-view", "fsdp2", "zero", "zero-bucket-view")
RESUME_CASES = [("nesterov", "default"), ("nesterov", "foreach=False"), ("plain", "default")]

JOB_TIMEOUT = 240  # seconds a whole launch may take before it is killed (it takes about 10 s)
PG_TIMEOUT = 30  # seconds a collective may wait for a peer


def torch_flag(flag: str) -> str:
    """The torch.optim.SGD flag to compare with. torchsgd's fused=True promises the numbers of torch's loop
    (foreach=False): torch's own fused CPU kernel rounds differently (it uses FMA; tests/test_torch_fused_bugs.py),
    and under FSDP2 it does not run at all (aten._fused_sgd_ has no DTensor sharding rule)."""
    return "foreach=False" if flag == "fused=True" else flag


def run_key(mode: str, library: str, config: str, flag: str) -> str:
    return f"{mode}|{library}|{config}|{flag}"


# ------------------------------------------------------------------------------------------ shared pieces


def make_model(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def make_batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, OUT, generator=generator))
        for _ in range(STEPS)
    ]


def rows(rank: int) -> slice:
    share = BATCH // WORLD
    return slice(rank * share, (rank + 1) * share)


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


def build_optimizer(library: str, config: str, flag: str, params: Any) -> torch.optim.Optimizer:
    cls = torchsgd.SGD if library == "torchsgd" else torch.optim.SGD
    return cls(params, lr=LR, **CONFIGS[config], **FLAGS[flag])


def bitwise_equal(a: Tensor | None, b: Tensor | None) -> bool:
    """Same dtype, shape and bits (so -0.0 differs from 0.0, unlike torch.equal)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


# --------------------------------------------------------------------------------------- the worker side


@contextlib.contextmanager
def engines_used():
    """The names of the torchsgd engines that update parameters inside the block (``fused->foreach``: the
    fused engine handed the group to its multi-tensor fallback)."""
    from torchsgd import engines

    watched = {
        "reference": engines.REFERENCE,
        "foreach": engines.FOREACH,
        "fused": engines.FUSED,
        "fused->foreach": engines.FUSED.fallback,
    }
    used: set[str] = set()
    for name, engine in watched.items():

        def tracked(*args: Any, _original: Any = engine.step_group, _name: str = name, **kwargs: Any) -> Any:
            used.add(_name)
            return _original(*args, **kwargs)

        engine.step_group = tracked  # an instance attribute shadows the method until it is deleted
    try:
        yield used
    finally:
        for engine in watched.values():
            del engine.step_group


def full(t: Tensor | None) -> Tensor | None:
    """A plain copy of a tensor; a DTensor is gathered (only to check results, after training)."""
    from torch.distributed.tensor import DTensor

    if t is None:
        return None
    return t.full_tensor().detach().clone() if isinstance(t, DTensor) else t.detach().clone()


def layout(t: Tensor | None) -> tuple | None:
    """What a state tensor is: its type, DTensor placements and local shape."""
    from torch.distributed.tensor import DTensor

    if t is None:
        return None
    if isinstance(t, DTensor):
        return ("DTensor", tuple(repr(p) for p in t.placements), tuple(t.to_local().shape), str(t.dtype))
    return (type(t).__name__, None, tuple(t.shape), str(t.dtype))


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)


def train_parallel(mode: str, library: str, config: str, flag: str, batches: list) -> dict[str, Any]:
    """Train STEPS steps under ``mode`` on this rank's rows of every batch; what came out, for the tests."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel

    rank = torch.distributed.get_rank()
    model = make_model()
    if mode == "fsdp2":
        shard(model)
        net = model
    else:
        net = DistributedDataParallel(model, gradient_as_bucket_view=mode == "ddp-bucket-view")
    if mode.startswith("zero"):
        cls = torchsgd.SGD if library == "torchsgd" else torch.optim.SGD
        optimizer = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=cls,
            parameters_as_bucket_view=mode == "zero-bucket-view",
            lr=LR,
            **CONFIGS[config],
            **FLAGS[flag],
        )
    else:
        optimizer = build_optimizer(library, config, flag, model.parameters())
    step_collectives = 0
    with engines_used() as engines:
        for x, y in batches:
            loss_fn(net, x[rows(rank)], y[rows(rank)]).backward()
            with CommDebugMode() as comms:
                optimizer.step()
            step_collectives += comms.get_total_counts()
            optimizer.zero_grad()
    params = list(model.parameters())
    if mode.startswith("zero"):
        optimizer.consolidate_state_dict(to=0)  # a collective: every rank calls it
        state = optimizer.state_dict()["state"] if rank == 0 else {}
        buffers = [state.get(i, {}).get("momentum_buffer") for i in range(len(params))]
        layouts = [layout(b) for b in buffers]
    else:
        raw = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        layouts = [layout(b) for b in raw]
        buffers = [full(b) for b in raw]
    return {
        "params": [full(p) for p in params],
        "param_layouts": [layout(p) for p in params],
        "buffers": buffers,
        "buffer_layouts": layouts,
        "engines": sorted(engines),
        "fallback_reason": fallback_reason(optimizer) if "fused->foreach" in engines else None,
        "step_collectives": step_collectives if mode == "fsdp2" else None,
    }


def fallback_reason(optimizer: Any) -> str | None:
    """Why a group of the torchsgd optimizer (inside ZeRO's wrapper, if any) left the engine it selected."""
    inner = getattr(optimizer, "optim", optimizer)
    return next((r["reason"] for r in inner.engine_report() if r["reason"]), None)


def fsdp_checkpoint_resume(config: str, flag: str, batches: list, folder: Path) -> dict[str, Any]:
    """Train RESUME_AT steps under FSDP2, save model and optimizer through torch.distributed.checkpoint and
    train on to STEPS (saving must not disturb the running job); then build a new model (other initial
    weights) and optimizer as a restarted job would, load the checkpoint into them and train to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    rank = torch.distributed.get_rank()

    def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: list) -> None:
        for x, y in steps:
            loss_fn(model, x[rows(rank)], y[rows(rank)]).backward()
            optimizer.step()
            optimizer.zero_grad()

    model = make_model()
    shard(model)
    optimizer = build_optimizer("torchsgd", config, flag, model.parameters())
    train(model, optimizer, batches[:RESUME_AT])
    checkpoint = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(checkpoint, checkpoint_id=str(folder))
    del checkpoint
    train(model, optimizer, batches[RESUME_AT:])
    continued = list(model.parameters())
    saver = {
        "params": [full(p) for p in continued],
        "buffers": [full(optimizer.state.get(p, {}).get("momentum_buffer")) for p in continued],
    }
    del model, optimizer, continued

    model = make_model(seed=123)  # not the saved weights: only the checkpoint can put them back
    shard(model)
    optimizer = build_optimizer("torchsgd", config, flag, model.parameters())
    # The templates DCP loads into. get_optimizer_state_dict runs one step with zero gradients and lr 0 on
    # the new optimizer to create its state (torch.distributed.checkpoint.state_dict._init_optim_state).
    checkpoint = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(checkpoint, checkpoint_id=str(folder))
    set_model_state_dict(model, checkpoint["model"])
    set_optimizer_state_dict(model, optimizer, checkpoint["optim"])
    loaded = [layout(optimizer.state.get(p, {}).get("momentum_buffer")) for p in model.parameters()]
    train(model, optimizer, batches[RESUME_AT:])
    params = list(model.parameters())
    return {
        "params": [full(p) for p in params],
        "buffers": [full(optimizer.state.get(p, {}).get("momentum_buffer")) for p in params],
        "loaded_buffer_layouts": loaded,
        "saver": saver,
    }


def step_in_backward_errors(prebuilt: torch.optim.Optimizer, prebuilt_model: nn.Module) -> dict[str, str | None]:
    """The errors step_in_backward gives under a process group of 2: at construction, and at the first
    backward for an optimizer that was built before init_process_group."""
    errors: dict[str, str | None] = {"construct": None, "backward": None}
    try:
        torchsgd.SGD(make_model().parameters(), lr=LR, momentum=0.9, step_in_backward=True)
    except ValueError as error:
        errors["construct"] = str(error)
    try:
        prebuilt_model(torch.ones(2, IN)).sum().backward()
    except (ValueError, RuntimeError) as error:
        errors["backward"] = str(error)
    return errors


CLIP = 0.05  # max_grad_norm of the FSDP2 extras run; the gradients' global norm is larger at every step


def fsdp2_extras(batches: list) -> dict[str, Any]:
    """torchsgd's extras under FSDP2: low-precision momentum buffers; clipping by the global norm inside
    the step (against torch's clip_grad_norm_ then torch's step, on the same DTensor gradients). (Stochastic
    rounding on shards: tests/test_distributed_rounding.py.)"""
    rank = torch.distributed.get_rank()

    def train(optimizer_for: Any, clip: float | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        model = make_model().to(dtype)
        shard(model)
        optimizer = optimizer_for(model.parameters())
        for x, y in batches:
            loss_fn(model, x[rows(rank)].to(dtype), y[rows(rank)].to(dtype)).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
        params = list(model.parameters())
        return {
            "params": [full(p) for p in params],
            "buffers": [full(optimizer.state.get(p, {}).get("momentum_buffer")) for p in params],
            "buffer_layouts": [layout(optimizer.state.get(p, {}).get("momentum_buffer")) for p in params],
            "last_grad_norm": full(getattr(optimizer, "last_grad_norm", None)),
        }

    nesterov = CONFIGS["nesterov"]
    results = {
        "momentum_dtype": train(lambda ps: torchsgd.SGD(ps, lr=LR, momentum_dtype=torch.bfloat16, **nesterov)),
        "max_grad_norm": train(lambda ps: torchsgd.SGD(ps, lr=LR, max_grad_norm=CLIP, **nesterov)),
        "torch_clipped": train(lambda ps: torch.optim.SGD(ps, lr=LR, foreach=False, **nesterov), clip=CLIP),
    }
    return results


def init_process_group(timeout_s: float) -> None:
    init = os.environ.get("TORCHSGD_TEST_INIT")  # a FileStore from the test launcher; torchrun: env://
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if init:
        kwargs.update(init_method=init, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    torch.distributed.init_process_group("gloo", **kwargs)


def job_train(out: Path) -> None:
    # Built before the process group exists, so its constructor cannot see the data parallelism.
    prebuilt_model = make_model()
    prebuilt = torchsgd.SGD(prebuilt_model.parameters(), lr=LR, momentum=0.9, step_in_backward=True)
    init_process_group(PG_TIMEOUT)
    rank = torch.distributed.get_rank()
    batches = make_batches()
    results: dict[str, Any] = {}
    for mode in MODES:
        for config in CONFIGS:
            for flag in FLAGS:
                results[run_key(mode, "torchsgd", config, flag)] = train_parallel(
                    mode, "torchsgd", config, flag, batches
                )
                torch_twin = run_key(mode, "torch", config, torch_flag(flag))
                if torch_twin not in results:
                    results[torch_twin] = train_parallel(mode, "torch", config, torch_flag(flag), batches)
    for config, flag in RESUME_CASES:
        folder = out / f"checkpoint-{config}-{flag}"
        results[f"resume|{config}|{flag}"] = fsdp_checkpoint_resume(config, flag, batches, folder)

    results["fsdp2_extras"] = fsdp2_extras(batches)

    # A positive control for the collective counter used on the FSDP2 steps: gathering a shard counts.
    from torch.distributed.tensor.debug import CommDebugMode

    model = make_model()
    shard(model)
    with CommDebugMode() as comms:
        next(model.parameters()).full_tensor()
    results["gather_collectives"] = comms.get_total_counts()
    results["step_in_backward"] = step_in_backward_errors(prebuilt, prebuilt_model)
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def job_fail(out: Path) -> None:
    """Rank 1 fails at its second step (TORCHSGD_TEST_FAILURE: ``raise`` an error, or ``hang`` without one);
    rank 0 goes on into DDP's collectives."""
    from torch.nn.parallel import DistributedDataParallel

    init_process_group(float(os.environ.get("TORCHSGD_TEST_PG_TIMEOUT", PG_TIMEOUT)))
    rank = torch.distributed.get_rank()
    (out / f"pid{rank}").write_text(str(os.getpid()))
    model = DistributedDataParallel(make_model())
    optimizer = torchsgd.SGD(model.parameters(), lr=LR, momentum=0.9)
    for step, (x, y) in enumerate(make_batches()):
        if rank == 1 and step == 1:
            if os.environ.get("TORCHSGD_TEST_FAILURE", "raise") == "hang":
                time.sleep(3600)  # alive, but never joins the next collective
            raise RuntimeError("rank 1 fails on purpose at step 1")
        loss_fn(model, x[rows(rank)], y[rows(rank)]).backward()
        optimizer.step()
        optimizer.zero_grad()
    (out / f"finished{rank}").write_text("the job should not have finished")


JOBS = {"train": job_train, "fail": job_fail}


def worker_main(argv: list[str]) -> int:
    torch.set_num_threads(1)  # both ranks share 2 cores; also what the single-process references use
    job, out = argv
    JOBS[job](Path(out))
    return 0


# --------------------------------------------------------------------------------------- the launcher side


def worker_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TORCHSGD_TEST_INIT", None)  # torchrun's ranks use env://
    return {**env, **extra}


def torchrun_command() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def run_bounded(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` (torchrun) in its own process group; past ``timeout`` kill the whole group, ranks
    included, and fail the test."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... did not end within {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def launch(
    job: str, out: Path, timeout: float, *, kill_on_failure: bool = True, **extra_env: str
) -> list[tuple[int | None, str]]:
    """Run ``job`` on WORLD worker processes of this file; return each rank's (exit status, output).

    The ranks meet through a FileStore in ``out`` (no port to race for). When one rank fails the others
    are killed (``kill_on_failure``), and at ``timeout`` seconds every rank still running is killed: its
    status is then None.
    """
    store = out / "store"
    store.unlink(missing_ok=True)
    procs = []
    for rank in range(WORLD):
        env = worker_env(RANK=str(rank), WORLD_SIZE=str(WORLD), TORCHSGD_TEST_INIT=f"file://{store}", **extra_env)
        log = open(out / f"log{rank}.txt", "w+")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, __file__, job, str(out)], env=env, stdout=log, stderr=subprocess.STDOUT
                ),
                log,
            )
        )
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
            if kill_on_failure and any(p.poll() not in (None, 0) for p, _ in procs):
                break
            time.sleep(0.05)
    finally:
        statuses = []
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
                statuses.append(None)
            else:
                statuses.append(p.returncode)
    outputs = []
    for (_, log), status in zip(procs, statuses):
        log.seek(0)
        outputs.append((status, log.read()))
        log.close()
    return outputs


def report(outputs: list[tuple[int | None, str]]) -> str:
    return "\n".join(f"--- rank {r}: exit {status}\n{text[-4000:]}" for r, (status, text) in enumerate(outputs))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """What each rank of one 'train' job wrote (one launch for all the comparison tests)."""
    out = tmp_path_factory.mktemp("distributed-train")
    outputs = launch("train", out, JOB_TIMEOUT)
    if any(status != 0 for status, _ in outputs):
        pytest.fail(f"the 2-rank training job failed:\n{report(outputs)}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@contextlib.contextmanager
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: reductions then split the same way
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def set_averaged_half_grads(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """The gradients DDP/FSDP2 reach on WORLD ranks, in one process: a backward pass on each rank's rows,
    then (g0 + g1) / WORLD, which is bitwise the all-reduced g0/2 + g1/2 for two ranks."""
    halves = []
    for rank in range(WORLD):
        model.zero_grad()
        loss_fn(model, x[rows(rank)], y[rows(rank)]).backward()
        halves.append([p.grad.clone() for p in model.parameters()])
    for p, (g0, g1) in zip(model.parameters(), zip(*halves)):
        p.grad = (g0 + g1) / WORLD


@functools.cache
def single_process(
    config: str, flag: str, how: str, library: str = "torchsgd"
) -> tuple[list[Tensor], list[Tensor | None]]:
    """One process, STEPS steps; ``how``: ``"halves"`` averages the gradients of the ranks' half batches
    as (g0 + g1) / 2, ``"full"`` runs one backward over the whole batch. Returns (params, buffers)."""
    with one_thread():
        model = make_model()
        optimizer = build_optimizer(library, config, flag, model.parameters())
        for x, y in make_batches():
            if how == "full":
                loss_fn(model, x, y).backward()
            else:
                set_averaged_half_grads(model, x, y)
            optimizer.step()
            optimizer.zero_grad()
        params = [p.detach().clone() for p in model.parameters()]
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in model.parameters()]
        return params, buffers


def assert_all_bitwise(actual: list, expected: list, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not bitwise_equal(a, e):
            detail = (
                ""
                if a is None or e is None
                else f", largest difference {(a.double() - e.double()).abs().max().item():.3g}"
            )
            pytest.fail(f"{what}: tensor {i} differs{detail}")


CASES = [
    pytest.param(mode, config, flag, id=f"{mode}-{config}-{flag}")
    for mode in MODES
    for config in CONFIGS
    for flag in FLAGS
]


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(("mode", "config", "flag"), CASES)
def test_same_bits_as_torch_under_the_same_setup(ranks, mode, config, flag):
    """torchsgd.SGD under DDP / FSDP2 / ZeRO ends on torch.optim.SGD's bits, on every rank."""
    for rank, results in enumerate(ranks):
        ours = results[run_key(mode, "torchsgd", config, flag)]
        theirs = results[run_key(mode, "torch", config, torch_flag(flag))]
        assert_all_bitwise(ours["params"], theirs["params"], f"rank {rank} parameters")
        if not mode.startswith("zero") or rank == 0:  # ZeRO consolidates the state on rank 0
            assert_all_bitwise(ours["buffers"], theirs["buffers"], f"rank {rank} momentum buffers")
            assert ours["buffer_layouts"] == theirs["buffer_layouts"]
    # the replicas agree: both ranks hold the same (full) parameters
    assert_all_bitwise(
        ranks[1][run_key(mode, "torchsgd", config, flag)]["params"],
        ranks[0][run_key(mode, "torchsgd", config, flag)]["params"],
        "rank 1 vs rank 0",
    )


@pytest.mark.parametrize(("mode", "config", "flag"), CASES)
def test_same_trajectory_as_one_process_on_the_full_batch(ranks, mode, config, flag):
    """Bitwise one process that averages the two half-batch gradients in DDP's order; within
    FULL_BATCH_BOUND of one process that runs a single backward over the full batch."""
    ours = ranks[0][run_key(mode, "torchsgd", config, flag)]
    halves_params, halves_buffers = single_process(config, flag, "halves")
    assert_all_bitwise(ours["params"], halves_params, "parameters vs one process, averaged half batches")
    # (ZeRO's buffers: the state consolidated on rank 0)
    assert_all_bitwise(ours["buffers"], halves_buffers, "momentum buffers vs one process, averaged half batches")

    full_params, _ = single_process(config, flag, "full")
    initial = list(make_model().parameters())
    for i, (a, e, p0) in enumerate(zip(ours["params"], full_params, initial)):
        assert (a - e).abs().max().item() <= FULL_BATCH_BOUND, f"tensor {i} beyond the full-batch bound"
        assert (e - p0).abs().max().item() > 100 * FULL_BATCH_BOUND, "training barely moved: the bound says nothing"


def test_one_process_references_are_torchs():
    """The single-process references the distributed runs are held to are themselves torch's numbers."""
    for config in CONFIGS:
        for how in ("halves", "full"):
            ours = single_process(config, "default", how)
            theirs = single_process(config, "foreach=False", how, library="torch")
            assert_all_bitwise(ours[0], theirs[0], f"{config} {how} parameters")
            assert_all_bitwise(ours[1], theirs[1], f"{config} {how} buffers")


@pytest.mark.parametrize("flag", list(FLAGS))
def test_fsdp2_steps_on_local_shards(ranks, flag):
    """Under fully_shard every engine flag updates the local shards with no collective in step(), and the
    momentum buffers are DTensors sharded exactly like torch's (and like the parameters)."""
    expected_engines = {
        "foreach=False": ["reference"],
        "foreach=True": ["foreach"],
        # the native kernel steps a DTensor group through its plain local tensors (engines/fused.py)
        "fused=True": ["fused"],
        "default": ["fused"],
    }[flag]
    assert ranks[0]["gather_collectives"] > 0  # the counter does see a gather
    for rank, results in enumerate(ranks):
        for config in CONFIGS:
            ours = results[run_key("fsdp2", "torchsgd", config, flag)]
            theirs = results[run_key("fsdp2", "torch", config, torch_flag(flag))]
            assert ours["engines"] == expected_engines
            assert ours["fallback_reason"] is None
            assert ours["step_collectives"] == 0 == theirs["step_collectives"]
            assert all(p[0] == "DTensor" and p[1] == ("Shard(dim=0)",) for p in ours["param_layouts"])
            assert ours["buffer_layouts"] == theirs["buffer_layouts"]
            if CONFIGS[config].get("momentum"):
                # each buffer is a DTensor laid out as its parameter: its local shard, no gathered copy
                assert ours["buffer_layouts"] == ours["param_layouts"]
                local_rows = [layout[2][0] for layout in ours["buffer_layouts"]]
                assert local_rows == ([8, 8, 4, 4] if rank == 0 else [8, 8, 3, 3])
            else:
                assert ours["buffer_layouts"] == [None] * 4


@pytest.mark.parametrize("mode", ["ddp", "ddp-bucket-view", "zero", "zero-bucket-view"])
def test_plain_tensors_keep_their_engine_under_ddp_and_zero(ranks, mode):
    """DDP's (and its bucket views') and ZeRO's parameters are plain CPU tensors: the fused engine's native
    kernel takes them itself, and the other flags run their own engine."""
    expected = {
        "foreach=False": ["reference"],
        "foreach=True": ["foreach"],
        "fused=True": ["fused"],
        "default": ["fused"],
    }
    for results in ranks:
        for config in CONFIGS:
            for flag, engines in expected.items():
                assert results[run_key(mode, "torchsgd", config, flag)]["engines"] == engines, (config, flag)


@pytest.mark.parametrize(("config", "flag"), RESUME_CASES, ids=[f"{c}-{f}" for c, f in RESUME_CASES])
def test_fsdp2_checkpoint_resume_is_the_uninterrupted_trajectory(ranks, config, flag):
    """Saved after RESUME_AT steps through torch.distributed.checkpoint, loaded into a new model (other
    initial weights) and optimizer, trained to STEPS: bitwise the uninterrupted run, on every rank. So is
    the job that saved and went on training (saving ran no step that moved anything)."""
    for rank, results in enumerate(ranks):
        resumed = results[f"resume|{config}|{flag}"]
        uninterrupted = results[run_key("fsdp2", "torchsgd", config, flag)]
        assert_all_bitwise(resumed["saver"]["params"], uninterrupted["params"], f"rank {rank} saver's parameters")
        assert_all_bitwise(resumed["saver"]["buffers"], uninterrupted["buffers"], f"rank {rank} saver's buffers")
        assert_all_bitwise(resumed["params"], uninterrupted["params"], f"rank {rank} parameters")
        assert_all_bitwise(resumed["buffers"], uninterrupted["buffers"], f"rank {rank} momentum buffers")
        assert resumed["loaded_buffer_layouts"] == uninterrupted["buffer_layouts"]  # loaded as sharded DTensors


def test_fsdp2_low_precision_momentum_and_clipping(ranks):
    """momentum_dtype works on the shards (bitwise one process, averaged half batches); max_grad_norm clips
    by the global norm over all shards (bitwise torch's clip_grad_norm_ then torch's step)."""
    nesterov = CONFIGS["nesterov"]
    with one_thread():
        model = make_model()
        reference = torchsgd.SGD(model.parameters(), lr=LR, momentum_dtype=torch.bfloat16, **nesterov)
        for x, y in make_batches():
            set_averaged_half_grads(model, x, y)
            reference.step()
            reference.zero_grad()
    expected_params = [p.detach() for p in model.parameters()]
    expected_buffers = [reference.state[p]["momentum_buffer"] for p in model.parameters()]
    for rank, results in enumerate(ranks):
        extras = results["fsdp2_extras"]
        low = extras["momentum_dtype"]
        assert_all_bitwise(low["params"], expected_params, f"rank {rank} momentum_dtype parameters")
        assert_all_bitwise(low["buffers"], expected_buffers, f"rank {rank} bfloat16 momentum buffers")
        assert all(b[0] == "DTensor" and b[3] == "torch.bfloat16" for b in low["buffer_layouts"])

        clipped, theirs = extras["max_grad_norm"], extras["torch_clipped"]
        assert_all_bitwise(clipped["params"], theirs["params"], f"rank {rank} clipped parameters")
        assert_all_bitwise(clipped["buffers"], theirs["buffers"], f"rank {rank} clipped momentum buffers")
        assert clipped["last_grad_norm"].item() > CLIP  # the clip was active
        assert not all(
            bitwise_equal(a, b)
            for a, b in zip(clipped["params"], results[run_key("fsdp2", "torchsgd", "nesterov", "default")]["params"])
        )


def test_step_in_backward_is_refused_under_data_parallelism(ranks):
    for results in ranks:
        errors = results["step_in_backward"]
        assert (
            errors["construct"] is not None
            and "step_in_backward cannot run under torch.distributed" in errors["construct"]
        )
        # built before init_process_group: refused at its first update instead of stepping on local gradients
        assert (
            errors["backward"] is not None
            and "step_in_backward cannot run under torch.distributed" in errors["backward"]
        )
    # and without a process group it is accepted (the refusal is about the process group, nothing else)
    torchsgd.SGD(make_model().parameters(), lr=LR, momentum=0.9, step_in_backward=True)


# --------------------------------------------------------------------------------------------- failures


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:  # a zombie (exited, unreaped) is not running
        return f.read().split(") ", 1)[1][0] != "Z"
    return True


TORCHRUN_FAILURE_BOUND = 60  # seconds from launch to torchrun's exit when a rank fails (measured 4-9 s)


def torchrun_fail_job(out: Path, failure: str, pg_timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = run_bounded(
        [
            *torchrun_command(),
            "--standalone",
            "--nproc-per-node",
            str(WORLD),
            "--monitor-interval",
            "0.2",
            __file__,
            "fail",
            str(out),
        ],
        worker_env(TORCHSGD_TEST_FAILURE=failure, TORCHSGD_TEST_PG_TIMEOUT=str(pg_timeout)),
        TORCHRUN_FAILURE_BOUND,
    )
    return done, time.monotonic() - start


def assert_every_rank_gone(out: Path) -> None:
    assert not list(out.glob("finished*")), "a rank ran to the end"
    for rank in range(WORLD):
        assert not alive(int((out / f"pid{rank}").read_text())), f"rank {rank} is still running"


def test_a_failing_rank_ends_the_torchrun_job(tmp_path):
    """Rank 1 raises: torchrun's agent sees it exit, stops rank 0 (blocked in DDP's all-reduce, or failing
    on the closed connection) and exits non-zero with a summary whose root cause is rank 1."""
    done, elapsed = torchrun_fail_job(tmp_path, "raise", PG_TIMEOUT)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "RuntimeError: rank 1 fails on purpose at step 1" in text
    assert "ChildFailedError" in text
    assert re.search(r"Root Cause \(first observed failure\):\n\[0\]:\n(.*\n){2}\s*rank\s*: 1 ", text), text[-3000:]
    assert_every_rank_gone(tmp_path)
    assert elapsed < TORCHRUN_FAILURE_BOUND


def test_a_hanging_rank_ends_the_torchrun_job_by_the_gloo_timeout(tmp_path):
    """Rank 1 hangs without failing: rank 0's collective times out after the process group's timeout (5 s
    here), rank 0 exits with gloo's timeout error, and the agent then stops the hanging rank 1."""
    done, elapsed = torchrun_fail_job(tmp_path, "hang", 5)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert re.search(r"[Tt]imed out", text), text[-3000:]
    assert re.search(r"Root Cause \(first observed failure\):\n\[0\]:\n(.*\n){2}\s*rank\s*: 0 ", text), text[-3000:]
    assert_every_rank_gone(tmp_path)
    assert 5 <= elapsed < TORCHRUN_FAILURE_BOUND


def test_a_failing_rank_ends_its_peer_without_a_launcher(tmp_path):
    """With no launcher to stop it, the surviving rank still ends on its own within the process group's
    timeout: gloo fails the all-reduce (the peer's connection closed, or the timeout) and it exits non-zero."""
    pg_timeout = 10
    start = time.monotonic()
    outputs = launch(
        "fail", tmp_path, timeout=pg_timeout + 30, kill_on_failure=False, TORCHSGD_TEST_PG_TIMEOUT=str(pg_timeout)
    )
    elapsed = time.monotonic() - start
    (status0, text0), (status1, text1) = outputs
    assert status1 not in (None, 0) and "RuntimeError: rank 1 fails on purpose at step 1" in text1
    assert status0 is not None, f"rank 0 hung until it was killed:\n{report(outputs)}"
    assert status0 != 0 and re.search(r"Connection closed by peer|Connection reset|Timed out|timed out", text0), report(
        outputs
    )
    assert_every_rank_gone(tmp_path)
    assert elapsed < pg_timeout + 30


# ------------------------------------------------------------------------------------------------ the demo

DEMO_ARGS = ["--epochs", "1", "--train-samples", "96", "--optimizers", "torch,torchsgd,torchsgd-momentum"]


def demo_rows(text: str) -> dict[str, list[str]]:
    """The table's rows by optimizer name: [test acc, train loss, step ms, state KiB, peak RSS]."""
    table = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 6 and cells[0] in ("torch", "torchsgd", "torchsgd-momentum"):
            table[cells[0]] = cells[1:]
    return table


def test_torchrun_demo_distributed_prints_the_single_process_table(tmp_path, capsys, monkeypatch):
    """``torchrun --standalone --nproc-per-node 2 -m torchsgd demo --distributed``: DDP over 2 ranks; rank 0
    alone prints the demo's table, torchsgd = torch bitwise under DDP, and the numbers are the single-process
    demo's up to the last printed digit of the loss."""
    from torchsgd.cli.main import main

    env = worker_env(COLUMNS="120")
    command = [
        *torchrun_command(),
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        "-m",
        "torchsgd",
        "demo",
        "--distributed",
    ]
    done = run_bounded([*command, *DEMO_ARGS, "--out", str(tmp_path / "ddp")], env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("digits, small convnet") == 1  # one table: rank 0's
    assert out.count("identical: yes (torchsgd = torch") == 1
    assert "data-parallel: DistributedDataParallel over 2 ranks (gloo, CPU)" in out
    assert (tmp_path / "ddp" / "loss_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    distributed = demo_rows(out)
    assert list(distributed) == ["torch", "torchsgd", "torchsgd-momentum"]

    monkeypatch.setenv("COLUMNS", "120")
    assert main(["demo", *DEMO_ARGS, "--out", str(tmp_path / "single")]) == 0
    single = demo_rows(capsys.readouterr().out)
    assert list(single) == list(distributed)
    for name, (accuracy, loss, _, state, _) in single.items():
        d_accuracy, d_loss, _, d_state, _ = distributed[name]
        assert (d_accuracy, d_state) == (accuracy, state), name
        assert abs(float(d_loss) - float(loss)) <= 2e-4, name  # the full-batch rounding bound, printed


def test_demo_distributed_without_torchrun_is_a_clear_error(capsys, monkeypatch, tmp_path):
    from torchsgd.cli.main import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    code = main(["demo", "--distributed", "--epochs", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("torchsgd demo: error: --distributed: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set")
    assert "torchrun --standalone --nproc-per-node 2 -m torchsgd demo --distributed" in err
    assert not torch.distributed.is_initialized()


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
