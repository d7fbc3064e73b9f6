"""The optimizer step overlapped with DistributedDataParallel's communication: each bucket of parameters is
updated as soon as its all-reduce completes, while backward goes on computing the earlier layers' gradients.

:func:`overlap_with_ddp` registers a DDP communication hook that all-reduces a bucket (DDP's own average
unless given another hook) and then runs the optimizer's engine on that bucket's parameters,
with the averaged gradients. ``optimizer.step()`` stays in the training loop: it updates nothing more (the
gradients are hidden from it), and runs the step hooks, the closure refusal and the counters (a schedule
and stochastic rounding count steps as they do without overlap). The result is bitwise DDP followed by
``optimizer.step()``: the update is elementwise, so stepping a bucket's parameters is stepping them in the
whole group, and the averaged gradient is DDP's own (see :func:`mean_allreduce_hook` and
docs/distributed.md).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchsgd.engines import Ran
from torchsgd.optim import amp

__all__ = ["overlap_with_ddp", "OverlappedStep", "mean_allreduce_hook"]

_MARK = "_torchsgd_ddp_overlap"  # the optimizer's attribute holding its OverlappedStep


def _refusal(why: str) -> ValueError:
    return ValueError(f"overlap_with_ddp: {why}")


def check_combinable(optimizer: Any) -> None:
    """Refuse what an update per bucket, inside backward, cannot do (ValueError, nothing changed)."""
    from torchsgd.optim.sgd import SGD, SGDW

    if type(optimizer) not in (SGD, SGDW):
        raise _refusal(
            f"takes a torchsgd.SGD or torchsgd.SGDW, not {type(optimizer).__module__}.{type(optimizer).__name__} "
            "(LARS and ScheduleFreeSGD are not supported: their steps are not checked per bucket)"
        )
    if optimizer.max_grad_norm is not None:
        raise _refusal(
            "cannot clip by the global norm (max_grad_norm): the norm needs every gradient before the first "
            "update, and each bucket is updated as soon as its all-reduce completes"
        )
    if optimizer.skip_nonfinite:
        raise _refusal(
            "cannot skip non-finite steps (skip_nonfinite): earlier buckets are already updated when a later "
            "gradient turns out to be NaN or Inf"
        )
    if optimizer.step_in_backward:
        raise _refusal("the optimizer already steps in backward (step_in_backward=True); use one or the other")
    if any(group["differentiable"] for group in optimizer.param_groups):
        raise _refusal("does not support differentiable=True")


class OverlappedStep:
    """The link between one DDP model and one optimizer made by :func:`overlap_with_ddp`.

    ``remove()`` ends it: the optimizer steps as usual again, and the DDP model's communication hook (DDP
    cannot unregister one) only all-reduces from then on.
    """

    def __init__(self, model: Any, optimizer: Any, comm_hook: Callable, comm_state: Any) -> None:
        self.optimizer = optimizer
        self.comm_hook = comm_hook
        self.comm_state = comm_state
        self.active = True
        self._lock = threading.Lock()  # gloo may complete two buckets' futures on two threads
        self._group_of: dict[int, int] = {}  # id(parameter) -> its param group's index
        self._groups_shape: tuple[int, ...] = ()  # the group sizes _group_of was built for
        self._ran: dict[int, Ran] = {}  # id(param group) -> what its last bucket update ran
        self._updated: set[int] = set()  # ids of the parameters updated since the last step()
        self._hidden: list[tuple[Tensor, Tensor]] = []
        self._warned_second_backward = False
        self._had_amp_flag = "_step_supports_amp_scaling" in optimizer.__dict__
        self._amp_flag = optimizer.__dict__.get("_step_supports_amp_scaling")
        # A GradScaler then hands the scale to step() instead of unscaling the gradients, and step() refuses
        # it with a message (the update already ran in backward, on scaled gradients).
        optimizer._step_supports_amp_scaling = True
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ------------------------------------------------------------------------------------ in backward

    def hook(self, state: Any, bucket: Any) -> torch.futures.Future[Tensor]:
        """DDP's communication hook: all-reduce the bucket, then update its parameters.

        (DDP checks a hook's annotations as objects; :func:`overlap_with_ddp` hands it :func:`_as_ddp_hook`'s.)"""
        future = self.comm_hook(self.comm_state, bucket)
        if not self.active:
            return future

        def update(done: torch.futures.Future[Tensor]) -> Tensor:
            averaged = done.value()
            buffer = bucket.buffer()
            if averaged is not buffer:  # a hook that returns a new tensor (compression): DDP copies it back too
                buffer.copy_(averaged)
            self._update(bucket.index(), bucket.parameters(), bucket.gradients())
            return buffer

        return future.then(update)

    def _update(self, index: int, params: list[Tensor], grads: list[Tensor]) -> None:
        optimizer = self.optimizer
        with self._lock, torch.no_grad():
            check_combinable(optimizer)  # its options may have changed since overlap_with_ddp
            shape = tuple(len(group["params"]) for group in optimizer.param_groups)
            if shape != self._groups_shape:  # (buckets may complete in any order: not keyed to bucket 0)
                self._groups_shape = shape
                self._group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
            by_group: dict[int, list[tuple[Tensor, Tensor]]] = {}
            for p, g in zip(params, grads):
                i = self._group_of.get(id(p))
                if i is not None:  # a DDP parameter the optimizer does not hold is left alone, as step() would
                    by_group.setdefault(i, []).append((p, g))
            if any(id(p) in self._updated for pairs in by_group.values() for p, _ in pairs):
                self._warn_second_backward()
            rounding = optimizer._rounding()
            for i, pairs in by_group.items():
                group = optimizer.param_groups[i]
                kept = [p.grad for p, _ in pairs]
                try:
                    for p, g in pairs:  # the averaged gradient (before backward ends, .grad is the local one)
                        p.grad = g
                    ran = optimizer._step_group({**group, "params": [p for p, _ in pairs]}, None, rounding)
                finally:
                    for (p, _), grad in zip(pairs, kept):
                        p.grad = grad
                self._ran[id(group)] = ran
                self._updated.update(id(p) for p, _ in pairs)

    def _warn_second_backward(self) -> None:
        if self._warned_second_backward:
            return
        self._warned_second_backward = True
        warnings.warn(
            "overlap_with_ddp: a second backward() ran without optimizer.step() in between, and every backward "
            "updates the parameters, so gradients were not accumulated. Accumulate micro-batches under "
            "`with ddp_model.no_sync():` (all but the last), or call optimizer.step() after each backward. "
            "Shown once.",
            RuntimeWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------------------------ in step()

    def _before_step(self, optimizer: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.active:
            return
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # (torch's args start with self)
        if closure is not None:
            raise ValueError(
                "overlap_with_ddp: step() takes no closure: the update runs inside the backward pass of the DDP "
                "model, so call loss.backward() yourself and then optimizer.step()"
            )
        if amp.scaler_active(optimizer):
            optimizer.grad_scale = optimizer.found_inf = None  # the refusal must not leave them to the next step
            raise RuntimeError(
                "overlap_with_ddp cannot be used with a GradScaler: each bucket was updated inside backward with "
                "the scaled gradient, before the scaler could unscale it or skip an overflowing step (this run's "
                "last update is wrong). Drop the GradScaler (bfloat16 autocast needs none), or call "
                "OverlappedStep.remove() and step after backward"
            )
        # The update already ran in backward: step() sees no gradient, so it updates nothing and only counts.
        self._hidden = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._hidden.append((p, p.grad))
                    p.grad = None

    def _after_step(self, optimizer: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        for p, grad in self._hidden:
            p.grad = grad
        self._hidden = []
        if not self.active:
            return
        for group in optimizer.param_groups:  # engine_report(): what the bucket updates ran, not the empty step
            ran = self._ran.get(id(group))
            if ran is not None:
                optimizer._ran[id(group)] = ran
        self._ran.clear()
        self._updated.clear()

    def remove(self) -> None:
        """End the overlap: step() updates again, and the DDP hook only all-reduces."""
        if not self.active:
            return
        self.active = False
        for handle in self._handles:
            handle.remove()
        optimizer = self.optimizer
        if self._had_amp_flag:
            optimizer._step_supports_amp_scaling = self._amp_flag
        else:
            del optimizer._step_supports_amp_scaling
        optimizer.__dict__.pop(_MARK, None)


def overlap_with_ddp(
    model: torch.nn.parallel.DistributedDataParallel,
    optimizer: Any,
    *,
    comm_hook: Callable[[Any, Any], torch.futures.Future[Tensor]] | None = None,
    comm_state: Any = None,
) -> OverlappedStep:
    """Update each DDP bucket's parameters as soon as its all-reduce completes, inside ``backward()``.

    The training loop does not change::

        ddp_model = DistributedDataParallel(model)
        optimizer = torchsgd.SGD(ddp_model.parameters(), lr=0.1, momentum=0.9)
        torchsgd.overlap_with_ddp(ddp_model, optimizer)
        for x, y in batches:
            loss_fn(ddp_model(x), y).backward()   # all-reduces and updates, bucket by bucket
            optimizer.step()                      # updates nothing more: hooks, counters
            optimizer.zero_grad()

    Bitwise DDP followed by ``optimizer.step()`` (parameters, momentum buffers, ``.grad``), with
    ``comm_hook`` left at :func:`mean_allreduce_hook` (DDP's own average; ``comm_state``: the process group,
    default DDP's). Another hook (e.g. torch's ``fp16_compress_hook``) can be given: it runs first, and the
    update uses what it returns. Register it once, before training; DDP takes one communication hook.

    Raises ValueError, changing nothing, for what cannot update per bucket inside backward: ``max_grad_norm``
    (global-norm clipping), ``skip_nonfinite``, ``step_in_backward``, ``differentiable``, LARS and
    ScheduleFreeSGD, ``find_unused_parameters=True``, DDP's ``mixed_precision``, sparse embeddings, parameters of the
    optimizer that DDP does not reduce, and an optimizer already overlapped. ``step(closure)`` raises
    ValueError before running the closure; a GradScaler raises RuntimeError at ``step()``. Gradient
    accumulation: run all but the last micro-batch under ``with ddp_model.no_sync():``.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(f"overlap_with_ddp: model must be a DistributedDataParallel, not {type(model).__name__}")
    check_combinable(optimizer)
    if getattr(optimizer, _MARK, None) is not None:
        raise _refusal("this optimizer is already overlapped with a DDP model")
    if getattr(model, "find_unused_parameters", False):
        raise _refusal(
            "find_unused_parameters=True is not supported: a bucket's hook cannot tell which of its parameters "
            "no rank used (step() leaves those alone, an update with a zero gradient would not)"
        )
    if getattr(model, "mixed_precision", None) is not None:
        raise _refusal("DDP's mixed_precision is not supported (its buckets hold low-precision copies)")
    sparse = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    if any(isinstance(m, sparse) and m.sparse for m in model.module.modules()):
        raise _refusal("sparse gradients (an Embedding with sparse=True) are not supported (not checked per bucket)")
    ignored: set[str] = set(getattr(model, "parameters_to_ignore", ()))
    reduced = {id(p) for name, p in model.module.named_parameters() if p.requires_grad and name not in ignored}
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            if p.requires_grad and id(p) not in reduced:
                raise _refusal(
                    f"parameter {j} of param group {i} is not one DDP reduces (not in the DDP model, or "
                    "ignored), so no bucket would update it; give the optimizer the DDP model's parameters"
                )
    hook = mean_allreduce_hook if comm_hook is None else comm_hook
    state = model.process_group if comm_hook is None and comm_state is None else comm_state
    overlap = OverlappedStep(model, optimizer, hook, state)
    try:
        model.register_comm_hook(None, _as_ddp_hook(overlap.hook))  # raises if the model has a hook already
    except BaseException:
        overlap.remove()
        raise
    setattr(optimizer, _MARK, overlap)
    return overlap


