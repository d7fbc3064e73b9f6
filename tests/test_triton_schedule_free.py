"""ScheduleFreeSGD's training step in the Triton kernel (kernels/triton/schedule_free.py), under Triton's
interpreter, against the reference engine (ScheduleFreeSGD with TORCHSGD_ENGINE=reference: torch's
operations tensor by tensor) and, where installed, the schedulefree package.

As in tests/test_triton.py, TRITON_INTERPRET=1 is set at import, before torchsgd first loads its kernels.
float32 and float64 are bitwise, as is stochastic rounding (float32 arithmetic on both sides, the same
noise); bfloat16 and float16 with torch's rounding are bitwise but for torch's own scalar remainder (the
last elements of a tensor, where torch's CPU loop rounds an add's product apart), within one ulp there.
Every test checks the kernel launched and the report says "triton".
"""

from __future__ import annotations

import os

import pytest
import torch

import torchsgd
from helpers import assert_bitwise, grads_for, make_params
from torchsgd.engines import native_extras
from torchsgd.engines import triton as triton_engine

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined (see tests/test_triton.py)

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("Triton is not installed: make setup installs the cuda extra", allow_module_level=True)

KERNELS = triton_engine.kernels()
assert KERNELS is not None, f"the Triton kernels did not load: {triton_engine.triton_failure()}"
assert KERNELS.INTERPRETED, "the Triton kernels were defined before TRITON_INTERPRET=1 was set"

SHAPES = [(), (0,), (1,), (67,), (33, 17), (1100,)]
OPTIONS = [
    dict(lr=0.5, momentum=0.9),
    dict(lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=3),
    dict(lr=2.0, momentum=0.4, weight_decay=1e-3, warmup_steps=2, r=0.5, weight_lr_power=1.0),
]
LOW = (torch.bfloat16, torch.float16)


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def run(engine, monkeypatch, init, grads, toggle=(2,), groups=None, **options):
    """Params and optimizer after train steps (eval() then train() after the steps in ``toggle``), the
    engine forced by TORCHSGD_ENGINE; the gradients are checked unchanged (the step only reads them)."""
    with monkeypatch.context() as patch:
        patch.setenv("TORCHSGD_ENGINE", engine)
        params = [torch.nn.Parameter(p.clone()) for p in init]
        if groups is None:
            opt = torchsgd.ScheduleFreeSGD(params, **options)
        else:
            opt = torchsgd.ScheduleFreeSGD([{"params": [params[i] for i in idx]} for idx in groups], **options)
        opt.train()
        for step, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = None if g is None else g.clone()
            opt.step()
            for p, g in zip(params, step_grads):
                assert g is None or torch.equal(p.grad, g), "the step changed a gradient"
            if step in toggle:
                opt.eval()
                opt.train()
    return params, opt


def assert_ran_triton(opt) -> None:
    for entry in opt.engine_report():
        assert entry["ran"] in ("triton", None), entry


def assert_same_runs(ours, theirs, what: str) -> None:
    (params, opt), (ref_params, ref) = ours, theirs
    for i, (a, b) in enumerate(zip(params, ref_params)):
        assert_bitwise(a, b, f"{what}: parameter {i}")
        if "z" in ref.state.get(b, {}):
            assert_bitwise(opt.state[a]["z"], ref.state[b]["z"], f"{what}: z {i}")
        else:
            assert "z" not in opt.state.get(a, {}), f"{what}: parameter {i} has a z"


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bitwise_reference(monkeypatch, dtype, options):
    """float32/float64: every schedule option, both sides of the lerp weight (c starts at 1, then falls below
    0.5), 0-d, empty and odd sizes, a z made late, train()/eval() between steps: bitwise the reference."""
    init = make_params(SHAPES, dtype)
    grads = grads_for(SHAPES, dtype, steps=6, late=(3,))
    launches = triton_engine.schedule_free_launches
    ours = run("triton", monkeypatch, init, grads, **options)
    assert triton_engine.schedule_free_launches > launches
    theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert theirs[1].engine_report()[0]["ran"] == "reference"
    assert_same_runs(ours, theirs, f"{dtype} {options}")
    ours[1].eval()
    theirs[1].eval()
    for a, b in zip(ours[0], theirs[0]):
        assert_bitwise(a, b, "the average x after eval()")


