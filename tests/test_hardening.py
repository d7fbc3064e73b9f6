"""Hardening: atomic state loading, exact resume in a fresh process, no leaks, no code from checkpoints.

- load_state_dict is atomic: a state_dict that does not fit raises an error naming the offending entry
  (param group, parameter, key), and the optimizer is bitwise unchanged afterwards: its state_dict, its
  param_groups, and its next step equal those of an untouched twin.
- Exact resume: k steps, torch.save, torch.load(weights_only=True) in a fresh process, n − k more steps
  give bitwise the params and state of n uninterrupted steps, for every engine and option.
- Long runs leak nothing: no growth in Python objects or traced memory per step (benchmarks/long_run.py
  measures 100,000 steps; docs/reliability.md has the figures).
- Nothing in the package loads a checkpoint with torch.load unless weights_only=True.
- Bugs the option fuzz (test_fuzz_options.py) found, pinned by deterministic tests.
"""

from __future__ import annotations

import ast
import copy
import gc
import math
import os
import subprocess
import sys
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import torchsgd
from torchsgd.engines.build import native_module
from helpers import (
    ENGINE_NAMES,
    ENGINES,
    assert_optimizers_match,
    assert_state_dicts_equal,
    assert_values_equal,
    capture_error,
)

PACKAGE = Path(torchsgd.__file__).parent


# ---------------------------------------------------------------------------------------------------------
# Atomic load_state_dict
# ---------------------------------------------------------------------------------------------------------
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda groups, **kw: torchsgd.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01, **kw),
    "SGDW": lambda groups, **kw: torchsgd.SGDW(groups, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, **kw),
    "LARS": lambda groups, **kw: torchsgd.LARS(groups, lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, **kw),
    # The options whose state lives in the "torchsgd" entry: stochastic rounding's seed and step, the
    # guard's count of skipped steps; and momentum in another dtype than the parameters'.
    "SGD+extras": lambda groups, **kw: torchsgd.SGD(
        groups, lr=0.1, momentum=0.9, stochastic_rounding=True, seed=7, skip_nonfinite=True,
        momentum_dtype=torch.float32, **kw
    ),
}


