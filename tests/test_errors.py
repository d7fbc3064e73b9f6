"""Bad inputs: torch's messages word for word where torch rejects, clear errors where torch does not check,
the same checks for every way options arrive, and an invalid call changes nothing."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import torchsgd
from helpers import (
    ENGINE_NAMES,
    ENGINES,
    assert_optimizers_match,
    assert_same_error,
    assert_state_dicts_equal,
    assert_values_equal,
    capture_error,
    clone_param,
    seeded_grads,
)


def params() -> list[torch.Tensor]:
    return [torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), torch.randn(4, generator=torch.Generator().manual_seed(1))]


# ---------------------------------------------------------------------------------------------------------
# torch's own checks: its exact words
# ---------------------------------------------------------------------------------------------------------
TORCH_REJECTS = [
    ({"lr": -0.1}, ValueError, "Invalid learning rate: -0.1"),
    ({"lr": -math.inf}, ValueError, "Invalid learning rate: -inf"),
    ({"lr": torch.tensor(-0.5)}, ValueError, "Invalid learning rate: -0.5"),  # a 0-d Tensor formats as its value
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, "Tensor lr must be 1-element"),
    ({"lr": torch.tensor([-0.1, 0.2])}, ValueError, "Tensor lr must be 1-element"),
    ({"momentum": -0.5}, ValueError, "Invalid momentum value: -0.5"),
    ({"momentum": -1}, ValueError, "Invalid momentum value: -1"),
    ({"weight_decay": -1e-4}, ValueError, "Invalid weight_decay value: -0.0001"),
    ({"weight_decay": torch.tensor(-0.25)}, ValueError, "Invalid weight_decay value: -0.25"),
    ({"nesterov": True}, ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    ({"fused": True, "differentiable": True}, RuntimeError, "`fused` does not support `differentiable`"),
    ({"fused": True, "foreach": True}, RuntimeError, "`fused` and `foreach` cannot be `True` together."),
    # torch checks in this order: lr before momentum before weight_decay before nesterov before the flags.
    ({"lr": -1.0, "momentum": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    ({"momentum": -1.0, "weight_decay": -1.0}, ValueError, "Invalid momentum value: -1.0"),
    ({"weight_decay": -1.0, "nesterov": True}, ValueError, "Invalid weight_decay value: -1.0"),
    ({"nesterov": True, "fused": True, "foreach": True}, ValueError, "Nesterov momentum requires a momentum and zero dampening"),
]


@pytest.mark.parametrize(("kwargs", "error_type", "message"), TORCH_REJECTS, ids=repr)
def test_torch_rejections_word_for_word(kwargs: dict[str, Any], error_type: type, message: str) -> None:
    error = assert_same_error(lambda: torchsgd.SGD(params(), **kwargs), lambda: torch.optim.SGD(params(), **kwargs))
    assert type(error) is error_type
    assert str(error) == message


def test_torch_base_class_rejections_word_for_word() -> None:
    p = torch.zeros(2)
    for bad in ([], p, [{"params": [p]}, {"params": [p]}], [1.0], [torch.zeros(2, requires_grad=True).mul(2)]):
        assert_same_error(lambda: torchsgd.SGD(bad, lr=0.1), lambda: torch.optim.SGD(bad, lr=0.1))


# ---------------------------------------------------------------------------------------------------------
# torchsgd's stricter checks
# ---------------------------------------------------------------------------------------------------------
NON_FINITE = [math.nan, math.inf]
STRICTER = [
    *[({"lr": v}, "lr") for v in [math.nan, math.inf]],
    *[({"lr": torch.tensor(v)}, "lr") for v in [math.nan, math.inf]],
    *[({"lr": torch.tensor([v])}, "lr") for v in [math.nan]],
    *[({"momentum": v}, "momentum") for v in NON_FINITE],
    *[({"momentum": torch.tensor(v)}, "momentum") for v in [math.nan, math.inf]],
    *[({"dampening": v}, "dampening") for v in [*NON_FINITE, -math.inf]],
    *[({"dampening": torch.tensor(v)}, "dampening") for v in [math.nan, math.inf]],
    *[({"weight_decay": v}, "weight_decay") for v in NON_FINITE],
    *[({"weight_decay": torch.tensor(v)}, "weight_decay") for v in [math.nan, math.inf]],
    ({"dampening": -0.1}, "dampening"),
    ({"dampening": 1.5}, "dampening"),
    ({"dampening": torch.tensor(2.0)}, "dampening"),
    ({"nesterov": 1, "momentum": 0.9}, "nesterov"),
    ({"nesterov": "yes", "momentum": 0.9}, "nesterov"),
    ({"maximize": 1}, "maximize"),
    ({"maximize": "False"}, "maximize"),
    ({"maximize": None}, "maximize"),
]


def our_error(make) -> BaseException:
    error = capture_error(make)
    assert error is not None, "torchsgd accepted it"
    return error


@pytest.mark.parametrize(("kwargs", "name"), STRICTER, ids=repr)
def test_stricter_checks(kwargs: dict[str, Any], name: str) -> None:
    error = our_error(lambda: torchsgd.SGD(params(), **kwargs))
    assert isinstance(error, (ValueError, TypeError))
    assert name in str(error), f"the message should name {name!r}: {error}"
    # torch accepts these (this is torchsgd being stricter, not a different message for torch's check).
    torch_error = capture_error(lambda: torch.optim.SGD(params(), **kwargs))
    assert torch_error is None or "Nesterov" in str(torch_error), torch_error


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_valid_edge_values_are_accepted(engine: str) -> None:
    """The stricter checks reject nothing torch's users rely on."""
    for kwargs in ({"lr": 0.0}, {"dampening": 1.0, "momentum": 0.9}, {"dampening": 0.0}, {"momentum": 1.5}, {"lr": torch.tensor([0.1])},
                   {"weight_decay": torch.tensor(0.0)}, {"lr": 10.0, "maximize": True, "nesterov": True, "momentum": 0.9}):
        torchsgd.SGD(params(), **kwargs, **ENGINES[engine])


