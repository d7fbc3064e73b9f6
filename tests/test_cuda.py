"""CUDA tensors on every engine. Skipped without a CUDA device.

No GPU was lent to the sessions that wrote these (the project's machines are CPU-only), so they have not
run yet: they are written to the contract, with bounds where the arithmetic is not pinned down. On CUDA the
reference engine runs torch's own per-tensor ops, so it must be bitwise torch.optim.SGD(foreach=False) on
the same device; the foreach engine runs torch's CUDA _foreach kernels and the fused engine hands CUDA
groups to it (the native kernel is CPU-only), so those are held to a per-step bound at the scale of the
step's operands (torch's CUDA kernels may contract a + α·b into one fma, or not, per kernel).
"""

from __future__ import annotations

import pytest
import torch

import torchsgd
from helpers import resynchronise, ulps_at_scale

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FLAGS = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}, "default": {}}
OPTIONS = [
    dict(momentum=0.9, nesterov=True, weight_decay=1e-4),
    dict(momentum=0.9, dampening=0.1),
    dict(weight_decay=0.01, maximize=True),
    dict(),
]
SHAPES = [(), (1,), (67,), (33, 17), (4, 3, 2), (70000,)]
# ulps at the scale of the step's operands, per step, for the engines that are not torch's per-tensor ops
BOUND = {torch.float32: 2, torch.float64: 2, torch.float16: 4, torch.bfloat16: 4}


def twins(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    initial = [torch.randn(s, generator=generator).to(dtype) for s in SHAPES]
    ours = [t.clone().cuda().requires_grad_() for t in initial]
    theirs = [t.clone().cuda().requires_grad_() for t in initial]
    return ours, theirs


def set_grads(ours, theirs, generator: torch.Generator, dtype: torch.dtype) -> None:
    for a, b in zip(ours, theirs):
        g = torch.randn(a.shape, generator=generator).to(dtype).cuda()
        a.grad, b.grad = g.clone(), g.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("engine", list(FLAGS))
def test_every_engine_on_cuda_against_torch(engine, options, dtype):
    """30 steps from identical state each step (the bound is per step): the reference engine bitwise
    torch's loop on CUDA, the others within BOUND at the scale of the step's operands."""
    ours, theirs = twins(dtype)
    opt = torchsgd.SGD(ours, lr=0.05, **options, **FLAGS[engine])
    ref = torch.optim.SGD(theirs, lr=0.05, foreach=False, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(30):
        resynchronise(opt, ref, ours, theirs)  # the bound is per step
        before = [b.detach().clone() for b in theirs]
        set_grads(ours, theirs, generator, dtype)
        opt.step()
        ref.step()
        for a, b, old in zip(ours, theirs, before):
            assert a.device == b.device and a.dtype == b.dtype
            if engine == "reference":
                assert torch.equal(a, b)
                if options.get("momentum"):
                    assert torch.equal(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"])
                continue
            scale = torch.stack([old.abs(), b.detach().abs(), b.grad.abs()]).amax(0).cpu()
            worst = ulps_at_scale(a.detach().cpu(), b.detach().cpu(), scale).max().item() if a.numel() else 0
            assert worst <= BOUND[dtype], f"{engine}: {worst} ulps from torch's loop"


def test_fused_flag_on_cuda_selects_triton_and_reports_what_ran():
    """fused=True on a CUDA group selects the Triton engine; where it cannot run (triton not installed, or
    this process set TRITON_INTERPRET=1 for tests/test_triton.py) the foreach engine runs and says why."""
    ours, theirs = twins(torch.float32)
    opt = torchsgd.SGD(ours, lr=0.05, momentum=0.9, fused=True)
    set_grads(ours, theirs, torch.Generator().manual_seed(2), torch.float32)
    opt.step()
    report = opt.engine_report()[0]
    assert report["selected"] == "triton"
    assert (report["ran"], report["reason"] is None) in (("triton", True), ("foreach", False)), report
    assert all(opt.state[p]["momentum_buffer"].is_cuda for p in ours)


@pytest.mark.parametrize("engine", list(FLAGS))
def test_step_in_backward_on_cuda_equals_the_step(engine):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).cuda()
    twin.load_state_dict(model.state_dict())
    options = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, **FLAGS[engine])
    in_backward = torchsgd.SGD(model.parameters(), step_in_backward=True, **options)
    normal = torchsgd.SGD(twin.parameters(), **options)
    x = torch.randn(8, 16, device="cuda")
    for _ in range(5):
        model(x).square().mean().backward()
        in_backward.step()
        normal.zero_grad()
        twin(x).square().mean().backward()
        normal.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert a.grad is None
        assert torch.equal(a, b)


@pytest.mark.parametrize("engine", list(FLAGS))
def test_low_precision_storage_on_cuda(engine):
    """bfloat16 momentum and stochastic rounding on CUDA: the same seed gives bitwise the same run on each
    engine, and every engine stays within a few bfloat16 ulps of the reference engine (on CPU they are
    bitwise; CUDA's _foreach kernels may round their float32 intermediates differently from the per-tensor
    ones, and a one-ulp float32 difference can flip a stochastic rounding)."""

    def run(flags):
        torch.manual_seed(0)
        params = [torch.randn(s).to(torch.bfloat16).cuda().requires_grad_() for s in SHAPES]
        opt = torchsgd.SGD(
            params, lr=0.05, momentum=0.9, momentum_dtype=torch.bfloat16, stochastic_rounding=True, seed=7, **flags
        )
        generator = torch.Generator().manual_seed(3)
        for _ in range(10):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16).cuda()
            opt.step()
        return [p.detach().cpu() for p in params], [opt.state[p]["momentum_buffer"].cpu() for p in params]

    reference = run(FLAGS["reference"])
    other, again = run(FLAGS[engine]), run(FLAGS[engine])
    for a, b, c in zip(reference[0] + reference[1], other[0] + other[1], again[0] + again[1]):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(b, c), "the same seed must give the same run"
        if a.numel():
            assert ulps_at_scale(b, a, a.abs().amax().expand(a.shape)).max().item() <= 4


