"""Generic tests over the optimizer database (tests/optimizers.py): every optimizer, every configuration.

What an Optimizer must do whatever its rule, held bitwise against the configuration's oracle
(torch.optim.SGD(foreach=False), or the optimizer's reference engine): state_dict round trips (into a fresh
optimizer, from the oracle and into it), pickle and deepcopy, every hook, closures, the global generator,
and an invalid add_param_group that changes nothing. The checkpoint tests (atomic load_state_dict, exact
resume, no growth) run over the same database in test_hardening.py.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from helpers import (
    assert_optimizers_match,
    assert_state_dicts_equal,
    assert_unchanged,
    capture_error,
    clone_param,
    one_thread,
    seeded_grads,
    snapshot,
    with_flags_of,
)
from optimizers import (
    OptimizerInfo,
    OptimizerInput,
    group_params,
    make_params,
    optimizer_cases,
    trained,
    training_grads,
    two_groups,
)

CASE_NAMES = ("info", "config", "engine")


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Every tensor here is small (helpers.one_thread: two threads on shared cores only wait)."""
    with one_thread():
        yield


def receiver_overrides(config: OptimizerInput) -> dict[str, Any]:
    """Constructor arguments of an optimizer that is about to load a checkpoint: another lr and seed than
    the checkpoint's, so that whatever the checkpoint holds must come from it."""
    overrides: dict[str, Any] = {"lr": 0.5}
    if "seed" in config.kwargs:
        overrides["seed"] = config.kwargs["seed"] + 1000
    return overrides


def continue_both(
    info: OptimizerInfo,
    ours: torch.optim.Optimizer,
    theirs: torch.optim.Optimizer,
    what: str,
    steps: int = 4,
    seed: int = 5,
) -> None:
    """Step both over the same gradients (each its own parameters), comparing after every step."""
    our_params, their_params = group_params(ours), group_params(theirs)
    for t, grads in enumerate(seeded_grads(our_params, steps, seed=seed)):
        info.step(ours, our_params, grads)
        info.step(theirs, their_params, grads)
        assert_optimizers_match(ours, theirs, our_params, their_params, engine="reference", what=f"{what}, step {t}: ")


# ---------------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(CASE_NAMES, optimizer_cases(engines="all"))
def test_state_dict_round_trip_into_a_fresh_optimizer(info: OptimizerInfo, config: OptimizerInput, engine: str) -> None:
    """A checkpoint loaded into a fresh optimizer (other lr, other seed, copied parameters) gives back the
    same state_dict, and both continue bitwise alike."""
    opt, params = trained(info, config, engine)
    info.prepare_checkpoint(opt)
    checkpoint = copy.deepcopy(opt.state_dict())
    fresh_params = [clone_param(p) for p in params]
    fresh = info.make(two_groups(fresh_params), config, engine, **receiver_overrides(config))
    fresh.load_state_dict(checkpoint)
    assert_state_dicts_equal(fresh.state_dict(), opt.state_dict())
    continue_both(info, fresh, opt, "resumed vs original")


@pytest.mark.parametrize(CASE_NAMES, optimizer_cases(engines="all"))
def test_state_dict_moves_both_ways_between_the_oracle_and_every_engine(
    info: OptimizerInfo, config: OptimizerInput, engine: str
) -> None:
    """The oracle's checkpoint loads into the optimizer on this engine, and this engine's into the oracle;
    each pair then continues bitwise alike (which engine runs stays the receiver's choice)."""
    for direction in ("from the oracle", "into the oracle"):
        params = make_params(config)
        if direction == "from the oracle":
            source = info.make_oracle(two_groups(params), config)
        else:
            source = info.make(two_groups(params), config, engine)
        for grads in training_grads(config, params, 3, seed=100):
            info.step(source, params, grads)
        info.prepare_checkpoint(source)
        copies = two_groups([clone_param(p) for p in params])
        if direction == "from the oracle":
            receiver = info.make(copies, config, engine, **receiver_overrides(config))
        else:
            receiver = info.make_oracle(copies, config)
        receiver.load_state_dict(with_flags_of(source.state_dict(), receiver))
        what = f"{direction} ({info.oracle_name(config)})"
        assert_optimizers_match(receiver, source, group_params(receiver), params, engine="reference", what=f"{what}: ")
        continue_both(info, receiver, source, what)


