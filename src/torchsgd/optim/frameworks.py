"""Find training-framework settings that step_in_backward silently defeats, by reading step()'s call stack.

With ``step_in_backward`` each gradient is applied and freed inside ``backward()``. Lightning's Trainer
(``gradient_clip_val``) and transformers' Trainer (``TrainingArguments.max_grad_norm``, 1.0 by default)
clip the gradients after backward and before ``optimizer.step()``: by then there is nothing left to clip,
and training runs unclipped without a word. :func:`spent_gradient_clipping` finds such a trainer among
the frames that called ``step()``. It imports no framework: it recognises them by their module and class
names, so it costs a few attribute reads, and nothing when no framework is in use.

accelerate's ``Accelerator`` has no clipping setting of its own (a training loop calls
``accelerator.clip_grad_norm_`` itself, where a spent gradient clips to nothing); what it can change
silently is gradient accumulation, which the optimizer detects by itself (two backward passes, no step).
"""

from __future__ import annotations

import sys
from numbers import Real
from types import FrameType
from typing import Any

__all__ = ["spent_gradient_clipping"]

MAX_DEPTH = (
    40  # both trainers lie within ~10 frames of step(): Lightning's in a `trainer` local, transformers' in `self`
)
_LIGHTNING = ("lightning.", "pytorch_lightning.")
_TRANSFORMERS = ("transformers.",)
_CANDIDATE_NAMES = ("trainer", "self")  # the locals that hold a trainer in those frameworks' frames


def spent_gradient_clipping(optimizer: Any) -> str | None:
    """A message naming a framework's gradient clipping that ``optimizer`` (step_in_backward) makes void.

    Call it from inside ``optimizer.step()``. It walks up at most :data:`MAX_DEPTH` frames to the first
    Lightning Trainer or transformers Trainer that drives ``optimizer`` (one that lists other optimizers
    only is passed over) and returns a message naming its clipping setting and the fix, or None when that
    trainer does not clip, or when no trainer is found.
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(MAX_DEPTH):
        if frame is None:
            return None
        module = frame.f_globals.get("__name__") or ""
        if module.startswith(_LIGHTNING):
            trainer = _local_instance(frame, "Trainer", ("lightning.pytorch", "pytorch_lightning"))
            if trainer is not None and _drives(getattr(trainer, "optimizers", None), optimizer):
                return _lightning_message(trainer)
        elif module.startswith(_TRANSFORMERS):
            trainer = _local_instance(frame, "Trainer", _TRANSFORMERS)
            if trainer is not None and _drives([getattr(trainer, "optimizer", None)], optimizer):
                return _transformers_message(trainer)
        frame = frame.f_back
    return None


def _lightning_message(trainer: Any) -> str | None:
    clip = getattr(trainer, "gradient_clip_val", None)
    if not _positive(clip):
        return None
    return (
        f"Lightning's Trainer(gradient_clip_val={clip!r}) clips gradients that step_in_backward has already "
        "applied and freed: the clipping has no effect and training runs unclipped. Pass "
        "gradient_clip_val=None, or drop step_in_backward (Lightning's clipping then works, as does "
        "torchsgd.SGD(max_grad_norm=...))"
    )


def _transformers_message(trainer: Any) -> str | None:
    clip = getattr(getattr(trainer, "args", None), "max_grad_norm", None)
    if not _positive(clip):
        return None
    return (
        f"transformers' Trainer(args=TrainingArguments(max_grad_norm={clip!r})) clips gradients that "
        "step_in_backward has already applied and freed: the clipping has no effect and training runs "
        "unclipped (1.0 is TrainingArguments' default). Pass TrainingArguments(max_grad_norm=0), or drop "
        "step_in_backward (the Trainer's clipping then works)"
    )


def _positive(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and float(value) > 0


def _local_instance(frame: FrameType, class_name: str, module_prefixes: tuple[str, ...]) -> Any:
    """The frame's ``trainer`` or ``self`` local if its class (or a base) is ``class_name`` from those modules."""
    names = frame.f_code.co_varnames
    if not any(name in names for name in _CANDIDATE_NAMES):
        return None  # spares building f_locals for the frames that cannot hold one
    local_values = frame.f_locals
    for name in _CANDIDATE_NAMES:
        value = local_values.get(name)
        if value is None:
            continue
        for cls in type(value).__mro__:
            if cls.__name__ == class_name and cls.__module__.startswith(module_prefixes):
                return value
    return None


def _drives(optimizers: Any, optimizer: Any) -> bool:
    """Whether ``optimizer`` is among a trainer's optimizers (seen through their wrappers).

    A trainer that lists no optimizer yet is taken to drive it: the frame is in its training loop.
    """
    try:
        listed = [opt for opt in optimizers or () if opt is not None]
    except TypeError:
        return True
    if not listed:
        return True
    for opt in listed:
        # LightningOptimizer keeps the optimizer in ._optimizer, accelerate's AcceleratedOptimizer in
        # .optimizer (and DeepSpeed's wrapper in another .optimizer): a few levels cover them.
        for _ in range(4):
            if opt is optimizer:
                return True
            attributes = getattr(opt, "__dict__", {})
            inner = attributes.get("_optimizer") or attributes.get("optimizer")
            if inner is None or inner is opt:
                break
            opt = inner
    return False