def test_bitwise_schedulefree_package(monkeypatch):
    """float32 over 30 steps with eval()/train() every 7: bitwise schedulefree.SGDScheduleFree (independent)."""
    schedulefree = pytest.importorskip("schedulefree")
    shapes = [(67,), (5, 3), ()]
    init, grads = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=30)
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=4)
    params, opt = run("triton", monkeypatch, init, grads, toggle=range(0, 30, 7), **options)
    assert_ran_triton(opt)
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    ref = schedulefree.SGDScheduleFree(theirs, **options)
    ref.train()
    for step, step_grads in enumerate(grads):
        for p, g in zip(theirs, step_grads):
            p.grad = g.clone()
        ref.step()
        if step in range(0, 30, 7):
            ref.eval()
            ref.train()
    for i, (a, b) in enumerate(zip(params, theirs)):
        assert_bitwise(a, b, f"parameter {i}")
        assert_bitwise(opt.state[a]["z"], ref.state[b]["z"], f"z {i}")


@pytest.mark.parametrize("options", OPTIONS[:2], ids=option_id)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_rounding_bitwise_reference(monkeypatch, dtype, options):
    """bfloat16/float16 with stochastic rounding: float32 arithmetic, y and z each rounded once with the
    parameter's and the buffer's noise of rules/rounding.py: bitwise the reference's rounded path."""
    init = make_params(SHAPES, dtype)
    grads = grads_for(SHAPES, dtype, steps=5, late=(3,))
    ours = run("triton", monkeypatch, init, grads, stochastic_rounding=True, seed=17, **options)
    theirs = run("reference", monkeypatch, init, grads, stochastic_rounding=True, seed=17, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"{dtype} {options} stochastic rounding")
    # The noise decided something: rounding to nearest would give other bits.
    nearest = run("triton", monkeypatch, init, grads, **options)
    assert any(not torch.equal(a, b) for a, b in zip(ours[0], nearest[0]))


# torch's CPU loop over a 16-bit tensor runs its vector op on whole iterations (BF16_LOOP_ELEMENTS: two
# vectors) and its scalar op on the rest, which rounds an add's product before adding: the kernel fuses
# everywhere, as torch's vector op (and its CUDA kernels) do. Unknown capability: only the one-ulp bound.
TAIL = native_extras.BF16_LOOP_ELEMENTS.get(torch.backends.cpu.get_cpu_capability())


