"""The base-class contract a drop-in keeps: everything torch's ecosystem does with an Optimizer works on
torchsgd.SGD and gives torch's numbers (torch's class shape and state_dict format, zero_grad, schedulers,
GradScaler, differentiable steps, torch.compile, named parameters, later param groups).

What every optimizer of torchsgd must do (hooks, closures, state dicts both ways, pickling and deepcopy,
the global generator) runs over the optimizer database in test_generic.py, against torch.optim.SGD for
SGD's configurations that torch has."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau, StepLR

import torchsgd
from helpers import (
    ENGINE_NAMES,
    ENGINES,
    assert_optimizers_match,
    assert_same_as_reference,
    assert_state_dicts_equal,
    capture_error,
    clone_param,
    make_twins,
    random_tensor,
    seeded_grads,
    ulps_at_scale,
)

OPTIONS = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True)


def initial_params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [random_tensor(s, dtype, generator) for s in [(4, 3), (3,), (5,)]]


# ---------------------------------------------------------------------------------------------------------
# Class shape
# ---------------------------------------------------------------------------------------------------------
def test_is_a_torch_optimizer_with_torchs_signature_and_defaults() -> None:
    assert issubclass(torchsgd.SGD, torch.optim.Optimizer)
    ours_sig, torch_sig = inspect.signature(torchsgd.SGD.__init__), inspect.signature(torch.optim.SGD.__init__)
    ours_params, torch_params = list(ours_sig.parameters.values()), list(torch_sig.parameters.values())
    # torch's parameters, in torch's order, with torch's kinds and defaults; anything torchsgd adds comes
    # after them, keyword-only and optional, so that every call written for torch means the same.
    assert [(p.name, p.kind, p.default) for p in ours_params[: len(torch_params)]] == [
        (p.name, p.kind, p.default) for p in torch_params
    ]
    for extra in ours_params[len(torch_params) :]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty, extra
    ours, theirs = torchsgd.SGD(initial_params()), torch.optim.SGD(initial_params())
    assert ours.defaults == theirs.defaults
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_init_group_collects_like_torchs(momentum: float) -> None:
    """``_init_group`` exists with torch's signature and collects the same lists (torch.compile runs it)."""
    assert list(inspect.signature(torchsgd.SGD._init_group).parameters) == list(
        inspect.signature(torch.optim.SGD._init_group).parameters
    )
    twins = make_twins(initial_params(), lr=0.1, momentum=momentum)
    twins.step(seeded_grads(twins.our_params, 1, seed=0)[0])
    twins.set_grads([torch.ones(4, 3), None, torch.ones(5)])
    collected = []
    for opt in (twins.ours, twins.theirs):
        params, grads, buffers = [], [], []
        has_sparse = opt._init_group(opt.param_groups[0], params, grads, buffers)
        collected.append((params, grads, buffers, has_sparse))
    (p1, g1, b1, s1), (p2, _g2, b2, s2) = collected
    assert s1 is s2 is False
    assert [p.shape for p in p1] == [p.shape for p in p2] and len(p1) == 2
    assert all(g is p.grad for g, p in zip(g1, p1))
    assert len(b1) == len(b2) and all((x is None) == (y is None) for x, y in zip(b1, b2))
    for x, y in zip(b1, b2):
        if y is not None:
            assert torch.equal(x, y)


# ---------------------------------------------------------------------------------------------------------
# zero_grad
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [None, True, False])
def test_zero_grad_like_torch(set_to_none: bool | None) -> None:
    outcomes = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        w = torch.ones(3, requires_grad=True)
        opt = cls([w], lr=0.1)
        (w * 2).sum().backward()
        before = w.grad
        opt.zero_grad() if set_to_none is None else opt.zero_grad(set_to_none=set_to_none)
        outcomes.append(None if w.grad is None else (w.grad.clone(), w.grad is before))
    assert (outcomes[0] is None) == (outcomes[1] is None)
    if outcomes[1] is not None:
        assert torch.equal(outcomes[0][0], outcomes[1][0]) and outcomes[0][1] == outcomes[1][1]
    if set_to_none is None:
        assert outcomes[0] is None, "zero_grad sets grads to None by default"


