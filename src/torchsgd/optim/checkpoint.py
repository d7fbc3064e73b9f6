"""Checkpoints: what ``load_state_dict`` (and unpickling) would put in place is checked before anything
changes, and an entry that does not fit is named in the error.

Two points see a checkpoint: torch's ``load_state_dict`` pre-hooks see it as saved (parameter ids, the
buffers before torch casts them to the parameters' dtype): :func:`check_state_dict` runs there, last of
the pre-hooks. ``__setstate__`` sees the state torch built from it (and the whole state when unpickling):
:func:`check_restored_state` runs there. Every optimizer of torchsgd uses both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from torchsgd.optim.validation import SEED_LIMIT
from torchsgd.rules.quantize import QuantizedMomentum, blocks

__all__ = [
    "BACKFILL",
    "EXTRA_KEYS",
    "GROUP_KEY",
    "check_state_dict",
    "check_restored_state",
    "convert_momentum",
    "torch_format",
    "lift_group_counters",
    "load_state_dict",
]

# Keys torch's SGD back-fills when a state_dict from an older torch lacks them.
BACKFILL = {"nesterov": False, "maximize": False, "foreach": None, "differentiable": False, "fused": False}
# What the "torchsgd" entry of a state_dict may hold (see SGD.state_dict).
EXTRA_KEYS = ("seed", "rounding_step", "skipped_steps")
# The param-group key that carries the same entry (torch.distributed.checkpoint keeps groups, not other keys).
GROUP_KEY = "torchsgd"


def lift_group_counters(state_dict: Any) -> Any:
    """``state_dict`` with the counters torchsgd keeps in its param groups moved to the top-level entry.

    :meth:`torchsgd.SGD.state_dict` writes the "torchsgd" entry both at the top level and into every param
    group, since torch.distributed.checkpoint (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``)
    keeps only "state" and "param_groups". Here the groups' copies are taken out (a group never holds
    them once loaded); where the top-level entry is missing, the groups' becomes it, and they must all
    be the same. A top-level entry that is there counts as it is. Anything malformed is left for the
    checks of :func:`load_state_dict`; a state_dict without group counters is returned unchanged.
    """
    if not isinstance(state_dict, Mapping):
        return state_dict
    groups = state_dict.get("param_groups")
    if not isinstance(groups, (list, tuple)) or not any(isinstance(g, Mapping) and GROUP_KEY in g for g in groups):
        return state_dict
    entries = [(i, g[GROUP_KEY]) for i, g in enumerate(groups) if isinstance(g, Mapping) and GROUP_KEY in g]
    lifted = dict(state_dict)
    lifted["param_groups"] = [
        {k: v for k, v in g.items() if k != GROUP_KEY} if isinstance(g, Mapping) else g for g in groups
    ]
    if "torchsgd" not in state_dict:
        first_index, first = entries[0]
        for i, entry in entries[1:]:
            if entry != first:
                raise ValueError(
                    f"loaded state dict: param groups {first_index} and {i} carry different {GROUP_KEY!r} "
                    f"counters ({first!r} and {entry!r}); every group holds the optimizer's same counters"
                )
        lifted["torchsgd"] = first
    return lifted


CODES, SCALES = QuantizedMomentum.CODES_KEY, QuantizedMomentum.SCALES_KEY


def _quantized_entry(label: str, entry: Mapping[str, Any]) -> QuantizedMomentum:
    """An entry's 8-bit momentum, checked: int8 codes in −127..127 and float32 scales, one per block."""
    if CODES not in entry or SCALES not in entry:
        missing = SCALES if CODES in entry else CODES
        raise ValueError(f"{label} has {(CODES if missing == SCALES else SCALES)!r} without {missing!r}")
    codes, scales = entry[CODES], entry[SCALES]
    for key, value in ((CODES, codes), (SCALES, scales)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{label}: {key!r} must be a Tensor, got {type(value).__name__}")
        if value.layout != torch.strided or value.is_meta:
            raise ValueError(f"{label}: {key!r} must be a strided tensor holding values")
    if codes.dtype != torch.int8:
        raise TypeError(f"{label}: {CODES!r} must be int8, got {codes.dtype}")
    if codes.numel() and int(codes.min()) < -127:
        raise ValueError(f"{label}: {CODES!r} holds -128, which no code means (codes are -127..127)")
    if not scales.is_floating_point() or scales.dim() != 1 or scales.numel() != blocks(codes.numel()):
        raise ValueError(
            f"{label}: {SCALES!r} must be a 1-D float tensor of {blocks(codes.numel())} scales (one per block of "
            f"the {codes.numel()} codes), got {scales.dtype} of shape {tuple(scales.shape)}"
        )
    return QuantizedMomentum(codes.contiguous(), scales.float())


def convert_momentum(optimizer: Any, state_dict: Any) -> Any:
    """``state_dict`` with its momentum in the optimizer's format (a new dict; the given one is not changed).

    For ``momentum_dtype=torch.int8``, a float ``momentum_buffer`` (a torch.optim.SGD checkpoint) is
    quantized to nearest; for any other optimizer, 8-bit codes and scales are dequantized to a float32
    ``momentum_buffer``, which the load then treats as a checkpoint of torch's. Codes and scales are
    checked first, naming the entry; anything else is left for :func:`check_state_dict`.
    """
    state = state_dict.get("state") if isinstance(state_dict, Mapping) else None
    if not isinstance(state, Mapping):
        return state_dict
    int8 = getattr(optimizer, "momentum_dtype", None) is torch.int8
    converted: dict[Any, Any] = {}
    changed = False
    for pid, entry in state.items():
        if isinstance(entry, Mapping):
            label = f"loaded state dict: state[{pid}]"
            buffer = entry.get("momentum_buffer")
            if CODES in entry or SCALES in entry:
                quantized = _quantized_entry(label, entry)
                if not int8:
                    entry = {k: v for k, v in entry.items() if k not in (CODES, SCALES)}
                    entry["momentum_buffer"] = quantized.dequantize()
                    changed = True
            elif int8 and isinstance(buffer, Tensor) and buffer.layout == torch.strided and not buffer.is_complex():
                quantized = QuantizedMomentum.of(buffer)
                entry = {k: v for k, v in entry.items() if k != "momentum_buffer"}
                entry[CODES], entry[SCALES] = quantized.codes, quantized.scales
                changed = True
        converted[pid] = entry
    return {**state_dict, "state": converted} if changed else state_dict


def torch_format(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state_dict of torchsgd's with 8-bit momentum as torch.optim.SGD keeps it: float32 ``momentum_buffer``."""
    state = {}
    for pid, entry in state_dict["state"].items():
        if CODES in entry:
            entry = {k: v for k, v in entry.items() if k not in (CODES, SCALES)}
            entry["momentum_buffer"] = QuantizedMomentum(
                state_dict["state"][pid][CODES], state_dict["state"][pid][SCALES]
            ).dequantize()
        state[pid] = entry
    return {**state_dict, "state": state}


def load_state_dict(optimizer: Any, state_dict: Mapping[str, Any], torch_load: Callable[[Any], None]) -> dict[str, int]:
    """torch's load (``torch_load``), atomic; returns the state_dict's "torchsgd" entry ({} without one).

    Where torch itself rejects the state_dict its error stands, with a note naming the entry. With
    ``momentum_dtype`` the buffers are converted from the checkpoint's own values: torch first casts them
    to the parameter's dtype, which would round a float32 buffer of a bfloat16 parameter.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"loaded state dict must be a dict, got {type(state_dict).__name__}")
    checked: dict[str, Any] = {}

    def check(_: Any, loaded: dict[str, Any]) -> None:
        checked.update(check_state_dict(optimizer, loaded))

    # Registered last, so it sees what the user's pre-hooks made of the state_dict.
    handle = optimizer.register_load_state_dict_pre_hook(check)
    try:
        torch_load(state_dict)
    except Exception as error:
        if checked.get("note"):  # torch's own words, and where
            if hasattr(error, "add_note"):
                error.add_note(checked["note"])
            else:  # Python 3.10: PEP 678's attribute, which 3.11's traceback prints and tests can read
                error.__notes__ = [*getattr(error, "__notes__", []), checked["note"]]  # type: ignore[attr-defined]
        raise
    finally:
        handle.remove()
    originals: dict[Tensor, Tensor] = checked.get("originals") or {}
    if any(buffer.is_sparse for buffer in originals.values()):
        optimizer._sparse_buffers = True  # torch keeps sparse buffers for sparse gradients
    # torch cast 8-bit codes and scales to the parameter's dtype: int8 codes and float32 scales again, contiguous,
    # and copies (as torch's cast made them), so that the optimizer's steps never write the loaded state_dict.
    for param, quantized in (checked.get("quantized") or {}).items():
        entry = optimizer.state[param]
        entry[CODES] = quantized.codes.to(param.device, torch.int8, copy=True, memory_format=torch.contiguous_format)
        entry[SCALES] = quantized.scales.to(
            param.device, torch.float32, copy=True, memory_format=torch.contiguous_format
        )
    if getattr(optimizer, "momentum_dtype", None) is not None:
        for param, source in originals.items():
            entry = optimizer.state[param]
            entry["momentum_buffer"] = source.to(device=entry["momentum_buffer"].device, dtype=optimizer.momentum_dtype)
    return checked.get("torchsgd") or {}


def check_state_dict(optimizer: Any, loaded: Mapping[str, Any]) -> dict[str, Any]:
    """Check a state_dict as torch will load it (before its casts); see :func:`load_state_dict`.

    Returns ``{"note": ...}`` where torch itself will reject it, else ``{"torchsgd": entry or None,
    "originals": {parameter: its momentum_buffer as loaded}}``.
    """
    name = type(optimizer).__name__
    groups = optimizer.param_groups
    if "param_groups" not in loaded:
        return {"note": f"the state dict has no 'param_groups' (its keys: {sorted(map(str, loaded))})"}
    saved_groups = loaded["param_groups"]
    if not isinstance(saved_groups, (list, tuple)):
        raise TypeError(f"loaded state dict: 'param_groups' must be a list of dicts, got {type(saved_groups).__name__}")
    for i, saved in enumerate(saved_groups):
        if not isinstance(saved, Mapping):
            raise TypeError(f"loaded state dict: param group {i} must be a dict, got {type(saved).__name__}")
    if len(saved_groups) != len(groups):
        return {"note": f"the state dict has {len(saved_groups)} param groups, the {name} has {len(groups)}"}
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        if "params" not in saved:
            return {"note": f"param group {i} of the state dict has no 'params'"}
        if not isinstance(saved["params"], (list, tuple)):
            raise TypeError(
                f"loaded state dict: 'params' of param group {i} must be a list, got {type(saved['params']).__name__}"
            )
        if len(saved["params"]) != len(group["params"]):
            return {
                "note": f"param group {i} of the state dict lists {len(saved['params'])} parameters, the {name}'s has {len(group['params'])}"
            }
    if "state" not in loaded:
        return {"note": f"the state dict has no 'state' (its keys: {sorted(map(str, loaded))})"}
    state = loaded["state"]
    if not isinstance(state, Mapping):
        raise TypeError(f"loaded state dict: 'state' must be a dict, got {type(state).__name__}")

    # Parameter ids, as torch pairs them with the parameters: in order, group by group.
    where: dict[Any, tuple[int, int, Tensor]] = {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        for j, (pid, param) in enumerate(zip(saved["params"], group["params"])):
            try:
                hash(pid)
            except TypeError:
                raise TypeError(
                    f"loaded state dict: param group {i} lists {pid!r} as parameter {j}; a parameter id must be hashable (an int)"
                ) from None
            if pid in where:
                raise ValueError(
                    f"loaded state dict: parameter id {pid} is listed twice (param group {where[pid][0]} and param group {i})"
                )
            where[pid] = (i, j, param)
    originals: dict[Tensor, Tensor] = {}
    scales: dict[Tensor, QuantizedMomentum] = {}  # 8-bit momentum's codes and scales as loaded
    for pid, entry in state.items():
        if pid not in where:
            raise ValueError(f"loaded state dict has state for parameter id {pid!r}, which no param group lists")
        i, j, param = where[pid]
        label = f"loaded state dict: state[{pid}] (param group {i}, parameter {j})"
        if not isinstance(entry, Mapping):
            raise TypeError(f"{label} must be a dict, got {type(entry).__name__}")
        for key in entry:
            if key not in optimizer._STATE_KEYS:
                raise ValueError(
                    f"{label} has {key!r}, which {name} does not keep (its per-parameter state: {', '.join(optimizer._STATE_KEYS)})"
                )
        if CODES in entry or SCALES in entry:
            quantized = _quantized_entry(label, entry)
            if quantized.codes.shape != param.shape:
                raise ValueError(
                    f"{label}: {CODES!r} has shape {tuple(quantized.codes.shape)}, the parameter {tuple(param.shape)}"
                )
            scales[param] = quantized
        buffer = entry.get("momentum_buffer")
        if buffer is None:
            continue
        if not isinstance(buffer, Tensor):
            raise TypeError(f"{label}: 'momentum_buffer' must be a Tensor, got {type(buffer).__name__}")
        if buffer.is_complex() != param.is_complex():
            kind = "complex" if buffer.is_complex() else "real"
            raise TypeError(
                f"{label}: 'momentum_buffer' is {kind} ({buffer.dtype}) and the parameter is not "
                f"({param.dtype}); the cast would {'discard the imaginary part' if buffer.is_complex() else 'fail at the next step'}"
            )
        if buffer.shape != param.shape:
            raise ValueError(
                f"{label}: 'momentum_buffer' has shape {tuple(buffer.shape)}, the parameter {tuple(param.shape)}"
            )
        if buffer.is_meta and not param.is_meta:
            raise ValueError(
                f"{label}: 'momentum_buffer' is on the meta device (it holds no values), the parameter on {param.device}"
            )
        if buffer.layout == torch.strided and any(
            size > 1 and stride == 0 for size, stride in zip(buffer.shape, buffer.stride())
        ):
            raise ValueError(
                f"{label}: 'momentum_buffer' has elements that share memory (strides {buffer.stride()}, e.g. "
                "from expand()); the step updates it in place, so it must be a dense tensor (.contiguous())"
            )
        if buffer.layout not in (torch.strided, torch.sparse_coo):
            raise ValueError(
                f"{label}: 'momentum_buffer' has layout {buffer.layout}; it must be strided (or sparse_coo, as torch keeps it for sparse gradients)"
            )
        originals[param] = buffer

    if "torchsgd" not in loaded:
        return {"torchsgd": None, "originals": originals, "quantized": scales}
    extra = loaded["torchsgd"]
    if not isinstance(extra, Mapping):
        raise TypeError(f"loaded state dict: 'torchsgd' must be a dict, got {type(extra).__name__}")
    for key, value in extra.items():
        if key not in EXTRA_KEYS:
            raise ValueError(f"loaded state dict: 'torchsgd' has {key!r}; it holds {', '.join(EXTRA_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
            raise ValueError(f"loaded state dict: 'torchsgd' {key!r} must be an int in [0, 2**64), got {value!r}")
    if ("seed" in extra) != ("rounding_step" in extra):
        raise ValueError(
            "loaded state dict: 'torchsgd' must hold both 'seed' and 'rounding_step' (the rounding noise is a function of both), or neither"
        )
    return {"torchsgd": dict(extra), "originals": originals, "quantized": scales}


def check_restored_state(
    state: dict[str, Any],
    check_options: Callable[[dict[str, Any]], None],
    required: list[str],
    state_keys: tuple[str, ...],
    nullable: tuple[str, ...] = ("momentum_buffer",),
) -> None:
    """Reject a loaded state that does not fit the parameters, naming the offending entry.

    Every group must hold the ``required`` keys and pass ``check_options``; every state entry must belong
    to a parameter and hold only ``state_keys``, each a Tensor of the parameter's shape (or None, for the
    keys in ``nullable``: torch's SGD may keep a None momentum_buffer).
    """
    params = {p: (i, j) for i, group in enumerate(state["param_groups"]) for j, p in enumerate(group["params"])}
    for i, group in enumerate(state["param_groups"]):
        missing = [key for key in required if key not in group]
        if missing:
            raise ValueError(f"loaded state dict: param group {i} has no {missing[0]!r}")
        try:
            check_options(group)
        except (ValueError, TypeError, RuntimeError) as error:
            raise type(error)(f"loaded state dict: param group {i}: {error}") from None
    for key, entry in state["state"].items():
        if key not in params:
            raise ValueError(f"loaded state dict has state for {key!r}, which is not a parameter of the optimizer")
        where = "param group {}, parameter {}".format(*params[key])
        if not isinstance(entry, dict):
            raise TypeError(f"loaded state dict: state of {where} must be a dict, got {type(entry).__name__}")
        for name, value in entry.items():
            if name not in state_keys:
                raise ValueError(f"loaded state dict: state of {where} has {name!r}, which the optimizer does not keep")
            if value is None and name in nullable:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"loaded state dict: {name} of {where} must be a Tensor, got {type(value).__name__}")
            expected = (blocks(key.numel()),) if name == SCALES else key.shape
            if value.shape != expected:
                raise ValueError(
                    f"loaded state dict: {name} of {where} has shape {tuple(value.shape)}, "
                    f"the parameter has shape {tuple(key.shape)}"
                )
