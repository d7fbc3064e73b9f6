"""Beyond torch: SGDW, clipping in the step, the non-finite guard, no-decay groups, LARS, schedule-free.

Each feature is checked on every engine against an independent oracle: torch's own functions
(clip_grad_norm_, a hand-written decoupled decay), the installable packages (pytorch_optimizer's LARS,
schedulefree's SGDScheduleFree), or the paper's formula in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import torchsgd
from helpers import ENGINES, train

engine_params = pytest.mark.parametrize("engine", list(ENGINES))


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


DATA = (torch.randn(32, 8, generator=torch.Generator().manual_seed(5)), torch.arange(32) % 4)


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------- SGDW


@engine_params
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgdw_is_decay_then_sgd_without_decay(engine, nesterov):
    """SGDW = p·(1 − lr·wd) (as AdamW writes it), then torch's SGD step with no weight decay."""
    ours_model, ref_model = mlp(), mlp()
    ours = torchsgd.SGDW(
        ours_model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.05, **ENGINES[engine]
    )
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, foreach=False)
    sched_ours = torch.optim.lr_scheduler.StepLR(ours, step_size=7, gamma=0.5)
    sched_ref = torch.optim.lr_scheduler.StepLR(ref, step_size=7, gamma=0.5)

    def decay(_):
        with torch.no_grad():
            for p in ref_model.parameters():
                p.mul_(1 - ref.param_groups[0]["lr"] * 0.05)

    train(ours_model, ours, 25, DATA, scheduler=sched_ours)
    train(ref_model, ref, 25, DATA, before_step=decay, scheduler=sched_ref)
    assert_same_params(ours_model, ref_model)
    assert torchsgd.SGD(mlp().parameters(), decoupled_weight_decay=True).defaults["decoupled_weight_decay"]


def test_decoupled_differs_from_coupled_once_the_lr_changes():
    """The documented difference: coupled L2 lives in the momentum buffer, decoupled decay does not."""
    a, b = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    coupled = torchsgd.SGD([a], lr=0.1, momentum=0.9, weight_decay=0.1)
    decoupled = torchsgd.SGDW([b], lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(3):
        for p, opt in ((a, coupled), (b, decoupled)):
            p.grad = torch.zeros(1)  # only the decay acts
            if step == 1:
                opt.param_groups[0]["lr"] = 0.0
            opt.step()
    # With lr = 0 decoupled decay stops at once; coupled decay was accumulated in the buffer but needs
    # lr to act, so both hold still at lr 0 — then differ in what the buffer carries.
    assert decoupled.state[b]["momentum_buffer"].item() == 0.0
    assert coupled.state[a]["momentum_buffer"].item() != 0.0


def test_plain_sgd_state_dict_has_exactly_torchs_keys():
    ours = torchsgd.SGD(mlp().parameters(), lr=0.1)
    ref = torch.optim.SGD(mlp().parameters(), lr=0.1)
    assert ours.state_dict()["param_groups"][0].keys() == ref.state_dict()["param_groups"][0].keys()


# ------------------------------------------------------------------------------------------ clipping


@engine_params
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e6])
def test_clip_in_step_equals_clip_grad_norm_then_step(engine, dtype, max_norm):
    ours_model, ref_model = mlp().to(dtype), mlp().to(dtype)
    ours = torchsgd.SGD(
        ours_model.parameters(),
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        max_grad_norm=max_norm,
        **ENGINES[engine],
    )
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)
    norms = []

    def clip(_):
        norms.append(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm))

    x, y = DATA
    for step in range(30):
        ours.zero_grad()
        torch.nn.functional.cross_entropy(ours_model(x.to(dtype)), y).backward()
        grads_before = [p.grad.clone() for p in ours_model.parameters()]
        ours.step()
        for p, g in zip(ours_model.parameters(), grads_before):
            assert torch.equal(p.grad, g)  # the gradients themselves are left unclipped
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref_model(x.to(dtype)), y).backward()
        clip(step)
        ref.step()
        assert torch.equal(ours.last_grad_norm, norms[-1])
    assert_same_params(ours_model, ref_model)


def test_clip_validation():
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Invalid max_grad_norm value"):
            torchsgd.SGD(mlp().parameters(), lr=0.1, max_grad_norm=bad)


# ------------------------------------------------------------------------------------ non-finite guard