# ---------------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------------
def torch_flags_of(engine: str) -> dict[str, Any]:
    """The flag entries of a group of torch.optim.SGD constructed with the engine's flags."""
    group = torch.optim.SGD([torch.zeros(1)], **ENGINES[engine]).param_groups[0]
    return {k: group[k] for k in ("foreach", "fused", "differentiable")}


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_state_dict_is_torchs(engine: str) -> None:
    groups = [([0, 1], {}), ([2], {"lr": 0.05, "momentum": 0.5, "nesterov": False, "dampening": 0.1})]
    twins = make_twins(initial_params(), engine=engine, groups=groups, **OPTIONS)
    StepLR(twins.ours, step_size=2), StepLR(twins.theirs, step_size=2)  # adds initial_lr to the groups
    for grads in seeded_grads(twins.our_params, 3, seed=1):
        twins.step(grads)
    expected = twins.theirs.state_dict()
    for group in expected["param_groups"]:
        group.update(torch_flags_of(engine))
    assert_state_dicts_equal(twins.ours.state_dict(), expected, engine=engine)


def continue_both(ours, our_params, theirs, their_params, steps: int, engine: str, seed: int = 5) -> None:
    for grads in seeded_grads(our_params, steps, seed=seed):
        for ps, opt in ((our_params, ours), (their_params, theirs)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        assert_optimizers_match(ours, theirs, our_params, their_params, engine=engine)


def test_loaded_buffers_are_cast_to_the_parameter_dtype_like_torch() -> None:
    source = torch.optim.SGD([torch.zeros(3, dtype=torch.float64)], lr=0.1, momentum=0.9)
    source.state[source.param_groups[0]["params"][0]]["momentum_buffer"] = torch.tensor(
        [1 / 3, 2 / 3, 1e-30], dtype=torch.float64
    )
    state_dict = source.state_dict()
    loaded = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            p = torch.zeros(3, dtype=dtype)
            opt = cls([p], lr=0.1, momentum=0.9)
            opt.load_state_dict(state_dict)
            buffer = opt.state[p]["momentum_buffer"]
            assert buffer.dtype == dtype
            loaded.append(buffer)
    for a, b in zip(loaded[:3], loaded[3:]):
        assert torch.equal(a, b)


def test_missing_group_keys_are_backfilled_like_torch() -> None:
    """A state dict from an older torch lacks nesterov/maximize/foreach/differentiable/fused."""
    old = torch.optim.SGD([torch.zeros(2)], lr=0.3, momentum=0.5).state_dict()
    for key in ("nesterov", "maximize", "foreach", "differentiable", "fused"):
        del old["param_groups"][0][key]
    groups = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        opt = cls([torch.zeros(2)], lr=0.1, momentum=0.9, nesterov=True, maximize=True, foreach=True)
        opt.load_state_dict(old)
        groups.append({k: v for k, v in opt.param_groups[0].items() if k != "params"})
    assert groups[0] == groups[1]
    assert groups[0]["nesterov"] is False and groups[0]["fused"] is False


# ---------------------------------------------------------------------------------------------------------
# LR schedulers
# ---------------------------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda opt: StepLR(opt, step_size=3, gamma=0.5),
    "OneCycleLR": lambda opt: OneCycleLR(opt, max_lr=0.5, total_steps=12),
    "ReduceLROnPlateau": lambda opt: ReduceLROnPlateau(opt, patience=1, factor=0.5),
}


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_lr_schedulers_give_torchs_numbers(engine: str, scheduler: str, tensor_lr: bool) -> None:
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    twins = make_twins(initial_params(), engine=engine, lr=lr, momentum=0.9, weight_decay=1e-3)
    schedulers = [SCHEDULERS[scheduler](twins.ours), SCHEDULERS[scheduler](twins.theirs)]
    for t, grads in enumerate(seeded_grads(twins.our_params, 12, seed=6)):
        twins.step(grads)
        metric = 1.0 if t > 2 else 2.0 - t  # plateaus from step 3 on
        for s in schedulers:
            s.step(metric) if isinstance(s, ReduceLROnPlateau) else s.step()
        g, h = twins.ours.param_groups[0], twins.theirs.param_groups[0]
        assert type(g["lr"]) is type(h["lr"]) and float(g["lr"]) == float(h["lr"]) and g["momentum"] == h["momentum"]
        twins.assert_match()
    assert float(twins.ours.param_groups[0]["lr"]) != 0.1, "the scheduler changed the lr"


