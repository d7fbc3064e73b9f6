"""The Triton engine under Triton's interpreter, against the reference engine; and how engines are chosen.

TRITON_INTERPRET=1 is set here, at import, before torchsgd loads its Triton kernels (it does so lazily, at
the engine's first use, and nothing else imports them): the kernels are then defined as interpreted
functions that run on CPU tensors. (On a machine with a GPU this also turns the engine off for CUDA
groups in the same process, visibly: run tests/test_cuda.py in a process of its own there.) The module-level check below fails the whole file, rather than letting
it pass on a fallback, if they were defined otherwise; every numeric test also checks that the kernel
launched and that the group's report says "triton".

Every comparison is against the reference engine (torch.optim.SGD(foreach=False) arithmetic, run by
torchsgd with TORCHSGD_ENGINE=reference or by torch itself), never the kernel against itself.
float32/float64 must be bitwise, and so must everything lifted (momentum_dtype, stochastic rounding):
those compute in float32 on both sides. float16/bfloat16 with torch's rounding hold the per-step bound
the fused CPU kernel holds (4 ulps of the step's operands; torch's own scalar tail rounds differently
from its vector body) and are bitwise the CPU kernel's numbers, whose arithmetic the kernel follows.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchsgd
from helpers import KERNEL_OPTIONS, assert_bitwise, grads_for, make_params, recorded_ops, resynchronise
from torchsgd.engines import FOREACH, FUSED, REFERENCE, TRITON, select_engine
from torchsgd.engines import triton as triton_engine
from torchsgd.engines.base import OVERLAP_REASON
from torchsgd.engines.build import native_module
from torchsgd.rules.rounding import BUFFER, element_hash, stochastic_round, stream_key
from torchsgd.rules.sgd import Rounding, SGDHyper

# (Nothing above imports Triton or defines a kernel: torchsgd loads its kernels at their first use.) The
# variable stays set for the whole process: Triton's own modules, imported lazily when a kernel launches,
# check it against the kernels they meet.
os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined (see the docstring)

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("Triton is not installed: make setup installs the cuda extra", allow_module_level=True)

KERNELS = triton_engine.kernels()
assert KERNELS is not None, f"the Triton kernels did not load: {triton_engine.triton_failure()}"
assert KERNELS.INTERPRETED, (
    "the Triton kernels were defined before TRITON_INTERPRET=1 was set, so they cannot run on CPU tensors "
    "and these tests would only exercise the fallback"
)

OPTIONS = [*KERNEL_OPTIONS, dict(momentum=0.9, weight_decay=0.05, decoupled_weight_decay=True)]
SHAPES = [(), (0,), (1,), (67,), (5, 3), (33, 17), (4, 3, 2), (1100,)]
LOW = (torch.float16, torch.bfloat16)


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "plain"


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    x = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(x))) * info.eps


def run(engine: str, monkeypatch, init, grads, optimizer=torchsgd.SGD, groups=None, **options):
    """Params (and the optimizer) after the steps, with the engine forced by TORCHSGD_ENGINE."""
    monkeypatch.setenv("TORCHSGD_ENGINE", engine)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    if groups is None:
        opt = optimizer(params, **options)
    else:
        opt = optimizer([{"params": [params[i] for i in idx], **extra} for idx, extra in groups], **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


def assert_ran_triton(opt) -> None:
    for entry in opt.engine_report():
        assert entry["ran"] in ("triton", None), f"a group left the Triton kernel: {entry}"


def assert_same_runs(ours, theirs, what: str) -> None:
    (params, opt), (ref_params, ref) = ours, theirs
    for i, (a, b) in enumerate(zip(params, ref_params)):
        assert_bitwise(a, b, f"{what}: parameter {i}")
        if "momentum_buffer" in ref.state.get(b, {}):
            assert_bitwise(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"], f"{what}: buffer {i}")
        elif "momentum_codes" in ref.state.get(b, {}):  # 8-bit momentum (tests/test_triton_int8.py has more)
            for key in ("momentum_codes", "momentum_scales"):
                assert_bitwise(opt.state[a][key], ref.state[b][key], f"{what}: {key} {i}")
        else:
            assert "momentum_buffer" not in opt.state.get(a, {}), f"{what}: parameter {i} has a buffer"


# --------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_reference(monkeypatch, options, dtype):
    """float32/float64, every option, 0-d, empty and odd sizes, first steps: bitwise the reference."""
    init, grads = make_params(SHAPES, dtype), grads_for(SHAPES, dtype, steps=6)
    launches = TRITON.launches
    ours = run("triton", monkeypatch, init, grads, lr=0.05, **options)
    theirs = run("reference", monkeypatch, init, grads, lr=0.05, **options)
    assert TRITON.launches > launches
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"{dtype} {options}")


def test_bitwise_torch_over_120_steps(monkeypatch):
    """120 steps of Nesterov momentum with weight decay, against torch.optim.SGD(foreach=False) itself."""
    shapes = [(), (67,), (33, 17)]
    init, grads = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=120)
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    params, opt = run("triton", monkeypatch, init, grads, **options)
    assert_ran_triton(opt)
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    ref = torch.optim.SGD(theirs, foreach=False, **options)
    for step_grads in grads:
        for p, g in zip(theirs, step_grads):
            p.grad = g.clone()
        ref.step()
    assert_same_runs((params, opt), (theirs, ref), "120 steps")


def test_pieces_of_a_tensor(monkeypatch):
    """Tensors split over several table rows and several blocks per row (small CHUNK and BLOCK here)."""
    monkeypatch.setattr(triton_engine, "CHUNK", 200)
    monkeypatch.setattr(triton_engine, "BLOCK", 64)
    shapes = [(1000,), (7, 61), (199,), (200,), (201,)]
    for dtype in (torch.float32, torch.bfloat16):
        init, grads = make_params(shapes, dtype), grads_for(shapes, dtype, steps=3)
        options = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
        ours = run("triton", monkeypatch, init, grads, **options)
        theirs = run("fused" if dtype in LOW else "reference", monkeypatch, init, grads, **options)
        assert_ran_triton(ours[1])
        assert_same_runs(ours, theirs, f"pieces {dtype}")


@pytest.mark.parametrize("options", [o for o in OPTIONS if not o.get("decoupled_weight_decay")], ids=option_id)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_half_precision_within_bound_per_step(monkeypatch, options, dtype):
    """float16/bfloat16 with torch's rounding: per step, within 4 ulps of the step's operands of the
    reference, and at most 2% of the elements differ (torch's scalar tail elements)."""
    shapes = [(67,), (5, 3), (40, 40), (1,), ()]
    init = make_params(shapes, dtype, seed=3)
    generator = torch.Generator().manual_seed(2)
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torchsgd.SGD(ours, lr=0.05, **options)
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **options)
    differing = total = 0
    for _ in range(4):
        resynchronise(opt, ref, ours, theirs)  # the bound is per step
        before = [b.detach().clone() for b in theirs]
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=generator, dtype=torch.float64).to(dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert_ran_triton(opt)
        for a, b, old in zip(ours, theirs, before):
            scale = torch.stack([old.double().abs(), b.double().abs(), a.double().abs(), b.grad.double().abs()]).amax(0)
            assert ((a.double() - b.double()).abs() <= 4 * ulp(scale, dtype)).all()
            differing += int((a != b).sum())
            total += a.numel()
    assert differing <= 0.02 * total, f"{differing} of {total} elements differ from torch's loop"


@pytest.mark.skipif(native_module() is None, reason="the native CPU kernel could not be built here")
@pytest.mark.parametrize("options", OPTIONS[2:6], ids=option_id)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_half_precision_bitwise_cpu_kernel(monkeypatch, options, dtype):
    """float16/bfloat16 with torch's rounding are bitwise the native CPU kernel (the same arithmetic)."""
    init, grads = make_params(SHAPES, dtype), grads_for(SHAPES, dtype, steps=4)
    ours = run("triton", monkeypatch, init, grads, lr=0.05, **options)
    theirs = run("fused", monkeypatch, init, grads, lr=0.05, **options)
    assert_ran_triton(ours[1])
    assert theirs[1].engine_report()[0]["ran"] == "fused"
    assert_same_runs(ours, theirs, f"{dtype} {options} vs the CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_late_gradients_and_several_groups(monkeypatch, dtype):
    """Parameters whose first gradient arrives late start their buffer then; groups with their own options."""
    init = make_params(SHAPES, dtype)
    grads = grads_for(SHAPES, dtype, steps=5, late=(2, 5))
    for step in (3,):  # a parameter without a gradient on a later step too
        grads[step][3] = None
    groups = [
        ([0, 1, 2, 3], dict(momentum=0.9, weight_decay=0.1)),
        ([4, 5], dict(momentum=0.5, nesterov=True)),
        ([6, 7], dict(lr=0.2)),
    ]
    engine = "reference" if dtype == torch.float32 else "fused"
    ours = run("triton", monkeypatch, init, grads, groups=groups, lr=0.05)
    theirs = run(engine, monkeypatch, init, grads, groups=groups, lr=0.05)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"late gradients {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipping_in_the_step(monkeypatch, dtype):
    """max_grad_norm: the clip coefficient (a 0-d tensor) is read by the kernel."""
    init, grads = make_params(SHAPES, dtype), grads_for(SHAPES, dtype, steps=4)
    options = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, max_grad_norm=0.5)
    ours = run("triton", monkeypatch, init, grads, **options)
    theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"clipping {dtype}")


