"""8-bit momentum (momentum_dtype=torch.int8) in the Triton kernel, under Triton's interpreter, against the
reference engine's int8 path (engines/quantized.py over rules/quantize.py), bitwise: parameters, codes, scales.

As in tests/test_triton.py, TRITON_INTERPRET=1 is set at import, before torchsgd first loads its kernels,
and the module fails as a whole if they were defined otherwise. Every numeric test checks that the kernel
launched, that the group's report says "triton", and (where the Triton engine runs) that the Python
quantized step never ran, so a pass cannot come from a fallback.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import torchsgd
import torchsgd.engines.quantized as python_quantized
from helpers import assert_bitwise, grads_for, make_params, recorded_ops
from torchsgd.engines import TRITON
from torchsgd.engines import triton as triton_engine
from torchsgd.rules.quantize import BLOCK, FLOOR, quantize

os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit function is defined (see tests/test_triton.py)

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("Triton is not installed: make setup installs the cuda extra", allow_module_level=True)

KERNELS = triton_engine.kernels()
assert KERNELS is not None, f"the Triton kernels did not load: {triton_engine.triton_failure()}"
assert KERNELS.INTERPRETED, "the Triton kernels were defined before TRITON_INTERPRET=1 was set"

# Sizes around a block (255, 256, 257), several blocks with a partial last one, a tile and a bit (1100 > 1024).
SHAPES = [(), (0,), (1,), (255,), (256,), (257,), (33, 17), (1100,)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = [
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.05, decoupled_weight_decay=True, maximize=True),
    dict(momentum=0.5, weight_decay=1e-3, max_grad_norm=0.5),
]
ROUNDINGS = [dict(), dict(stochastic_rounding=True, seed=1234)]


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "plain"


def _no_python_quantized_step(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the 8-bit step ran in Python (engines/quantized.py), not in the kernel")

    monkeypatch.setattr(python_quantized, "step_quantized", refuse)


def run(engine, monkeypatch, init, grads, optimizer=torchsgd.SGD, state=None, **options):
    """Params and optimizer after the steps, the engine forced by TORCHSGD_ENGINE; from ``state`` if given."""
    with monkeypatch.context() as patch:
        patch.setenv("TORCHSGD_ENGINE", engine)
        if engine == "triton" and state is None:  # (resumed: assert_ran_triton says where it ran)
            _no_python_quantized_step(patch)
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = optimizer(params, momentum_dtype=torch.int8, **options)
        if state is not None:
            opt.load_state_dict(state)
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
        expected = ref.state.get(b, {})
        if "momentum_codes" in expected:
            state = opt.state[a]
            assert_bitwise(state["momentum_codes"], expected["momentum_codes"], f"{what}: codes {i}")
            assert_bitwise(state["momentum_scales"], expected["momentum_scales"], f"{what}: scales {i}")
        else:
            assert "momentum_codes" not in opt.state.get(a, {}), f"{what}: parameter {i} has a buffer"
        assert "momentum_buffer" not in opt.state.get(a, {}), f"{what}: parameter {i} has a float buffer"


@pytest.mark.parametrize("rounding", ROUNDINGS, ids=["nearest", "sr"])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_reference(monkeypatch, dtype, options, rounding):
    """Every dtype the kernel lifts, to nearest and stochastically, Nesterov, dampening, both weight decays,
    maximize and clipping; first steps (one of them late) and later ones: parameters, codes and scales."""
    init = make_params(SHAPES, dtype)
    grads = grads_for(SHAPES, dtype, steps=4, late=(3,))
    launches = TRITON.launches
    ours = run("triton", monkeypatch, init, grads, lr=0.05, **options, **rounding)
    assert TRITON.launches > launches
    theirs = run("reference", monkeypatch, init, grads, lr=0.05, **options, **rounding)
    assert_ran_triton(ours[1])
    assert theirs[1].engine_report()[0]["ran"] == "reference"
    assert_same_runs(ours, theirs, f"{dtype} {options} {rounding}")


@pytest.mark.parametrize(("chunk", "block"), [(1100, 256), (2048, 512), (300, 64)])
def test_pieces_of_a_tensor_are_whole_blocks(monkeypatch, chunk, block):
    """A tensor over several table rows and several tiles a row, a tile of one block or of two: the pieces
    are cut on blocks (CHUNK rounded down to whole tiles, a tile at least a block), so the codes are the
    reference's, whose blocks are the tensor's."""
    monkeypatch.setattr(triton_engine, "CHUNK", chunk)
    monkeypatch.setattr(triton_engine, "BLOCK", block)
    shapes = [(3000,), (7, 61), (513,)]
    for dtype, rounding in ((torch.float32, dict()), (torch.bfloat16, dict(stochastic_rounding=True, seed=5))):
        init, grads = make_params(shapes, dtype), grads_for(shapes, dtype, steps=3)
        options = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, **rounding)
        ours = run("triton", monkeypatch, init, grads, **options)
        theirs = run("reference", monkeypatch, init, grads, **options)
        assert_ran_triton(ours[1])
        assert_same_runs(ours, theirs, f"pieces {chunk}/{block} {dtype}")


def _edge_gradient() -> torch.Tensor:
    """Blocks of what the code must get exactly right: ties (s = 127, so b · (127 / s) = b), a block holding
    inf, one holding NaN, one of all zeros, one below the floor (zero codes, the scale kept), one just
    above it, and a last partial block."""
    g = torch.randn(7 * BLOCK + 40, generator=torch.Generator().manual_seed(9))
    ties = torch.arange(BLOCK, dtype=torch.float32) % 254 - 126.5  # -126.5 .. 126.5 by 1: every one a tie
    ties[0] = 127.0
    g[:BLOCK] = ties
    g[BLOCK + 3] = math.inf
    g[2 * BLOCK + 7] = math.nan
    g[3 * BLOCK : 4 * BLOCK] = 0.0
    g[4 * BLOCK : 5 * BLOCK] *= FLOOR / 8
    g[5 * BLOCK : 6 * BLOCK] *= FLOOR * 4  # just above the floor: 127 / s near float32's largest
    return g


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy, meeting the NaN and inf
@pytest.mark.parametrize("rounding", ROUNDINGS, ids=["nearest", "sr"])
def test_ties_non_finite_and_tiny_blocks(monkeypatch, rounding):
    """The first buffer is quantize(g) (to nearest: half to even, which the ties decide), a non-finite block
    gives zero codes and a NaN scale, a block below the floor zero codes; the next step dequantizes them."""
    g = _edge_gradient()
    codes, scales = quantize(g, key=None)
    assert torch.equal(codes[:6], torch.tensor([127, -126, -124, -124, -122, -122], dtype=torch.int8))
    assert math.isnan(scales[1]) and math.isnan(scales[2]) and scales[3] == 0 and 0 < scales[4] < FLOOR < scales[5]
    assert not codes[BLOCK : 5 * BLOCK].any() and codes[5 * BLOCK : 6 * BLOCK].any()

    init = [torch.zeros_like(g)]
    grads = [[g], [torch.randn(g.shape, generator=torch.Generator().manual_seed(3))]]
    options = dict(lr=0.0, momentum=0.9, **rounding)
    ours = run("triton", monkeypatch, init, grads[:1], **options)
    theirs = run("reference", monkeypatch, init, grads[:1], **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"edge blocks, first step {rounding}")
    if not rounding:
        state = ours[1].state[ours[0][0]]
        assert_bitwise(state["momentum_codes"], codes, "the first codes against quantize(g)")
        assert_bitwise(state["momentum_scales"], scales, "the first scales against quantize(g)")
    ours = run("triton", monkeypatch, init, grads, **options)
    theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"edge blocks, second step {rounding}")


def _division_sensitive_blocks(count: int) -> torch.Tensor:
    """``count`` blocks whose codes and dequantized values each division decides: scales s for which 127 / s
    and s / 127, correctly rounded, differ from a reciprocal and a multiply, and values b whose code
    round(b · (127 / s)) is another with (1 / s) · 127."""
    generator = torch.Generator().manual_seed(21)
    s = torch.rand(1 << 16, generator=generator) + 0.5
    sensitive = (torch.full_like(s, 127.0).div(s) != s.reciprocal() * 127) & (
        s / 127 != s * torch.tensor(1 / 127, dtype=torch.float32)
    )
    out = []
    for scale in s[sensitive][:count]:
        inverse = torch.tensor(127.0).div(scale)
        approximate = scale.reciprocal() * 127
        halves = (torch.arange(127, dtype=torch.float32) + 0.5).div(inverse)
        near = torch.cat([halves, torch.nextafter(halves, torch.tensor(0.0)), torch.nextafter(halves, scale)])
        near = near[(near <= scale) & (torch.round(near * inverse) != torch.round(near * approximate))]
        assert near.numel() > 0, "no value whose code the division decides"
        block = torch.zeros(BLOCK)
        block[0] = -scale
        block[1 : 1 + min(near.numel(), BLOCK - 1)] = near[: BLOCK - 1]
        out.append(block)
    return torch.cat(out)


@pytest.mark.parametrize("rounding", ROUNDINGS, ids=["nearest", "sr"])
def test_one_division_a_block_not_a_reciprocal(monkeypatch, rounding):
    """127 / s and s / 127 are each one correctly rounded division (the reference's): blocks where a reciprocal
    then a multiply would give other codes, and other dequantized values on the next step."""
    g = _division_sensitive_blocks(4)
    init = [torch.zeros_like(g)]
    grads = [[g], [torch.randn(g.shape, generator=torch.Generator().manual_seed(4))]]
    options = dict(lr=0.5, momentum=0.9, **rounding)
    ours = run("triton", monkeypatch, init, grads, **options)
    theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"division-sensitive blocks {rounding}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lars_trust_ratios(monkeypatch, dtype):
    shapes = [(67,), (5, 3), (33, 17)]
    init, grads = make_params(shapes, dtype), grads_for(shapes, dtype, steps=3)
    options = dict(lr=0.1, exclude_1d=False, trust_clip=True, nesterov=True, weight_decay=1e-3)
    if dtype is torch.bfloat16:
        options.update(stochastic_rounding=True, seed=11)
    ours = run("triton", monkeypatch, init, grads, optimizer=torchsgd.LARS, **options)
    theirs = run("reference", monkeypatch, init, grads, optimizer=torchsgd.LARS, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, f"LARS {dtype}")


def test_without_momentum_no_buffer(monkeypatch):
    """momentum_dtype=torch.int8 and momentum 0: no buffer to store, the kernel runs the lifted step."""
    init, grads = make_params(SHAPES, torch.bfloat16), grads_for(SHAPES, torch.bfloat16, steps=2)
    options = dict(lr=0.05, weight_decay=1e-2, stochastic_rounding=True, seed=2)
    ours = run("triton", monkeypatch, init, grads, **options)
    theirs = run("reference", monkeypatch, init, grads, **options)
    assert_ran_triton(ours[1])
    assert_same_runs(ours, theirs, "no momentum")


def test_grad_scaler_unscale_and_skip(monkeypatch):
    """fused=True: GradScaler's scale and overflow flag applied in the kernel to 8-bit momentum groups; an
    overflowing first step leaves no state, one later leaves codes and scales as they were."""
    shapes = [(67,), (300,), ()]
    init, grads = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=5)
    results = []
    for engine in ("triton", "reference"):
        with monkeypatch.context() as patch:
            patch.setenv("TORCHSGD_ENGINE", engine)
            if engine == "triton":
                _no_python_quantized_step(patch)
            params = [torch.nn.Parameter(p.clone()) for p in init]
            opt = torchsgd.SGD(params, lr=0.05, momentum=0.9, fused=True, momentum_dtype=torch.int8)
            for step, step_grads in enumerate(grads):
                for p, g in zip(params, step_grads):
                    p.grad = g * 512.0
                opt.grad_scale = torch.tensor(512.0)
                opt.found_inf = torch.tensor(float(step in (0, 3)))
                opt.step()
            opt.grad_scale = opt.found_inf = None
            results.append((params, opt))
    assert_ran_triton(results[0][1])
    assert_same_runs(results[0], results[1], "GradScaler")


def test_resume_from_a_state_dict(monkeypatch):
    """Codes and scales saved and loaded: the resumed steps run in the kernel and are the reference's."""
    shapes = [(300,), (5, 3)]
    init, grads = make_params(shapes, torch.bfloat16), grads_for(shapes, torch.bfloat16, steps=4)
    options = dict(lr=0.05, momentum=0.9, stochastic_rounding=True, seed=8)
    params, opt = run("reference", monkeypatch, init, grads[:2], **options)
    state = opt.state_dict()
    after = [p.detach().clone() for p in params]
    ours = run("triton", monkeypatch, after, grads[2:], state=state, **options)
    theirs = run("reference", monkeypatch, after, grads[2:], state=state, **options)
    assert_same_runs(ours, theirs, "resumed")
    assert_ran_triton(ours[1])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: torch.randn(4, 300).t(), "row-major"),  # gradients laid out alike, as autograd makes them
        (lambda: torch.randn(300, dtype=torch.float64), "float64"),
    ],
    ids=["transposed", "float64"],
)
def test_groups_the_kernel_cannot_take_say_why(monkeypatch, make, reason):
    """A transposed parameter (its blocks are row-major, its memory is not) or a float64 one with 8-bit momentum
    runs another engine's int8 path, saying why; the numbers are the reference's."""
    torch.manual_seed(0)
    init, grads = make(), [make() for _ in range(2)]
    results = []
    for engine in ("triton", "reference"):
        with monkeypatch.context() as patch:
            patch.setenv("TORCHSGD_ENGINE", engine)
            param = torch.nn.Parameter(init.clone(memory_format=torch.preserve_format))
            opt = torchsgd.SGD([param], lr=0.05, momentum=0.9, momentum_dtype=torch.int8)
            for g in grads:
                param.grad = g.clone(memory_format=torch.preserve_format)
                opt.step()
            results.append(([param], opt))
    (entry,) = results[0][1].engine_report()
    assert entry["ran"] != "triton" and reason in entry["reason"], entry
    assert_same_runs(results[0], results[1], f"refused {reason}")


