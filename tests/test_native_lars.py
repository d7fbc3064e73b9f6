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


def lars_runs(monkeypatch, dtype, steps, **options):
    """The parameters after `steps` of LARS with the kernel's trust ratios and with the Python ones."""
    generator = torch.Generator().manual_seed(5)
    shapes = [(16, 8), (16,), (4, 16), (4,), (3, 3, 3), (1, 129)]
    initial = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads = [[(torch.randn(s, generator=generator) * 1e-2).to(dtype) for s in shapes] for _ in range(steps)]
    results = []
    calls = []
    for native in (True, False):
        with monkeypatch.context() as patch:
            if not native:
                patch.setattr(native_extras, "lars_trust_ratios", lambda *a, **k: None)
            else:
                original = native_extras.lars_trust_ratios

                def counting(*a, **k):
                    calls.append(1)
                    return original(*a, **k)

                patch.setattr(native_extras, "lars_trust_ratios", counting)
            params = [t.clone().requires_grad_() for t in initial]
            opt = torchsgd.LARS(params, **options)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                opt.step()
            assert opt.engine_report()[0]["ran"] == "fused"
            results.append([p.detach().clone() for p in params])
    assert len(calls) == steps
    return results


@pytest.mark.parametrize(
    "options",
    [
        dict(lr=0.1, momentum=0.9, weight_decay=1e-3),
        dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2, trust_coefficient=0.02, trust_clip=True),
        dict(lr=0.1, momentum=0.0, exclude_1d=False, eps=0.0),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lars_with_kernel_ratios_is_bitwise_lars_over_100_steps(monkeypatch, dtype, options):
    native, python = lars_runs(monkeypatch, dtype, 100, **options)
    for a, b in zip(native, python):
        assert torch.equal(a, b)


def test_lars_stochastic_rounding_with_kernel_ratios(monkeypatch):
    native, python = lars_runs(
        monkeypatch, torch.bfloat16, 30, lr=0.1, momentum=0.9, weight_decay=1e-3, stochastic_rounding=True, seed=1
    )
    for a, b in zip(native, python):
        assert torch.equal(a, b)


def test_lars_with_clipping_keeps_the_python_ratios(monkeypatch):
    """With max_grad_norm the norms are of the clipped gradients: the Python path computes them."""
    monkeypatch.setattr(native_extras, "lars_trust_ratios", lambda *a, **k: pytest.fail("kernel ratios used"))
    p = torch.randn(4, 4, requires_grad=True)
    p.grad = torch.randn(4, 4)
    torchsgd.LARS([p], lr=0.1, max_grad_norm=0.5).step()