@engine_params
@pytest.mark.parametrize("with_clip", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_step_is_skipped_bitwise(engine, with_clip, bad):
    model, twin = mlp(), mlp()
    extra = dict(max_grad_norm=1.0) if with_clip else {}
    opt = torchsgd.SGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, skip_nonfinite=True, **extra, **ENGINES[engine]
    )
    ref = torchsgd.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False, **extra)
    x, y = DATA
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(8):
            poisoned = step in (0, 3, 4)  # the very first step too: no state may appear
            for m, o in ((model, opt), (twin, ref)):
                o.zero_grad()
                torch.nn.functional.cross_entropy(m(x), y).backward()
            if poisoned:
                before = copy.deepcopy(opt.state_dict())
                params_before = [p.detach().clone() for p in model.parameters()]
                list(model.parameters())[step % 4].grad.view(-1)[0] = bad
                opt.step()
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params_before))
                after = opt.state_dict()
                assert after["state"].keys() == before["state"].keys()
                for k in after["state"]:
                    assert torch.equal(after["state"][k]["momentum_buffer"], before["state"][k]["momentum_buffer"])
            else:
                opt.step()
                ref.step()
    assert opt.skipped_steps == 3
    assert sum("NaN or Inf" in str(w.message) for w in caught) == 1  # warned once
    assert_same_params(model, twin)  # the skipped steps left no trace


def test_guard_off_by_default_keeps_torchs_behaviour():
    p = torch.ones(3, requires_grad=True)
    opt = torchsgd.SGD([p], lr=0.1)
    p.grad = torch.tensor([1.0, float("nan"), 1.0])
    opt.step()
    assert torch.isnan(p[1]) and opt.skipped_steps == 0


def test_guard_and_options_survive_pickling():
    opt = torchsgd.SGD(mlp().parameters(), lr=0.1, skip_nonfinite=True, max_grad_norm=2.0)
    opt.skipped_steps = 4
    clone = copy.deepcopy(opt)
    assert (clone.skip_nonfinite, clone.max_grad_norm, clone.skipped_steps) == (True, 2.0, 4)


# ------------------------------------------------------------------------------------------- groups


def test_param_groups_exclude_bias_and_norm_weights():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
        torch.nn.LayerNorm(2),
    )
    groups = torchsgd.param_groups(model, weight_decay=5e-4, lr=0.1)
    decayed, plain = groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(plain["params"]) == 6 and all(g["lr"] == 0.1 for g in groups)
    # the result feeds any optimizer, torch's too
    torch.optim.SGD(groups, lr=0.1)
    torchsgd.SGD(groups, lr=0.1)


def test_param_groups_configurable():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm([4]))
    groups = torchsgd.param_groups(model, 0.1, exclude=["0.*"], exclude_1d=False, exclude_norm=False, named=True)
    names = [[n for n, _ in g["params"]] for g in groups]
    assert names == [["1.weight", "1.bias", "2.weight", "2.bias"], ["0.weight"]]
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        torchsgd.param_groups(frozen, 0.1)


# --------------------------------------------------------------------------------------------- LARS


@engine_params
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_equals_pytorch_optimizer_lars(engine, nesterov):
    oracle = pytest.importorskip("pytorch_optimizer")
    ours_model, ref_model = mlp(), mlp()
    ours = torchsgd.LARS(
        ours_model.parameters(),
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        nesterov=nesterov,
        trust_coefficient=0.02,
        eps=0.0,
        **ENGINES[engine],
    )
    ref = oracle.LARS(
        ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov, trust_coefficient=0.02
    )
    train(ours_model, ours, 100, DATA)
    train(ref_model, ref, 100, DATA)
    assert_same_params(ours_model, ref_model)


@pytest.mark.parametrize("trust_clip", [False, True])
def test_lars_matches_the_papers_formula_in_float64(trust_clip):
    torch.manual_seed(1)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)  # 1-D: plain SGD, checked elsewhere
    w0 = w.detach().clone()
    lr, eta, wd, eps, mu = 0.5, 0.01, 1e-2, 1e-8, 0.9
    opt = torchsgd.LARS(
        [w, b], lr=lr, momentum=mu, weight_decay=wd, trust_coefficient=eta, eps=eps, trust_clip=trust_clip
    )
    grads = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    buf = None
    for g in grads:
        w.grad, b.grad = g, torch.ones(6, dtype=torch.float64)
        opt.step()
        local = eta * w0.norm() / (g.norm() + wd * w0.norm() + eps)
        if trust_clip:
            local = min(local / lr, 1.0)
        d = local * (g + wd * w0)
        buf = d if buf is None else mu * buf + d
        w0 = w0 - lr * buf
    torch.testing.assert_close(w.detach(), w0, rtol=1e-12, atol=1e-12)


def test_lars_excludes_1d_params_from_decay_and_adaptation():
    bias = torch.ones(4, requires_grad=True)
    opt = torchsgd.LARS([bias], lr=0.1, momentum=0.0, weight_decay=0.5, trust_coefficient=1e-3)
    bias.grad = torch.full((4,), 2.0)
    opt.step()
    assert torch.equal(bias, torch.full((4,), 1 - 0.1 * 2.0))