def trained(optimizer: str, engine: str, seed: int = 0) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """An optimizer with momentum state after 3 steps, over two groups: a (3, 2) matrix and a (4,) vector."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if optimizer == "SGD+extras" else torch.float32
    params = [torch.randn(3, 2, generator=generator).to(dtype), torch.randn(4, generator=generator).to(dtype)]
    opt = OPTIMIZERS[optimizer]([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.05}], **ENGINES[engine])
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        if step == 1 and getattr(opt, "skip_nonfinite", False):
            params[0].grad[0, 0] = math.nan  # one skipped step: skipped_steps is 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    return opt, params


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "state_dict": copy.deepcopy(opt.state_dict()),
        "groups": [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups],
        "state_ids": {id(p): {k: id(v) for k, v in s.items()} for p, s in opt.state.items()},
        "globals": {name: getattr(opt, name) for name in type(opt)._GLOBAL_OPTIONS},
    }


def assert_unchanged(opt: torch.optim.Optimizer, params: list[Tensor], before: dict[str, Any], twin: tuple) -> None:
    """Bitwise the optimizer it was: state_dict, param_groups, its own state tensors, and its next step."""
    after = opt.state_dict()
    assert_state_dicts_equal(after, before["state_dict"])
    assert after.get("torchsgd") == before["state_dict"].get("torchsgd")
    assert len(opt.param_groups) == len(before["groups"])
    for g, h in zip(opt.param_groups, before["groups"]):
        assert set(g) == set(h), f"group keys {sorted(g)} != {sorted(h)}"
        for key in h:
            if key == "params":
                assert len(g["params"]) == len(h["params"]) and all(x is y for x, y in zip(g["params"], h["params"]))
            else:
                assert_values_equal(g[key], h[key], what=key)
    assert {id(p): {k: id(v) for k, v in s.items()} for p, s in opt.state.items()} == before["state_ids"], "state replaced"
    assert {name: getattr(opt, name) for name in type(opt)._GLOBAL_OPTIONS} == before["globals"]
    twin_opt, twin_params = twin
    generator = torch.Generator().manual_seed(99)
    grads = [torch.randn(p.shape, generator=generator).to(p.dtype) for p in params]
    for o, ps in ((opt, params), (twin_opt, twin_params)):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    assert_optimizers_match(opt, twin_opt, params, twin_params, engine="reference", what="after the failed load: ")


def edited(good: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    sd = copy.deepcopy(good)
    edit(sd)
    return sd


def set_group(i: int, **values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["param_groups"][i].update(values)


def drop_group_key(i: int, key: str) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["param_groups"][i].pop(key)


def set_buffer(pid: int, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["state"][pid].update(momentum_buffer=value)


# (name, edit, exception type, words the message or its notes must contain, optimizers it applies to).
# "torch" marks the cases torch itself rejects: torch's exception and words, with a note naming the entry.
ALL = ("SGD", "SGDW", "LARS", "SGD+extras")
BAD_STATE_DICTS: list[tuple[str, Callable, type, list[str], tuple[str, ...]]] = [
    # torch's own rejections
    ("one group too many", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])), ValueError,
     ["torch", "different number of parameter groups", "3 param groups", "has 2"], ALL),
    ("one group too few", lambda sd: sd["param_groups"].pop(), ValueError, ["torch", "1 param groups"], ALL),
    ("a group with a parameter too many", lambda sd: sd["param_groups"][1]["params"].append(7), ValueError,
     ["torch", "doesn't match the size", "param group 1", "2 parameters"], ALL),
    ("no 'state'", lambda sd: sd.pop("state"), KeyError, ["torch", "'state'"], ALL),
    ("no 'param_groups'", lambda sd: sd.pop("param_groups"), KeyError, ["torch", "'param_groups'"], ALL),
    ("a group without 'params'", drop_group_key(1, "params"), KeyError, ["torch", "param group 1", "'params'"], ALL),
    # structure
    ("'state' not a dict", lambda sd: sd.update(state=[1, 2]), TypeError, ["'state'", "list"], ALL),
    ("'param_groups' not a list", lambda sd: sd.update(param_groups={"lr": 0.1}), TypeError, ["'param_groups'"], ALL),
    ("a group that is not a dict", lambda sd: sd["param_groups"].__setitem__(1, [1]), TypeError, ["param group 1"], ALL),
    ("a parameter id listed twice", set_group(1, params=[0]), ValueError, ["parameter id 0", "twice"], ALL),
    ("a state entry that is not a dict", lambda sd: sd["state"].update({1: 0.5}), TypeError, ["state[1]", "param group 1"], ALL),
    # missing group keys
    ("a group without 'lr'", drop_group_key(1, "lr"), ValueError, ["param group 1", "'lr'"], ALL),
    ("a group without 'momentum'", drop_group_key(0, "momentum"), ValueError, ["param group 0", "'momentum'"], ALL),
    ("a group without 'weight_decay'", drop_group_key(1, "weight_decay"), ValueError, ["param group 1", "'weight_decay'"], ALL),
    ("a group without 'dampening'", drop_group_key(0, "dampening"), ValueError, ["param group 0", "'dampening'"], ALL),
    # extra keys
    ("state for a parameter id that does not exist", lambda sd: sd["state"].update({5: {"momentum_buffer": torch.zeros(4)}}),
     ValueError, ["parameter id 5"], ALL),
    ("a per-parameter key SGD does not keep", lambda sd: sd["state"][1].update(exp_avg=torch.zeros(4)), ValueError,
     ["state[1]", "param group 1", "'exp_avg'"], ALL),
    ("an Adam checkpoint's 'step'", lambda sd: sd["state"][0].update(step=torch.tensor(3.0)), ValueError,
     ["state[0]", "'step'"], ALL),
    # buffers
    ("a buffer of the wrong shape", set_buffer(1, torch.zeros(5)), ValueError, ["state[1]", "shape (5,)", "(4,)"], ALL),
    ("a transposed buffer", set_buffer(0, torch.zeros(2, 3)), ValueError, ["state[0]", "shape (2, 3)"], ALL),
    ("a buffer that is a string", set_buffer(1, "0.1 0.2 0.3 0.4"), TypeError, ["state[1]", "str"], ALL),
    ("a buffer that is a list", set_buffer(1, [0.1, 0.2, 0.3, 0.4]), TypeError, ["state[1]", "list"], ALL),
    ("a complex buffer for a real parameter", set_buffer(1, torch.zeros(4, dtype=torch.complex64)), TypeError,
     ["state[1]", "complex", "imaginary"], ALL),
    # invalid and non-finite hyperparameters
    ("a nan lr", set_group(1, lr=math.nan), ValueError, ["param group 1", "learning rate", "nan"], ALL),
    ("an inf lr Tensor", set_group(0, lr=torch.tensor(math.inf)), ValueError, ["param group 0", "learning rate"], ALL),
    ("a negative lr", set_group(1, lr=-0.5), ValueError, ["param group 1", "Invalid learning rate: -0.5"], ALL),
    ("a nan momentum", set_group(0, momentum=math.nan), ValueError, ["param group 0", "momentum"], ALL),
    ("an inf weight_decay", set_group(1, weight_decay=math.inf), ValueError, ["param group 1", "weight_decay"], ALL),
    ("a nan dampening", set_group(0, dampening=math.nan), ValueError, ["param group 0", "dampening"], ALL),
    ("an lr that is a string", set_group(1, lr="0.1"), TypeError, ["param group 1", "lr"], ALL),
    ("nesterov with dampening", set_group(0, nesterov=True, dampening=0.5), ValueError, ["param group 0", "Nesterov"], ALL),
    ("a flag that is not a bool", set_group(1, maximize="no"), TypeError, ["param group 1", "maximize"], ALL),
    ("decoupled decay in LARS", set_group(0, decoupled_weight_decay=True), ValueError, ["param group 0", "coupled"], ("LARS",)),
    ("a nan trust_coefficient", set_group(1, trust_coefficient=math.nan), ValueError, ["param group 1", "trust_coefficient"], ("LARS",)),
    ("an inf eps", set_group(0, eps=math.inf), ValueError, ["param group 0", "eps"], ("LARS",)),
    # the "torchsgd" entry
    ("'torchsgd' that is not a dict", lambda sd: sd.update(torchsgd=[7, 3]), TypeError, ["'torchsgd'"], ALL),
    ("'torchsgd' that is None", lambda sd: sd.update(torchsgd=None), TypeError, ["'torchsgd'"], ALL),
    ("'torchsgd' with an unknown key", lambda sd: sd.update(torchsgd={"seed": 1, "rounding_step": 2, "generator": b"x"}),
     ValueError, ["'torchsgd'", "'generator'"], ALL),
    ("'torchsgd' with a bool seed", lambda sd: sd.update(torchsgd={"seed": True, "rounding_step": 2}), ValueError,
     ["'torchsgd'", "'seed'"], ALL),
    ("'torchsgd' with a negative step", lambda sd: sd.update(torchsgd={"seed": 1, "rounding_step": -1}), ValueError,
     ["'rounding_step'", "-1"], ALL),
    ("'torchsgd' with a float step", lambda sd: sd.update(torchsgd={"seed": 1, "rounding_step": 2.0}), ValueError,
     ["'rounding_step'"], ALL),
    ("'torchsgd' with a seed and no step", lambda sd: sd.update(torchsgd={"seed": 1}), ValueError,
     ["'seed'", "'rounding_step'"], ALL),
    ("'torchsgd' with a string count", lambda sd: sd.update(torchsgd={"skipped_steps": "1"}), ValueError,
     ["'skipped_steps'"], ALL),
]
CASES = [
    pytest.param(optimizer, engine, index, id=f"{optimizer}-{engine}-{name}")
    for index, (name, _, _, _, applies) in enumerate(BAD_STATE_DICTS)
    for optimizer in applies
    for engine in (ENGINE_NAMES if optimizer == "SGD" else ("default",))
]


def error_text(error: BaseException) -> str:
    return "\n".join([str(error), *getattr(error, "__notes__", [])])


@pytest.mark.parametrize(("optimizer", "engine", "index"), CASES)
def test_bad_state_dict_raises_naming_the_entry_and_changes_nothing(optimizer: str, engine: str, index: int) -> None:
    name, edit, error_type, words, _ = BAD_STATE_DICTS[index]
    opt, params = trained(optimizer, engine)
    twin = trained(optimizer, engine)
    good = trained(optimizer, engine, seed=1)[0].state_dict()  # another run's checkpoint: it would change things
    bad = edited(good, edit)
    before = snapshot(opt)
    error = capture_error(lambda: opt.load_state_dict(bad))
    assert error is not None, f"{name}: accepted"
    assert type(error) is error_type, f"{name}: {type(error).__name__}: {error}"
    text = error_text(error)
    if words[0] == "torch":
        # torch's own check: torch's exception and words, unchanged, the location in a note.
        torch_params = [p.detach().clone().float() for p in params]
        torch_opt = torch.optim.SGD([{"params": [torch_params[0]]}, {"params": [torch_params[1]]}], lr=0.1, momentum=0.9)
        torch_error = capture_error(lambda: torch_opt.load_state_dict(bad))
        assert type(torch_error) is type(error) and str(torch_error) == str(error), f"{error!r} != torch's {torch_error!r}"
        assert getattr(error, "__notes__", None), f"{name}: no note names the entry"
        words = words[1:]
    for word in words:
        assert word in text, f"{name}: {word!r} not in the message: {text}"
    assert_unchanged(opt, params, before, twin)
    # The good checkpoint still loads afterwards (no half-registered hook or leftover).
    opt.load_state_dict(good)
    assert_state_dicts_equal(opt.state_dict(), good)


def test_a_failed_load_leaves_pre_hooks_as_they_were() -> None:
    opt, _ = trained("SGD", "default")
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("user hook"))
    hooks = dict(opt._optimizer_load_state_dict_pre_hooks)
    bad = edited(opt.state_dict(), set_buffer(1, torch.zeros(5)))
    assert capture_error(lambda: opt.load_state_dict(bad)) is not None
    assert dict(opt._optimizer_load_state_dict_pre_hooks) == hooks and seen == ["user hook"]


def test_checks_run_on_what_the_pre_hooks_made() -> None:
    """A pre-hook may repair (or break) a state_dict: the checks see its result, as torch would load it."""
    opt, _ = trained("SGD", "default")
    good = opt.state_dict()
    bad = edited(good, set_buffer(1, torch.zeros(5)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: {**sd, "state": copy.deepcopy(good["state"])})
    opt.load_state_dict(bad)  # repaired by the hook
    assert_state_dicts_equal(opt.state_dict(), good)


# fused=True refuses complex parameters at the first step, with torch's error (test_parity.py).
@pytest.mark.parametrize("engine", [e for e in ENGINE_NAMES if e != "fused"])
def test_a_real_buffer_for_a_complex_parameter_is_rejected(engine: str) -> None:
    """torch keeps a complex parameter's buffer as it is (no cast): a real one would fail mid-step."""
    z = torch.randn(4, dtype=torch.complex64)
    opt = torchsgd.SGD([z], lr=0.1, momentum=0.9, **ENGINES[engine])
    z.grad = torch.randn(4, dtype=torch.complex64)
    opt.step()
    bad = edited(opt.state_dict(), set_buffer(0, torch.zeros(4)))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match=r"state\[0\].*real.*complex64"):
        opt.load_state_dict(bad)
    assert_state_dicts_equal(opt.state_dict(), before)


