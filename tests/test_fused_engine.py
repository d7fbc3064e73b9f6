"""The fused engine against the reference, and staying right through what users do to params and state.

Every comparison is against torch.optim.SGD(foreach=False) (the reference), never the fast path against
itself. float32/float64 must be bitwise; float16/bfloat16 must hold the stated per-step bound.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch

import torchsgd
from helpers import KERNEL_OPTIONS, train
from torchsgd.engines.base import OVERLAP_REASON
from torchsgd.engines.build import native_module

pytestmark = pytest.mark.skipif(native_module() is None, reason="the native CPU kernel could not be built here")

OPTIONS = KERNEL_OPTIONS
SHAPES = [(), (0,), (1,), (67,), (64,), (5, 3), (33, 17), (4, 3, 2), (40000,)]


def twins(shapes, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ours = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    return ours, theirs


def set_grads(ours, theirs, generator, dtype):
    for a, b in zip(ours, theirs):
        g = torch.randn(a.shape, generator=generator, dtype=torch.float64).to(dtype)
        a.grad, b.grad = g.clone(), g.clone()


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    x = x.double().abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(x))) * info.eps


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flags", [dict(), dict(fused=True)], ids=["default", "fused"])
def test_bitwise_reference_over_120_steps(options, dtype, flags):
    ours, theirs = twins(SHAPES, dtype)
    opt = torchsgd.SGD(ours, lr=0.05, **options, **flags)
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(120):
        set_grads(ours, theirs, generator, dtype)
        opt.step()
        ref.step()
    assert opt.engine_report()[0]["ran"] == "fused", f"the group left the native kernel: {opt.engine_report()}"
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    for a, b in zip(ours, theirs):
        if options.get("momentum"):
            assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
        else:
            assert a not in opt.state
    assert opt.state_dict()["param_groups"] == [
        {**g, "foreach": None, "fused": flags.get("fused")} for g in ref.state_dict()["param_groups"]
    ]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_float16_stays_native_over_120_steps(options):
    """float16 runs in the kernel (eight F16C lanes at a time, the remainder element by element) over 120
    steps, on shapes with and without a remainder, and stays close to torch's loop: the per-step bound is
    held by test_half_precision_within_stated_bound_per_step; here, after 120 steps, at most 1% of the
    elements differ (0.01-0.02% measured on 100,000 elements after 50)."""
    ours, theirs = twins(SHAPES, torch.float16)
    opt = torchsgd.SGD(ours, lr=0.05, **options)
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(120):
        set_grads(ours, theirs, generator, torch.float16)
        opt.step()
        ref.step()
    kernel = native_module()
    if kernel is not None and kernel.HALF_LANES:  # built without F16C/AVX2/FMA, float16 goes to foreach
        assert opt.engine_report()[0]["ran"] == "fused", "the float16 group left the native kernel"
    differing = sum(int((a != b).sum()) for a, b in zip(ours, theirs))
    total = sum(a.numel() for a in ours)
    assert differing <= max(1, total // 100), f"{differing} of {total} elements differ from torch's loop"
    for a, b in zip(ours, theirs):
        assert torch.equal(torch.isnan(a), torch.isnan(b))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_stated_bound_per_step(options, dtype):
    """One step from identical state: each element equals torch's or is within 4 ulps of the step's operands.

    torch's own fp16/bf16 CPU kernels round differently in their vector body and their scalar tail; the
    fused engine always uses the vector-body arithmetic, so only torch's tail elements can differ.
    """
    generator = torch.Generator().manual_seed(2)
    ours, theirs = twins([(67,), (5, 3), (300, 300), (1,)], dtype, seed=3)
    opt = torchsgd.SGD(ours, lr=0.05, **options)
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **options)
    differing = total = 0
    for _ in range(5):
        for a, b in zip(ours, theirs):  # resynchronise: the bound is per step
            with torch.no_grad():
                a.copy_(b)
            if b in ref.state:
                opt.state[a]["momentum_buffer"].copy_(ref.state[b]["momentum_buffer"])
        before = [b.detach().clone() for b in theirs]
        buffers_before = [ref.state[b]["momentum_buffer"].clone() if b in ref.state else None for b in theirs]
        set_grads(ours, theirs, generator, dtype)
        opt.step()
        ref.step()
        for a, b, old, old_buffer in zip(ours, theirs, before, buffers_before):
            scale = torch.stack([old.double().abs(), b.double().abs(), a.double().abs(), b.grad.double().abs()]).amax(0)
            assert ((a.double() - b.double()).abs() <= 4 * ulp(scale, dtype)).all()
            differing += int((a != b).sum())
            total += a.numel()
            if options.get("momentum"):
                ba, bb = opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"]
                parts = [ba.double().abs(), bb.double().abs(), b.grad.double().abs() * (1 + 0.1 * old.double().abs())]
                if old_buffer is not None:
                    parts.append(old_buffer.double().abs())
                assert ((ba.double() - bb.double()).abs() <= 4 * ulp(torch.stack(parts).amax(0), dtype)).all()
    assert differing <= 0.01 * total  # only torch's scalar-tail elements


def test_fallback_groups_give_reference_numbers():
    """Groups the kernel hands back (complex, sparse, subclass, layouts, duplicates) still match torch."""
    torch.manual_seed(0)
    cases = {
        "complex": [torch.randn(4, 3, dtype=torch.complex64)],
        "mixed dtypes": [torch.randn(5), torch.randn(5, dtype=torch.float64)],
        "non-dense param": [torch.randn(6, 4)[:, ::2]],
        "expanded": [torch.randn(3, 1).expand(3, 4).clone()],
    }
    for name, params in cases.items():
        ours = [p.clone().requires_grad_() for p in params]
        theirs = [p.clone().requires_grad_() for p in params]
        opt = torchsgd.SGD(ours, lr=0.1, momentum=0.9, weight_decay=0.01)
        ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)
        for _ in range(5):
            for a, b in zip(ours, theirs):
                g = torch.randn_like(a)
                a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), name


def test_gradient_with_other_strides_than_param():
    """torch's fused bug 4: a grad laid out differently from its param. We fall back and stay right."""
    p = torch.randn(8, 8, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = torchsgd.SGD([p], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(3):
        g = torch.randn(8, 8).t()  # same shape, transposed strides
        p.grad, q.grad = g, g.contiguous()
        opt.step()
        ref.step()
    assert opt.engine_report()[0] == {
        "group": 0,
        "selected": "fused",
        "ran": "foreach",
        "reason": "a gradient is laid out differently from its parameter",
    }
    assert torch.equal(p, q)
    assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def test_clipping_next_to_float64_leaves_the_kernel_only_for_0d_parameters():
    """A float64 clip coefficient: torch clips a 0-d float32 gradient in float64 (both operands 0-d) and
    an n-d one by the coefficient's float32 rounding. Only groups with such a 0-d parameter leave the
    kernel (test_hardening.py holds the numbers); n-d float32 groups stay native and bitwise."""
    generator = torch.Generator().manual_seed(0)
    wide = torch.randn(5, generator=generator, dtype=torch.float64)
    matrix, scalar = torch.randn(4, 3, generator=generator), torch.randn((), generator=generator)
    ours = [t.clone() for t in (wide, matrix, scalar)]
    theirs = [t.clone() for t in (wide, matrix, scalar)]
    opt = torchsgd.SGD(
        [{"params": [ours[0]]}, {"params": [ours[1]]}, {"params": [ours[2]]}],
        lr=0.5,
        momentum=0.9,
        max_grad_norm=0.01,
        fused=True,
    )
    ref = torch.optim.SGD([{"params": [t]} for t in theirs], lr=0.5, momentum=0.9, foreach=False)
    reasons = []
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in ours]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        torch.nn.utils.clip_grad_norm_(theirs, 0.01)
        ref.step()
        factor = opt._check_gradients()[1]  # what step() does, one group at a time to see each engine
        assert factor.dtype == torch.float64
        reasons.append(opt._step_group(opt.param_groups[1], factor, None).reason)
        opt._step_group(opt.param_groups[0], factor, None)
        reasons.append(opt._step_group(opt.param_groups[2], factor, None).reason)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    assert reasons[0::2] == [None] * 4, "the n-d float32 group left the kernel"
    assert all("0-d parameter" in r for r in reasons[1::2])


def test_channels_last_params_and_grads_stay_native():
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    opt = torchsgd.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x = torch.randn(2, 3, 10, 10).to(memory_format=torch.channels_last)
    for _ in range(5):
        for model, o in ((conv, opt), (twin, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    assert opt.engine_report()[0]["ran"] == "fused"
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv.weight]["momentum_buffer"].stride() == conv.weight.stride()
    for a, b in zip(conv.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3)
    )


@pytest.mark.parametrize(
    "event",
    [
        "replace p.data",
        "freeze and unfreeze",
        "new group",
        "state cleared",
        "buffer replaced",
        "load_state_dict",
        "set_to_none False",
        "bucket views",
    ],
)
def test_user_actions_between_steps(event):
    """What users do to params and state between steps: the fused engine must follow torch exactly."""
    data = (torch.randn(16, 6), torch.randint(0, 3, (16,)))
    model, twin = _mlp(), _mlp()
    first, second = next(iter(model.children())), list(model.children())[2]
    first_t, second_t = next(iter(twin.children())), list(twin.children())[2]
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if event == "new group":
        opt = torchsgd.SGD(first.parameters(), **kwargs)
        ref = torch.optim.SGD(first_t.parameters(), foreach=False, **kwargs)
    else:
        opt = torchsgd.SGD(model.parameters(), **kwargs)
        ref = torch.optim.SGD(twin.parameters(), foreach=False, **kwargs)

    def act(step, m, o, layer, other, mirror):
        if step != 3:
            return
        if event == "replace p.data":
            layer.weight.data = layer.weight.data.clone() * 0.5
        elif event == "freeze and unfreeze":
            layer.weight.requires_grad_(False)
        elif event == "new group":
            o.add_param_group({"params": list(other.parameters()), "lr": 0.01})
        elif event == "state cleared":
            o.state.clear()
        elif event == "buffer replaced":
            o.state[layer.weight]["momentum_buffer"] = torch.zeros_like(layer.weight)
        elif event == "load_state_dict":
            saved = copy.deepcopy(o.state_dict())
            for _ in range(2):
                o.step()  # steps that the load must erase
            o.load_state_dict(saved)
        elif event == "set_to_none False":
            o.zero_grad(set_to_none=False)

    def mirrored(m, o, layer, other):
        return lambda step: act(step, m, o, layer, other, None)

    if event == "bucket views":
        # DDP with gradient_as_bucket_view: every .grad is a view into one flat bucket.
        for m in (model, twin):
            params = list(m.parameters())
            bucket = torch.zeros(sum(p.numel() for p in params))
            offset = 0
            for p in params:
                p.grad = bucket[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
        x, y = data
        for _ in range(6):
            for m, o in ((model, opt), (twin, ref)):
                o.zero_grad(set_to_none=False)
                torch.nn.functional.cross_entropy(m(x), y).backward()
                o.step()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) == 1, "the gradients are no longer views into one bucket"
    else:
        if event == "freeze and unfreeze":

            def unfreeze(step, m, o, layer):
                act(step, m, o, layer, None, None)
                if step == 6:
                    layer.weight.requires_grad_(True)

            train(model, opt, 9, data, before_zero_grad=lambda s: unfreeze(s, model, opt, first))
            train(twin, ref, 9, data, before_zero_grad=lambda s: unfreeze(s, twin, ref, first_t))
        else:
            train(model, opt, 8, data, before_zero_grad=mirrored(model, opt, first, second))
            train(twin, ref, 8, data, before_zero_grad=mirrored(twin, ref, first_t, second_t))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b), event
    ours, theirs = opt.state_dict(), ref.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for k in ours["state"]:
        assert torch.equal(ours["state"][k]["momentum_buffer"], theirs["state"][k]["momentum_buffer"])