@pytest.mark.parametrize("options", [dict(), dict(trust_clip=True, nesterov=True, weight_decay=1e-3)], ids=option_id)
def test_lars_trust_ratios(monkeypatch, options):
    shapes = [(67,), (5, 3), (33, 17)]
    init, grads = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=4)
    ours = run("triton", monkeypatch, init, grads, optimizer=torchsgd.LARS, lr=0.1, exclude_1d=False, **options)
    theirs = run("reference", monkeypatch, init, grads, optimizer=torchsgd.LARS, lr=0.1, exclude_1d=False, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"LARS {options}")


def test_sgdw(monkeypatch):
    init, grads = make_params(SHAPES, torch.float32), grads_for(SHAPES, torch.float32, steps=4)
    ours = run("triton", monkeypatch, init, grads, optimizer=torchsgd.SGDW, lr=0.05, momentum=0.9, weight_decay=0.1)
    theirs = run(
        "reference", monkeypatch, init, grads, optimizer=torchsgd.SGDW, lr=0.05, momentum=0.9, weight_decay=0.1
    )
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, "SGDW")


def _forbid_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the step read a tensor on the host (a device synchronisation)")

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("decoupled", [False, True])
def test_tensor_hyperparameters_without_host_reads(monkeypatch, decoupled):
    """A Tensor lr, weight decay and clip coefficient are read by the kernel: no .item() in the step."""
    shapes = [(), (67,), (5, 3)]
    init, (grads,) = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=1)
    results = []
    for engine, tensors in ((TRITON, True), (REFERENCE, False)):
        lr, wd, clip = torch.tensor(0.05), torch.tensor(0.01), torch.tensor(0.7, dtype=torch.float64)
        hyper = SGDHyper(
            lr=lr if tensors else lr.item(),
            momentum=0.9,
            weight_decay=wd if tensors else wd.item(),
            nesterov=True,
            decoupled_weight_decay=decoupled,
            clip_coefficient=clip,
        )
        params = [p.clone() for p in init]
        buffers: list = [None] * len(params)
        for _ in range(2):  # the first step creates buffers; the second updates them
            with monkeypatch.context() as patch:
                if engine is TRITON:
                    _forbid_host_reads(patch)
                engine.step(params, [g.clone() for g in grads], buffers, hyper)
        results.append((params, buffers))
    (params, buffers), (ref_params, ref_buffers) = results
    for i in range(len(shapes)):
        assert_bitwise(params[i], ref_params[i], f"parameter {i}")
        assert_bitwise(buffers[i], ref_buffers[i], f"buffer {i}")