def test_lars_rejects_bad_options():
    params = mlp().parameters
    with pytest.raises(ValueError, match="Invalid trust_coefficient value"):
        torchsgd.LARS(params(), lr=0.1, trust_coefficient=0)
    with pytest.raises(ValueError, match="Invalid eps value"):
        torchsgd.LARS(params(), lr=0.1, eps=float("nan"))
    with pytest.raises(TypeError, match="trust_clip must be True or False"):
        torchsgd.LARS(params(), lr=0.1, trust_clip="yes")
    opt = torchsgd.LARS(params(), lr=0.1)
    with pytest.raises(ValueError, match="Invalid trust_coefficient value"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "trust_coefficient": -1.0})
    assert len(opt.param_groups) == 1


# ------------------------------------------------------------------------------------- schedule-free


@pytest.mark.parametrize("foreach", [False, True, None])
@pytest.mark.parametrize("weight_decay,warmup", [(0.0, 0), (1e-3, 5)])
def test_schedule_free_equals_the_schedulefree_package(foreach, weight_decay, warmup):
    schedulefree = pytest.importorskip("schedulefree")
    ours_model, ref_model = mlp(), mlp()
    ours = torchsgd.ScheduleFreeSGD(
        ours_model.parameters(), lr=0.5, momentum=0.9, weight_decay=weight_decay, warmup_steps=warmup, foreach=foreach
    )
    ref = schedulefree.SGDScheduleFree(
        ref_model.parameters(), lr=0.5, momentum=0.9, weight_decay=weight_decay, warmup_steps=warmup
    )
    x, y = DATA
    for step in range(120):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if step % 10 == 0:
                opt.eval()  # evaluate at x, then back to y
        if step % 10 == 0:
            assert_same_params(ours_model, ref_model)
    ours.eval()
    ref.eval()
    assert_same_params(ours_model, ref_model)
    # checkpoints move between the two
    strip = [{k: v for k, v in g.items() if k != "foreach"} for g in ours.state_dict()["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k != "foreach"} for g in ref.state_dict()["param_groups"]]


def test_schedule_free_weight_decay_in_pieces_equals_the_schedulefree_package(monkeypatch):
    """With weight decay the foreach step runs in pieces of rows (optim/schedule_free.py), so that g + λ·y
    is a small temporary: still bitwise schedulefree, for a tensor cut into row slices, a 0-d one and
    small ones sharing a piece."""
    schedulefree = pytest.importorskip("schedulefree")
    from torchsgd.optim import schedule_free

    monkeypatch.setattr(schedule_free, "WEIGHT_DECAY_PIECE", 1000)  # (37, 100) in slices of 10 rows
    generator = torch.Generator().manual_seed(9)
    shapes = [(37, 100), (), (7,), (3, 5), (2500,)]
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    ours_params = [t.clone().requires_grad_() for t in initial]
    ref_params = [t.clone().requires_grad_() for t in initial]
    ours = torchsgd.ScheduleFreeSGD(ours_params, lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=2)
    ref = schedulefree.SGDScheduleFree(ref_params, lr=0.5, momentum=0.9, weight_decay=1e-2, warmup_steps=2)
    ours.train()
    ref.train()
    for _ in range(6):
        for a, b in zip(ours_params, ref_params):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_params, ref_params):
            assert torch.equal(a, b)
            assert torch.equal(ours.state[a]["z"], ref.state[b]["z"])


def test_schedule_free_refuses_to_step_in_eval_mode():
    opt = torchsgd.ScheduleFreeSGD(mlp().parameters())
    with pytest.raises(RuntimeError, match="called in eval mode"):
        opt.step()
    with pytest.raises(ValueError, match="Momentum must be between 0 and 1 exclusive"):
        torchsgd.ScheduleFreeSGD(mlp().parameters(), momentum=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_schedule_free_swaps_of_many_tensors_are_schedulefrees_bitwise(dtype):
    """eval()/train() move 300 parameters (one torch._foreach_lerp_ on CPU) exactly as schedulefree's loop of
    lerp_ calls does; a parameter never stepped is left alone and gets the same empty state entry."""
    schedulefree = pytest.importorskip("schedulefree")
    generator = torch.Generator().manual_seed(3)
    shapes = [(int(torch.randint(1, 70, (), generator=generator)),) for _ in range(300)]
    initial = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in initial]
    theirs = [torch.nn.Parameter(t.clone()) for t in initial]
    opt = torchsgd.ScheduleFreeSGD(ours, lr=0.05, momentum=0.9, warmup_steps=2)
    ref = schedulefree.SGDScheduleFree(theirs, lr=0.05, momentum=0.9, warmup_steps=2)
    opt.train()
    ref.train()
    for step in range(4):
        grads = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
        for i, (a, b, g) in enumerate(zip(ours, theirs, grads)):
            keep = i % 7 != 0  # every seventh parameter never gets a gradient
            a.grad = g.clone() if keep else None
            b.grad = g.clone() if keep else None
        opt.step()
        ref.step()
        opt.eval()
        ref.eval()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), f"eval after step {step}"
        opt.train()
        ref.train()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), f"train after step {step}"
    assert len(opt.state) == len(ref.state)