# ---------------------------------------------------------------------------------------------------------
# GradScaler
# ---------------------------------------------------------------------------------------------------------
def scaled_training(make, overflow_at: set[int], steps: int = 6) -> list[dict[str, Any]]:
    """Train a Linear under torch.amp.GradScaler("cpu"); an inf or NaN lands in a gradient at ``overflow_at``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    records = []
    for t in range(steps):
        opt.zero_grad()
        scaler.scale(model(x).pow(2).mean()).backward()
        if t in overflow_at:
            model.weight.grad[1, 2] = float("inf") if t % 2 else float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        records.append(
            {
                "params": [p.detach().clone() for p in model.parameters()],
                "before": before,
                "grads": [p.grad.clone() for p in model.parameters()],
                "buffers": [opt.state[p].get("momentum_buffer") for p in model.parameters()],
                "scale": scaler.get_scale(),
            }
        )
    return records


@pytest.mark.parametrize("overflow_at", [set(), {0}, {0, 1}, {3}, {2, 5}], ids=lambda s: f"overflow at {sorted(s)}")
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_grad_scaler_unscales_and_skips_like_torch(engine: str, overflow_at: set[int]) -> None:
    ours = scaled_training(lambda ps: torchsgd.SGD(ps, lr=0.1, momentum=0.9, **ENGINES[engine]), overflow_at)
    theirs = scaled_training(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False), overflow_at)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert a["scale"] == b["scale"], f"step {t}"
        for i, (p, q) in enumerate(zip(a["params"], b["params"])):
            assert_same_as_reference(p, q, engine=engine, dtype=q.dtype, what=f"step {t} param {i}")
        for i, (x, y) in enumerate(zip(a["buffers"], b["buffers"])):
            assert (x is None) == (y is None), f"step {t}: momentum state {'created' if y is None else 'missing'}"
            if y is not None:
                assert_same_as_reference(x, y, engine=engine, dtype=y.dtype, what=f"step {t} buffer {i}")
        if t in overflow_at:
            assert all(torch.equal(p, q) for p, q in zip(a["params"], a["before"])), f"step {t} was not skipped"
        else:
            # The unscaled gradient is what the step saw, and what p.grad holds afterwards (as in torch).
            for i, (g, h) in enumerate(zip(a["grads"], b["grads"])):
                assert_same_as_reference(g, h, engine=engine, dtype=h.dtype, what=f"step {t} grad {i}")


def test_grad_scaler_hands_the_step_to_fused_only() -> None:
    """fused=True takes GradScaler's scale and overflow flag into the step, as torch's fused SGD does."""
    assert getattr(torchsgd.SGD([torch.zeros(1)], fused=True), "_step_supports_amp_scaling", False) is True
    assert getattr(torchsgd.SGD([torch.zeros(1)], foreach=False), "_step_supports_amp_scaling", False) is False


# ---------------------------------------------------------------------------------------------------------
# differentiable=True
# ---------------------------------------------------------------------------------------------------------
def unrolled_loss(cls, lr: torch.Tensor, weight_decay: Any, nesterov: bool, steps: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 3, dtype=torch.float64, generator=generator)
    x = torch.randn(6, 4, dtype=torch.float64, generator=generator)
    w = w0.clone().requires_grad_(True).clone()  # a non-leaf: the steps are recorded by autograd
    opt = cls(
        [w], lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, maximize=True, differentiable=True
    )
    for _ in range(steps):
        (g,) = torch.autograd.grad(-(x @ w).pow(2).mean(), w, create_graph=True)
        w.grad = g
        opt.step()
    return (x @ w).pow(2).mean()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("tensor_weight_decay", [False, True])
def test_gradient_with_respect_to_lr_is_torchs(tensor_weight_decay: bool, nesterov: bool) -> None:
    """Three differentiable steps unrolled: d(loss)/d(lr) (and d/d(weight_decay)) are torch's, bitwise.
    Without nesterov the momentum buffer autograd saved is updated in place by the next step, and torch's
    backward fails: torchsgd's must fail the same way, not return other numbers."""
    outcomes = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        lr = torch.tensor(0.01, dtype=torch.float64, requires_grad=True)
        wd = torch.tensor(0.1, dtype=torch.float64, requires_grad=True) if tensor_weight_decay else 0.1
        loss = unrolled_loss(cls, lr, wd, nesterov)
        error = capture_error(loss.backward)
        outcomes.append((error, loss.detach(), lr.grad, wd.grad if tensor_weight_decay else None))
    (error_a, loss_a, lr_a, wd_a), (error_b, loss_b, lr_b, wd_b) = outcomes
    assert torch.equal(loss_a, loss_b)
    if error_b is not None:
        assert not nesterov, f"torch's backward failed: {error_b}"
        assert type(error_a) is type(error_b) and str(error_a) == str(error_b)
        return
    assert error_a is None, error_a
    assert lr_a is not None and lr_a.item() != 0
    assert torch.equal(lr_a, lr_b)
    if tensor_weight_decay:
        assert torch.equal(wd_a, wd_b)


