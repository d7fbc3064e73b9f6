"""torch.compile(opt.step) under a schedule that cycles momentum (issue 14 item 7).

OneCycleLR (and CyclicLR with cycle_momentum) writes a new float into group["momentum"] every step. Dynamo
passes that float into the graph as a symbolic input; AOTAutograd's tensorify pass keeps it an input where
a per-tensor op takes it and specialises it (a guard ``param_groups[0]['momentum'] == 0.946...``) where a
_foreach op takes it as its Scalar. Specialised, every step recompiles until dynamo's recompile limit (8)
and the step then falls back to eager. torch.optim.SGD's single-tensor step settles after its one
recompile for the new momentum buffers; torchsgd's compiled (foreach) step must settle as well.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.optim.lr_scheduler import OneCycleLR

import torchsgd
from helpers import clone_param, random_tensor, seeded_grads

STEPS = 12  # a recompile per step would reach the recompile limit (8) well before the end
# Compiled vs eager over the whole run: inductor contracts p - lr·d into FMAs (the README's 2 ulps at
# operand scale per step); these bound the drift that accumulates through the momentum over 12 steps.
RTOL, ATOL = 1e-6, 1e-7

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]


def initial_params() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [random_tensor(s, torch.float32, generator).requires_grad_() for s in [(4, 8), (4,), (3, 5)]]


def run(make, compiled: bool) -> tuple[list[torch.Tensor], int | None]:
    """STEPS steps of OneCycleLR (Tensor lr, cycling momentum); the parameters and, compiled, the recompiles."""
    params = [clone_param(p) for p in initial_params()]
    opt = make(params)
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=STEPS + 1)  # cycle_momentum=True: 0.95 down to 0.85
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    torch._dynamo.reset()  # the step's code object (and its cache) is shared by every optimizer of its class
    step = torch.compile(opt.step) if compiled else opt.step
    momenta = []
    for grads in seeded_grads(params, STEPS, seed=3):
        for p, g in zip(params, grads):
            p.grad = g
        step()
        momenta.append(opt.param_groups[0]["momentum"])
        sched.step()
    assert len(set(momenta)) == STEPS, "the schedule did not change the momentum every step"
    if not compiled:
        return params, None
    # The compiled versions of the step's frame (the function under the step's wrappers): each one past
    # the first is a recompile.
    versions = len(_debug_get_cache_entry_list(inspect.unwrap(type(opt).step).__code__))
    assert versions >= 1, "the step was not compiled"
    return params, versions - 1


@pytest.fixture(scope="module")
def torch_recompiles() -> int:
    # torch's single-tensor step (its CPU default) is the anchor: it recompiles once, when the momentum
    # buffers appear. (torch's own foreach=True step takes the momentum as a _foreach Scalar and does
    # not settle: it reaches the limit.)
    _, recompiles = run(lambda ps: torch.optim.SGD(ps, lr=torch.tensor(0.01), momentum=0.9, foreach=False), True)
    return recompiles


@pytest.mark.parametrize("foreach", [None, True], ids=["default-engine", "foreach"])
def test_momentum_cycling_schedule_settles_like_torch(foreach: bool | None, torch_recompiles: int) -> None:
    def make(ps):
        return torchsgd.SGD(ps, lr=torch.tensor(0.01), momentum=0.9, foreach=foreach)

    compiled_params, recompiles = run(make, compiled=True)
    assert recompiles <= max(2, torch_recompiles), (
        f"torchsgd's compiled step recompiled {recompiles} times under OneCycleLR, torch's {torch_recompiles}"
    )
    eager_params, _ = run(make, compiled=False)
    for i, (p, q) in enumerate(zip(compiled_params, eager_params)):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"param {i}: {m}")
