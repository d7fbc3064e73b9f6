"""torchsgd.LARS's one pass over a group (lars.py, LARS._partition): which parameters are adapted and which
take plain SGD is read afresh at every step (ndim included: ``p.data = other`` can change it), and a sparse
gradient raises the same error, before anything has changed, wherever it is in the group."""

from __future__ import annotations

import pytest
import torch

import torchsgd
from helpers import ENGINES

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=1e-3)
engines = pytest.mark.parametrize("engine", ["reference", "foreach", "fused"])


def _first_step(value: torch.Tensor, grad: torch.Tensor, engine: str, exclude_1d: bool) -> torch.Tensor:
    """The parameter after a fresh optimizer's first step on it alone."""
    p = value.clone().requires_grad_()
    optimizer = torchsgd.LARS([p], **OPTIONS, exclude_1d=exclude_1d, **ENGINES[engine])
    p.grad = grad.clone()
    optimizer.step()
    return p.detach()


@engines
@pytest.mark.parametrize("exclude_1d", [True, False])
def test_a_parameter_whose_ndim_changes_through_data_is_sorted_again(engine, exclude_1d):
    params = [torch.randn(4, 5).requires_grad_(), torch.randn(6).requires_grad_()]
    optimizer = torchsgd.LARS(params, **OPTIONS, exclude_1d=exclude_1d, **ENGINES[engine])
    for step in range(4):
        if step == 2:  # the vector becomes a matrix, the matrix a vector (their buffers dropped: new shapes)
            params[0].data, params[1].data = params[0].detach().reshape(-1).clone(), params[1].detach().reshape(2, 3)
            optimizer.state.clear()
        grads = [torch.randn(p.shape) for p in params]
        expected = (
            [_first_step(p.detach(), g, engine, exclude_1d) for p, g in zip(params, grads)] if step == 2 else None
        )
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        if expected is not None:  # each as a fresh optimizer steps it: adapted (2-D) or plain (1-D) now
            for p, e in zip(params, expected):
                assert torch.equal(p.detach(), e)


@engines
def test_parameters_without_a_gradient_are_left_alone(engine):
    params = [torch.randn(4, 5).requires_grad_(), torch.randn(6).requires_grad_(), torch.randn(3).requires_grad_()]
    optimizer = torchsgd.LARS(params, **OPTIONS, **ENGINES[engine])
    params[0].grad, params[2].grad = torch.randn(4, 5), torch.randn(3)
    before = params[1].detach().clone()
    optimizer.step()
    assert torch.equal(params[1], before) and params[1] not in optimizer.state
    assert not torch.equal(params[0], before) and "momentum_buffer" in optimizer.state[params[2]]


@engines
@pytest.mark.parametrize("exclude_1d", [True, False])
@pytest.mark.parametrize("where", [0, 1, 2])
def test_a_sparse_gradient_raises_the_same_error_with_nothing_changed(engine, exclude_1d, where):
    params = [torch.randn(4, 5).requires_grad_(), torch.randn(6).requires_grad_(), torch.randn(8, 2).requires_grad_()]
    optimizer = torchsgd.LARS(params, **OPTIONS, exclude_1d=exclude_1d, **ENGINES[engine])
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape)
        optimizer.step()
    for p in params:
        p.grad = torch.randn(p.shape)
    params[where].grad = params[where].grad.to_sparse()
    if where != 1:
        params[1].grad = None  # a parameter without a gradient before or after the sparse one
    before = [p.detach().clone() for p in params]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    with pytest.raises(RuntimeError) as raised:
        optimizer.step()
    assert str(raised.value) == "LARS does not support sparse gradients (the trust ratio needs dense norms)"
    for p, b, m in zip(params, before, buffers):
        assert torch.equal(p, b) and torch.equal(optimizer.state[p]["momentum_buffer"], m)