def trained_schedule_free(seed: int = 0) -> tuple[torchsgd.ScheduleFreeSGD, list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, 2, generator=generator), torch.randn(4, generator=generator)]
    opt = torchsgd.ScheduleFreeSGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.5}], lr=1.0, warmup_steps=2)
    opt.train()
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    opt.eval()
    return opt, params


BAD_SCHEDULE_FREE: list[tuple[str, Callable, type, list[str]]] = [
    ("z of the wrong shape", lambda sd: sd["state"][1].update(z=torch.zeros(5)), ValueError, ["z", "param group 1", "(5,)"]),
    ("z that broadcasts", lambda sd: sd["state"][1].update(z=torch.zeros(1)), ValueError, ["z", "(1,)"]),
    ("z that is None", lambda sd: sd["state"][0].update(z=None), TypeError, ["z", "param group 0"]),
    ("an SGD momentum_buffer", lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3, 2)), ValueError,
     ["'momentum_buffer'"]),
    ("state for a parameter id that does not exist", lambda sd: sd["state"].update({9: {"z": torch.zeros(4)}}), ValueError, ["9"]),
    ("a group without 'k'", drop_group_key(0, "k"), ValueError, ["param group 0", "'k'"]),
    ("a negative k", set_group(1, k=-1), ValueError, ["param group 1", "k"]),
    ("a nan weight_sum", set_group(0, weight_sum=math.nan), ValueError, ["param group 0", "weight_sum"]),
    ("an inf lr_max", set_group(1, lr_max=math.inf), ValueError, ["param group 1", "lr_max"]),
    ("a nan lr", set_group(0, lr=math.nan), ValueError, ["param group 0", "learning rate"]),
    ("a momentum of 1", set_group(1, momentum=1.0), ValueError, ["param group 1", "Momentum"]),
    ("a train_mode that is not a bool", set_group(0, train_mode="yes"), TypeError, ["param group 0", "train_mode"]),
    ("one group too many", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])), ValueError,
     ["different number of parameter groups"]),
]