# ---------------------------------------------------------------------------------------------------------
# The same checks for every way options arrive
# ---------------------------------------------------------------------------------------------------------
GROUP_CASES = [kwargs for kwargs, _ in STRICTER] + [kwargs for kwargs, _, _ in TORCH_REJECTS if "fused" not in kwargs and "foreach" not in kwargs]


def error_signature(make) -> tuple[type, str]:
    error = our_error(make)
    return type(error), str(error)


@pytest.mark.parametrize("kwargs", GROUP_CASES, ids=repr)
def test_groups_are_checked_like_constructor_arguments(kwargs: dict[str, Any]) -> None:
    expected = error_signature(lambda: torchsgd.SGD(params(), **kwargs))
    a, b = params()
    in_constructor_group = error_signature(lambda: torchsgd.SGD([{"params": [a]}, {"params": [b], **kwargs}], lr=0.1))

    opt = torchsgd.SGD([a], lr=0.1)
    added_group = error_signature(lambda: opt.add_param_group({"params": [b], **kwargs}))
    assert in_constructor_group == expected
    assert added_group == expected


def test_group_inherits_defaults_before_it_is_checked() -> None:
    """A group that sets nesterov is valid or not with the defaults it inherits (momentum, dampening)."""
    a, b, c = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    opt = torchsgd.SGD([a], lr=0.1, momentum=0.9)
    opt.add_param_group({"params": [b], "nesterov": True})  # inherits momentum 0.9: valid
    with pytest.raises(ValueError, match="^Nesterov momentum requires a momentum and zero dampening$"):
        opt.add_param_group({"params": [c], "nesterov": True, "momentum": 0.0})
    with pytest.raises(ValueError, match="^Nesterov momentum requires a momentum and zero dampening$"):
        torchsgd.SGD([{"params": [c], "momentum": 0}], lr=0.1, momentum=0.9, nesterov=True)


def test_both_engine_flags_in_a_group_are_accepted_as_torch_accepts_them() -> None:
    """torch checks the flags on the constructor's arguments only; a group with both runs foreach."""
    for cls in (torch.optim.SGD, torchsgd.SGD):
        opt = cls([torch.zeros(2)], lr=0.1)
        opt.add_param_group({"params": [torch.zeros(2)], "fused": True, "foreach": True})
        assert (opt.param_groups[1]["fused"], opt.param_groups[1]["foreach"]) == (True, True)
    assert opt.engine_report()[1]["selected"] == "foreach"


# ---------------------------------------------------------------------------------------------------------
# An invalid call changes nothing
# ---------------------------------------------------------------------------------------------------------
def trained_twins(engine: str = "reference"):
    """Two identical torchsgd optimizers with momentum state after 3 steps, two groups."""
    twins = []
    for _ in range(2):
        ps = [clone_param(p) for p in params()]
        opt = torchsgd.SGD([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 0.05}], lr=0.1, momentum=0.9, weight_decay=0.01, **ENGINES[engine])
        for grads in seeded_grads(ps, 3, seed=4):
            for p, g in zip(ps, grads):
                p.grad = g
            opt.step()
        twins.append((opt, ps))
    return twins


def snapshot(opt: torch.optim.Optimizer) -> tuple[dict, list[dict]]:
    return copy.deepcopy(opt.state_dict()), [{k: (list(v) if k == "params" else copy.deepcopy(v)) for k, v in g.items()} for g in opt.param_groups]