def test_state_dict_moves_between_cuda_and_cpu():
    """A checkpoint of a CUDA run loads into a CPU optimizer (torch casts state to the parameter's device),
    and both continue on the same numbers as torch's loop does on CPU."""
    generator = torch.Generator().manual_seed(4)
    initial = [torch.randn(s, generator=generator) for s in SHAPES]
    cuda_params = [t.clone().cuda().requires_grad_() for t in initial]
    opt = torchsgd.SGD(cuda_params, lr=0.05, momentum=0.9)
    for p in cuda_params:
        p.grad = torch.randn(p.shape, generator=generator).cuda()
    opt.step()
    cpu_params = [p.detach().cpu().requires_grad_() for p in cuda_params]
    resumed = torchsgd.SGD(cpu_params, lr=0.05, momentum=0.9)
    resumed.load_state_dict(opt.state_dict())
    torch_params = [p.detach().cpu().requires_grad_() for p in cuda_params]
    torch_opt = torch.optim.SGD(torch_params, lr=0.05, momentum=0.9, foreach=False)
    torch_opt.load_state_dict(opt.state_dict())
    for p, q in zip(cpu_params, torch_params):
        assert resumed.state[p]["momentum_buffer"].device.type == "cpu"
        g = torch.randn(p.shape, generator=generator)
        p.grad, q.grad = g.clone(), g.clone()
    resumed.step()
    torch_opt.step()
    for p, q in zip(cpu_params, torch_params):
        assert torch.equal(p, q)


def test_grad_scaler_on_cuda_skips_a_step_with_inf():
    model = torch.nn.Linear(8, 4).cuda()
    opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.randn(2, 8, device="cuda")).sum()).backward()
    model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert not opt.state  # the skipped first step leaves no state (torch's fused bug 2)


def test_grad_scaler_unscale_and_skip_in_the_triton_kernel_without_a_host_wait():
    """fused=True on the Triton engine takes GradScaler's scale and overflow flag in its kernel: after the
    first step (which creates the buffers and so reads the flag) no step synchronises with the device, an
    overflow skips the step, and the numbers are torch.optim.SGD(foreach=False) driven by its own scaler
    within BOUND per step (the kernel's fma against torch's CUDA ops)."""
    from torchsgd.engines import triton as triton_engine

    kernels = triton_engine.kernels()
    if kernels is None or kernels.INTERPRETED:
        pytest.skip("the Triton kernels are not loaded for the GPU in this process (run this file on its own)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).cuda()
    twin.load_state_dict(model.state_dict())
    ours = torchsgd.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, foreach=False)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10) for _ in range(2)]
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 1, device="cuda")
    for step in range(8):
        for net, opt, scaler in zip((model, twin), (ours, theirs), scalers):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(net(x), y)).backward()
            if step == 4:
                next(net.parameters()).grad[0, 0] = float("inf")
            if opt is ours and step > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            scaler.update()
        assert ours.engine_report()[0]["ran"] == "triton", ours.engine_report()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert float(ulps_at_scale(a, b, b).max()) <= BOUND[torch.float32], step
        resynchronise(ours, theirs, list(model.parameters()), list(twin.parameters()))
    assert scalers[0].get_scale() == scalers[1].get_scale()
