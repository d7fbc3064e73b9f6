"""LARS's norms and trust ratios in the native kernel (kernels/cpu/lars.h) against the Python path.

The reference is rules.lars.trust_ratios (torch's _foreach_norm and tensor arithmetic), which LARS runs
wherever the kernel does not take the tensors: the kernel's ratios must be its bits, and LARS over 100
steps with the kernel's ratios must be bitwise LARS with the Python ones.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchsgd
from torchsgd.engines import native_extras
from torchsgd.engines.build import native_module
from torchsgd.rules.lars import trust_ratios

pytestmark = pytest.mark.skipif(
    native_module() is None or torch.backends.cpu.get_cpu_capability() not in native_extras.VECTOR_BYTES,
    reason="the native CPU kernel is unavailable, or torch's CPU capability is one it does not follow",
)


def ratios_both_ways(params, **options):
    grads = [p.grad for p in params]
    expected = trust_ratios(params, grads, **options)
    actual = native_extras.lars_trust_ratios(params, **options)
    assert actual is not None
    return actual, expected


def assert_same_ratios(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        assert torch.equal(a, e) or (torch.isnan(a) and torch.isnan(e)), (a, e)


@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.3]),
    eps=st.sampled_from([0.0, 1e-8]),
    trust_clip=st.booleans(),
    scale=st.sampled_from([1e-6, 1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_kernel_trust_ratios_are_bitwise_trust_ratios(sizes, dtype, weight_decay, eps, trust_clip, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.randn(n, 1 + n % 3, generator=generator).to(dtype).requires_grad_()
        p.grad = (torch.randn(p.shape, generator=generator) * scale).to(dtype)
        params.append(p)
    options = dict(weight_decay=weight_decay, trust_coefficient=1e-3, eps=eps, lr=0.01, trust_clip=trust_clip)
    assert_same_ratios(*ratios_both_ways(params, **options))


def test_large_and_special_tensors():
    """Sizes around the vector widths and a large one, zeros (ratio 1), infinities and NaN."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for n in [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000, 100_003, 1_000_000]:
        p = torch.randn(n, 2, generator=generator).requires_grad_()
        p.grad = torch.randn(n, 2, generator=generator) * 1e-3
        params.append(p)
    special = [torch.zeros(3, 3), torch.ones(3, 3), torch.full((3, 3), float("inf")), torch.full((3, 3), float("nan"))]
    for values in special:
        for grad in special:
            p = values.clone().requires_grad_()
            p.grad = grad.clone()
            params.append(p)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        typed = []
        for p in params:
            q = p.detach().to(dtype).requires_grad_()
            q.grad = p.grad.to(dtype)
            typed.append(q)
        for trust_clip in (False, True):
            options = dict(weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8, lr=0.01, trust_clip=trust_clip)
            assert_same_ratios(*ratios_both_ways(typed, **options))


def test_kernel_declines_what_it_does_not_follow():
    p = torch.randn(4, 4, dtype=torch.float16, requires_grad=True)
    p.grad = torch.randn(4, 4, dtype=torch.float16)
    options = dict(weight_decay=0.0, trust_coefficient=1e-3, eps=1e-8, lr=0.1, trust_clip=False)
    assert native_extras.lars_trust_ratios([p], **options) is None
    q = torch.randn(4, 4).t().requires_grad_()  # not contiguous
    q.grad = torch.randn(4, 4)
    assert native_extras.lars_trust_ratios([q], **options) is None


def counted(patch, calls, name):
    """Patch native_extras.<name> to count its calls (each one that computed: not None) in calls[name]."""
    original = getattr(native_extras, name)

    def counting(*a, **k):
        result = original(*a, **k)
        if result is not None:
            calls[name] = calls.get(name, 0) + 1
        return result

    patch.setattr(native_extras, name, counting)