def test_zero_tensor_weight_decay_leaves_gradients_alone(monkeypatch):
    """A Tensor weight decay of 0 is found 0 in the kernel: no decay term (torch skips it, so -0.0 stays)."""
    params = [torch.tensor([1.0, float("inf"), -2.0])]
    grads = [torch.tensor([-0.0, 1.0, 0.5])]
    buffers = [None]
    TRITON.step(params, grads, buffers, SGDHyper(lr=torch.tensor(0.1), momentum=0.9, weight_decay=torch.tensor(0.0)))
    assert_bitwise(buffers[0], torch.tensor([-0.0, 1.0, 0.5]), "the first buffer")
    assert_bitwise(params[0], torch.tensor([1.0, float("inf"), -2.05]), "the parameter")


def test_no_arithmetic_or_large_allocation_in_torch(monkeypatch):
    """After the first step the kernel does the work: torch does no arithmetic and makes nothing larger than the
    launch tables (the smallest parameter here is larger than a table)."""
    shapes = [(67,), (50, 3), (300,)]
    init, grads = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=2)
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torchsgd.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()

    for p, g in zip(params, grads[1]):
        p.grad = g
    with recorded_ops() as seen:
        opt.step()
    assert_ran_triton(opt)
    arithmetic = [name for name, _ in seen if any(op in name for op in ("add", "mul", "lerp", "neg", "div"))]
    assert not arithmetic, f"torch did arithmetic in the step: {arithmetic}"
    # (The interpreter's own views of the tables' storages are listed too; they are as large as the tables.)
    largest = max((n for _, n in seen), default=0)
    table_bytes = 8 * 8 * len(shapes)  # a row of eight int64 per tensor
    assert largest <= table_bytes, f"the step touched a tensor of {largest} bytes: {seen}"


# --------------------------------------------------------------------------- the lifted storage


ROUNDING_CASES = [
    pytest.param(torch.bfloat16, dict(stochastic_rounding=True), id="bf16-sr"),
    pytest.param(torch.float16, dict(stochastic_rounding=True), id="fp16-sr"),
    pytest.param(
        torch.bfloat16, dict(stochastic_rounding=True, momentum_dtype=torch.float32), id="bf16-sr-fp32-momentum"
    ),
    pytest.param(torch.float32, dict(momentum_dtype=torch.bfloat16), id="fp32-bf16-momentum"),
    pytest.param(
        torch.float32, dict(momentum_dtype=torch.float16, stochastic_rounding=True), id="fp32-fp16-sr-momentum"
    ),
    pytest.param(torch.bfloat16, dict(momentum_dtype=torch.bfloat16), id="bf16-nearest"),
    pytest.param(
        torch.float16, dict(momentum_dtype=torch.bfloat16, stochastic_rounding=True), id="fp16-sr-bf16-momentum"
    ),
]


def _no_python_rounding(monkeypatch):
    """Make the Python rounding path fail, so a pass proves the kernel rounded."""
    import torchsgd.engines.base as base

    def refuse(*args, **kwargs):
        raise AssertionError("the lifted step rounded in Python, not in the kernel")

    monkeypatch.setattr(base, "round_to_dtype", refuse)


@pytest.mark.parametrize(("dtype", "rounding"), ROUNDING_CASES)
def test_lifted_storage_bitwise_reference(monkeypatch, dtype, rounding):
    """momentum_dtype and stochastic rounding in the kernel: bitwise the reference's lifted path, noise included."""
    init = make_params(SHAPES, dtype)
    grads = grads_for(SHAPES, dtype, steps=4, late=(3,))
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, seed=1234, **rounding)
    with monkeypatch.context() as patch:
        _no_python_rounding(patch)
        ours = run("triton", patch, init, grads, **options)
    theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"{dtype} {rounding}")