def _diff_fn(p, grad, state, opt_class, kwargs, *ignored):
    """As torch's own differentiable-optimizer test: one step of a fresh optimizer as a function of its
    inputs (parameter, gradient, momentum buffer, Tensor lr)."""
    p = p.clone()
    p.grad = grad
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    opt = opt_class([p], **kwargs)
    opt.state[p].update(state)
    opt.step()
    return (p, *tuple(v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.requires_grad))


def test_gradcheck_through_the_step_and_same_jacobian_as_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    p, grad, buffer = (torch.rand(10, dtype=torch.float64, generator=generator).requires_grad_() for _ in range(3))
    lr = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    state = {"momentum_buffer": buffer}
    kwargs = {"lr": lr, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1, "differentiable": True}
    inputs = (p, grad, state, torchsgd.SGD, kwargs, *state.values())
    assert torch.autograd.gradcheck(_diff_fn, inputs)
    jacobians = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        outputs = _diff_fn(p, grad, state, cls, kwargs, buffer)
        cotangents = [torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o) for o in outputs]
        jacobians.append(torch.autograd.grad(outputs, (p, grad, buffer, lr), cotangents))
    for a, b in zip(*jacobians):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_step_follows_eager_step_by_step() -> None:
    """torch.compile(opt.step), 10 steps with a Tensor lr (changed mid-run, as a scheduler would), each
    started from eager torch's numbers. The compiled step equals torch's own compiled (foreach) step
    bitwise, its momentum buffers equal eager torch's bitwise, and its parameters are within 2 ulps (at
    operand scale) of eager torch.optim.SGD(foreach=False): inductor contracts `p - lr·d` into FMAs, and
    torch's own compiled step is no closer than that (1 ulp of the result is out of reach for it too)."""
    torch._dynamo.reset()
    options = dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True, weight_decay=1e-2)
    twins = make_twins(initial_params(), engine="default", **options)
    torch_compiled_params = [clone_param(p) for p in initial_params()]
    torch_compiled = torch.optim.SGD(torch_compiled_params, **options, foreach=True)
    compiled_steps = [torch.compile(twins.ours.step), torch.compile(torch_compiled.step)]
    worst = 0.0
    for t, grads in enumerate(seeded_grads(twins.our_params, 10, seed=8)):
        before = [q.detach().clone() for q in twins.their_params]
        twins.set_grads(grads)
        for p, g in zip(torch_compiled_params, grads):
            p.grad = g.clone()
        for step in compiled_steps:
            step()
        twins.theirs.step()
        for i, (p, q, r, b) in enumerate(zip(twins.our_params, twins.their_params, torch_compiled_params, before)):
            assert torch.equal(p, r), f"step {t}, param {i}: not torch's compiled numbers"
            assert torch.equal(twins.ours.state[p]["momentum_buffer"], twins.theirs.state[q]["momentum_buffer"])
            distance = ulps_at_scale(p, q, scale=torch.maximum(b.abs(), (q - b).abs())).max().item()
            assert distance <= 2, f"step {t}, param {i}: {distance} ulps from eager torch"
            worst = max(worst, distance)
        twins.resync()  # per step: the next step starts from eager torch's numbers
        with torch.no_grad():
            for p, q in zip(torch_compiled_params, twins.their_params):
                p.copy_(q)
                torch_compiled.state[p]["momentum_buffer"].copy_(twins.theirs.state[q]["momentum_buffer"])
        if t == 4:
            for opt in (twins.ours, twins.theirs, torch_compiled):
                opt.param_groups[0]["lr"].fill_(0.02)
    assert worst > 0, "compiled and eager agree bitwise: tighten this test to bitwise"


