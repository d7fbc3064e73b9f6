"""ScheduleFreeSGD's step in the native kernel (kernels/cpu/schedule_free.h) against its oracles.

The schedulefree package's SGDScheduleFree is the oracle of torch's rounding: bitwise for float32 and
float64 over 120 steps with train()/eval() toggling, warmup, r, weight_lr_power and weight decay;
bitwise for bfloat16 and float16 where the kernel follows torch's scalar remainder (AVX2), else within a stated
bound a step (bfloat16: one ulp; float16: FLOAT16_REMAINDER_ULPS). With stochastic rounding the oracle is the
Python path (rules.schedule_free.schedule_free_update_rounded), bitwise.
"""

from __future__ import annotations

import copy
import pickle
import random

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
# TorchChunks: AVX2, and AVX512 whose loop runs 32 elements too), else within one ulp a step. The large shapes are split among torch's threads.
BF16_BITWISE = torch.backends.cpu.get_cpu_capability() in native_extras.BF16_LOOP_ELEMENTS
BF16_SHAPES = [*SHAPES, (40_000,), (70_001,), (3, 33_000)]

# float16 at torch's rounding: bitwise with AVX2 and AVX512, where the kernel follows torch's scalar remainder (the last
# n mod 32 elements of each of torch's thread chunks add a + f16(α·b), rounded twice, where its vector loop
# is one fma). Where it does not (other capabilities), each element of torch's remainder is within
# FLOAT16_REMAINDER_ULPS (without weight decay, with it) ulps of torch's at the scale
# max(1, γ)·max(|y|, |z|, |g|, λ|y|, |g + λy|): a twice-rounded add differs by about 1.5 ulps of its result,
# and with weight decay g + λy by 1.5 ulps of itself, carried into y and z times |α| ≤ γ (2 ulps of the
# scale each: 1.5 + 3). Measured over 2,400 random states (AVX2 with torch's loop withheld): 1 and 3.
F16_LANES = bool(getattr(native_module(), "HALF_LANES", 0))  # else the kernel refuses float16 (no F16C)
F16_BITWISE = F16_LANES and torch.backends.cpu.get_cpu_capability() in native_extras.F16_LOOP_ELEMENTS
FLOAT16_REMAINDER_ULPS = (1.5, 4.5)
F16_SIZES = [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 100, 1000, 4097, 32767, 32768, 40_001, 65_537, 70_001]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_matches_schedulefree_each_step(dtype):
    """Each step from the same state (resynchronised to schedulefree's after it): bitwise with AVX2, else
    at most 1 ulp (bfloat16) or FLOAT16_REMAINDER_ULPS[1] (float16) apart in ulps at the scale of the step's
    operands (helpers.ulps_at_scale; lr < 1)."""
    if dtype == torch.float16 and not F16_LANES:
        pytest.skip("the kernel was built without F16C/AVX2/FMA")
    bitwise, bound = (BF16_BITWISE, 1.0) if dtype == torch.bfloat16 else (F16_BITWISE, FLOAT16_REMAINDER_ULPS[1])
    options = dict(lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=4)
    initial = make_params(dtype, shapes=BF16_SHAPES)
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
                if bitwise:
                    assert torch.equal(x, y), (step, x.shape)
                else:
                    assert x.numel() == 0 or float(ulps_at_scale(x, y, scale).max()) <= bound
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


def test_float16_runs_native_and_refused_groups_fall_back_visibly():
    p = torch.randn(10, dtype=torch.float16, requires_grad=True)
    q = torch.randn(10, requires_grad=True)
    c = torch.randn(10, dtype=torch.complex64, requires_grad=True)
    opt = torchsgd.ScheduleFreeSGD([{"params": [p]}, {"params": [q]}, {"params": [c]}], lr=0.5)
    opt.train()
    p.grad, q.grad, c.grad = torch.randn_like(p), torch.randn_like(q), torch.randn_like(c)
    opt.step()
    report = opt.engine_report()
    if native_module().HALF_LANES:  # float16 at torch's rounding: F16C lanes
        assert report[0] == {"group": 0, "selected": "fused", "ran": "fused", "reason": None}
    else:  # built without F16C/AVX2/FMA: refused
        assert report[0]["ran"] == "foreach" and "dtype" in report[0]["reason"]
    assert report[1] == {"group": 1, "selected": "fused", "ran": "fused", "reason": None}
    assert report[2]["ran"] == "foreach" and "dtype" in report[2]["reason"]  # complex: refused
    # a Tensor lr: the kernel takes numbers
    opt = torchsgd.ScheduleFreeSGD([p], lr=torch.tensor(0.5))
    opt.train()
    opt.step()
    assert opt.engine_report()[0]["ran"] == "foreach" and "Tensor" in opt.engine_report()[0]["reason"]
    # views that share memory: the kernel refuses, the Python path runs in order
    base = torch.zeros(10)
    views = [base[:6].requires_grad_(), base[4:].requires_grad_()]
    opt = torchsgd.ScheduleFreeSGD(views, lr=0.5)
    opt.train()
    for v in views:
        v.grad = torch.ones_like(v)
    opt.step()
    assert "share memory" in opt.engine_report()[0]["reason"]


