"""PyTorch's own SGD test database (torch.testing._internal.common_optimizers), run against torchsgd.SGD.

torch's generic tests check contracts but never compare numbers with a reference; here every configuration
of its database, with every engine flag and every scheduler combination it lists, must train bitwise like
torch.optim.SGD(foreach=False), and every error input must raise (or warn) exactly as torch does.
"""

from __future__ import annotations

import re
import warnings
from copy import deepcopy
from typing import Any

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

import torchsgd
from helpers import (
    ENGINE_NAMES,
    ENGINES,
    assert_optimizers_match,
    capture_error,
    clone_options,
    import_common_optimizers,
)

common = import_common_optimizers()
SGD_INFO = next(info for info in common.optim_db if info.optim_cls is torch.optim.SGD)
CLIQUEY_FLAGS = ("foreach", "fused", "differentiable")

CONFIGS = SGD_INFO.optim_inputs_func("cpu")
# torch's own flagged configs (on CPU: all flags False; differentiable; fused; its database leaves foreach
# out on CPU), plus each config with each of torchsgd's engines (ENGINES).
FLAGGED_CONFIGS = common._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, SGD_INFO) + [
    common.OptimizerInput(params=None, kwargs={**deepcopy(c.kwargs), **flags}, desc=f"{c.desc} & {engine} engine")
    for c in CONFIGS
    for engine, flags in ENGINES.items()
]


def test_database_is_what_this_suite_expects() -> None:
    """A newer torch may add configs or schedulers; this suite then needs a look (not a silent pass)."""
    assert len(CONFIGS) == 9
    assert len(SGD_INFO.scheduler_inputs) == 7
    assert len(FLAGGED_CONFIGS) == 9 * 3 + 9 * len(ENGINES)
    assert any(isinstance(c.kwargs.get("lr"), torch.Tensor) for c in CONFIGS), "the tensor-lr config is gone"