@pytest.mark.skipif(native_module() is None, reason="the native CPU kernel could not be built here")
@pytest.mark.parametrize(("dtype", "rounding"), ROUNDING_CASES[:3])
def test_stochastic_rounding_bits_equal_cpu_kernel(monkeypatch, dtype, rounding):
    """The same noise on every device: the Triton kernel's stores are the native CPU kernel's, bit for bit."""
    init, grads = make_params(SHAPES, dtype), grads_for(SHAPES, dtype, steps=3)
    options = dict(lr=0.05, momentum=0.9, seed=99, **rounding)
    ours = run("triton", monkeypatch, init, grads, **options)
    theirs = run("fused", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert theirs[1].engine_report()[0]["ran"] == "fused"
    assert_same_runs(ours, theirs, f"{dtype} {rounding} vs the CPU kernel")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_first_buffer_is_stochastic_round_of_the_gradient(dtype):
    """A first-step buffer is SR(g) with the BUFFER noise of (seed, step, index): rules/rounding.py's bits."""
    g = torch.randn(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float32) * 1e-3
    params, buffers = [torch.zeros(3000)], [None]
    rounding = Rounding(momentum_dtype=dtype, stochastic_rounding=True, seed=7, step=11)
    TRITON.step_rounded(params, [g.clone()], buffers, SGDHyper(lr=0.0, momentum=0.9, rounding=rounding), None, [4])
    expected = stochastic_round(g, dtype, stream_key(7, 11, 4), BUFFER)
    assert_bitwise(buffers[0], expected, "the first buffer")
    assert not torch.equal(expected, g.to(dtype)), "the noise changed nothing: the test would not see wrong bits"


def test_hash_matches_rounding_module_across_the_32_bit_wrap():
    """The kernel's element hash is element_hash's, for indices past 2^32 (they wrap as the CPU kernel's)."""
    import triton
    import triton.language as tl

    @triton.jit
    def hash_kernel(out, start, key, BLOCK: tl.constexpr):
        index = (start + tl.arange(0, BLOCK)).to(tl.uint32)
        tl.store(out + tl.arange(0, BLOCK), KERNELS._hash(index, key.to(tl.uint32)).to(tl.int64))

    for start, key in ((0, 0), (2**32 - 40, 0xDEADBEEF), (5 * 2**32 + 3, stream_key(1, 2, 3))):
        out = torch.empty(64, dtype=torch.int64)
        hash_kernel[(1,)](out, start, key, BLOCK=64)
        assert torch.equal(out, element_hash(key, 64, start=start)), (start, key)


# -------------------------------------------------------------------------------------- the sweep


def _examples() -> int:
    # The interpreter runs Python per program: a fraction of the profile's examples (ci 60 -> 20; fuzz 3000 -> 300).
    return max(10, settings.default.max_examples // (3 if settings.default.max_examples <= 100 else 10))


@settings(max_examples=_examples())
@given(
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    shapes=st.lists(
        st.sampled_from([(), (0,), (1,), (2,), (31,), (64,), (65,), (3, 5), (2, 0, 3), (130,)]), min_size=1, max_size=5
    ),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.3]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.3]),
    decoupled=st.booleans(),
    maximize=st.booleans(),
    clip=st.sampled_from([None, 0.3, 100.0]),
    rounding=st.sampled_from([None, "sr", "bf16-momentum", "int8-momentum"]),
    steps=st.integers(1, 3),
    late=st.sets(st.integers(0, 4), max_size=2),
)
def test_fuzz_triton_against_reference(
    dtype, shapes, momentum, dampening, nesterov, weight_decay, decoupled, maximize, clip, rounding, steps, late
):
    """Random options, sizes, dtypes and late gradients: bitwise the reference where both compute in float32
    or float64 (torch's rounding of float32/float64, and every lifted storage); float16/bfloat16 with torch's
    rounding within the per-step bound (4 ulps of the step's operands, checked after one step from the same state)."""
    nesterov = nesterov and momentum != 0 and dampening == 0
    options = dict(
        lr=0.05,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled,
        maximize=maximize,
        max_grad_norm=clip,
    )
    if rounding is not None and dtype == torch.float64:
        rounding = None
    if rounding == "sr":
        if dtype not in LOW:
            return
        options.update(stochastic_rounding=True, seed=5)
    elif rounding == "bf16-momentum":
        options.update(momentum_dtype=torch.bfloat16)
    elif rounding == "int8-momentum":
        # (Stochastically, codes included, where maximize is drawn: another draw would thin the others.)
        options.update(momentum_dtype=torch.int8, stochastic_rounding=maximize, seed=5)
    bounded = dtype in LOW and rounding is None
    steps = 1 if bounded else steps
    init = make_params(shapes, dtype)
    grads = grads_for(shapes, dtype, steps, late={i for i in late if i < len(shapes)} if not bounded else ())
    with pytest.MonkeyPatch.context() as monkeypatch:
        ours = run("triton", monkeypatch, init, grads, **options)
        theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    if not bounded:
        assert_same_runs(ours, theirs, f"{dtype} {options}")
        return
    for i, (a, b) in enumerate(zip(ours[0], theirs[0])):
        scale = torch.stack(
            [init[i].double().abs(), a.double().abs(), b.double().abs(), grads[0][i].double().abs()]
        ).amax(0)
        if b.numel():
            assert ((a.double() - b.double()).abs() <= 4 * ulp(scale, dtype) * (1 + 10 * weight_decay)).all(), i