def test_no_float_copy_of_a_buffer(monkeypatch):
    """After the first step the kernel does it all: torch does no arithmetic and makes nothing larger than the
    launch table (no float32 copy of a buffer, as the Python path's), the smallest tensor here being larger."""
    shapes = [(300,), (50, 7), (1100,)]
    init, grads = make_params(shapes, torch.float32), grads_for(shapes, torch.float32, steps=2)
    monkeypatch.setenv("TORCHSGD_ENGINE", "triton")
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = torchsgd.SGD(params, lr=0.05, momentum=0.9, nesterov=True, momentum_dtype=torch.int8)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()

    for p, g in zip(params, grads[1]):
        p.grad = g
    with recorded_ops() as seen:
        opt.step()
    assert_ran_triton(opt)
    arithmetic = [name for name, _ in seen if any(op in name for op in ("add", "mul", "lerp", "neg", "div", "round"))]
    assert not arithmetic, f"torch did arithmetic in the step: {arithmetic}"
    largest = max((n for _, n in seen), default=0)
    table_bytes = 9 * 8 * len(shapes)  # a row of nine int64 per tensor
    assert largest <= table_bytes < 300, f"the step touched a tensor of {largest} bytes: {seen}"


def test_interpreted_after_triton_language_was_imported():
    """torch._inductor (or any test) may import triton.language before TRITON_INTERPRET=1 is set: its own
    @triton.jit functions (tl.max, ...) are then compiled-mode objects the interpreter cannot call, so the
    kernel must not use them. Checked in a fresh process where that happens first."""
    import subprocess
    import sys

    script = """
import os, torch
import triton.language  # before TRITON_INTERPRET, as torch._inductor may import it
os.environ["TRITON_INTERPRET"] = "1"
os.environ["TORCHSGD_ENGINE"] = "triton"
import torchsgd
from torchsgd.engines import triton as triton_engine
assert triton_engine.kernels().INTERPRETED
p = torch.nn.Parameter(torch.randn(1100, generator=torch.Generator().manual_seed(0)))
p.grad = torch.randn(1100, generator=torch.Generator().manual_seed(1))
opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
opt.step(); opt.step()
print(opt.engine_report()[0]["ran"])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TORCHSGD_ENGINE")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "triton", done.stdout