DEFECTS = {
    "mixed dtypes": "unsupported or mixed dtypes",
    "non-dense param": "a parameter is not dense (overlapping or with gaps)",
    "grad layout": "a gradient is laid out differently from its parameter",
    "buffer layout": "a momentum buffer is laid out differently from its parameter",
    "sparse grad": "a gradient is sparse",
    "duplicate": OVERLAP_REASON,
}


def last_reason(opt: torchsgd.SGD) -> str | None:
    """Why the (single) group did not run where its flags chose, at its last step."""
    return opt.engine_report()[0]["reason"]


def _defective_group(n: int, defects: dict[int, str], seed: int = 0):
    """n small parameters (every fifth without a gradient) with the given defects at the given indices,
    and an identical copy for torch; each step's gradients come from make_grads."""
    g = torch.Generator().manual_seed(seed)
    base = [
        torch.randn(4, 6, generator=g, dtype=torch.float64 if defects.get(i) == "mixed dtypes" else None)
        for i in range(n)
    ]
    ours, theirs = [], []
    for i, b in enumerate(base):
        if defects.get(i) == "non-dense param":
            ours.append(torch.randn(4, 12, generator=g)[:, ::2].requires_grad_())  # every other column
            theirs.append(ours[-1].detach().clone().requires_grad_())
            continue
        ours.append(b.clone().requires_grad_())
        theirs.append(b.clone().requires_grad_())
    for i, kind in defects.items():
        if kind == "duplicate":
            ours[i], theirs[i] = ours[i - 1], theirs[i - 1]

    def make_grads(step: int):
        gen = torch.Generator().manual_seed(100 + step)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if i % 5 == 4 and step > 0:
                a.grad = b.grad = None
                continue
            grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            if defects.get(i) == "grad layout":
                a.grad, b.grad = grad.t().contiguous().t(), grad.clone()
            elif defects.get(i) == "sparse grad":
                a.grad, b.grad = grad.to_sparse(), grad.to_sparse()
            else:
                a.grad, b.grad = grad.clone(), grad.clone()

    return ours, theirs, make_grads