def test_stochastic_rounding_seed_comes_from_the_global_generator() -> None:
    torch.manual_seed(5)
    first = torchsgd.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, stochastic_rounding=True).seed
    torch.manual_seed(5)
    assert torchsgd.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, stochastic_rounding=True).seed == first


_WITHOUT_COMPILE = """
import sys
import torch
import torchsgd

def train(opt, model, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        opt.step()

model = torch.nn.Linear(4, 3)
extra = torch.nn.Parameter(torch.zeros(2))
for opt in (
    torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    torchsgd.SGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, max_grad_norm=1.0),
    torchsgd.LARS(model.parameters(), lr=0.1, momentum=0.9),
    torchsgd.ScheduleFreeSGD(model.parameters(), lr=0.1),
):
    scheduler = None
    if isinstance(opt, torchsgd.ScheduleFreeSGD):
        opt.train()
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    train(opt, model)
    if scheduler is not None:
        scheduler.step()
    opt.add_param_group({"params": [extra]})
    opt.load_state_dict(opt.state_dict())
in_backward = torchsgd.SGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9, step_in_backward=True)
torch.nn.Linear(4, 3)(torch.ones(1, 4)).sum().backward()
assert "torch._dynamo" not in sys.modules, "a torchsgd optimizer imported torch._dynamo"
torch.optim.SGD(torch.nn.Linear(4, 3).parameters(), lr=0.1)
print("torch imports dynamo:", "torch._dynamo" in sys.modules)
"""