# --------------------------------------------------------------------------------- choosing engines


def group(params=None, **flags):
    base = dict(params=params or [torch.zeros(2)], differentiable=False, foreach=None, fused=None)
    return {**base, **flags}


def test_engine_variable_forces_every_group(monkeypatch):
    for name, engine in (("reference", REFERENCE), ("foreach", FOREACH), ("fused", FUSED), ("triton", TRITON)):
        monkeypatch.setenv("TORCHSGD_ENGINE", name)
        for flags in (dict(), dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
            assert select_engine(group(**flags)) is engine, (name, flags)
        assert select_engine(group(differentiable=True)) is REFERENCE  # autograd through the step needs it
    monkeypatch.setenv("TORCHSGD_ENGINE", "")
    assert select_engine(group()) is FUSED


def test_engine_variable_bad_value_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TORCHSGD_ENGINE", "cuda-fast")
    with pytest.raises(
        ValueError, match=r"TORCHSGD_ENGINE='cuda-fast' names no engine.*reference, foreach, fused, triton"
    ):
        select_engine(group())
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torchsgd.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="TORCHSGD_ENGINE"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))


def test_cuda_groups_select_triton(monkeypatch):
    """(CUDA tensors cannot be made here: the group's device type is what is simulated.)"""
    monkeypatch.delenv("TORCHSGD_ENGINE", raising=False)
    monkeypatch.setattr(triton_engine, "device_type", lambda g: "cuda")
    assert select_engine(group()) is TRITON
    assert select_engine(group(fused=True)) is TRITON
    assert select_engine(group(foreach=True)) is FOREACH
    assert select_engine(group(fused=False)) is FOREACH
    assert select_engine(group(foreach=False)) is REFERENCE
    assert select_engine(group(differentiable=True)) is REFERENCE
    monkeypatch.undo()
    assert select_engine(group()) is FUSED


def _simulate_missing_triton(monkeypatch):
    monkeypatch.setattr(triton_engine, "_kernels", None)
    monkeypatch.setattr(triton_engine, "_failure", "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(triton_engine, "_logged_unavailable", False)


def test_without_triton_cuda_groups_run_foreach_and_one_line_says_why(monkeypatch, caplog):
    monkeypatch.delenv("TORCHSGD_ENGINE", raising=False)
    _simulate_missing_triton(monkeypatch)
    monkeypatch.setattr(triton_engine, "device_type", lambda g: "cuda")
    params = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    opt = torchsgd.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, momentum=0.9)
    with caplog.at_level(logging.INFO, logger="torchsgd"):
        for _ in range(3):
            for p in params:
                p.grad = torch.ones(4)
            opt.step()
    for entry in opt.engine_report():
        assert entry["selected"] == "triton" and entry["ran"] == "foreach", entry
        assert "triton is not importable" in entry["reason"] and "torchsgd[cuda]" in entry["reason"]
    lines = [r for r in caplog.records if r.name == "torchsgd"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "CUDA param groups run the multi-tensor engine (foreach)" in lines[0].getMessage()
    assert "No module named 'triton'" in lines[0].getMessage()
    for p in params:  # and the numbers are the reference's
        assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.1 * (1 + 1.9 + 2.71)))


def test_forced_triton_on_cpu_without_interpreter_falls_back_visibly(monkeypatch):
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    monkeypatch.setattr(KERNELS, "INTERPRETED", False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torchsgd.SGD([p], lr=0.1, momentum=0.9)
    launches = TRITON.launches
    opt.step()
    (entry,) = opt.engine_report()
    assert entry["selected"] == "triton" and entry["ran"] == "fused", entry
    assert "TRITON_INTERPRET=1" in entry["reason"]
    assert TRITON.launches == launches
    assert torch.allclose(p.detach(), torch.full((3,), 0.9))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.grad.to_sparse(), "sparse"),
        (lambda p: p.grad.t().contiguous().t(), "laid out unlike its parameter"),
    ],
    ids=["sparse", "strides"],
)
def test_groups_the_kernel_cannot_take_say_why(monkeypatch, make, reason):
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3)
    p.grad = make(p)
    expected = p.detach() - 0.1 * p.grad.to_dense()
    opt = torchsgd.SGD([p], lr=0.1)
    opt.step()
    (entry,) = opt.engine_report()
    assert entry["ran"] != "triton" and reason in entry["reason"], entry
    assert torch.allclose(p.detach(), expected)


def test_overlapping_parameters_run_in_order(monkeypatch):
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    base = torch.zeros(10)
    a, b = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])
    a.grad, b.grad = torch.ones(6), torch.ones(6)
    opt = torchsgd.SGD([a, b], lr=0.1)
    opt.step()
    (entry,) = opt.engine_report()
    assert entry["ran"] == "reference" and entry["reason"] == OVERLAP_REASON


