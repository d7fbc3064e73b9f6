"""What every engine is: a way of running the SGD rule over the tensors of one param group."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from torchsgd.rules.rounding import BUFFER, PARAM, memory_index, round_to_dtype, shard_rows, stream_key
from torchsgd.rules.sgd import Rounding, SGDHyper

# One trust ratio per entry of group["params"] (LARS), None where a parameter is not adapted.
TrustRatios = list[Tensor | None]

# The types of a plain tensor, as the kernels take them: not a subclass (DTensor and other wrappers fall back).
PLAIN_TYPES = (Tensor, torch.nn.Parameter)

OVERLAP_REASON = "parameters share memory (one listed twice, or views that overlap): torch's loop, in order"


@dataclasses.dataclass(frozen=True)
class Ran:
    """What updated a param group: the engine's name, why it is not the engine selected (or None), and the
    momentum buffers the step created, as (parameter, buffer) pairs, for the optimizer to keep in its state
    (engines write none of it; a buffer that existed is updated in place)."""

    engine: str
    reason: str | None = None
    new_buffers: tuple[tuple[Tensor, Tensor], ...] = dataclasses.field(default=(), compare=False, repr=False)

    def without_buffers(self) -> Ran:
        """This report, not holding the buffers (what the optimizer keeps for engine_report())."""
        return Ran(self.engine, self.reason) if self.new_buffers else self


class GroupOwner(Protocol):
    """All an engine asks of the optimizer whose param group it steps (torchsgd.SGD and its subclasses).

    ``collect`` is torch's ``_init_group``: the parameters with a gradient, their gradients and their
    momentum buffers (None before a parameter's first step). ``param_index`` is a parameter's position in
    the optimizer (its key in the state_dict), which names its stochastic-rounding noise stream. ``state``
    is torch's per-parameter state, which the native kernel reads its buffers from. Nothing is written
    back through this: new buffers come back in :class:`Ran`. ``reserved_buffers`` is memory set aside for
    first-step buffers (step_in_backward's pool, engines/fused.py ``reserve_buffers``): an engine may take
    a parameter's entry as that parameter's new buffer (the optimizer drops the entry when it stores it).
    """

    state: Any
    reserved_buffers: dict[Tensor, Any]

    def collect(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor | None]
    ) -> bool: ...

    def param_index(self, param: Tensor) -> int: ...


class Engine(Protocol):
    """Runs one SGD step over one param group of an optimizer, keeping torch's state format."""

    name: str

    def step_group(
        self, optimizer: GroupOwner, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> Ran: ...


# Elements of each array (parameters, gradients, buffers) a lifted step converts to float32 at once. At
# 128K elements its float32 copies are 1.5 MB and stochastic rounding's int64 temporaries a few MB: what a
# step adds beyond first-step buffers stays around 25 MB whatever the group's size (tests/test_bounded_lifted.py).
LIFTED_CHUNK = 1 << 17


def _chunks(tensors: list[Tensor], limit: int | None = None) -> list[list[tuple[int, slice | None, int]]]:
    """Pieces of at most about ``limit`` (LIFTED_CHUNK) elements in all: (tensor index, rows of dim 0 or None,
    first element)."""
    limit = LIFTED_CHUNK if limit is None else limit
    chunks: list[list[tuple[int, slice | None, int]]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if n <= limit or t.dim() == 0 or _is_dtensor(t):
            pieces: list[tuple[slice | None, int, int]] = [(None, 0, n)]
        else:
            row = n // t.shape[0]
            step = max(1, limit // row)
            pieces = [
                (slice(r, min(r + step, t.shape[0])), r * row, (min(r + step, t.shape[0]) - r) * row)
                for r in range(0, t.shape[0], step)
            ]
        for rows, start, count in pieces:
            if size and size + count > limit:
                chunks.append([])
                size = 0
            chunks[-1].append((i, rows, start))
            size += count
    return [c for c in chunks if c]


def _rows(t: Tensor, rows: slice | None) -> Tensor:
    return t if rows is None else t[rows]


def bounded_pieces(tensors: list[list[Tensor]], limit: int) -> list[list[list[Tensor]]]:
    """Side-by-side lists of same-shaped tensors (e.g. parameters, gradients, buffers) cut into pieces of
    about ``limit`` elements each: whole tensors, or slices of rows of dim 0 of a large one, the same
    slices of every list. For elementwise updates whose temporaries should stay small."""
    return [[[_rows(ts[i], rows) for i, rows, _ in chunk] for ts in tensors] for chunk in _chunks(tensors[0], limit)]


def memory_overlaps(tensors: list[Tensor]) -> bool:
    """Whether any two of these tensors share memory (the same tensor twice, or overlapping views).

    Updating such tensors is order-dependent (each update reads what an earlier one wrote), so a group
    holding them runs torch's per-tensor loop. Tensors on different devices never overlap; a tensor's span
    is the bytes from its first to its last element, so interleaved views (x[::2], x[1::2]) count as
    overlapping too, which costs speed, never correctness.
    """
    from torchsgd.engines.build import native_module

    kernel = native_module()
    verdict = None if kernel is None else kernel.overlapping(tensors)
    if verdict is not None:
        return verdict
    spans = []
    for t in tensors:
        if _is_dtensor(t):
            t = cast(Any, t).to_local()
        if t.numel() == 0 or t.is_sparse or t.is_meta:
            continue
        start = t.data_ptr()
        last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) * t.element_size()
        spans.append((str(t.device), start, start + last + t.element_size()))
    spans.sort()
    return any(a[0] == b[0] and b[1] < a[2] for a, b in itertools.pairwise(spans))


def _is_dtensor(t: Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no tensor can be a DTensor
    return module is not None and isinstance(t, module.DTensor)


SHARD_SUPPORT = (
    "stochastic_rounding on DTensor parameters supports Shard(0) (FSDP2's fully_shard) and Replicate on a 1-D "
    "device mesh"
)


def _refuse_shard(index: int, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{SHARD_SUPPORT}; parameter {index} {what}. Use round-to-nearest (stochastic_rounding=False; "
        "momentum_dtype works) for it"
    )


def _shard_start(p: Tensor, index: int) -> int:
    """The global index of the first element of DTensor ``p``'s local tensor, in the whole row-major parameter.

    ``index`` names the parameter in an error. Anything but a 1-D mesh with Shard(0) or Replicate is refused
    (NotImplementedError), as is a local tensor that is not the rows :func:`shard_rows` says this rank holds.
    """
    from torch.distributed.tensor import Shard

    dt = cast(Any, p)
    mesh, placements = dt.device_mesh, tuple(dt.placements)
    if mesh.ndim != 1:
        raise _refuse_shard(index, f"has placements {placements} on a {mesh.ndim}-D device mesh")
    placement = placements[0]
    local = dt.to_local()
    if not p.is_contiguous() or not local.is_contiguous():
        raise _refuse_shard(index, "is not row-major (contiguous), so its noise has no global row-major index")
    if placement.is_replicate():
        shape, first_row = tuple(p.shape), 0
    elif type(placement) is Shard and p.dim() > 0 and placement.dim in (0, -p.dim()):  # dim 0, maybe as -ndim
        coordinate = mesh.get_coordinate()
        if coordinate is None:  # this rank is not in the mesh: it holds nothing
            return 0
        first_row, rows = shard_rows(p.shape[0], mesh.size(0), coordinate[0])
        shape = (rows, *p.shape[1:])
    else:
        raise _refuse_shard(index, f"has placements {placements}")
    if tuple(local.shape) != shape:
        raise _refuse_shard(
            index,
            f"holds a local tensor of shape {tuple(local.shape)} where {placements} of {tuple(p.shape)} gives {shape}",
        )
    return first_row * (p.numel() // p.shape[0] if p.dim() and p.shape[0] else 0)


def dtensor_like(param: Tensor) -> Callable[[Tensor], Tensor]:
    """What turns a local tensor (a new momentum buffer) into a DTensor laid out as DTensor ``param``: its mesh,
    placements, global shape and stride, with no communication."""
    from torch.distributed.tensor import DTensor

    dt = cast(Any, param)
    return functools.partial(
        DTensor.from_local,
        device_mesh=dt.device_mesh,
        placements=dt.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def local_elementwise_mismatch(param: Tensor, grad: Tensor | None, buffer: Tensor | None) -> str | None:
    """Why an elementwise step of DTensor ``param`` with its gradient and momentum buffer (None where absent)
    cannot run on their local tensors, element for element; None when it can.

    It can when every tensor is a DTensor on the parameter's mesh with its placements, each of them a Shard
    or a Replicate (each local element is then one element of the whole, in every tensor the same one): the
    local step is the whole step's, restricted to this rank's elements. A Partial placement holds pieces of
    a sum, which an elementwise update of momentum and weight decay does not commute with."""
    dt = cast(Any, param)
    placements = dt.placements
    if not _local_placements(placements):
        return f"a DTensor parameter has placements {tuple(placements)} (only Shard and Replicate step locally)"
    for what, t in (("gradient", grad), ("momentum buffer", buffer)):
        if t is None:
            continue
        if not _is_dtensor(t):
            return f"a DTensor parameter's {what} is a plain tensor"
        other = cast(Any, t)
        if other.placements != placements or (
            other.device_mesh is not dt.device_mesh and other.device_mesh != dt.device_mesh
        ):
            return f"a DTensor parameter's {what} is laid out unlike it ({tuple(other.placements)})"
    return None


@functools.lru_cache(maxsize=64)
def _local_placements(placements: tuple[Any, ...]) -> bool:
    return all(p.is_shard() or p.is_replicate() for p in placements)


def replicated(x: Any) -> Any:
    """A DTensor hyperparameter (a clip coefficient, a trust ratio) as the plain tensor of its whole value."""
    return x.full_tensor() if _is_dtensor(x) else x


def replicated_hyper(hyper: SGDHyper) -> SGDHyper:
    """``hyper`` with each DTensor hyperparameter (lr, weight decay, clip coefficient) as its plain value.

    ``hyper`` itself when none is a DTensor: the fused engine calls this on every step of every group.
    """
    if not any(
        isinstance(x, Tensor) and _is_dtensor(x) for x in (hyper.lr, hyper.weight_decay, hyper.clip_coefficient)
    ):
        return hyper
    return dataclasses.replace(
        hyper,
        lr=replicated(hyper.lr),
        weight_decay=replicated(hyper.weight_decay),
        clip_coefficient=replicated(hyper.clip_coefficient),
    )


@dataclasses.dataclass
class _LocalShards:
    """A group's tensors as the plain local tensors of their DTensors (a plain tensor stays as it is), with the
    global index of each one's first element, and what turns a new local buffer back into a DTensor."""

    params: list[Tensor]
    grads: list[Tensor]
    buffers: list[Tensor | None]
    hyper: SGDHyper
    trust_ratios: TrustRatios | None
    starts: list[int]
    wraps: list[Callable[[Tensor], Tensor] | None]

    def keep_new_buffers(self, momentum_buffers: list[Tensor | None], local_buffers: list[Tensor | None]) -> None:
        """Put the buffers the step created into ``momentum_buffers``, as DTensors laid out as their parameters."""
        for i, (old, new) in enumerate(zip(momentum_buffers, local_buffers)):
            wrap = self.wraps[i]
            if old is None and new is not None:
                momentum_buffers[i] = new if wrap is None else wrap(new)


def _local_shards(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    hyper: SGDHyper,
    trust_ratios: TrustRatios | None,
    indices: list[int],
) -> _LocalShards:
    """The group on its local tensors (see :class:`_LocalShards`); refuses what :func:`_shard_start` refuses,
    and a gradient or buffer not laid out as its DTensor parameter."""
    from torch.distributed.tensor import DTensor

    local_params: list[Tensor] = []
    local_grads: list[Tensor] = []
    local_buffers: list[Tensor | None] = []
    starts: list[int] = []
    wraps: list[Callable[[Tensor], Tensor] | None] = []
    for i, (p, g) in enumerate(zip(params, grads)):
        b = momentum_buffers[i] if momentum_buffers else None
        if not isinstance(p, DTensor):
            if isinstance(g, DTensor) or isinstance(b, DTensor):
                raise _refuse_shard(indices[i], "is a plain tensor with a DTensor gradient or momentum buffer")
            local_params.append(p)
            local_grads.append(g)
            local_buffers.append(b)
            starts.append(0)
            wraps.append(None)
            continue
        starts.append(_shard_start(p, indices[i]))
        for what, t in (("gradient", g), ("momentum buffer", b)):
            if t is not None and not (
                isinstance(t, DTensor) and t.device_mesh == p.device_mesh and t.placements == p.placements
            ):
                placements = tuple(t.placements) if isinstance(t, DTensor) else "a plain tensor"
                raise _refuse_shard(indices[i], f"has placements {tuple(p.placements)} and its {what} {placements}")
        local_params.append(p.to_local())
        local_grads.append(cast(Any, g).to_local())
        local_buffers.append(None if b is None else cast(Any, b).to_local())
        wraps.append(dtensor_like(p))
    local_hyper = replicated_hyper(hyper)
    trust = None if trust_ratios is None else [replicated(t) for t in trust_ratios]
    return _LocalShards(
        local_params,
        local_grads,
        local_buffers if momentum_buffers else [],
        local_hyper,
        trust,
        starts,
        wraps,
    )


class TensorListEngine:
    """An engine that works on the lists torch's ``_init_group`` collects (params with a gradient).

    Subclasses implement :meth:`step`: update ``params`` in place and fill ``momentum_buffers`` (one entry
    per parameter, None where the parameter has no buffer yet) with the new or updated buffers; and may
    implement :meth:`step_rounded`, the same with ``hyper.rounding`` (by default in bounded float32 pieces).
    """

    name = "tensor-list"

    def step_group(
        self, optimizer: GroupOwner, group: dict[str, Any], hyper: SGDHyper, trust_ratios: TrustRatios | None = None
    ) -> Ran:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momentum_buffers: list[Tensor | None] = []
        optimizer.collect(group, params, grads, momentum_buffers)
        ran = Ran(self.name)
        if not params:
            return ran
        if trust_ratios is not None:
            trust_ratios = [t for p, t in zip(group["params"], trust_ratios) if p.grad is not None]
        with_momentum = hyper.momentum != 0
        engine: TensorListEngine = self
        # (Not while torch.compile traces the step: the check reads addresses, which a graph cannot.)
        if (
            self.name != "reference"
            and len(params) > 1
            and not torch.compiler.is_compiling()
            and memory_overlaps(params)
        ):
            from torchsgd.engines.reference import ReferenceEngine

            engine, ran = ReferenceEngine(), Ran("reference", OVERLAP_REASON)
        before = list(momentum_buffers)
        if hyper.rounding is None:
            engine.step(params, grads, momentum_buffers, hyper, trust_ratios)
        else:
            indices = [optimizer.param_index(p) for p in params]
            engine.step_rounded(params, grads, momentum_buffers, hyper, trust_ratios, indices)
        if with_momentum:
            new = tuple(
                (p, cast(Tensor, buffer))
                for p, buffer, old in zip(params, momentum_buffers, before)
                if buffer is not old
            )
            if new:
                ran = dataclasses.replace(ran, new_buffers=new)
        return ran

    def step_rounded(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None,
        indices: list[int],
    ) -> None:
        """:meth:`step` with ``hyper.rounding``: the rule in float32, each stored value rounded once.

        ``indices`` are the parameters' positions in the optimizer, their stochastic-rounding noise streams.
        This implementation runs the rule on float32 (float64) copies, then stores each result rounded once.

        In bounded pieces: whole tensors up to LIFTED_CHUNK elements at a time, a larger tensor in slices of
        rows of dim 0, so the float32 copies (and stochastic rounding's noise) held at once stay within
        about LIFTED_CHUNK elements of each array, whatever the group's size. The rule is elementwise and
        each slice draws its elements' own noise, so the numbers are those of the whole group at once.

        With stochastic rounding, a DTensor parameter (Shard(0), e.g. FSDP2's ``fully_shard``, or Replicate,
        on a 1-D mesh) runs on its local tensor, whose elements draw the noise of their global index in the
        whole parameter: the bits of one process stepping the whole tensor. Other placements are refused
        (NotImplementedError). Without it, DTensors run through DTensor's own pointwise rules.
        """
        rounding = hyper.rounding
        if rounding is None:
            raise ValueError("step_rounded takes a hyper with a rounding (rules.sgd.Rounding)")
        if rounding.momentum_dtype is torch.int8:
            if hyper.momentum != 0:  # 8-bit momentum: buffers of codes and scales (engines/quantized.py)
                from torchsgd.engines.quantized import step_quantized

                step_quantized(self, params, grads, momentum_buffers, hyper, trust_ratios, indices)
                return
            rounding = dataclasses.replace(rounding, momentum_dtype=None)  # no buffer to store
            hyper = dataclasses.replace(hyper, rounding=rounding)
        if rounding.stochastic_rounding and any(_is_dtensor(t) for t in params):
            # A DTensor's shard draws the noise of its own elements of the whole parameter: the step runs on
            # the local tensors, each from the global index of its first element (see _local_shards).
            shards = _local_shards(params, grads, momentum_buffers, hyper, trust_ratios, indices)
            local_buffers = shards.buffers
            self._step_rounded(
                shards.params, shards.grads, local_buffers, shards.hyper, shards.trust_ratios, indices, shards.starts
            )
            shards.keep_new_buffers(momentum_buffers, local_buffers)
            return
        self._step_rounded(params, grads, momentum_buffers, hyper, trust_ratios, indices, [0] * len(params))

    def _step_rounded(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None,
        indices: list[int],
        starts: list[int],
    ) -> None:
        """:meth:`step_rounded`, each tensor's noise from element ``starts[i]`` of its parameter (0 but for a
        shard of one)."""
        rounding = cast(Rounding, hyper.rounding)
        with_momentum = hyper.momentum != 0
        # (Without momentum the caller's buffer list is empty.)
        first = [with_momentum and momentum_buffers[i] is None for i in range(len(params))]
        buffer_dtypes = [rounding.momentum_dtype or p.dtype for p in params]
        for i, g in enumerate(grads):
            if first[i]:  # a new buffer, laid out like the gradient as torch's clone of it is, filled piece by piece
                momentum_buffers[i] = torch.empty_like(g, dtype=buffer_dtypes[i])
        buffers = cast("list[Tensor]", momentum_buffers)  # with momentum, every entry is a buffer now
        keys = [
            stream_key(rounding.seed, rounding.step, index) if rounding.stochastic_rounding else None
            for index in indices
        ]
        plain = dataclasses.replace(hyper, rounding=None)
        for chunk in _chunks(params):
            views = [(i, _rows(params[i].detach(), rows), _rows(grads[i], rows), start) for i, rows, start in chunk]
            compute = [torch.promote_types(p.dtype, torch.float32) for _, p, _, _ in views]
            lifted_params = [p.to(c) for (_, p, _, _), c in zip(views, compute)]
            lifted_grads = [g.to(c) for (_, _, g, _), c in zip(views, compute)]
            lifted_buffers: list[Tensor | None] = []
            if with_momentum:
                lifted_buffers = [
                    None if first[i] else _rows(buffers[i], rows).to(c) for (i, rows, _), c in zip(chunk, compute)
                ]
            chunk_trust = None if trust_ratios is None else [trust_ratios[i] for i, _, _ in chunk]
            self.step(lifted_params, lifted_grads, lifted_buffers, plain, chunk_trust)

            for k, ((i, rows, start), (_, p, _, _)) in enumerate(zip(chunk, views)):
                index = memory_index(p, params[i]) if keys[i] is not None else None
                start += starts[i]
                if p.dtype != compute[k]:
                    p.copy_(round_to_dtype(lifted_params[k], p.dtype, keys[i], PARAM, start, index))
                if with_momentum:
                    target = _rows(buffers[i], rows)
                    value = round_to_dtype(
                        cast(Tensor, lifted_buffers[k]), buffer_dtypes[i], keys[i], BUFFER, start, index
                    )
                    if value is not target:
                        target.copy_(value)

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffers: list[Tensor | None],
        hyper: SGDHyper,
        trust_ratios: TrustRatios | None = None,
    ) -> None:
        raise NotImplementedError
