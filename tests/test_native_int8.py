"""8-bit momentum in the native CPU kernel (kernels/cpu/quantized.h) against the reference engine.

The reference is torchsgd.SGD(foreach=False, momentum_dtype=torch.int8): the rule on float32 copies, then
rules/quantize.py (tests/test_int8_momentum.py ties that to its definition). The kernel must give the same
bits: parameters, codes and scales, over 100 steps, for float32, bfloat16 and float16 parameters, to nearest
and stochastically, whatever the thread count, with non-finite gradients and parameters without a gradient.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import torchsgd
from torchsgd.engines.build import native_module
from torchsgd.rules.quantize import BLOCK

pytestmark = pytest.mark.skipif(native_module() is None, reason="the native kernel is not built")

# Sizes around the block (256); test_the_thread_count_changes_nothing takes tensors larger than the
# kernel's grain (256 blocks), which span several pieces.
SHAPES = [(4100,), (3, 300), (256,), (257,), (1,), (5, 7), (0,), ()]
OPTIONS = {
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov+wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening+maximize": dict(lr=0.1, momentum=0.8, dampening=0.3, maximize=True),
    "decoupled+clip": dict(lr=0.05, momentum=0.9, weight_decay=5e-2, decoupled_weight_decay=True, max_grad_norm=1.0),
}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where the other is NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).logical_or(a.isnan() & b.isnan()).all())


def train(flags: dict, dtype: torch.dtype, steps: int, shapes=SHAPES, nan_step: int | None = 7, **options):
    generator = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]
    opt = torchsgd.SGD(params, momentum_dtype=torch.int8, **flags, **options)
    grads = torch.Generator().manual_seed(2)
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=grads).to(dtype)
            p.grad = None if (step % 5 == 3 and i == 2) else g  # now and then a parameter without a gradient
        if nan_step is not None and step == nan_step:
            params[1].grad[0, 3] = math.nan  # its block's scale becomes NaN, and the block NaN from then on
        if step == steps // 2:
            opt.param_groups[0]["lr"] *= 0.5
        opt.step()
    return params, opt


def assert_same_training(ours, reference, what):
    (params, opt), (ref_params, ref_opt) = ours, reference
    for i, (p, r) in enumerate(zip(params, ref_params)):
        assert same(p.detach(), r.detach()), f"{what}: parameter {i}"
        mine, theirs = opt.state.get(p, {}), ref_opt.state.get(r, {})
        assert mine.keys() == theirs.keys(), f"{what}: state keys of {i}"
        for key in mine:
            assert same(mine[key], theirs[key]), f"{what}: {key} of parameter {i}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_kernel_is_the_reference_over_100_steps(options, dtype, stochastic):
    extra = dict(stochastic_rounding=True, seed=5) if stochastic else {}
    ours = train({}, dtype, 100, **options, **extra)
    assert ours[1].engine_report()[0]["ran"] == "fused", ours[1].engine_report()
    assert ours[1].engine_report()[0]["reason"] is None
    reference = train(dict(foreach=False), dtype, 100, **options, **extra)
    assert_same_training(ours, reference, f"{dtype} {options} {extra}")


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_the_thread_count_changes_nothing(stochastic):
    extra = dict(stochastic_rounding=True, seed=9) if stochastic else {}
    threads = torch.get_num_threads()
    shapes = [(300_000,), (1000,)]
    try:
        torch.set_num_threads(1)
        one = train({}, torch.float32, 5, shapes=shapes, nan_step=None, lr=0.1, momentum=0.9, **extra)
        torch.set_num_threads(max(2, threads))
        many = train({}, torch.float32, 5, shapes=shapes, nan_step=None, lr=0.1, momentum=0.9, **extra)
    finally:
        torch.set_num_threads(threads)
    assert_same_training(one, many, "threads")


def test_many_small_tensors():
    generator = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 1200, (300,), generator=generator).tolist()
    shapes = [(n,) for n in sizes]
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours = train({}, torch.float32, 20, shapes=shapes, nan_step=None, **options)
    assert ours[1].engine_report()[0]["ran"] == "fused"
    assert_same_training(
        ours, train(dict(foreach=False), torch.float32, 20, shapes=shapes, nan_step=None, **options), "many"
    )


def test_lars_runs_in_the_kernel_as_the_reference():
    generator = torch.Generator().manual_seed(4)
    init = [torch.randn(s, generator=generator) for s in [(33, 17), (17,), (4, 300)]]

    def run(flags):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torchsgd.LARS(params, lr=0.5, weight_decay=1e-3, momentum_dtype=torch.int8, **flags)
        grads = torch.Generator().manual_seed(5)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        return params, opt

    ours, reference = run({}), run(dict(foreach=False))
    assert_same_training(ours, reference, "LARS")


def test_step_in_backward_runs_the_kernel_as_the_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(40, 300), torch.nn.Tanh(), torch.nn.Linear(300, 3))
    twin.load_state_dict(model.state_dict())
    options = dict(lr=0.05, momentum=0.9, nesterov=True, momentum_dtype=torch.int8)
    a = torchsgd.SGD(model.parameters(), step_in_backward=True, **options)
    b = torchsgd.SGD(twin.parameters(), foreach=False, **options)
    x, y = torch.randn(16, 40), torch.randn(16, 3)
    for _ in range(15):
        torch.nn.functional.mse_loss(model(x), y).backward()
        a.step()
        b.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        b.step()
    assert a.engine_report()[0]["ran"] == "fused"
    assert_same_training((list(model.parameters()), a), (list(twin.parameters()), b), "step_in_backward")


def test_a_parameter_that_is_not_contiguous_runs_foreach_and_says_why():
    p = torch.nn.Parameter(torch.randn(30, 40).t())  # dense, column-major: its blocks are not its memory order
    q = torch.nn.Parameter(p.detach().clone())
    assert not p.is_contiguous()
    a = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    b = torchsgd.SGD([q], lr=0.1, momentum=0.9, momentum_dtype=torch.int8, foreach=False)
    for step in range(3):
        p.grad = torch.randn(30, 40, generator=torch.Generator().manual_seed(step)).t()
        q.grad = p.grad.clone()
        a.step()
        b.step()
    (entry,) = a.engine_report()
    assert entry["ran"] == "foreach" and "not contiguous" in entry["reason"], entry
    assert_same_training(([p], a), ([q], b), "transposed")


def test_the_kernels_new_state_checkpoints_and_resumes_bitwise():
    shapes = [(600,), (20, 30)]
    params, opt = train({}, torch.float32, 4, shapes=shapes, nan_step=None, lr=0.1, momentum=0.9)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    codes = saved["state"][0]["momentum_codes"]
    assert codes.dtype == torch.int8 and codes.shape == (600,) and codes.is_contiguous()
    assert saved["state"][0]["momentum_scales"].shape == (-(-600 // BLOCK),)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = torchsgd.SGD(resumed, lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    opt2.load_state_dict(saved)
    for step in range(3):
        for p, r in zip(params, resumed):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            r.grad = p.grad.clone()
        opt.step()
        opt2.step()
    assert opt2.engine_report()[0]["ran"] == "fused"
    assert_same_training((params, opt), (resumed, opt2), "resumed")