@pytest.mark.parametrize("index", range(len(BAD_SCHEDULE_FREE)), ids=[case[0] for case in BAD_SCHEDULE_FREE])
def test_schedule_free_bad_state_dict_raises_and_changes_nothing(index: int) -> None:
    name, edit, error_type, words = BAD_SCHEDULE_FREE[index]
    opt, params = trained_schedule_free()
    twin, twin_params = trained_schedule_free()
    bad = edited(trained_schedule_free(seed=1)[0].state_dict(), edit)
    before = copy.deepcopy(opt.state_dict())
    error = capture_error(lambda: opt.load_state_dict(bad))
    assert type(error) is error_type, f"{name}: {error!r}"
    for word in words:
        assert word in str(error), f"{name}: {word!r} not in {error}"
    assert_state_dicts_equal(opt.state_dict(), before)
    for o, ps in ((opt, params), (twin, twin_params)):
        o.train()
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
        o.eval()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["z"], twin.state[q]["z"])


def test_schedulefree_package_checkpoints_still_load() -> None:
    schedulefree = pytest.importorskip("schedulefree")
    params = [torch.randn(3, 2), torch.randn(4)]
    theirs = schedulefree.SGDScheduleFree(params, lr=1.0)
    theirs.train()
    for p in params:
        p.grad = torch.ones_like(p)
    theirs.step()
    theirs.eval()
    ours = torchsgd.ScheduleFreeSGD(params, lr=1.0)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["k"] == 1 and torch.equal(ours.state[params[0]]["z"], theirs.state[params[0]]["z"])


# What still loads (torch accepts it, and so must a drop-in).
def test_torch_checkpoints_load_into_sgdw_and_lars_keeping_their_own_options() -> None:
    """A torch.optim.SGD checkpoint has no decoupled_weight_decay or LARS options: the optimizer's stand."""
    params = [torch.randn(3, 2), torch.randn(4)]
    torch_opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    checkpoint = torch_opt.state_dict()
    for optimizer, own in ((torchsgd.SGDW, {"decoupled_weight_decay": True}),
                           (torchsgd.LARS, {"trust_coefficient": 0.02, "trust_clip": True})):
        opt = optimizer(params, lr=0.5, momentum=0.5, **{k: v for k, v in own.items() if k != "decoupled_weight_decay"})
        opt.load_state_dict(checkpoint)
        group = opt.param_groups[0]
        assert group["lr"] == 0.1 and group["momentum"] == 0.9  # the checkpoint's
        for key, value in own.items():
            assert group[key] == value  # the optimizer's own
        assert torch.equal(opt.state[params[0]]["momentum_buffer"], torch_opt.state[params[0]]["momentum_buffer"])


def test_what_torch_accepts_still_loads() -> None:
    """An older torch's group without nesterov/maximize/foreach/differentiable/fused, integer buffers
    (cast to the parameter's dtype, as torch does), no state at all, a None buffer."""
    opt, params = trained("SGD", "default")
    good = opt.state_dict()
    backfilled = edited(good, lambda sd: [g.pop(k) for g in sd["param_groups"] for k in _BACKFILLED])
    opt.load_state_dict(backfilled)
    assert opt.param_groups[0]["nesterov"] is False and opt.param_groups[0]["fused"] is False
    opt.load_state_dict(edited(good, set_buffer(1, torch.arange(4))))
    assert torch.equal(opt.state[params[1]]["momentum_buffer"], torch.arange(4.0))
    opt.load_state_dict(edited(good, lambda sd: sd.update(state={})))
    assert not opt.state_dict()["state"]
    opt.load_state_dict(edited(good, set_buffer(0, None)))
    assert opt.state[params[0]]["momentum_buffer"] is None