@pytest.mark.parametrize("n", [40, 300], ids=["one-thread check", "parallel check"])
@pytest.mark.parametrize("kind", list(DEFECTS))
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_defect_anywhere_in_a_group_is_found_and_changes_nothing(n, kind, where):
    """The kernel checks large groups (>= 256 parameters) on torch's threads. Wherever the one parameter
    it cannot take sits, in a small or a large group, it reports the same reason, updates nothing, and the
    group runs on the multi-tensor engine with torch's numbers."""
    index = {"first": 1, "middle": n // 2, "last": n - 2}[where]  # never one of the gradient-less fifths
    ours, theirs, make_grads = _defective_group(n, {index: kind})
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.0 if kind == "sparse grad" else 0.01, nesterov=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
        opt = torchsgd.SGD(ours, **kwargs)
        ref = torch.optim.SGD(theirs, foreach=False, **kwargs)
    for step in range(4):
        make_grads(step)
        if step == 2 and kind == "buffer layout":
            for o, ps in ((opt, ours), (ref, theirs)):
                buf = o.state[ps[index]]["momentum_buffer"]
                o.state[ps[index]]["momentum_buffer"] = buf.t().contiguous().t() if o is opt else buf
        opt.step()
        ref.step()
        if step >= 2 or kind != "buffer layout":
            assert last_reason(opt) == DEFECTS[kind], (step, last_reason(opt))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [40, 300, 1000], ids=["one-thread check", "parallel check", "parallel, 1000"])
