"""ScheduleFreeSGD's step in the native kernel (kernels/cpu/schedule_free.h) against its oracles.

The schedulefree package's SGDScheduleFree is the oracle of torch's rounding: bitwise for float32 and
float64 over 120 steps with train()/eval() toggling, warmup, r, weight_lr_power and weight decay; within
bitwise for bfloat16 where the kernel follows torch's scalar remainder (AVX2), else within one ulp a step. With stochastic
rounding the oracle is the Python path (rules.schedule_free.schedule_free_update_rounded), bitwise.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import torchsgd
from helpers import ulps_at_scale
from torchsgd.engines import native_extras
from torchsgd.engines.build import native_module

schedulefree = pytest.importorskip("schedulefree")
pytestmark = pytest.mark.skipif(native_module() is None, reason="the native CPU kernel is unavailable")

SHAPES = [(37, 100), (), (0,), (7,), (3, 5), (2500,), (1,), (17, 33)]


def make_params(dtype: torch.dtype, seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def twins(dtype, options, **ours_options):
    initial = make_params(dtype)
    ours_params = [t.detach().clone().requires_grad_() for t in initial]
    ref_params = [t.detach().clone().requires_grad_() for t in initial]
    ours = torchsgd.ScheduleFreeSGD(ours_params, **options, **ours_options)
    ref = schedulefree.SGDScheduleFree(ref_params, **options)
    return ours_params, ours, ref_params, ref


def give_grads(generator, *param_lists):
    first = param_lists[0]
    for i, p in enumerate(first):
        g = torch.randn(p.shape, generator=generator).to(p.dtype)
        for params in param_lists:
            params[i].grad = g.clone()


OPTIONS = [
    dict(lr=0.5, momentum=0.9),
    dict(lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=5),
    dict(lr=2.0, momentum=0.4, weight_decay=1e-3, warmup_steps=3, r=0.5, weight_lr_power=1.0),
    dict(lr=0.1, momentum=0.98, r=2.0, weight_lr_power=0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS)
def test_native_step_is_bitwise_schedulefree_over_120_steps_with_train_eval(dtype, options):
    ours_params, ours, ref_params, ref = twins(dtype, options)
    generator = torch.Generator().manual_seed(1)
    for step in range(120):
        ours.train()
        ref.train()
        give_grads(generator, ours_params, ref_params)
        grads_before = [p.grad.clone() for p in ours_params]
        ours.step()
        ref.step()
        assert ours.engine_report()[0]["ran"] == "fused", ours.engine_report()
        for p, g in zip(ours_params, grads_before):
            assert torch.equal(p.grad, g)  # the kernel only reads the gradient (schedulefree adds into it)
        if step % 10 == 0:
            ours.eval()
            ref.eval()
        for a, b in zip(ours_params, ref_params):
            assert torch.equal(a, b)
            assert torch.equal(ours.state[a]["z"], ref.state[b]["z"])
    ours.eval()
    ref.eval()
    for a, b in zip(ours_params, ref_params):
        assert torch.equal(a, b)


# bfloat16 is bitwise where the kernel emulates torch's scalar remainder (kernels/cpu/schedule_free.h,
# TorchChunks: AVX2), else within one ulp a step. The large shapes are split among torch's threads.
BF16_BITWISE = torch.backends.cpu.get_cpu_capability() in native_extras.BF16_LOOP_ELEMENTS
BF16_SHAPES = [*SHAPES, (40_000,), (70_001,), (3, 33_000)]


def test_bfloat16_matches_schedulefree_each_step():
    """Each step from the same state (resynchronised to schedulefree's after it): bitwise with AVX2, else
    at most 1 ulp apart in ulps at the scale of the step's operands (helpers.ulps_at_scale)."""
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=4)
    initial = make_params(torch.bfloat16, shapes=BF16_SHAPES)
    ours_params = [t.detach().clone().requires_grad_() for t in initial]
    ref_params = [t.detach().clone().requires_grad_() for t in initial]
    ours = torchsgd.ScheduleFreeSGD(ours_params, **options)
    ref = schedulefree.SGDScheduleFree(ref_params, **options)
    ours.train()
    ref.train()
    generator = torch.Generator().manual_seed(2)
    for step in range(100):
        give_grads(generator, ours_params, ref_params)
        scales = [
            torch.maximum(torch.maximum(p.detach().abs(), ours.state[p]["z"].abs()), p.grad.abs())
            if "z" in ours.state[p]
            else torch.maximum(p.detach().abs(), p.grad.abs())
            for p in ours_params
        ]
        ours.step()
        ref.step()
        assert ours.engine_report()[0]["ran"] == "fused"
        for a, b, scale in zip(ours_params, ref_params, scales):
            for x, y in ((a.detach(), b.detach()), (ours.state[a]["z"], ref.state[b]["z"])):
                if BF16_BITWISE:
                    assert torch.equal(x, y), (step, x.shape)
                else:
                    assert x.numel() == 0 or float(ulps_at_scale(x, y, scale).max()) <= 1.0
            with torch.no_grad():
                a.copy_(b)
                ours.state[a]["z"].copy_(ref.state[b]["z"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_bitwise_the_python_path(dtype):
    initial = make_params(dtype)
    runs = []
    for foreach in (None, True):  # the kernel, and the Python path it must equal
        params = [t.detach().clone().requires_grad_() for t in initial]
        opt = torchsgd.ScheduleFreeSGD(
            params, lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=3, foreach=foreach,
            stochastic_rounding=True, seed=7,
        )  # fmt: skip
        runs.append((params, opt))
    generator = torch.Generator().manual_seed(3)
    for step in range(100):
        for _, opt in runs:
            opt.train()
        give_grads(generator, *(params for params, _ in runs))
        for _, opt in runs:
            opt.step()
            if step % 25 == 0:
                opt.eval()
        assert runs[0][1].engine_report()[0]["ran"] == "fused"
        assert runs[1][1].engine_report()[0]["ran"] == "foreach"
        for a, b in zip(runs[0][0], runs[1][0]):
            assert torch.equal(a, b)
            assert torch.equal(runs[0][1].state[a]["z"], runs[1][1].state[b]["z"])


def test_stochastic_rounding_rounds_up_and_down():
    """Updates far below a bfloat16 ulp survive on average, where rounding to nearest erases them."""
    p = torch.ones(20000, dtype=torch.bfloat16, requires_grad=True)
    opt = torchsgd.ScheduleFreeSGD([p], lr=1e-4, momentum=0.9, stochastic_rounding=True)
    opt.train()
    for _ in range(10):
        p.grad = torch.ones_like(p)
        opt.step()
    assert (p != 1).any() and float(p.detach().float().mean()) < 1.0


def test_float16_and_refused_groups_fall_back_visibly():
    p = torch.randn(10, dtype=torch.float16, requires_grad=True)
    q = torch.randn(10, requires_grad=True)
    opt = torchsgd.ScheduleFreeSGD([{"params": [p]}, {"params": [q]}], lr=0.5)
    opt.train()
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    opt.step()
    report = opt.engine_report()
    assert report[0]["ran"] == "foreach" and "dtype" in report[0]["reason"]
    assert report[1] == {"group": 1, "selected": "fused", "ran": "fused", "reason": None}
    # views that share memory: the kernel refuses, the Python path runs in order
    base = torch.zeros(10)
    views = [base[:6].requires_grad_(), base[4:].requires_grad_()]
    opt = torchsgd.ScheduleFreeSGD(views, lr=0.5)
    opt.train()
    for v in views:
        v.grad = torch.ones_like(v)
    opt.step()
    assert "share memory" in opt.engine_report()[0]["reason"]


@pytest.mark.parametrize("foreach,ran", [(False, "reference"), (True, "foreach")])
def test_foreach_flag_selects_the_python_paths(foreach, ran):
    p = torch.randn(5, requires_grad=True)
    opt = torchsgd.ScheduleFreeSGD([p], foreach=foreach)
    assert opt.engine_report()[0]["ran"] is None
    opt.train()
    p.grad = torch.randn(5)
    opt.step()
    assert opt.engine_report()[0] == {"group": 0, "selected": ran, "ran": ran, "reason": None}


def test_state_dict_round_trip_resumes_bitwise():
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, warmup_steps=3)
    ours_params, ours, ref_params, ref = twins(torch.float32, options)
    generator = torch.Generator().manual_seed(4)
    for opt in (ours, ref):
        opt.train()
    for _ in range(7):
        give_grads(generator, ours_params, ref_params)
        ours.step()
        ref.step()
    ours.eval()
    saved = copy.deepcopy(ours.state_dict())
    params = [p.detach().clone().requires_grad_() for p in ours_params]
    resumed = torchsgd.ScheduleFreeSGD(params, **options)
    resumed.load_state_dict(saved)
    theirs = [p.detach().clone().requires_grad_() for p in ours_params]
    into_ref = schedulefree.SGDScheduleFree(theirs, **options)
    into_ref.load_state_dict(copy.deepcopy(saved))  # loading keeps the tensors: one copy each
    for opt in (resumed, into_ref):
        opt.train()
    for _ in range(5):
        give_grads(generator, params, theirs)
        resumed.step()
        into_ref.step()
        assert resumed.engine_report()[0]["ran"] == "fused"
        for a, b in zip(params, theirs):
            assert torch.equal(a, b)


def test_rounding_options_survive_pickling():
    p = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    opt = torchsgd.ScheduleFreeSGD([p], stochastic_rounding=True, seed=3)
    copied = pickle.loads(pickle.dumps(opt))
    assert copied.stochastic_rounding is True and copied.seed == 3
    with pytest.raises(TypeError, match="stochastic_rounding"):
        torchsgd.ScheduleFreeSGD([p], stochastic_rounding="yes")


@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=5),
    ckp1_steps=st.integers(1, 4),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.5]),
    momentum=st.floats(0.05, 0.99),
    lr=st.floats(1e-3, 5.0),
    dtype=st.sampled_from([torch.float32, torch.float64, *([torch.bfloat16] if BF16_BITWISE else [])]),
)
def test_fuzz_native_schedule_free_sizes_and_scalars(sizes, ckp1_steps, weight_decay, momentum, lr, dtype):
    """Odd sizes (vector remainders), every lerp weight side (|c| < 0.5 and not), bitwise schedulefree."""
    options = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=2)
    initial = make_params(dtype, seed=len(sizes), shapes=[(n,) for n in sizes])
    ours_params = [t.detach().clone().requires_grad_() for t in initial]
    ref_params = [t.detach().clone().requires_grad_() for t in initial]
    ours = torchsgd.ScheduleFreeSGD(ours_params, **options)
    ref = schedulefree.SGDScheduleFree(ref_params, **options)
    ours.train()
    ref.train()
    generator = torch.Generator().manual_seed(sum(sizes))
    for _ in range(ckp1_steps):
        give_grads(generator, ours_params, ref_params)
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        assert torch.equal(a, b)
        assert torch.equal(ours.state[a]["z"], ref.state[b]["z"])