_BACKFILLED = ("nesterov", "maximize", "foreach", "differentiable", "fused")


def test_a_torchsgd_entry_loads_into_an_optimizer_without_the_options() -> None:
    """An optimizer without the options ignores the entry; one with them restores seed, step and count."""
    opt, _ = trained("SGD+extras", "default")
    checkpoint = opt.state_dict()
    assert checkpoint["torchsgd"] == {"seed": 7, "rounding_step": 2, "skipped_steps": 1}

    def two_groups(**options: Any) -> torchsgd.SGD:
        params = [torch.zeros(3, 2, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16)]
        return torchsgd.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, momentum=0.9, **options)

    plain = two_groups(seed=5)
    plain.load_state_dict(checkpoint)
    assert (plain.seed, plain.rounding_step, plain.skipped_steps) == (5, 0, 1)
    assert "torchsgd" not in plain.state_dict()
    resumed = two_groups(stochastic_rounding=True, seed=123, skip_nonfinite=True, momentum_dtype=torch.float32)
    resumed.load_state_dict(checkpoint)
    assert (resumed.seed, resumed.rounding_step, resumed.skipped_steps) == (7, 2, 1)
    torch.optim.SGD([{"params": [torch.zeros(3, 2)]}, {"params": [torch.zeros(4)]}], lr=0.1).load_state_dict(checkpoint)


@pytest.mark.parametrize(("param_dtype", "momentum_dtype"), [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.float16),
                                                             (torch.float16, torch.float32), (torch.float32, torch.bfloat16)])
def test_momentum_dtype_buffers_load_exactly(param_dtype: torch.dtype, momentum_dtype: torch.dtype) -> None:
    """Bug found here: torch casts loaded buffers to the parameter's dtype first, which rounded a float32
    buffer of a bfloat16 parameter; the buffers now come from the checkpoint's own values."""
    p = torch.randn(500).to(param_dtype)
    opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=momentum_dtype)
    for _ in range(3):
        p.grad = torch.randn(500).to(param_dtype)
        opt.step()
    checkpoint = opt.state_dict()
    q = p.detach().clone()
    other = torchsgd.SGD([q], lr=0.1, momentum=0.9, momentum_dtype=momentum_dtype)
    other.load_state_dict(checkpoint)
    assert_state_dicts_equal(other.state_dict(), checkpoint)


# ---------------------------------------------------------------------------------------------------------
# Exact resume in a fresh process
# ---------------------------------------------------------------------------------------------------------
# name -> (optimizer class name, options, parameter dtype). Every one runs on every engine it has.
RESUME_OPTIONS: dict[str, tuple[str, dict[str, Any], torch.dtype]] = {
    "momentum-nesterov-wd": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), torch.float32),
    "dampening-maximize-fp64": ("SGD", dict(lr=0.05, momentum=0.5, dampening=0.3, maximize=True), torch.float64),
    "fp16": ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3), torch.float16),
    "sgdw": ("SGDW", dict(lr=0.05, momentum=0.9, weight_decay=0.05), torch.float32),
    "clip": ("SGD", dict(lr=0.05, momentum=0.9, max_grad_norm=0.5), torch.float32),
    "guard": ("SGD", dict(lr=0.05, momentum=0.9, skip_nonfinite=True), torch.float32),
    "clip-guard-bf16": ("SGD", dict(lr=0.05, momentum=0.9, max_grad_norm=0.5, skip_nonfinite=True), torch.bfloat16),
    "momentum-bf16": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, momentum_dtype=torch.bfloat16), torch.float32),
    "momentum-fp32-of-bf16": ("SGD", dict(lr=0.05, momentum=0.9, momentum_dtype=torch.float32), torch.bfloat16),
    "rounding-bf16": ("SGD", dict(lr=0.05, momentum=0.9, stochastic_rounding=True, seed=11), torch.bfloat16),
    "rounding-bf16-momentum-bf16": ("SGD", dict(lr=0.05, momentum=0.9, stochastic_rounding=True, seed=12,
                                                momentum_dtype=torch.bfloat16, weight_decay=1e-3), torch.bfloat16),
    "rounding-fp16-guard": ("SGD", dict(lr=0.05, momentum=0.9, stochastic_rounding=True, seed=13, skip_nonfinite=True), torch.float16),
    "in-backward": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, step_in_backward=True), torch.float32),
    "in-backward-rounding": ("SGD", dict(lr=0.05, momentum=0.9, step_in_backward=True, stochastic_rounding=True, seed=14,
                                         momentum_dtype=torch.bfloat16), torch.bfloat16),
    "lars": ("LARS", dict(lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02), torch.float32),
    "lars-clip-rounding": ("LARS", dict(lr=0.1, momentum=0.9, trust_clip=True, max_grad_norm=1.0, stochastic_rounding=True,
                                        seed=15), torch.bfloat16),
    "scheduler": ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-3), torch.float32),
    "schedule-free": ("ScheduleFreeSGD", dict(lr=0.5, momentum=0.9, weight_decay=1e-3, warmup_steps=3), torch.float32),
}
SCHEDULE_FREE_ENGINES = {"reference": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}
RESUME_CONFIGS = [
    (name, engine)
    for name, (kind, _, _) in RESUME_OPTIONS.items()
    for engine in (SCHEDULE_FREE_ENGINES if kind == "ScheduleFreeSGD" else ENGINE_NAMES)
]
TOTAL_STEPS, SAVE_AT = 14, 6
POISONED_STEPS = (2, 9)  # a NaN gradient before and after the checkpoint (with the guard)
X = torch.randn(24, 6, generator=torch.Generator().manual_seed(3))
Y = torch.arange(24) % 3