# ---------------------------------------------------------------------------------------------------------
# Pickling and deepcopy
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize(CASE_NAMES, optimizer_cases(engines="all"))
def test_copies_continue_on_the_oracles_trajectory(
    info: OptimizerInfo, config: OptimizerInput, engine: str, how: str
) -> None:
    """A pickled or deep-copied optimizer owns new parameters, has the same state_dict, and continues on the
    oracle's trajectory."""
    params, oracle_params = make_params(config), make_params(config)
    ours = info.make(two_groups(params), config, engine)
    oracle = info.make_oracle(two_groups(oracle_params), config)
    for grads in training_grads(config, params, 3, seed=3):
        info.step(ours, params, grads)
        info.step(oracle, oracle_params, grads)
    copied = pickle.loads(pickle.dumps(ours)) if how == "pickle" else copy.deepcopy(ours)
    assert type(copied) is info.cls
    assert all(p is not q for p, q in zip(group_params(copied), params))
    assert_state_dicts_equal(copied.state_dict(), ours.state_dict())
    continue_both(info, copied, oracle, f"{how} vs {info.oracle_name(config)}")


# ---------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------
def hook_log(info: OptimizerInfo, config: OptimizerInput, make: Callable[[list], torch.optim.Optimizer]) -> list[tuple]:
    """Register every kind of hook on a fresh optimizer; run a step, state_dict and load_state_dict."""
    log: list[tuple] = []
    params = make_params(config)
    opt = make(two_groups(params))
    w = params[0]
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global pre", type(o).__name__, a[1:], k))),
        register_optimizer_step_post_hook(lambda o, a, k: log.append(("global post", w.detach().clone()))),
        opt.register_step_pre_hook(lambda o, a, k: log.append(("pre", o is opt, w.detach().clone()))),
        opt.register_step_post_hook(lambda o, a, k: log.append(("post", o is opt, w.detach().clone()))),
        opt.register_state_dict_pre_hook(lambda o: log.append(("state_dict pre", o is opt))),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1}),
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load pre", sorted(sd)))),
        opt.register_load_state_dict_post_hook(lambda o: log.append(("load post", o.param_groups[0]["lr"]))),
    ]
    grads = seeded_grads(params, 2, seed=7)
    try:
        # A pre hook may replace the step's arguments: here it passes the closure explicitly.
        replace = opt.register_step_pre_hook(lambda o, a, k: (a, {"closure": None}))
        info.step(opt, params, grads[0])
        replace.remove()
        sd = opt.state_dict()
        log.append(("state_dict keys", sorted(sd)))
        sd = copy.deepcopy(sd)
        sd.pop("extra")
        sd["param_groups"][0]["lr"] = 0.25
        opt.load_state_dict(sd)
    finally:
        for handle in handles:
            handle.remove()
    info.step(opt, params, grads[1])  # removed hooks are not called again
    log.append(("final", w.detach().clone()))
    return log


@pytest.mark.parametrize(CASE_NAMES, optimizer_cases())
def test_every_hook_is_called_as_on_the_oracle(info: OptimizerInfo, config: OptimizerInput, engine: str) -> None:
    """Every hook, in the oracle's order, with the oracle's arguments and the oracle's numbers. With
    step_in_backward the update ran inside backward, so a step pre hook already sees the updated
    parameters (what the oracle's post hook sees)."""
    ours = hook_log(info, config, lambda groups: info.make(groups, config, engine))
    theirs = hook_log(info, config, lambda groups: info.make_oracle(groups, config))
    names = [
        "global pre",
        "pre",
        "post",
        "global post",
        "state_dict pre",
        "state_dict keys",
        "load pre",
        "load post",
        "final",
    ]
    assert [entry[0] for entry in theirs] == names, "the oracle's hooks changed: this test needs a look"
    assert [entry[0] for entry in ours] == names
    if config.step_in_backward:
        theirs[1] = (*theirs[1][:2], theirs[2][2])
    for a, b in zip(ours, theirs):
        for x, y in zip(a[1:], b[1:]):
            if isinstance(y, Tensor):
                assert torch.equal(x, y), a[0]
            else:
                assert x == y, f"{a[0]}: {x!r} != the oracle's {y!r}"


