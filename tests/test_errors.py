"""Bad inputs: torch's messages word for word where torch rejects, clear errors where torch does not check,
and the same checks for every way options arrive.

That an invalid call changes nothing runs over the optimizer database: add_param_group in test_generic.py,
load_state_dict (torch's words where torch rejects it) in test_hardening.py."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import torchsgd
from helpers import ENGINE_NAMES, ENGINES, assert_same_error, capture_error


def params() -> list[torch.Tensor]:
    return [
        torch.randn(3, 2, generator=torch.Generator().manual_seed(0)),
        torch.randn(4, generator=torch.Generator().manual_seed(1)),
    ]


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
    (
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        ValueError,
        "Nesterov momentum requires a momentum and zero dampening",
    ),
    ({"fused": True, "differentiable": True}, RuntimeError, "`fused` does not support `differentiable`"),
    ({"fused": True, "foreach": True}, RuntimeError, "`fused` and `foreach` cannot be `True` together."),
    # torch checks in this order: lr before momentum before weight_decay before nesterov before the flags.
    ({"lr": -1.0, "momentum": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    ({"momentum": -1.0, "weight_decay": -1.0}, ValueError, "Invalid momentum value: -1.0"),
    ({"weight_decay": -1.0, "nesterov": True}, ValueError, "Invalid weight_decay value: -1.0"),
    (
        {"nesterov": True, "fused": True, "foreach": True},
        ValueError,
        "Nesterov momentum requires a momentum and zero dampening",
    ),
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
    for kwargs in (
        {"lr": 0.0},
        {"dampening": 1.0, "momentum": 0.9},
        {"dampening": 0.0},
        {"momentum": 1.5},
        {"lr": torch.tensor([0.1])},
        {"weight_decay": torch.tensor(0.0)},
        {"lr": 10.0, "maximize": True, "nesterov": True, "momentum": 0.9},
    ):
        torchsgd.SGD(params(), **kwargs, **ENGINES[engine])


# ---------------------------------------------------------------------------------------------------------
# The same checks for every way options arrive
# ---------------------------------------------------------------------------------------------------------
GROUP_CASES = [kwargs for kwargs, _ in STRICTER] + [
    kwargs for kwargs, _, _ in TORCH_REJECTS if "fused" not in kwargs and "foreach" not in kwargs
]


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
    with pytest.raises(ValueError, match=r"^Nesterov momentum requires a momentum and zero dampening$"):
        opt.add_param_group({"params": [c], "nesterov": True, "momentum": 0.0})
    with pytest.raises(ValueError, match=r"^Nesterov momentum requires a momentum and zero dampening$"):
        torchsgd.SGD([{"params": [c], "momentum": 0}], lr=0.1, momentum=0.9, nesterov=True)


def test_both_engine_flags_in_a_group_are_accepted_as_torch_accepts_them() -> None:
    """torch checks the flags on the constructor's arguments only; a group with both runs foreach."""
    for cls in (torch.optim.SGD, torchsgd.SGD):
        opt = cls([torch.zeros(2)], lr=0.1)
        opt.add_param_group({"params": [torch.zeros(2)], "fused": True, "foreach": True})
        assert (opt.param_groups[1]["fused"], opt.param_groups[1]["foreach"]) == (True, True)
    assert opt.engine_report()[1]["selected"] == "foreach"