def resume_model(dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    return model.to(dtype)


def resume_optimizer(name: str, engine: str, model: torch.nn.Module, *, fresh: bool) -> tuple[Any, Any]:
    """The optimizer (and scheduler) of a configuration. ``fresh``: built as a resuming process would,
    with another seed than the checkpoint's, so that everything must come from the checkpoint."""
    kind, options, _ = RESUME_OPTIONS[name]
    options = dict(options)
    if fresh and "seed" in options:
        options["seed"] += 1000
    if kind == "ScheduleFreeSGD":
        return torchsgd.ScheduleFreeSGD(model.parameters(), **options, **SCHEDULE_FREE_ENGINES[engine]), None
    groups = [{"params": model[0].parameters()}, {"params": [*model[1].parameters(), *model[3].parameters()], "lr": 0.02}]
    opt = getattr(torchsgd, kind)(groups, **options, **ENGINES[engine])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5) if name == "scheduler" else None
    return opt, scheduler


def resume_step(name: str, model: torch.nn.Module, opt: Any, scheduler: Any, step: int) -> None:
    dtype = next(model.parameters()).dtype
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(X.to(dtype)).float(), Y)
    loss.backward()  # with step_in_backward this is the update
    if step in POISONED_STEPS and getattr(opt, "skip_nonfinite", False):
        model[0].weight.grad[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    if scheduler is not None:
        scheduler.step()


def checkpoint_of(model: torch.nn.Module, opt: Any, scheduler: Any) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
    }


def train_uninterrupted(name: str, engine: str, save_to: Path | None) -> dict[str, Any]:
    """n steps in this process; at step k, a checkpoint is written (ScheduleFreeSGD: eval(), save, train())."""
    model = resume_model(RESUME_OPTIONS[name][2], seed=0)
    opt, scheduler = resume_optimizer(name, engine, model, fresh=False)
    schedule_free = isinstance(opt, torchsgd.ScheduleFreeSGD)
    if schedule_free:
        opt.train()
    for step in range(TOTAL_STEPS):
        if step == SAVE_AT:
            if schedule_free:
                opt.eval()  # its docs: eval() before saving, train() after loading
            if save_to is not None:
                torch.save(checkpoint_of(model, opt, scheduler), save_to)
            if schedule_free:
                opt.train()
        resume_step(name, model, opt, scheduler, step)
    if schedule_free:
        opt.eval()
    return checkpoint_of(model, opt, scheduler)


def resume_from(name: str, engine: str, path: Path) -> dict[str, Any]:
    """A fresh model and optimizer (other init, other seed) loaded from ``path``, trained to n steps."""
    model = resume_model(RESUME_OPTIONS[name][2], seed=1)
    opt, scheduler = resume_optimizer(name, engine, model, fresh=True)
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    schedule_free = isinstance(opt, torchsgd.ScheduleFreeSGD)
    if schedule_free:
        opt.train()
    for step in range(SAVE_AT, TOTAL_STEPS):
        resume_step(name, model, opt, scheduler, step)
    if schedule_free:
        opt.eval()
    return checkpoint_of(model, opt, scheduler)


def resume_main(directory: str, threads: int) -> None:
    """The fresh process: resume every configuration from its checkpoint, write the results."""
    torch.set_num_threads(threads)
    for i, (name, engine) in enumerate(RESUME_CONFIGS):
        torch.save(resume_from(name, engine, Path(directory) / f"checkpoint-{i}.pt"), Path(directory) / f"resumed-{i}.pt")