# ---------------------------------------------------------------------------------------------------------
# Closures
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(CASE_NAMES, optimizer_cases(engines="first"))
def test_closure_runs_under_enable_grad_and_its_loss_is_returned(
    info: OptimizerInfo, config: OptimizerInput, engine: str
) -> None:
    """step(closure) runs the closure once, with grad enabled (also inside no_grad), returns its loss, leaves
    the grad mode as it was, and takes the oracle's step."""
    results = []
    for make in (lambda groups: info.make(groups, config, engine), lambda groups: info.make_oracle(groups, config)):
        params = make_params(config)
        opt = make(two_groups(params))
        info.prepare_step(opt)
        weights = [torch.linspace(-1, 1, p.numel(), dtype=torch.float64).to(p.dtype).view_as(p) for p in params]
        calls = []

        def closure(
            opt: torch.optim.Optimizer = opt,
            params: list[Tensor] = params,
            weights: list[Tensor] = weights,
            calls: list[bool] = calls,
        ) -> Tensor:
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = torch.stack([(p * w).square().sum().double() for p, w in zip(params, weights)]).sum()
            loss.backward()
            return loss

        with torch.no_grad():
            returned = opt.step(closure)
        assert calls == [True], "the closure runs once, with grad enabled"
        assert isinstance(returned, Tensor) and returned.requires_grad
        assert torch.is_grad_enabled(), "step restores the grad mode"
        results.append((returned.detach(), [p.detach().clone() for p in params]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert torch.equal(loss_a, loss_b)
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        assert torch.equal(p, q), f"param {i} after the closure's step differs from {info.oracle_name(config)}'s"


# ---------------------------------------------------------------------------------------------------------
# The global generator
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(CASE_NAMES, optimizer_cases())
def test_construction_steps_and_checkpoints_leave_the_global_generator_alone(
    info: OptimizerInfo, config: OptimizerInput, engine: str
) -> None:
    """A drop-in must not shift the user's random numbers (data order, dropout masks): torch.optim.SGD
    never draws from torch's global generator, and neither does torchsgd unless stochastic rounding asks
    for a seed (every configuration here passes one)."""
    before = torch.random.get_rng_state()
    opt, _ = trained(info, config, engine)
    info.prepare_checkpoint(opt)
    opt.load_state_dict(opt.state_dict())
    copy.deepcopy(opt)
    assert torch.equal(torch.random.get_rng_state(), before)


# ---------------------------------------------------------------------------------------------------------
# An invalid add_param_group changes nothing
# ---------------------------------------------------------------------------------------------------------
def _new(config: OptimizerInput, n: int = 3) -> Tensor:
    return torch.zeros(n, dtype=config.dtype, requires_grad=True)


# (description, the group to add, given the optimizer's parameters and configuration).
SHARED_BAD_GROUPS: list[tuple[str, Callable[[list[Tensor], OptimizerInput], dict[str, Any]]]] = [
    ("negative lr", lambda ps, c: {"params": [_new(c)], "lr": -1.0}),
    ("nan lr", lambda ps, c: {"params": [_new(c)], "lr": math.nan}),
    ("nan momentum", lambda ps, c: {"params": [_new(c)], "momentum": math.nan}),
    ("param already in a group", lambda ps, c: {"params": [ps[0]]}),
    ("a new and a known param", lambda ps, c: {"params": [_new(c), ps[1]], "lr": 0.3}),
    ("not a tensor", lambda ps, c: {"params": [_new(c), 1.0]}),
    ("a non-leaf tensor", lambda ps, c: {"params": [torch.zeros(2, requires_grad=True) * 2]}),
    ("names in an unnamed optimizer", lambda ps, c: {"params": [("w", _new(c))]}),
]


def bad_group_cases() -> list:
    """Every configuration on the default engine, the first on every engine, with every bad group: the
    shared ones and the optimizer's own."""
    cases = []
    for case in optimizer_cases(engines="first"):
        info = case.values[0]
        own = [
            (desc, lambda ps, c, o=options: {"params": [_new(c)], **o}) for desc, options in info.invalid_group_options
        ]
        for desc, build in [*SHARED_BAD_GROUPS, *own]:
            cases.append(pytest.param(*case.values, build, id=f"{case.id}-{desc}"))
    return cases


@pytest.mark.parametrize(("info", "config", "engine", "build"), bad_group_cases())
def test_invalid_add_param_group_changes_nothing(
    info: OptimizerInfo, config: OptimizerInput, engine: str, build: Callable
) -> None:
    opt, params = trained(info, config, engine)
    twin = trained(info, config, engine)
    group = build(params, config)
    before = snapshot(opt)
    assert capture_error(lambda: opt.add_param_group(group)) is not None, "accepted"
    assert_unchanged(opt, params, before, twin, step=info.step)