def test_ran_reports_the_kernel(monkeypatch):
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torchsgd.SGD([p], lr=0.1)
    opt.step()
    assert opt.engine_report()[0] == {"group": 0, "selected": "triton", "ran": "triton", "reason": None}


def test_a_tensor_refused_after_others_leaves_nothing_half_done(monkeypatch):
    """A momentum buffer the kernel cannot write (here float64 for a float32 parameter, the last of the group)
    sends the whole group to the fallback before the kernel writes anything: the numbers are the reference's."""
    init, grads = make_params([(5,), (7,), (3,)], torch.float32), grads_for([(5,), (7,), (3,)], torch.float32, 2)
    results = []
    for engine in ("triton", "reference"):
        params, opt = run(engine, monkeypatch, init, grads[:1], lr=0.1, momentum=0.9)
        opt.state[params[2]]["momentum_buffer"] = opt.state[params[2]]["momentum_buffer"].double()
        for p, g in zip(params, grads[1]):
            p.grad = g.clone()
        opt.step()
        results.append((params, opt))
    (entry,) = results[0][1].engine_report()
    assert entry["ran"] != "triton" and "momentum buffer of another dtype" in entry["reason"], entry
    assert_same_runs(results[0], results[1], "refused buffer")


# A script run in a process of its own (the kernels must be defined for a GPU there, not interpreted): the
# kernel compiled ahead of time, through PTX to a cubin, for a Hopper GPU, with no GPU present.
_COMPILE_FOR_A_GPU = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchsgd.engines.kernels.triton import sgd as kernels

fn = kernels.sgd_kernel
assert not kernels.INTERPRETED
pointers = {"table": "*i64", "trust": "*fp64", "lr_pointer": "*fp32", "weight_decay_pointer": "*fp64",
            "clip_pointer": "*fp32", "scalars": "*fp64", "grad_scale_pointer": "*fp32", "found_inf_pointer": "*fp32"}
names = ["P", "B", "MOMENTUM", "NESTEROV", "WEIGHT_DECAY", "MAXIMIZE", "CLIP", "TRUST", "LIFTED", "STOCHASTIC",
         "UNSCALE", "SKIP", "BLOCK"]
out = []
for case in json.loads(sys.argv[1]):
    values = dict(zip(names, case))
    signature = {**pointers, **{name: "constexpr" for name in names}}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(n),): v for n, v in values.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    out.append({"fma": ptx.count("fma.rn."), "mad": ptx.count("mad.rn") + ptx.count("mad.f"), "div_rn": ptx.count("div.rn.f32"), "div_rn64": ptx.count("div.rn.f64"),
                "div_approx": ptx.count("div.approx") + ptx.count("div.full"), "cubin": len(compiled.asm["cubin"]),
                "round_even": min(ptx.count(", 0f4B400000;"), ptx.count(", 0fCB400000;"))})