def assert_same_checkpoint(actual: dict[str, Any], expected: dict[str, Any], label: str) -> None:
    assert actual["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert value.dtype == actual["model"][key].dtype and torch.equal(actual["model"][key], value), f"{label}: {key} differs"
    ours, theirs = actual["optimizer"], expected["optimizer"]
    assert_state_dicts_equal(ours, theirs)
    assert ours.get("torchsgd") == theirs.get("torchsgd"), f"{label}: {ours.get('torchsgd')} != {theirs.get('torchsgd')}"
    assert actual["scheduler"] == expected["scheduler"], label


def test_exact_resume_in_a_fresh_process(tmp_path: Path) -> None:
    expected = {}
    for i, (name, engine) in enumerate(RESUME_CONFIGS):
        expected[i] = train_uninterrupted(name, engine, tmp_path / f"checkpoint-{i}.pt")
        assert all(torch.isfinite(p).all() for p in expected[i]["model"].values()), f"{name}/{engine} diverged"
    command = [sys.executable, "-c", "import sys, test_hardening as t; t.resume_main(sys.argv[1], int(sys.argv[2]))",
               str(tmp_path), str(torch.get_num_threads())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    for i, (name, engine) in enumerate(RESUME_CONFIGS):
        resumed = torch.load(tmp_path / f"resumed-{i}.pt", weights_only=True)
        assert_same_checkpoint(resumed, expected[i], f"{name} on {engine}")


def test_resume_is_a_real_test() -> None:
    """The comparison can fail: a resume that loses the rounding step, or the checkpoint's buffers, differs."""
    name, engine = "rounding-bf16", "fused"
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "c.pt"
        expected = train_uninterrupted(name, engine, path)
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["optimizer"]["torchsgd"]["rounding_step"] += 1
        torch.save(checkpoint, path)
        with pytest.raises(AssertionError):
            assert_same_checkpoint(resume_from(name, engine, path), expected, name)
    assert expected["optimizer"]["torchsgd"]["rounding_step"] == TOTAL_STEPS


def test_checkpoint_steps_are_not_trivial() -> None:
    """The checkpoint sits between the poisoned steps, and the guard really skipped them."""
    assert POISONED_STEPS[0] < SAVE_AT < POISONED_STEPS[1] < TOTAL_STEPS
    result = train_uninterrupted("guard", "default", None)
    assert result["optimizer"]["torchsgd"]["skipped_steps"] == 2


# ---------------------------------------------------------------------------------------------------------
# No leaks over long runs
# ---------------------------------------------------------------------------------------------------------
LEAK_OPTIONS = {
    "nesterov-wd": dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "clip-guard-rounding": dict(lr=0.01, momentum=0.9, max_grad_norm=1.0, skip_nonfinite=True, stochastic_rounding=True,
                                momentum_dtype=torch.bfloat16),
}


@pytest.mark.parametrize(("engine", "options"), [("reference", "nesterov-wd"), ("fused", "nesterov-wd"),
                                                  ("fused", "clip-guard-rounding")])
def test_no_growth_in_objects_or_memory_per_step(engine: str, options: str) -> None:
    """2,000 steps in windows: no window may end with more live Python objects or more traced memory
    than the first one (beyond a small slack: one leaked object per step would show 1,500)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torchsgd.SGD(model.parameters(), **LEAK_OPTIONS[options], **ENGINES[engine])
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    train(200)  # warm up: caches, lazily built state
    tracemalloc.start()
    try:
        objects, traced = [], []
        for _ in range(4):
            train(450)
            gc.collect()
            objects.append(len(gc.get_objects()))
            traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert max(objects) - objects[0] <= 20, f"live objects per window: {objects}"
    assert max(traced) - traced[0] <= 16 * 1024, f"traced bytes per window: {traced}"
    assert opt.state[next(model.parameters())]["momentum_buffer"] is not None


# ---------------------------------------------------------------------------------------------------------
# Checkpoints are loaded with weights_only=True
# ---------------------------------------------------------------------------------------------------------
# Calls that run code from what they read, whatever their arguments.
_UNSAFE_CALLS = {"pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "dill.load", "dill.loads", "eval", "exec"}


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that could run code from a file: torch.load without weights_only=True, and
    pickle/marshal/dill loads, eval, exec."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name.endswith("torch.load") or name == "torch.serialization.load":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name in _UNSAFE_CALLS:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_package_loads_checkpoints_with_weights_only() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"the scan found only {len(files)} files under {PACKAGE}"
    offenders = {}
    for path in files:
        source = path.read_text(encoding="utf-8")
        if found := unsafe_loads(source):
            offenders[str(path.relative_to(PACKAGE))] = found
        # A textual check too, for calls the AST pass cannot name (e.g. an aliased module).
        for number, line in enumerate(source.splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith("#"):
                offenders.setdefault(str(path.relative_to(PACKAGE)), []).append(f"line {number}: {line.strip()}")
    assert not offenders, f"unsafe loads in torchsgd: {offenders}"


def test_the_scan_finds_unsafe_loads() -> None:
    assert unsafe_loads("import torch\ntorch.load(path)\n")
    assert unsafe_loads("torch.load(path, weights_only=False)\n")
    assert unsafe_loads("import pickle\npickle.load(f)\n")
    assert unsafe_loads("eval(text)\n")
    assert not unsafe_loads("torch.load(path, map_location='cpu', weights_only=True)\n")
    assert not unsafe_loads("model.eval()\nopt.load_state_dict(sd)\n")


# ---------------------------------------------------------------------------------------------------------
# Bugs found by the option fuzz (test_fuzz_options.py), pinned
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_clipping_keeps_a_0d_half_gradient_in_its_dtype(engine: str) -> None:
    """A 0-d float16 parameter in a model whose global norm is float32: clip_grad_norm_ multiplies its
    gradient in place (float16); the reference and foreach engines made a float32 gradient, hence a
    float32 momentum buffer and other numbers. Oracle: clip_grad_norm_ then torch.optim.SGD."""
    generator = torch.Generator().manual_seed(3)
    initial = [torch.tensor(0.3).half(), torch.tensor(0.7), torch.linspace(-1, 1, 5).half(), torch.tensor(-0.2).bfloat16()]
    grads = [[torch.randn(p.shape, generator=generator).to(p.dtype) for p in initial] for _ in range(3)]
    ours, theirs = [p.clone() for p in initial], [p.clone() for p in initial]
    opt = torchsgd.SGD(ours, lr=0.1, momentum=0.5, max_grad_norm=0.01, **ENGINES[engine])
    ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.5, foreach=False)
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.01)
        ref.step()
    for p, q in zip(ours, theirs):
        assert opt.state[p]["momentum_buffer"].dtype == q.dtype
    # the fused engine takes none of these mixed groups, so all engines are bitwise torch's here
    assert_optimizers_match(opt, ref, ours, theirs, engine="reference")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_keeps_nan(dtype: torch.dtype) -> None:
    """torch widens float16's NaN to 0x7FFFFFFF; adding the bfloat16 rounding noise carried into the
    sign bit and stored -0.0 (precision.py). NaN and the infinities stay what they are."""
    from torchsgd.precision import stochastic_round, stream_key

    patterns = [0x7FFFFFFF, 0x7FFFE000, 0xFFFFFFFF, 0xFFFFE000, 0x7FC00000, 0xFFC00000, 0x7F800001]
    nans = torch.tensor([p - (1 << 32) if p >= 1 << 31 else p for p in patterns], dtype=torch.int32).view(torch.float32)
    special = torch.cat([nans, torch.tensor([math.inf, -math.inf])])
    for step in range(64):
        rounded = stochastic_round(special, dtype, stream_key(0, step, 0))
        assert rounded[: len(patterns)].isnan().all(), rounded
        assert torch.equal(rounded[len(patterns):].float(), special[len(patterns):])


@pytest.mark.skipif(native_module() is None, reason="the native kernel is not built here")
def test_fused_stochastic_rounding_keeps_nan() -> None:
    """The same bug in the native kernel, found by the option fuzz (round_bf16 adds the noise to the float32
    bits of NaN; a payload filling the high mantissa bits, a float16 NaN 0x7FFF widened by F16C to
    0x7FFFE000, carried into the sign bit and stored -0.0 in a bfloat16 momentum buffer where the
    reference keeps NaN). Fixed in sgd_cpu.cpp by keeping NaN NaN; this was its minimal reproduction."""
    results = {}
    for name, flags in (("reference", {"foreach": False}), ("fused", {"fused": True})):
        p = torch.zeros(8, dtype=torch.float16)
        opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16, stochastic_rounding=True, seed=0, **flags)
        p.grad = torch.full((8,), 0x7FFF, dtype=torch.int16).view(torch.float16)  # NaN, every payload bit set
        opt.step()
        results[name] = opt.state[p]["momentum_buffer"]
    assert results["reference"].isnan().all()
    assert results["fused"].isnan().all(), f"fused buffer: {results['fused'].tolist()}"


@pytest.mark.skipif(native_module() is None, reason="the native kernel is not built here")
def test_fused_clipping_of_a_0d_parameter_next_to_float64_ones() -> None:
    """A gap the option fuzz found in the fused engine, now closed (regression). With float64 parameters in
    the model, the global norm and so the clip coefficient c are float64; clip_grad_norm_ multiplies each
    gradient in place, which for a 0-d float32 gradient runs in float64 (two 0-d operands promote) and for
    an n-d one in float32. The kernel takes one float coefficient, g·float32(c), an ulp off for the 0-d
    parameter in these trials; engines/fused.py now hands such a group to the multi-tensor engine."""
    for trial in (76, 134, 195):
        generator = torch.Generator().manual_seed(trial)
        a0, b0 = torch.randn((), generator=generator), torch.randn(3, generator=generator, dtype=torch.float64)
        ga, gb = torch.randn((), generator=generator), torch.randn(3, generator=generator, dtype=torch.float64)
        a, b = a0.clone(), b0.clone()
        a.grad, b.grad = ga.clone(), gb.clone()
        torch.nn.utils.clip_grad_norm_([a, b], 0.01)
        torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0, foreach=False).step()
        for flags in ({"foreach": False}, {"foreach": True}, {"fused": True}, {}):
            x, y = a0.clone(), b0.clone()
            x.grad, y.grad = ga.clone(), gb.clone()
            torchsgd.SGD([{"params": [x]}, {"params": [y]}], lr=1.0, max_grad_norm=0.01, **flags).step()
            assert torch.equal(x, a), f"trial {trial}, {flags}: {x.item()!r} != torch's {a.item()!r}"
            assert torch.equal(y, b), f"trial {trial}, {flags}: the float64 parameter differs from torch's"


def test_a_first_step_buffer_that_cancels_is_held_at_its_operands_scale() -> None:
    """A test bug the long fuzz profile found (tests/helpers.py): a first-step buffer d = ∇ + λθ that
    cancels to near zero was held to the ulps of its own tiny magnitude, so the fused engine's one-ulp
    float16 difference (at the scale of ∇ and λθ) read as 11 ulps. The example it found, with that one-ulp
    difference made by hand, so that the test does not depend on where the kernel happens to round."""
    from helpers import random_tensor, ulps_at_scale

    generator = torch.Generator().manual_seed(4)
    theta = random_tensor((2, 3, 4), torch.float16, generator)
    grad = random_tensor((2, 3, 4), torch.float16, torch.Generator().manual_seed(4000))
    theirs = grad.add(theta, alpha=0.1)  # torch's first-step buffer: b = g + λθ, rounded to float16
    operands = torch.maximum(grad.double().abs(), (0.1 * theta.double()).abs())
    i = int((theirs.double().abs() / operands).argmin())  # the element that cancels most
    ours = theirs.clone()
    step = torch.tensor(operands.view(-1)[i].item(), dtype=torch.float16)
    ours.view(-1)[i] += torch.nextafter(step, torch.tensor(float("inf"), dtype=torch.float16)) - step
    assert ulps_at_scale(ours, theirs).max() > 4  # at its own (cancelled) magnitude: many ulps
    assert ulps_at_scale(ours, theirs, operands).max() <= 1  # at its operands': one, within the bound