def split_flags(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    options = {k: v for k, v in kwargs.items() if k not in CLIQUEY_FLAGS}
    flags = {k: v for k, v in kwargs.items() if k in CLIQUEY_FLAGS}
    return options, flags


def linear_params(dtype: torch.dtype, *, differentiable: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(leaves, params) of a 5 -> 3 linear layer. With ``differentiable`` the optimizer gets non-leaf copies
    (an in-place update of a leaf that requires grad is refused under autograd, by torch as by us), so that
    the whole trajectory stays differentiable with respect to the leaves."""
    generator = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(3, 5, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(),
        torch.randn(3, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(),
    ]
    return leaves, ([p.clone() for p in leaves] if differentiable else leaves)


def train_twins(
    options: dict[str, Any],
    our_flags: dict[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
    schedulers: list | None = None,
    steps: int = 12,
    engine_label: str = "reference",
) -> None:
    """Train a linear layer with torchsgd.SGD(**options, **our_flags) and torch.optim.SGD(**options,
    foreach=False) side by side on the same data; compare params, buffers and lrs after every step.
    With differentiable=True both run under autograd, and the gradients of the final parameters with
    respect to the initial ones must agree too."""
    differentiable = bool(our_flags.get("differentiable"))
    our_leaves, our_params = linear_params(dtype, differentiable=differentiable)
    their_leaves, their_params = linear_params(dtype, differentiable=differentiable)
    ours = torchsgd.SGD(our_params, **clone_options(options), **our_flags)
    # torch's loop, differentiable when ours is (that flag changes what a step computes, not only its speed).
    theirs = torch.optim.SGD(their_params, **clone_options(options), foreach=False, differentiable=differentiable)
    our_schedulers = [make(ours) for make in schedulers or []]
    their_schedulers = [make(theirs) for make in schedulers or []]
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64).to(dtype)
        for params, opt, scheds in ((our_params, ours, our_schedulers), (their_params, theirs, their_schedulers)):
            if not differentiable:  # (zero_grad reads .grad of the non-leaf params, which warns)
                opt.zero_grad()
            weight, bias = params
            loss = torch.nn.functional.linear(x, weight, bias).pow(2).mean()
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            for scheduler in scheds:
                if isinstance(scheduler, ReduceLROnPlateau):
                    scheduler.step(loss.item())
                else:
                    scheduler.step()
        what = f"step {step}: "
        assert_optimizers_match(ours, theirs, our_params, their_params, engine=engine_label, what=what)
        for g, h in zip(ours.param_groups, theirs.param_groups):
            assert type(g["lr"]) is type(h["lr"]), (
                f"{what}lr became {type(g['lr']).__name__}, torch's {type(h['lr']).__name__}"
            )
            assert float(g["lr"]) == float(h["lr"]), f"{what}lr {float(g['lr'])} != torch's {float(h['lr'])}"
    if differentiable:
        assert all(p.grad_fn is not None for p in our_params), "the step did not record autograd history"
        ours_d = torch.autograd.grad(sum(p.sum() for p in our_params), our_leaves)
        theirs_d = torch.autograd.grad(sum(p.sum() for p in their_params), their_leaves)
        for i, (a, b) in enumerate(zip(ours_d, theirs_d)):
            assert torch.equal(a, b), f"d(params)/d(initial params) {i} differs from torch's"


def engine_label(flags: dict[str, Any]) -> str:
    if flags.get("fused"):
        return "fused"
    if flags.get("foreach"):
        return "foreach"
    if flags.get("foreach") is False or flags.get("differentiable"):
        return "reference"
    return "default"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("config", FLAGGED_CONFIGS, ids=lambda c: c.desc)
def test_every_database_config_trains_like_torch(config, dtype: torch.dtype) -> None:
    options, flags = split_flags(config.kwargs)
    train_twins(options, flags, dtype=dtype, steps=20, engine_label=engine_label(flags))


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.desc)
@pytest.mark.parametrize(
    "schedulers", SGD_INFO.scheduler_inputs, ids=[f"schedulers{i}" for i in range(len(SGD_INFO.scheduler_inputs))]
)
def test_every_config_with_every_scheduler_combination(schedulers, config, engine: str) -> None:
    train_twins(dict(config.kwargs), ENGINES[engine], schedulers=list(schedulers), steps=12, engine_label=engine)


def test_sparse_metadata_config_trains_like_torch() -> None:
    """torch's database's sparse configuration (metadata_for_sparse) on an embedding with sparse gradients."""
    kwargs, schedulers = SGD_INFO.metadata_for_sparse
    embeddings = []
    for _ in range(2):
        torch.manual_seed(0)
        embeddings.append(torch.nn.Embedding(10, 3, sparse=True))
    ours = torchsgd.SGD(embeddings[0].parameters(), **kwargs)
    theirs = torch.optim.SGD(embeddings[1].parameters(), **kwargs, foreach=False)
    our_scheds, their_scheds = [s(ours) for s in schedulers], [s(theirs) for s in schedulers]
    generator = torch.Generator().manual_seed(2)
    for step in range(15):
        index = torch.randint(0, 10, (6,), generator=generator)
        for emb, opt, scheds in ((embeddings[0], ours, our_scheds), (embeddings[1], theirs, their_scheds)):
            opt.zero_grad()
            emb(index).pow(2).sum().backward()
            assert emb.weight.grad.is_sparse
            opt.step()
            for s in scheds:
                s.step()
        assert_optimizers_match(
            ours, theirs, [embeddings[0].weight], [embeddings[1].weight], engine="default", what=f"step {step}: "
        )


# ---------------------------------------------------------------------------------------------------------
# Error inputs
# ---------------------------------------------------------------------------------------------------------
ERROR_INPUTS = SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32)


def construct_or_step(optimizer_class, error_input, flags: dict[str, Any]) -> list[warnings.WarningMessage]:
    """What torch's TestOptimRenewed.test_errors does, returning the warnings it raised."""
    optim_input = error_input.optimizer_error_input
    params, kwargs = optim_input.params, {**optim_input.kwargs, **flags}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if error_input.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            optimizer_class(params, **kwargs)
        else:
            optimizer_class(params, **kwargs).step()
    return caught


def test_error_database_is_what_this_suite_expects() -> None:
    assert len(ERROR_INPUTS) == 7
    assert any(issubclass(e.error_type, Warning) for e in ERROR_INPUTS)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("error_input", ERROR_INPUTS, ids=lambda e: e.optimizer_error_input.desc)
def test_every_error_input_fails_like_torch(error_input, engine: str) -> None:
    flags = ENGINES[engine]
    if issubclass(error_input.error_type, Warning):
        their_warnings = construct_or_step(torch.optim.SGD, error_input, flags)
        our_warnings = construct_or_step(torchsgd.SGD, error_input, flags)
        their = [(w.category, str(w.message)) for w in their_warnings]
        ours = [(w.category, str(w.message)) for w in our_warnings]
        assert any(c is error_input.error_type and re.search(error_input.error_regex, m) for c, m in their)
        assert ours == their
        return
    their_error = capture_error(lambda: construct_or_step(torch.optim.SGD, error_input, flags))
    our_error = capture_error(lambda: construct_or_step(torchsgd.SGD, error_input, flags))
    assert isinstance(their_error, error_input.error_type) and re.search(error_input.error_regex, str(their_error))
    assert our_error is not None, f"torch raises {their_error!r}; torchsgd does not"
    assert type(our_error) is type(their_error)
    assert str(our_error) == str(their_error)