@pytest.mark.parametrize("options", OPTIONS[:2], ids=option_id)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_half_precision_torch_rounding_per_step(monkeypatch, dtype, options):
    """bfloat16/float16 with torch's rounding, each step from the reference's state: bitwise but for torch's
    scalar remainder of each tensor, within one ulp of the step's operands there."""
    shapes = [(67,), (5, 3), (1100,), (1,), ()]
    init = make_params(shapes, dtype, seed=3)
    grads = grads_for(shapes, dtype, steps=4)
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    ours = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torchsgd.ScheduleFreeSGD(ours, **options)
    ref = torchsgd.ScheduleFreeSGD(theirs, foreach=False, **options)
    opt.train()
    ref.train()
    differing = 0
    for step_grads in grads:
        for a, b in zip(ours, theirs):  # the same state before each step: the bound is per step
            a.data.copy_(b.data)
            if "z" in ref.state[b]:
                opt.state[a]["z"].copy_(ref.state[b]["z"])
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        with monkeypatch.context() as patch:
            patch.setenv("TORCHSGD_ENGINE", "reference")
            ref.step()
        opt.step()
        assert_ran_triton(opt)
        for i, (a, b, g) in enumerate(zip(ours, theirs, step_grads)):
            for mine, expected in ((a, b), (opt.state[a]["z"], ref.state[b]["z"])):
                x, e = mine.detach().reshape(-1).double(), expected.detach().reshape(-1).double()
                scale = torch.stack([x.abs(), e.abs(), g.reshape(-1).double().abs()]).amax(0)
                ulp = (
                    torch.exp2(torch.floor(torch.log2(scale.clamp_min(torch.finfo(dtype).tiny))))
                    * torch.finfo(dtype).eps
                )
                assert ((x - e).abs() <= ulp).all(), f"parameter {i}: beyond one ulp"
                off = torch.nonzero(x != e).flatten()
                differing += off.numel()
                if TAIL is not None:
                    body = x.numel() // TAIL * TAIL
                    assert (off >= body).all(), (
                        f"parameter {i}: elements {off[off < body].tolist()} differ in torch's vector body"
                    )
    assert differing < 0.1 * sum(p.numel() for p in ours) * len(grads)


def test_pieces_of_a_tensor(monkeypatch):
    """Tensors over several table rows and several blocks a row (small CHUNK and BLOCK here)."""
    monkeypatch.setattr(triton_engine, "CHUNK", 200)
    monkeypatch.setattr(triton_engine, "BLOCK", 64)
    shapes = [(1000,), (7, 61), (199,), (201,)]
    for dtype, rounding in ((torch.float32, dict()), (torch.bfloat16, dict(stochastic_rounding=True, seed=2))):
        init, grads = make_params(shapes, dtype), grads_for(shapes, dtype, steps=3)
        ours = run("triton", monkeypatch, init, grads, lr=0.5, weight_decay=1e-2, **rounding)
        theirs = run("reference", monkeypatch, init, grads, lr=0.5, weight_decay=1e-2, **rounding)
        assert_ran_triton(ours[1])
        assert_same_runs(ours, theirs, f"pieces {dtype}")


def test_groups_of_mixed_dtypes(monkeypatch):
    """A group of float32 and float64 parameters is one call, a launch per dtype; a second group its own."""
    init = make_params([(67,), (5, 3)], torch.float32) + make_params([(40,), ()], torch.float64)
    grads = [
        [g.to(p.dtype) for g, p in zip(step, init)] for step in grads_for([(67,), (5, 3), (40,), ()], torch.float64, 4)
    ]
    groups = [[0, 2, 3], [1]]
    ours = run("triton", monkeypatch, init, grads, groups=groups, lr=0.5, weight_decay=1e-3)
    theirs = run("reference", monkeypatch, init, grads, groups=groups, lr=0.5, weight_decay=1e-3)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, "mixed dtypes")


def test_cuda_groups_select_triton(monkeypatch):
    """(CUDA tensors cannot be made here: the group's device type is what is simulated.)"""
    monkeypatch.delenv("TORCHSGD_ENGINE", raising=False)
    group = {"params": [torch.zeros(2)], "foreach": None}
    select = torchsgd.ScheduleFreeSGD._selected_engine
    assert select(group) == "fused"
    monkeypatch.setattr(triton_engine, "device_type", lambda g: "cuda")
    assert select(group) == "triton"
    assert select({**group, "foreach": True}) == "foreach"
    assert select({**group, "foreach": False}) == "reference"
    monkeypatch.setenv("TORCHSGD_ENGINE", "fused")
    assert select(group) == "fused"


