"""step_in_backward sets the first-step buffers aside in one allocation (engines/fused.py reserve_buffers).

Without it each parameter's hook allocated its own buffer between backward's gradients, and the heap's
fragmentation moved the process peak by up to a quarter between runs of the same script (bench --memory).
The numbers must be those of the reference engine either way; what is checked here is where the state
lives, that nothing reserved leaks into the state, and that what the kernel cannot use is ignored.
"""

from __future__ import annotations

import io

import pytest
import torch

import torchsgd
from torchsgd.engines.build import native_module
from torchsgd.engines.fused import reserve_buffers

pytestmark = pytest.mark.skipif(native_module() is None, reason="the native kernel is not available")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=generator)
        optimizer.zero_grad()
        model(x).square().mean().backward()  # with step_in_backward the update runs here
        optimizer.step()


def _storages(optimizer: torch.optim.Optimizer) -> set[int]:
    return {t.untyped_storage().data_ptr() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}


@pytest.mark.parametrize("momentum_dtype", [None, torch.bfloat16, torch.int8])
def test_first_step_state_is_one_allocation_and_the_numbers_are_the_references(momentum_dtype):
    options = {} if momentum_dtype is None else {"momentum_dtype": momentum_dtype}
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False)
    ours, theirs = _model(), _model()
    opt = torchsgd.SGD(ours.parameters(), **hyper, step_in_backward=True, **options)
    ref = torchsgd.SGD(theirs.parameters(), **hyper, foreach=False, **options)  # the reference engine
    _train(ours, opt, 20)
    _train(theirs, ref, 20)
    assert opt.engine_report()[0]["ran"] == "fused"
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    assert opt.reserved_buffers == {}  # every entry became state
    # one allocation: the buffers (or the codes, and the scales) of every parameter share one storage
    assert len(_storages(opt)) == (2 if momentum_dtype is torch.int8 else 1)
    # the state_dict saves and loads as before, weights_only
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    again = torchsgd.SGD(ours.parameters(), **hyper, step_in_backward=True, **options)
    again.load_state_dict(loaded)
    assert again.reserved_buffers == {}


def test_a_parameter_without_a_gradient_at_first_takes_its_reserved_buffer_later():
    model = _model()
    head = torch.nn.Linear(32, 4)  # used from the third step on
    params = [*model.parameters(), *head.parameters()]
    opt = torchsgd.SGD(params, lr=0.05, momentum=0.9, step_in_backward=True)
    x = torch.randn(8, 16)
    model(x).sum().backward()
    opt.step()
    assert set(opt.reserved_buffers) == set(head.parameters())  # still set aside, not yet state
    assert all(p not in opt.state or not opt.state[p] for p in head.parameters())
    hidden = model[1](model[0](x))
    (model[2](hidden).sum() + head(hidden).sum()).backward()
    opt.step()
    assert opt.reserved_buffers == {}
    assert len(_storages(opt)) == 1


def test_a_non_contiguous_parameter_gets_its_own_buffer_with_the_same_numbers():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 5).t())  # a transposed view: not contiguous
    bias = torch.nn.Parameter(torch.randn(6))
    twin_w, twin_b = (torch.nn.Parameter(p.detach().clone()) for p in (weight, bias))
    opt = torchsgd.SGD([weight, bias], lr=0.1, momentum=0.9, step_in_backward=True)
    ref = torch.optim.SGD([twin_w, twin_b], lr=0.1, momentum=0.9, foreach=False)
    for step in range(5):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(step))
        (x @ weight + bias).square().sum().backward()
        opt.step()
        (x @ twin_w + twin_b).square().sum().backward()
        ref.step()
        ref.zero_grad()
    assert torch.equal(weight, twin_w) and torch.equal(bias, twin_b)
    assert opt.reserved_buffers == {}  # the contiguous one's entry was used; the other never had one
    assert opt.state[weight]["momentum_buffer"].stride() == weight.stride()