print(json.dumps(out))
"""


def test_kernel_compiles_for_a_gpu_without_one():
    """What the interpreter cannot tell: the GPU compiler takes every branch of the kernel (sm_90, to a cubin),
    fuses nothing beyond the kernel's explicit fma (one per torch op that fuses: p.add_, coupled decay,
    the buffer's add_, Nesterov's add), and divides by IEEE division in the float16 stochastic rounding,
    GradScaler's 1 / scale and 8-bit momentum's 127 / s and s / 127 (whose rounding to nearest even, an add
    and a subtract of 1.5 · 2^23, the compiler keeps)."""
    import json
    import subprocess
    import sys

    F32, BF16, F16, F64, I8 = 0, 1, 2, 3, 4
    cases = [  # P, B, MOMENTUM, NESTEROV, WEIGHT_DECAY, MAXIMIZE, CLIP, TRUST, LIFTED, STOCHASTIC, UNSCALE, SKIP, BLOCK
        (F32, F32, True, True, 1, True, True, True, False, False, False, False, 1024),
        (BF16, BF16, True, False, 2, False, True, False, False, False, False, False, 1024),
        (F16, F16, True, True, 1, True, False, True, False, False, False, False, 1024),
        (F64, F64, True, True, 1, True, True, True, False, False, False, False, 1024),
        (BF16, BF16, True, True, 1, False, True, True, True, True, False, False, 1024),
        (F16, F16, True, True, 2, True, False, False, True, True, False, False, 1024),
        (F32, BF16, True, False, 1, False, False, False, True, True, False, False, 1024),
        (F32, F16, True, False, 0, False, False, False, True, True, False, False, 1024),
        (F16, BF16, True, True, 1, False, False, False, True, True, False, False, 1024),
        (F32, F32, False, False, 0, False, False, False, False, False, False, False, 1024),
        (F32, F32, True, True, 1, False, False, False, False, False, True, True, 1024),  # GradScaler's
        (BF16, F32, True, False, 2, True, False, False, True, False, True, True, 1024),  # unscale and skip
        (F64, F64, False, False, 1, False, False, False, False, False, True, False, 1024),
        (F32, I8, True, True, 1, True, True, True, True, False, False, False, 1024),  # 8-bit momentum
        (BF16, I8, True, False, 2, False, False, False, True, True, False, False, 1024),
        (F16, I8, True, True, 1, False, False, False, True, True, True, True, 1024),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_A_GPU, json.dumps(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    per_thread = 1024 // (4 * 32)  # elements each thread holds of a block
    for case, result in zip(cases, json.loads(done.stdout.splitlines()[-1])):
        p, b, momentum, nesterov, decay, *_, stochastic, _unscale, _skip, _block = case
        assert result["cubin"] > 0, case
        expected_fma = per_thread * (1 + (decay == 1) + momentum + nesterov)
        assert result["fma"] == expected_fma and result["mad"] == 0, (case, result)
        half_stochastic_stores = stochastic * ((p == F16) + (momentum and b == F16))
        block_divisions = 2 * (1024 // 256) * (b == I8)  # 127 / s and s / 127 of each of a tile's four blocks
        assert result["div_rn"] == per_thread * half_stochastic_stores + block_divisions, (case, result)
        assert result["div_approx"] == 0, (case, result)
        assert result["round_even"] == per_thread * (b == I8 and not stochastic), (case, result)
        assert (result["div_rn64"] > 0) == _unscale, (case, result)  # GradScaler's 1 / scale: IEEE, in float64


@pytest.mark.parametrize("rounding", [dict(), dict(stochastic_rounding=True, seed=3)], ids=["torch-rounding", "sr"])
def test_dense_layouts_walk_memory_in_order(monkeypatch, rounding):
    """channels_last and transposed parameters (gradients laid out alike) are walked as flat memory; a stochastic
    rounding index is then the element's memory offset, as rules/rounding.memory_index and the CPU kernel make it."""
    dtype = torch.bfloat16 if rounding else torch.float32
    generator = torch.Generator().manual_seed(4)
    layouts = [
        lambda t: t.to(memory_format=torch.channels_last),
        lambda t: t.t() if t.dim() == 2 else t,
    ]
    shapes = [(2, 3, 4, 5), (6, 7)]
    init = [layouts[i](torch.randn(s, generator=generator).to(dtype)) for i, s in enumerate(shapes)]
    grads = [
        [layouts[i](torch.randn(s, generator=generator).to(dtype)) for i, s in enumerate(shapes)] for _ in range(3)
    ]
    results = []
    for engine in ("triton", "reference"):
        monkeypatch.setenv("TORCHSGD_ENGINE", engine)
        params = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in init]
        assert params[0].is_contiguous(memory_format=torch.channels_last) and not params[1].is_contiguous()
        opt = torchsgd.SGD(params, lr=0.05, momentum=0.9, **rounding)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone(memory_format=torch.preserve_format)
            opt.step()
        results.append((params, opt))
    assert_ran_triton(results[0][1])
    for i, (a, b) in enumerate(zip(results[0][0], results[1][0])):
        assert torch.equal(
            a.detach().contiguous().view(torch.int16 if rounding else torch.int32),
            b.detach().contiguous().view(torch.int16 if rounding else torch.int32),
        ), i
        ba, bb = results[0][1].state[a]["momentum_buffer"], results[1][1].state[b]["momentum_buffer"]
        assert ba.stride() == bb.stride() and torch.equal(ba, bb), i


# ------------------------------------------------------------------- GradScaler in the kernel