def run_lars(initial, grads, threads=None, **options):
    """The parameters after len(grads) steps of LARS from ``initial``."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        params = [t.clone().requires_grad_() for t in initial]
        opt = torchsgd.LARS(params, **options)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        assert opt.engine_report()[0]["ran"] == "fused"
        return [p.detach().clone() for p in params]
    finally:
        torch.set_num_threads(previous)


def lars_runs(monkeypatch, dtype, steps, expect_fused_step=True, **options):
    """The parameters after `steps` of LARS three ways: the kernel's fused step (native_extras.lars_step),
    the kernel's trust ratios with the fused engine's step (lars_step declining), and the Python ratios."""
    generator = torch.Generator().manual_seed(5)
    shapes = [(16, 8), (16,), (4, 16), (4,), (3, 3, 3), (1, 129)]
    initial = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=generator) * 1e-2).to(dtype) for s in shapes] for _ in range(steps)]
    results = []
    for mode in ("lars_step", "lars_trust_ratios", "python"):
        calls: dict[str, int] = {}
        with monkeypatch.context() as patch:
            counted(patch, calls, "lars_step")
            counted(patch, calls, "lars_trust_ratios")
            if mode != "lars_step":
                patch.setattr(native_extras, "lars_step", lambda *a, **k: None)
            if mode == "python":
                patch.setattr(native_extras, "lars_trust_ratios", lambda *a, **k: None)
            results.append(run_lars(initial, grads, **options))
        if mode == "lars_step":
            expected = {"lars_step": steps} if expect_fused_step else {"lars_trust_ratios": steps}
        else:
            expected = {"lars_trust_ratios": steps} if mode == "lars_trust_ratios" else {}
        assert calls == expected, (mode, calls)
    return results


@pytest.mark.parametrize(
    "options",
    [
        dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
        dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2, trust_coefficient=0.02, trust_clip=True),
        dict(lr=0.1, momentum=0.0, exclude_1d=False, eps=0.0),
        dict(lr=0.1, momentum=0.9, dampening=0.3, maximize=True, weight_decay=0.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lars_with_kernel_ratios_is_bitwise_lars_over_100_steps(monkeypatch, dtype, options):
    fused_step, kernel_ratios, python = lars_runs(monkeypatch, dtype, 100, **options)
    for a, b, c in zip(fused_step, kernel_ratios, python, strict=True):
        assert torch.equal(a, c)
        assert torch.equal(b, c)


def test_lars_stochastic_rounding_with_kernel_ratios(monkeypatch):
    """The lifted storage is not lars_step's: the kernel's ratios and the fused engine's step run."""
    runs = lars_runs(
        monkeypatch,
        torch.bfloat16,
        30,
        expect_fused_step=False,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        stochastic_rounding=True,
        seed=1,
    )
    for a, b, c in zip(*runs, strict=True):
        assert torch.equal(a, c)
        assert torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_on_one_and_two_threads_is_bitwise_the_python_path(monkeypatch, dtype):
    """Tensors larger than the update's thread grain and many small ones: lars_step spreads whole tensors
    over the threads, the step it replaces splits them; the numbers are the same on 1 and 2 threads."""
    generator = torch.Generator().manual_seed(11)
    shapes = [(300, 700), (1000, 1)] + [(n % 13 + 1, n % 7 + 2) for n in range(40)] + [(64, 3, 3, 3), (70000, 2)]
    initial = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=generator) * 1e-3).to(dtype) for s in shapes] for _ in range(3)]
    options = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    with monkeypatch.context() as patch:
        patch.setattr(native_extras, "lars_step", lambda *a, **k: None)
        patch.setattr(native_extras, "lars_trust_ratios", lambda *a, **k: None)
        python = run_lars(initial, grads, threads=2, **options)
    for threads in (1, 2):
        calls: dict[str, int] = {}
        with monkeypatch.context() as patch:
            counted(patch, calls, "lars_step")
            fused = run_lars(initial, grads, threads=threads, **options)
        assert calls == {"lars_step": 3}
        for a, b in zip(fused, python, strict=True):
            assert torch.equal(a, b)