def test_large_groups_stay_native_and_bitwise(n):
    """No defect: the group, with gradient-less parameters among the others, first steps and then later
    ones, stays in the kernel and equals torch bitwise."""
    ours, theirs, make_grads = _defective_group(n, {})
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    opt = torchsgd.SGD(ours, **kwargs)
    ref = torch.optim.SGD(theirs, foreach=False, **kwargs)
    for step in range(4):
        make_grads(step)
        opt.step()
        ref.step()
        assert last_reason(opt) is None
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])


@pytest.mark.parametrize("n", [40, 300], ids=["one-thread check", "parallel check"])
def test_the_first_defect_in_parameter_order_is_reported(n):
    """Two defects: the reason given is the one a single loop over the group would meet first."""
    ours, _, make_grads = _defective_group(n, {n // 3: "grad layout", n // 2: "mixed dtypes"})
    opt = torchsgd.SGD(ours, lr=0.1, momentum=0.9)
    make_grads(0)
    opt.step()
    assert last_reason(opt) == DEFECTS["grad layout"]
    ours, _, make_grads = _defective_group(n, {n // 3: "mixed dtypes", n // 2: "grad layout"})
    opt = torchsgd.SGD(ours, lr=0.1, momentum=0.9)
    make_grads(0)
    opt.step()
    assert last_reason(opt) == DEFECTS["mixed dtypes"]


def test_duplicate_parameter_runs_twice_like_torch():
    p = torch.randn(10, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = torchsgd.SGD([p, p], lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ref = torch.optim.SGD([q, q], lr=0.1, momentum=0.9, foreach=False)
    for _ in range(3):
        g = torch.randn(10)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert torch.equal(p, q)


def test_without_the_kernel_the_fused_flag_falls_back(tmp_path):
    """With the native kernel unavailable, fused/default runs the multi-tensor engine, same numbers."""
    code = (
        "import torch, torchsgd\n"
        "from torchsgd.engines.build import native_module, native_failure\n"
        "assert native_module() is None and 'TORCHSGD_DISABLE_NATIVE' in native_failure()\n"
        "p = torch.ones(5, requires_grad=True); q = p.detach().clone().requires_grad_()\n"
        "a = torchsgd.SGD([p], lr=0.1, momentum=0.9, fused=True); b = torch.optim.SGD([q], lr=0.1, momentum=0.9)\n"
        "for i in range(3):\n"
        "    p.grad = torch.full((5,), float(i)); q.grad = p.grad.clone(); a.step(); b.step()\n"
        "assert torch.equal(p, q)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TORCHSGD_DISABLE_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_first_step_in_a_fresh_process_is_quick_with_a_warm_cache():
    """The kernel is cached: loading it on the first step of a new process takes well under 3 s."""
    code = (
        "import time, torch, torchsgd\n"
        "m = torch.nn.Linear(10, 10); opt = torchsgd.SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
        "m(torch.randn(4, 10)).sum().backward()\n"
        "t = time.perf_counter(); opt.step(); print(time.perf_counter() - t)\n"
        "from torchsgd.engines.build import native_module; assert native_module() is not None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) < 3.0


def test_one_openmp_runtime_in_the_process():
    """The kernel runs on torch's OpenMP pool: loading it must not bring a second OpenMP runtime.

    Checked in a fresh process: other libraries of the test session (scikit-learn vendors its own libgomp)
    would otherwise be counted.
    """
    code = (
        "import torch\n"
        "from torchsgd.engines.build import native_module\n"
        "assert native_module() is not None\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "print(sorted({l.split()[-1] for l in maps if 'libgomp' in l or 'libiomp' in l}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    runtimes = eval(out.stdout.strip())  # a printed list of paths
    assert len(runtimes) == 1 and "torch" in runtimes[0], runtimes