def assert_unchanged(opt: torch.optim.Optimizer, before: tuple[dict, list[dict]], twin: tuple, ps: list[torch.Tensor]) -> None:
    state_dict, groups = before
    assert_state_dicts_equal(opt.state_dict(), state_dict)
    assert len(opt.param_groups) == len(groups)
    for g, h in zip(opt.param_groups, groups):
        assert set(g) == set(h)
        for key in h:
            if key == "params":
                assert len(g["params"]) == len(h["params"]) and all(x is y for x, y in zip(g["params"], h["params"]))
            else:
                assert_values_equal(g[key], h[key], what=key)
    # And it still steps exactly like the untouched twin.
    twin_opt, twin_ps = twin
    for opt_, ps_ in ((opt, ps), (twin_opt, twin_ps)):
        for p, g in zip(ps_, seeded_grads(ps_, 1, seed=99)[0]):
            p.grad = g
        opt_.step()
    assert_optimizers_match(opt, twin_opt, ps, twin_ps, engine="reference", what="after the failed call: ")


def bad_add_param_groups(ps: list[torch.Tensor]) -> list[tuple[str, dict]]:
    new = torch.zeros(3)
    return [
        ("negative lr", {"params": [new], "lr": -1.0}),
        ("nan momentum", {"params": [new], "momentum": math.nan}),
        ("dampening > 1", {"params": [new], "dampening": 2.0}),
        ("nesterov, no momentum", {"params": [new], "momentum": 0.0, "nesterov": True}),
        ("non-bool maximize", {"params": [new], "maximize": "yes"}),
        ("param already in a group", {"params": [ps[0]]}),
        ("a new and a known param", {"params": [new, ps[1]], "lr": 0.3}),
        ("not a tensor", {"params": [new, 1.0]}),
        ("a non-leaf tensor", {"params": [torch.zeros(2, requires_grad=True) * 2]}),
        ("names in an unnamed optimizer", {"params": [("w", new)]}),
    ]


BAD_GROUP_NAMES = [desc for desc, _ in bad_add_param_groups([torch.zeros(1), torch.zeros(1)])]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("case", range(len(BAD_GROUP_NAMES)), ids=lambda i: BAD_GROUP_NAMES[i])
def test_invalid_add_param_group_changes_nothing(case: int, engine: str) -> None:
    (opt, ps), twin = trained_twins(engine)
    desc, group = bad_add_param_groups(ps)[case]
    before = snapshot(opt)
    assert capture_error(lambda: opt.add_param_group(group)) is not None, f"{desc}: accepted"
    assert_unchanged(opt, before, twin, ps)


def bad_state_dicts(good: dict) -> list[tuple[str, dict]]:
    def edited(edit) -> dict:
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    return [
        ("one group too many", edited(lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])))),
        ("one group too few", edited(lambda sd: sd["param_groups"].pop())),
        ("a group of the wrong size", edited(lambda sd: sd["param_groups"][0]["params"].append(7))),
        ("a buffer of the wrong shape", edited(lambda sd: sd["state"][1].update(momentum_buffer=torch.zeros(5)))),
        ("a buffer that is not a tensor", edited(lambda sd: sd["state"][1].update(momentum_buffer=[1.0, 2.0]))),
        ("state for a parameter that does not exist", edited(lambda sd: sd["state"].update({5: {"momentum_buffer": torch.zeros(4)}}))),
        ("a group with a negative lr", edited(lambda sd: sd["param_groups"][1].update(lr=-0.5))),
        ("a group with a nan weight_decay", edited(lambda sd: sd["param_groups"][0].update(weight_decay=math.nan))),
        ("a group with nesterov and dampening", edited(lambda sd: sd["param_groups"][0].update(nesterov=True, dampening=0.5))),
    ]


BAD_STATE_DICT_NAMES = [
    "one group too many", "one group too few", "a group of the wrong size", "a buffer of the wrong shape",
    "a buffer that is not a tensor", "state for a parameter that does not exist", "a group with a negative lr",
    "a group with a nan weight_decay", "a group with nesterov and dampening",
]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("case", range(len(BAD_STATE_DICT_NAMES)), ids=lambda i: BAD_STATE_DICT_NAMES[i])
def test_invalid_load_state_dict_changes_nothing(case: int, engine: str) -> None:
    (opt, ps), twin = trained_twins(engine)
    good = opt.state_dict()
    desc, bad = bad_state_dicts(good)[case]
    assert desc == BAD_STATE_DICT_NAMES[case]
    before = snapshot(opt)
    error = capture_error(lambda: opt.load_state_dict(bad))
    assert isinstance(error, (ValueError, TypeError, KeyError)), f"{desc}: {error!r}"
    assert_unchanged(opt, before, twin, ps)


def test_torch_load_state_dict_errors_word_for_word() -> None:
    """Where torch itself rejects a state_dict, the same words (torch's base-class checks run first)."""
    (opt, ps), _ = trained_twins()
    torch_opt = torch.optim.SGD([{"params": [clone_param(ps[0])]}, {"params": [clone_param(ps[1])], "lr": 0.05}], lr=0.1, momentum=0.9)
    good = opt.state_dict()
    for desc, bad in bad_state_dicts(good)[:3]:
        assert_same_error(lambda: opt.load_state_dict(bad), lambda: torch_opt.load_state_dict(bad))