def step_options(**changes):
    options = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, nesterov=False, maximize=False)
    options.update(trust_coefficient=1e-3, eps=1e-8, trust_clip=False)
    options.update(changes)
    return options


def test_lars_step_declines_what_it_does_not_take():
    """None, with nothing changed (no buffer made, no parameter written): the caller's two passes run."""

    def with_grad(t):
        t = t.requires_grad_()
        t.grad = torch.randn(t.shape, dtype=t.dtype)
        return t

    half = with_grad(torch.randn(4, 4, dtype=torch.float16))
    transposed = torch.randn(4, 4).t().requires_grad_()
    transposed.grad = torch.randn(4, 4).t()
    zero_d = with_grad(torch.randn(()))
    a, b = with_grad(torch.randn(4, 4)), with_grad(torch.randn(4, 4, dtype=torch.float64))
    base = torch.randn(8, 4)
    overlapping = [with_grad(base[:6].detach()), with_grad(base[2:].detach())]
    no_grad = torch.randn(4, 4, requires_grad=True)
    for params in ([half], [transposed], [zero_d], [a, b], overlapping, [a, no_grad]):
        before = [p.detach().clone() for p in params]
        state: dict = {}
        assert native_extras.lars_step(params, state, **step_options()) is None
        assert state == {}
        for p, q in zip(params, before, strict=True):
            assert torch.equal(p.detach(), q)
    bad_buffer = with_grad(torch.randn(4, 4))
    state = {bad_buffer: {"momentum_buffer": torch.randn(4, 4, dtype=torch.float64)}}
    assert native_extras.lars_step([bad_buffer], state, **step_options()) is None


def test_lars_falls_back_where_lars_step_declines(monkeypatch):
    """A float16 group or shared memory: LARS steps as before lars_step (the ratios and the engines' step),
    with the same numbers and report."""

    def fresh():
        half = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).half()
        base = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
        groups = [[half.clone().requires_grad_()], [base[:6].clone(), base[2:].clone()]]
        shared = base.clone()
        groups[1] = [shared[:6].detach().requires_grad_(), shared[2:].detach().requires_grad_()]
        for params in groups:
            for q in params:
                q.grad = torch.full(q.shape, 0.01, dtype=q.dtype)
        return groups

    results = []
    for declined in (False, True):
        with monkeypatch.context() as patch:
            if declined:
                patch.setattr(native_extras, "lars_step", lambda *a, **k: None)
            groups = fresh()
            reports = []
            for params in groups:
                opt = torchsgd.LARS(params, lr=0.1)
                opt.step()
                opt.step()
                reports.append(opt.engine_report())
            results.append(([q.detach().clone() for params in groups for q in params], reports))
    (ours, our_reports), (theirs, their_reports) = results
    assert our_reports == their_reports
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_lars_step_creates_buffers_and_reads_them(monkeypatch):
    """The first step's buffers come back as (param, buffer) pairs and are the state the second step reads."""
    p = torch.randn(32, 8, requires_grad=True)
    p.grad = torch.randn(32, 8) * 1e-2
    state: dict = {}
    created = native_extras.lars_step([p], state, **step_options())
    assert created is not None and len(created) == 1 and created[0][0] is p
    state[p] = {"momentum_buffer": created[0][1]}
    assert native_extras.lars_step([p], state, **step_options()) == []


def test_lars_with_clipping_keeps_the_python_ratios(monkeypatch):
    """With max_grad_norm the norms are of the clipped gradients: the Python path computes them."""
    monkeypatch.setattr(native_extras, "lars_trust_ratios", lambda *a, **k: pytest.fail("kernel ratios used"))
    p = torch.randn(4, 4, requires_grad=True)
    p.grad = torch.randn(4, 4)
    torchsgd.LARS([p], lr=0.1, max_grad_norm=0.5).step()
