"""A first end-to-end check: torchsgd.SGD follows torch.optim.SGD bitwise on a small model."""

import copy

import torch

import torchsgd


def test_small_model_trains_bitwise_like_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    ours = torchsgd.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(100):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(
        ours.state_dict()["state"][0]["momentum_buffer"], theirs.state_dict()["state"][0]["momentum_buffer"]
    )