@pytest.mark.parametrize("case", ["tensor-lr", "not-interpreted", "sr-transposed"])
def test_what_the_kernel_cannot_take_runs_in_python_and_says_why(monkeypatch, case):
    """A Tensor lr, kernels not loaded for this device, stochastic rounding of a non-contiguous parameter:
    the Python path runs, the report says why, and the numbers are the reference's."""
    dtype = torch.bfloat16 if case == "sr-transposed" else torch.float32
    init = [torch.randn(6, 5).to(dtype).t(), torch.randn(7).to(dtype)]
    grads = [[torch.randn(6, 5).to(dtype).t(), torch.randn(7).to(dtype)] for _ in range(3)]
    options: dict = dict(lr=torch.tensor(0.5)) if case == "tensor-lr" else dict(lr=0.5)
    if case == "sr-transposed":
        options.update(stochastic_rounding=True, seed=4)
    if case == "not-interpreted":
        monkeypatch.setattr(KERNELS, "INTERPRETED", False)
    launches = triton_engine.schedule_free_launches
    results = []
    for engine in ("triton", "reference"):
        with monkeypatch.context() as patch:
            patch.setenv("TORCHSGD_ENGINE", engine)
            params = [torch.nn.Parameter(p.clone(memory_format=torch.preserve_format)) for p in init]
            opt = torchsgd.ScheduleFreeSGD(params, **options)
            opt.train()
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone(memory_format=torch.preserve_format)
                opt.step()
            results.append((params, opt, opt.engine_report()))  # (its "selected" reads TORCHSGD_ENGINE)
    (entry,) = results[0][2]
    expected = {"tensor-lr": "Tensor lr", "not-interpreted": "interpreter", "sr-transposed": "non-contiguous"}[case]
    assert entry["selected"] == "triton" and entry["ran"] == "foreach" and expected in entry["reason"], entry
    if case != "sr-transposed":  # (there the contiguous parameter's list ran in the kernel)
        assert triton_engine.schedule_free_launches == launches
    assert_same_runs(results[0][:2], results[1][:2], case)


# Run in a process of its own (the kernels must be defined for a GPU there, not interpreted): the kernel
# compiled ahead of time, through PTX to a cubin, for a Hopper GPU, with no GPU present.
_COMPILE_FOR_A_GPU = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchsgd.engines.kernels.triton import schedule_free as kernels

fn = kernels.schedule_free_kernel
names = ["P", "WEIGHT_DECAY", "LIFTED", "STOCHASTIC", "BLOCK"]
out = []
for case in json.loads(sys.argv[1]):
    values = dict(zip(names, case))
    signature = {"table": "*i64", "scalars": "*fp64", **{name: "constexpr" for name in names}}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(n),): v for n, v in values.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    out.append({"fma": ptx.count("fma.rn."), "mad": ptx.count("mad.rn") + ptx.count("mad.f"),
                "div_rn": ptx.count("div.rn.f32"), "div_approx": ptx.count("div.approx") + ptx.count("div.full"),
                "cubin": len(compiled.asm["cubin"])})
print(json.dumps(out))
"""


def test_kernel_compiles_for_a_gpu_without_one():
    """What the interpreter cannot tell: the GPU compiler takes every branch (sm_90, to a cubin) and fuses
    nothing beyond the kernel's explicit fma (the lerp, y's add, z's add, the weight decay's add), and the
    float16 stochastic rounding divides by IEEE division."""
    import json
    import subprocess
    import sys

    F32, BF16, F16, F64 = 0, 1, 2, 3
    cases = [  # P, WEIGHT_DECAY, LIFTED, STOCHASTIC, BLOCK
        (F32, True, False, False, 1024),
        (F64, False, False, False, 1024),
        (BF16, True, False, False, 1024),
        (F16, False, False, False, 1024),
        (BF16, True, True, True, 1024),
        (F16, True, True, True, 1024),
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
        p, weight_decay, _, stochastic, _ = case
        assert result["cubin"] > 0, case
        assert result["fma"] == per_thread * (3 + weight_decay) and result["mad"] == 0, (case, result)
        assert result["div_rn"] == per_thread * 2 * (stochastic and p == F16), (case, result)
        assert result["div_approx"] == 0, (case, result)
