"""Argument checks shared by the constructors, add_param_group and load_state_dict.

Torch's own messages are kept word for word (users grep for them); the checks torch does not make
(non-finite values, dampening range, flag types) use the same shape: the argument's name and its value.
"""

from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor


def scalar_value(name: str, value: Any) -> float:
    """Read a hyperparameter that may be a number or a 1-element Tensor as a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        if value.is_complex():
            raise TypeError(f"{name} must be a real number, got a complex Tensor: {value}")
        return float(value.detach().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number or a 1-element Tensor, got {type(value).__name__}: {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range: name the argument rather than the conversion
        raise ValueError(
            f"Invalid {name} value: an int of {len(str(abs(value)))} digits ({name} must be a finite number)"
        ) from None


def check_finite(name: str, shown: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{shown}: {value} ({name} must be a finite number)")


def check_flag(name: str, value: Any, *, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    expected = "True, False or None" if optional else "True or False"
    raise TypeError(f"{name} must be {expected}, got {value!r}")


def check_sgd_hyperparameters(options: Mapping[str, Any]) -> None:
    """Validate one set of SGD options (a constructor call or a full param group).

    The order of the checks is torch's, so an input torch rejects gets torch's message.
    """
    lr = options["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    lr_value = scalar_value("lr", lr)
    if lr_value < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    check_finite("lr", "Invalid learning rate", lr_value)

    momentum = scalar_value("momentum", options["momentum"])
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {options['momentum']}")
    check_finite("momentum", "Invalid momentum value", momentum)

    weight_decay = scalar_value("weight_decay", options["weight_decay"])
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {options['weight_decay']}")
    check_finite("weight_decay", "Invalid weight_decay value", weight_decay)

    dampening = scalar_value("dampening", options["dampening"])
    check_finite("dampening", "Invalid dampening value", dampening)
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"Invalid dampening value: {options['dampening']} (dampening must be in [0, 1])")

    check_flag("nesterov", options["nesterov"])
    if options["nesterov"] and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    check_flag("maximize", options.get("maximize", False))
    check_flag("differentiable", options.get("differentiable", False))
    check_flag("foreach", options.get("foreach"), optional=True)
    check_flag("fused", options.get("fused"), optional=True)
    check_flag("decoupled_weight_decay", options.get("decoupled_weight_decay", False))


def check_max_grad_norm(value: Any) -> None:
    if value is None:
        return
    norm = scalar_value("max_grad_norm", value)
    if not (math.isfinite(norm) and norm > 0):
        raise ValueError(f"Invalid max_grad_norm value: {value} (max_grad_norm must be a finite number > 0, or None)")


def check_engine_flags(options: Mapping[str, Any]) -> None:
    """torch's conflicts between the engine flags, which it checks on the constructor's arguments only.

    A param group may mix them (``fused=True`` in a group, ``foreach=True`` in the defaults): torch accepts
    that, and runs the multi-tensor path, as :func:`torchsgd.engines.select_engine` does.
    """
    if options.get("fused"):
        if options.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if options.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


# Keys torch's base class or LR schedulers put into a param group; they are never typos.
_BOOKKEEPING_KEYS = frozenset({"params", "param_names", "initial_lr", "name"})


def warn_unknown_keys(group: Mapping[str, Any], known: Iterable[str], optimizer: str) -> None:
    """Warn about a group key that looks like a misspelt option (it would otherwise do nothing)."""
    known = list(known)
    for key in group:
        if key in _BOOKKEEPING_KEYS or key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            warnings.warn(
                f"param group option {key!r} is not an option of {optimizer} (did you mean {close[0]!r}?); "
                "it is kept in the group but has no effect",
                UserWarning,
                stacklevel=4,
            )


_MOMENTUM_DTYPES = ("bfloat16", "float16", "float32", "float64", "int8")


def check_momentum_dtype(value: Any) -> None:
    if value is None:
        return
    import torch

    if not isinstance(value, torch.dtype) or str(value).removeprefix("torch.") not in _MOMENTUM_DTYPES:
        raise ValueError(
            f"Invalid momentum_dtype: {value!r} (must be None or one of torch.bfloat16, torch.float16, "
            "torch.float32, torch.float64, or torch.int8 for 8-bit block-wise quantized momentum)"
        )


SEED_LIMIT = 2**64  # the noise's counter hash takes a 64-bit seed (rules/rounding.py, stream_key)


def check_seed(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"Invalid seed: {value!r} (must be None or an int in [0, 2**64): the noise uses 64 bits)")