def mean_allreduce_hook(process_group: Any, bucket: Any) -> torch.futures.Future[Tensor]:
    """The average DDP's built-in reduction takes: each gradient times 1/world size, then the sum over ranks.

    (torch's ``allreduce_hook`` divides by the world size instead, which is the same bits only when the world
    size is a power of two: 1/3 is not exact.) DDP's own reduction multiplies while copying a gradient into its
    bucket; it divides in place where the gradient already is the bucket's view (``gradient_as_bucket_view``
    with gradients kept between steps, ``zero_grad(set_to_none=False)``), which this hook cannot tell apart."""
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    buffer = bucket.buffer()
    buffer.mul_(1.0 / torch.distributed.get_world_size(group))
    work = torch.distributed.all_reduce(buffer, group=group, async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


def _as_ddp_hook(method: Callable[[Any, Any], torch.futures.Future[Tensor]]) -> Callable:
    """``method`` as DDP's register_comm_hook checks a hook: annotations that are the objects themselves (this
    module's are strings, under ``from __future__ import annotations``)."""
    bucket_type = torch.distributed.GradBucket  # type: ignore[attr-defined]

    def ddp_hook(state: Any, bucket: Any) -> Any:
        return method(state, bucket)

    ddp_hook.__annotations__ = {"state": object, "bucket": bucket_type, "return": torch.futures.Future[torch.Tensor]}
    return ddp_hook