@pytest.mark.slow
def test_no_dynamo_import_unless_compiling() -> None:
    """torch.optim.Optimizer's add_param_group (every constructor), zero_grad, state_dict and load_state_dict
    import torch._dynamo and sympy on first call (~70 MB, ~1 s) to keep torch.compile out of them. torchsgd's
    optimizers, in a fresh process, construct, train, schedule, checkpoint and add groups without that
    import; torch.optim.SGD's constructor, last, does import it (the saving is real)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WITHOUT_COMPILE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch imports dynamo: True" in result.stdout


def test_methods_are_dynamo_disabled_once_dynamo_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once torch._dynamo is loaded, the four methods go through torch's own @_disable_dynamo wrappers: a
    compiled training step that calls zero_grad and step (graph breaks there, as for torch) gives torch's
    numbers bitwise, and each method, called on a torchsgd optimizer alone, reaches the disabled function
    torch's wrapper caches (a spy put in its place sees the call)."""
    import torch._dynamo

    torch._dynamo.reset()
    results = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
        x = torch.randn(5, 4)

        @torch.compile(backend="eager")
        def train_step() -> None:
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()

        for _ in range(3):
            train_step()
        opt.load_state_dict(opt.state_dict())
        results.append([p.detach().clone() for p in model.parameters()])
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)
    opt = torchsgd.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    calls = []
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        undecorated = getattr(torch.optim.Optimizer, name).__wrapped__

        def spy(*args, _name=name, _fn=undecorated, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(undecorated, "__dynamo_disable", spy, raising=False)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    opt.zero_grad()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["add_param_group", "zero_grad", "state_dict", "load_state_dict"]


# ---------------------------------------------------------------------------------------------------------
# Param groups added later, named parameters
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_add_param_group_later_like_torch(engine: str) -> None:
    twins = make_twins(initial_params()[:2], engine=engine, **OPTIONS)
    for grads in seeded_grads(twins.our_params, 3, seed=1):
        twins.step(grads)
    late = random_tensor((6,), torch.float32, torch.Generator().manual_seed(9))
    late_ours, late_theirs = clone_param(late), clone_param(late)
    twins.ours.add_param_group(
        {"params": [late_ours], "lr": 0.02, "momentum": 0.5, "nesterov": False, "dampening": 0.5}
    )
    twins.theirs.add_param_group(
        {"params": [late_theirs], "lr": 0.02, "momentum": 0.5, "nesterov": False, "dampening": 0.5}
    )
    assert {k: v for k, v in twins.ours.param_groups[1].items() if k != "params"} == {
        k: v for k, v in twins.theirs.param_groups[1].items() if k != "params"
    } | {k: v for k, v in twins.ours.param_groups[1].items() if k in ("foreach", "fused")}
    twins.our_params.append(late_ours)
    twins.their_params.append(late_theirs)
    for grads in seeded_grads(twins.our_params, 4, seed=2):
        twins.step(grads)
        twins.assert_match()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_named_parameters_like_torch(engine: str) -> None:
    models = [torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours = torchsgd.SGD(models[0].named_parameters(), **OPTIONS, **ENGINES[engine])
    theirs = torch.optim.SGD(models[1].named_parameters(), **OPTIONS, foreach=False)
    assert (
        ours.param_groups[0]["param_names"]
        == theirs.param_groups[0]["param_names"]
        == ["0.weight", "0.bias", "1.weight", "1.bias"]
    )
    continue_both(ours, list(models[0].parameters()), theirs, list(models[1].parameters()), 3, engine)
    expected = theirs.state_dict()
    for group in expected["param_groups"]:
        group.update(torch_flags_of(engine))
    assert_state_dicts_equal(ours.state_dict(), expected, engine=engine)
    # And a named state dict loads into a named optimizer, as in torch.
    reloaded = torchsgd.SGD(models[0].named_parameters(), lr=1.0, **ENGINES[engine])
    reloaded.load_state_dict(ours.state_dict())
    assert reloaded.param_groups[0]["param_names"] == theirs.param_groups[0]["param_names"]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, nesterov=True),  # the direction g + μ·b must not be added into the gradient itself
        dict(momentum=0.9, nesterov=True, weight_decay=0.1),
        dict(momentum=0.9, nesterov=True, maximize=True),
        dict(momentum=0.9, nesterov=True, max_grad_norm=0.5),
        dict(momentum=0.9, dampening=0.1),
        dict(momentum=0.9, nesterov=True, momentum_dtype=torch.bfloat16),
    ],
    ids=str,
)
def test_the_step_leaves_the_gradients_as_they_are(engine: str, options: dict) -> None:
    """torch's loop never writes into p.grad (its foreach step does, for Nesterov without decay); every
    engine of torchsgd leaves the gradients bitwise as backward left them."""
    generator = torch.Generator().manual_seed(5)
    params = [
        torch.randn(5, 3, generator=generator).requires_grad_(),
        torch.randn(7, generator=generator).requires_grad_(),
    ]
    opt = torchsgd.SGD(params, lr=0.1, **options, **ENGINES[engine])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        before = [p.grad.clone() for p in params]
        opt.step()
        for p, grad in zip(params, before):
            assert torch.equal(p.grad, grad)