class _NoHostRead:
    """Makes the test fail if the host reads GradScaler's overflow flag (the kernel is to read it)."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.flag = flag

    def __enter__(self) -> torch.Tensor:
        def read():
            raise AssertionError("the host read found_inf: the kernel was to read it on the device")

        self.flag.item = read
        return self.flag

    def __exit__(self, *exc) -> None:
        del self.flag.item


def run_scaled(engine, monkeypatch, init, grads, overflows, scale, kernel_reads_flag=True, **options):
    """Steps as GradScaler drives a fused optimizer: scaled gradients, grad_scale and found_inf set on it.

    ``overflows`` are the steps whose found_inf is set; the kernel must read the flag itself on every step
    that creates no buffer (checked for the Triton engine).
    """
    monkeypatch.setenv("TORCHSGD_ENGINE", engine)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torchsgd.SGD(params, fused=True, **options)
    unscaled = []
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else (g.double() * scale).to(g.dtype)
        opt.grad_scale = torch.tensor(scale, dtype=torch.float32)
        opt.found_inf = torch.tensor(1.0 if step in overflows else 0.0)
        creates_buffers = options.get("momentum", 0) and any(
            p.grad is not None and "momentum_buffer" not in opt.state.get(p, {}) for p in params
        )
        if engine == "triton" and kernel_reads_flag and not creates_buffers:
            with _NoHostRead(opt.found_inf):
                opt.step()
        else:
            opt.step()
        unscaled.append([None if p.grad is None else p.grad.clone() for p in params])
    opt.grad_scale = opt.found_inf = None
    return (params, opt), unscaled


@pytest.mark.parametrize(
    "options",
    [dict(momentum=0.9, weight_decay=1e-2), dict(momentum=0.9, nesterov=True, maximize=True), dict()],
    ids=option_id,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_grad_scaler_unscale_and_skip_in_the_kernel(monkeypatch, options, dtype):
    """GradScaler's scale and overflow flag read in the kernel: the gradients unscaled in place and the
    updates bitwise what the host's unscale then the reference step give (the CPU kernel for 16-bit
    dtypes, whose arithmetic the Triton kernel follows); an overflow on the first step leaves no state,
    one later leaves everything as it was; the host never reads the flag but on a step creating buffers."""
    shapes = [(), (67,), (5, 3), (0,)]
    init = make_params(shapes, dtype)
    grads = grads_for(shapes, dtype, steps=6, late=(2,))
    overflows = {0, 3}
    launches = TRITON.launches
    ours, our_grads = run_scaled("triton", monkeypatch, init, grads, overflows, 1024.0, lr=0.05, **options)
    assert TRITON.launches > launches
    assert_ran_triton(ours[1])
    oracle = "fused" if dtype in LOW else "reference"
    theirs, their_grads = run_scaled(oracle, monkeypatch, init, grads, overflows, 1024.0, lr=0.05, **options)
    assert_same_runs(ours, theirs, f"{dtype} {options}")
    for step, (a_step, b_step) in enumerate(zip(our_grads, their_grads)):
        for i, (a, b) in enumerate(zip(a_step, b_step)):
            if a is not None:
                assert_bitwise(a, b, f"gradient {i} after step {step}")
    # The first step was skipped: had it not been, the run would differ.
    skipped_none, _ = run_scaled("reference", monkeypatch, init, grads, set(), 1024.0, lr=0.05, **options)
    assert any(not torch.equal(a, b) for a, b in zip(ours[0], skipped_none[0]))


def test_an_overflowing_first_step_leaves_no_state(monkeypatch):
    init = make_params([(67,), (5, 3)], torch.float32)
    grads = grads_for([(67,), (5, 3)], torch.float32, steps=1)
    (params, opt), _ = run_scaled("triton", monkeypatch, init, grads, {0}, 8.0, lr=0.1, momentum=0.9)
    assert not any(opt.state[p] for p in params), "a skipped first step left momentum buffers"
    for p, p0 in zip(params, init):
        assert torch.equal(p.detach(), p0)


def test_grad_scaler_drives_the_kernel(monkeypatch):
    """torch.amp.GradScaler on CPU tensors with torchsgd.SGD(fused=True) on the Triton engine: bitwise
    torch.optim.SGD(foreach=False) driven by the same scaler (which then unscales itself), an overflowing
    step included, and the scale GradScaler keeps the same on both sides."""
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    twin.load_state_dict(model.state_dict())
    ours = torchsgd.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10), torch.amp.GradScaler("cpu", init_scale=2.0**10)]
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    launches = TRITON.launches
    for step in range(6):
        for net, opt, scaler in zip((model, twin), (ours, theirs), scalers):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), y)
            scaler.scale(loss).backward()
            if step == 2:  # an overflow: both skip the step, and both scalers back off
                next(net.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
    assert TRITON.launches > launches
    assert_ran_triton(ours)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_bitwise(a, b, "parameter")
        assert_bitwise(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"], "buffer")


def test_a_group_the_kernel_cannot_take_unscales_on_the_host(monkeypatch):
    """A gradient laid out unlike its parameter sends the group to the fallback, which unscales and skips on
    the host, saying why; the numbers are the reference's."""
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    init = make_params([(4, 3)], torch.float32)
    grads = grads_for([(4, 3)], torch.float32, steps=3)
    runs = []
    for engine in ("triton", "reference"):
        monkeypatch.setenv("TORCHSGD_ENGINE", engine)
        (p,) = params = [torch.nn.Parameter(init[0].clone())]
        opt = torchsgd.SGD(params, lr=0.1, momentum=0.9, fused=True)
        for step, (g,) in enumerate(grads):
            p.grad = (g * 4.0).t().contiguous().t()
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(float(step == 1))
            opt.step()
        runs.append((params, opt))
    (entry,) = runs[0][1].engine_report()
    assert entry["ran"] != "triton" and "laid out unlike its parameter" in entry["reason"], entry
    assert_same_runs(runs[0], runs[1], "fallback")


def test_what_needs_unscaled_gradients_first_unscales_on_the_host(monkeypatch):
    """In-step clipping, the guard and stochastic rounding read the flag and unscale on the host (before the
    norms, and so that the noise counter counts updates): the numbers are the reference engine's."""
    for options in (dict(max_grad_norm=0.5), dict(skip_nonfinite=True)):
        init = make_params([(67,), (5, 3)], torch.float32)
        grads = grads_for([(67,), (5, 3)], torch.float32, steps=4)
        ours, _ = run_scaled("triton", monkeypatch, init, grads, {1}, 64.0, False, lr=0.1, momentum=0.9, **options)
        theirs, _ = run_scaled("reference", monkeypatch, init, grads, {1}, 64.0, lr=0.1, momentum=0.9, **options)
        assert_same_runs(ours, theirs, str(options))
    init = make_params([(67,)], torch.bfloat16)
    grads = grads_for([(67,)], torch.bfloat16, steps=4)
    sr = dict(lr=0.1, momentum=0.9, stochastic_rounding=True, seed=3)
    ours, _ = run_scaled("triton", monkeypatch, init, grads, {1}, 64.0, False, **sr)
    theirs, _ = run_scaled("reference", monkeypatch, init, grads, {1}, 64.0, **sr)
    assert_same_runs(ours, theirs, "stochastic rounding")
    assert ours[1].rounding_step == theirs[1].rounding_step == 3