def test_load_state_dict_drops_what_was_set_aside():
    model = _model()
    head = torch.nn.Linear(32, 4)
    opt = torchsgd.SGD([*model.parameters(), *head.parameters()], lr=0.05, momentum=0.9, step_in_backward=True)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert opt.reserved_buffers
    opt.load_state_dict(opt.state_dict())
    assert opt.reserved_buffers == {}


def test_no_reserve_without_momentum_or_with_the_reference_engine():
    for options in ({"momentum": 0.0}, {"momentum": 0.9, "foreach": False}):
        model = _model()
        opt = torchsgd.SGD(model.parameters(), lr=0.05, step_in_backward=True, **options)
        model(torch.randn(2, 16)).sum().backward()
        opt.step()
        assert opt.reserved_buffers == {} and opt._reserved_groups == set()


def test_the_kernel_ignores_reserved_tensors_that_do_not_fit():
    """A reserve entry of another dtype, shape or layout is not used: the kernel allocates the buffer."""
    kernel = native_module()
    p = torch.randn(4, 8)
    p.grad = torch.randn(4, 8)
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    for unfit in (torch.empty(4, 8, dtype=torch.float64), torch.empty(8, 4), torch.empty(8, 4).t(), "not a tensor"):
        created: list = []
        handled = kernel.step(
            [p], {}, created, **hyper, decoupled_weight_decay=False, clip_coefficient=1.0, reserve={p: unfit}
        )
        assert handled == 1
        buffer = created[0][1]
        assert buffer is not unfit and buffer.dtype == p.dtype and buffer.shape == p.shape
        assert torch.equal(buffer, p.grad)
    fit = reserve_buffers([p], None)
    created = []
    kernel.step([p], {}, created, **hyper, decoupled_weight_decay=False, clip_coefficient=1.0, reserve=fit)
    assert created[0][1] is fit[p]


def test_reserve_buffers_lays_out_what_the_kernel_creates():
    params = [torch.randn(3, 5), torch.randn(300), torch.randn(2, 3).t(), torch.empty(0), torch.randn(())]
    reserve = reserve_buffers(params, None)
    assert set(reserve) == {params[0], params[1], params[4]}  # not the transposed or the empty one
    for p, buffer in reserve.items():
        assert buffer.shape == p.shape and buffer.stride() == p.stride() and buffer.dtype == p.dtype
        assert buffer.data_ptr() % 64 == 0 or p.numel() == 0
    quantized = reserve_buffers(params[:2], torch.int8)
    codes, scales = quantized[params[1]]
    assert codes.dtype == torch.int8 and codes.shape == (300,) and scales.dtype == torch.float32
    assert scales.shape == (2,)  # blocks of 256


def test_lars_in_backward_takes_the_reserved_buffers_too():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    opt = torchsgd.LARS(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, step_in_backward=True)
    _train(model, opt, 3)
    assert opt.engine_report()[0]["ran"] == "fused"
    assert opt.reserved_buffers == {}  # adapted (the kernel's lars_step) and plain parameters alike
    assert len(_storages(opt)) == 1


def test_a_buffer_made_by_another_engine_spends_the_reservation(monkeypatch):
    """Where the kernel hands a group back (here: made to), the multi-tensor engine creates the buffer and
    the reserved one is dropped: no parameter holds two buffers' worth."""
    import torchsgd.engines.fused as fused

    real = native_module()

    class Declining:
        REASONS = real.REASONS
        OVERLAPPING = real.OVERLAPPING

        def step(self, *args, **kwargs):
            return min(code for code in real.REASONS if code != real.OVERLAPPING)

    monkeypatch.setattr(fused, "native_module", lambda: Declining())
    model = _model()
    opt = torchsgd.SGD(model.parameters(), lr=0.05, momentum=0.9, step_in_backward=True)
    _train(model, opt, 2)
    assert opt.engine_report()[0]["ran"] == "foreach"
    assert opt.reserved_buffers == {}
    assert all(torch.is_tensor(opt.state[p]["momentum_buffer"]) for p in model.parameters())