def float16_states(rng: random.Random, extremes: bool):
    """One step's options, the schedule's bookkeeping and y, z, g of float16 tensors of random sizes; with
    extremes, magnitudes over the whole float16 range (subnormals, overflow) and some inf and NaN."""
    sizes = [rng.choice(F16_SIZES) for _ in range(rng.randint(1, 3))]
    options = dict(
        lr=rng.choice([1e-3, 0.05, 0.5, 2.0, 7.3, 30.0]),
        momentum=rng.uniform(0.05, 0.99),
        weight_decay=rng.choice([0.0, 1e-3, 0.05, 0.5, 3.0]),
    )
    k = rng.choice([0, 1, 2, 5, 50])  # k = 0: the first step (c = 1); else c = lr²/(k + lr²): both lerp sides
    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def tensor(n, scale):
        x = torch.randn(n, generator=generator) * scale
        if extremes:
            x = x * torch.exp(torch.randn(n, generator=generator) * 6)
            u = torch.rand(n, generator=generator)
            x = torch.where(u < 0.01, float("inf"), torch.where(u < 0.02, float("nan"), x))
            x = torch.where((u > 0.02) & (u < 0.03), -x, x)
        return x.half()

    scales = [10 ** rng.uniform(-3, 2) for _ in range(3)]
    ys = [tensor(n, scales[0]) for n in sizes]
    zs = [(y.float() + tensor(y.numel(), scales[1]).float()).half() for y in ys]
    gs = [tensor(n, scales[2]) for n in sizes]
    return options, k, ys, zs, gs


def one_step(cls, options, k, ys, zs, gs):
    """One training step of cls (ScheduleFreeSGD or SGDScheduleFree) from the given state: y, z as given
    (z = y at k = 0, the first step); the new y and z."""
    params = [y.clone().requires_grad_() for y in ys]
    opt = cls(params, **options)
    opt.train()
    if k:
        opt.param_groups[0].update(k=k, weight_sum=float(k), lr_max=options["lr"])
    for p, z, g in zip(params, zs, gs):
        if k:
            opt.state[p]["z"] = z.clone()
        p.grad = g.clone()
    opt.step()
    if cls is torchsgd.ScheduleFreeSGD:
        assert opt.engine_report()[0]["ran"] == "fused", opt.engine_report()
    return [(p.detach().clone(), opt.state[p]["z"].clone()) for p in params]


def assert_float16_step_matches(rng, threads, extremes, bitwise):
    options, k, ys, zs, gs = float16_states(rng, extremes)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = one_step(torchsgd.ScheduleFreeSGD, options, k, ys, zs, gs)
        theirs = one_step(schedulefree.SGDScheduleFree, options, k, ys, zs, gs)
    finally:
        torch.set_num_threads(previous)
    bound = FLOAT16_REMAINDER_ULPS[options["weight_decay"] != 0]
    for y, z, g, (y1, z1), (y2, z2) in zip(ys, zs, gs, ours, theirs):
        operands = torch.maximum(torch.maximum(y.abs(), z.abs()), g.abs()).float()
        decayed = g.float() + options["weight_decay"] * y.float()
        operands = torch.maximum(torch.maximum(operands, options["weight_decay"] * y.float().abs()), decayed.abs())
        scale = operands * max(1.0, options["lr"])
        for name, a, b in (("y", y1, y2), ("z", z1, z2)):
            what = (name, y.numel(), threads, options, k)
            if bitwise:  # the bits: NaN payloads and signs of zero too
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), what
            else:
                distance = ulps_at_scale(a, b, scale.clamp(max=65504).half())
                assert a.numel() == 0 or float(distance.max()) <= bound, what


@pytest.mark.skipif(not F16_LANES, reason="the kernel was built without F16C/AVX2/FMA")
@pytest.mark.parametrize("threads", [1, 2])
def test_float16_step_from_random_states_matches_schedulefree(threads):
    """One step from the same random state, sizes with every remainder of 8, 16 and 32 and tensors split
    among 2 threads: bitwise schedulefree with AVX2 (also at inf, NaN, subnormals and overflow)."""
    rng = random.Random(threads)
    for case in range(40):
        assert_float16_step_matches(rng, threads, extremes=case % 4 == 3, bitwise=F16_BITWISE)


@pytest.mark.skipif(not F16_LANES, reason="the kernel was built without F16C/AVX2/FMA")
def test_float16_remainder_bound_where_the_kernel_does_not_follow_torch(monkeypatch):
    """Where the kernel does not know torch's loop (another CPU capability: simulated by withholding it),
    torch's scalar remainder differs from the kernel's fma: within FLOAT16_REMAINDER_ULPS of schedulefree."""
    monkeypatch.setattr(native_extras, "F16_LOOP_ELEMENTS", {})
    rng = random.Random(3)
    for case in range(60):
        assert_float16_step_matches(rng, 1 + case % 2, extremes=False, bitwise=False)


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
    dtype=st.sampled_from(
        [
            torch.float32,
            torch.float64,
            *([torch.bfloat16] if BF16_BITWISE else []),
            *([torch.float16] if F16_BITWISE else []),
        ]
    ),
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
