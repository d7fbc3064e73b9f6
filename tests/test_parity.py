"""The backbone: torchsgd.SGD follows torch.optim.SGD(foreach=False) bitwise, on every engine.

Hypothesis sweeps (``test_fuzz_*``; ``make fuzz`` runs them with the long profile) draw dtypes, shapes,
options, param groups, gradient schedules (None on some steps, first gradient late) and gradient memory
layouts; deterministic tests add 100+ step runs, complex parameters and sparse gradients.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import torchsgd
from helpers import (
    COMPLEX_DTYPES,
    ENGINE_NAMES,
    ENGINES,
    REAL_DTYPES,
    assert_optimizers_match,
    assert_same_as_reference,
    assert_same_error,
    capture_error,
    clone_options,
    engine_dtype_cases,
    make_twins,
    random_tensor,
    run_twins,
    seeded_grads,
    split_into_groups,
    with_layout,
)

SHAPES = [(), (0,), (1,), (3,), (64,), (67,), (4, 4), (3, 5), (2, 3, 4), (2, 0, 3)]
LAYOUTS = ["contiguous", "transposed", "strided"]


# ---------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------
def hyper_value(draw: st.DrawFn, name: str, values: list[float]) -> Any:
    """A float, or (for lr and weight_decay) sometimes a Tensor of it.

    lr may be a 0-d or a 1-element Tensor; weight_decay only a 0-d one (torch 2.13 fails on a 1-element
    weight_decay Tensor, so it is no input to compare on).
    """
    value = draw(st.sampled_from(values), label=name)
    if name in ("lr", "weight_decay"):
        forms = ["float", "float", "tensor0d", "tensor1"] if name == "lr" else ["float", "float", "tensor0d"]
        form = draw(st.sampled_from(forms), label=f"{name} form")
        if form == "tensor0d":
            return torch.tensor(value)
        if form == "tensor1":
            return torch.tensor([value], dtype=draw(st.sampled_from([torch.float32, torch.float64])))
    return value


@st.composite
def sgd_options(draw: st.DrawFn, *, partial: bool = False) -> dict[str, Any]:
    """SGD options torch accepts; ``partial`` draws a subset (the overrides of one param group)."""
    options: dict[str, Any] = {
        "lr": hyper_value(draw, "lr", [0.0, 1e-3, 0.01, 0.1, 0.5, 1.7]),
        "momentum": hyper_value(draw, "momentum", [0.0, 0.0, 0.1, 0.5, 0.9, 0.99]),
        "dampening": hyper_value(draw, "dampening", [0.0, 0.0, 0.1, 0.5, 1.0]),
        "weight_decay": hyper_value(draw, "weight_decay", [0.0, 0.0, 1e-4, 0.1, 0.5]),
        "maximize": draw(st.booleans(), label="maximize"),
    }
    if options["momentum"] != 0 and options["dampening"] == 0:
        options["nesterov"] = draw(st.booleans(), label="nesterov")
    if partial:
        keep = draw(st.sets(st.sampled_from(sorted(options))), label="group overrides")
        options = {k: v for k, v in options.items() if k in keep}
        # A group that keeps nesterov must also keep what makes it valid, whatever the defaults are.
        if options.get("nesterov"):
            options["momentum"] = options.get("momentum") or 0.9
            options["dampening"] = 0.0
    return options


@dataclass
class ParamPlan:
    shape: tuple[int, ...]
    dtype: torch.dtype
    # For each step: "value", "none" (p.grad is None: skipped) or "zeros" (a zero gradient, not skipped).
    grad_kinds: list[str]
    layout: str


@dataclass
class Scenario:
    params: list[ParamPlan]
    defaults: dict[str, Any]
    groups: list[tuple[list[int], dict[str, Any]]] | None
    seed: int

    @property
    def steps(self) -> int:
        return len(self.params[0].grad_kinds)


@st.composite
def scenarios(draw: st.DrawFn, *, dtypes=REAL_DTYPES, max_params: int = 5, max_steps: int = 6) -> Scenario:
    steps = draw(st.integers(1, max_steps), label="steps")
    group_dtypes = draw(st.lists(st.sampled_from(dtypes), min_size=1, max_size=2, unique=True), label="dtypes")
    n_params = draw(st.integers(1, max_params), label="params")
    plans = []
    for _ in range(n_params):
        shape = draw(st.sampled_from(SHAPES))
        first = draw(st.sampled_from([0, 0, 0, 1, 2, steps + 1]), label="first grad at step")
        kinds = [
            "none" if t < first else draw(st.sampled_from(["value"] * 6 + ["none", "zeros"])) for t in range(steps)
        ]
        plans.append(ParamPlan(shape, draw(st.sampled_from(group_dtypes)), kinds, draw(st.sampled_from(LAYOUTS))))
    defaults = draw(sgd_options(), label="defaults")
    groups = None
    if n_params > 1 and draw(st.booleans(), label="several groups"):
        labels = draw(st.lists(st.integers(0, 2), min_size=n_params, max_size=n_params), label="group of each param")
        groups = [
            ([i for i, label in enumerate(labels) if label == g], draw(sgd_options(partial=True)))
            for g in sorted(set(labels))
        ]
        if defaults.get("nesterov"):
            # Groups inherit nesterov=True: they must keep a momentum and zero dampening.
            for _, options in groups:
                if options.get("momentum", 1) == 0 or options.get("dampening", 0) != 0:
                    options["nesterov"] = False
    return Scenario(plans, defaults, groups, draw(st.integers(0, 2**16), label="seed"))


def scenario_grads(scenario: Scenario, step: int):
    """A function building the gradients of ``step`` (called once per optimizer, same values each time)."""

    def build() -> list[torch.Tensor | None]:
        generator = torch.Generator().manual_seed(scenario.seed * 1000 + step)
        grads: list[torch.Tensor | None] = []
        for plan in scenario.params:
            values = random_tensor(plan.shape, plan.dtype, generator)
            kind = plan.grad_kinds[step]
            if kind == "none":
                grads.append(None)
            else:
                grads.append(with_layout(torch.zeros_like(values) if kind == "zeros" else values, plan.layout))
        return grads

    return build


def run_scenario(scenario: Scenario, engine: str) -> None:
    note(f"engine={engine} {scenario}")
    generator = torch.Generator().manual_seed(scenario.seed)
    initial = [random_tensor(plan.shape, plan.dtype, generator) for plan in scenario.params]
    twins = make_twins(initial, engine=engine, groups=scenario.groups, **scenario.defaults)
    for step in range(scenario.steps):
        twins.step(scenario_grads(scenario, step))
        twins.assert_match()


# ---------------------------------------------------------------------------------------------------------
# Hypothesis sweeps
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINE_NAMES)
@settings(max_examples=5 * settings.default.max_examples)  # the backbone: 5x the profile's examples
@given(data=st.data())
def test_fuzz_parity_with_torch(engine: str, data: st.DataObject) -> None:
    """Everything at once, every dtype."""
    run_scenario(data.draw(scenarios(), label="scenario"), engine)


@pytest.mark.parametrize(("engine", "dtype"), engine_dtype_cases())
@given(scenario=scenarios(max_params=3, max_steps=4))
def test_fuzz_parity_per_dtype(engine: str, dtype: torch.dtype, scenario: Scenario) -> None:
    """Every (engine, dtype) on its own, a single dtype per optimizer."""
    for plan in scenario.params:
        plan.dtype = dtype
    run_scenario(scenario, engine)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@given(scenario=scenarios(dtypes=COMPLEX_DTYPES, max_params=3, max_steps=4))
def test_fuzz_complex_parity_with_torch(engine: str, scenario: Scenario) -> None:
    """Complex parameters run torch's loop path; every engine gives its numbers (fused may refuse like torch)."""
    if engine != "fused":
        run_scenario(scenario, engine)
        return
    error = capture_error(lambda: run_scenario(scenario, engine))
    if error is not None:
        # torchsgd's fused engine may refuse complex parameters as torch's does, but only with torch's error.
        assert_same_error(lambda: _raise(error), lambda: _torch_fused_steps(scenario))


def _torch_fused_steps(scenario: Scenario) -> None:
    generator = torch.Generator().manual_seed(scenario.seed)
    params = [random_tensor(plan.shape, plan.dtype, generator) for plan in scenario.params]
    opt = torch.optim.SGD(split_into_groups(params, scenario.groups), **clone_options(scenario.defaults), fused=True)
    for step in range(scenario.steps):
        for p, g in zip(params, scenario_grads(scenario, step)()):
            p.grad = g
        opt.step()


# ---------------------------------------------------------------------------------------------------------
# Deterministic: long runs, shapes, options
# ---------------------------------------------------------------------------------------------------------
LONG_RUN_GROUPS = [
    ([0, 1, 2], {}),
    ([3, 4], {"lr": 0.02, "momentum": 0.5, "dampening": 0.3, "nesterov": False, "weight_decay": 0.0}),
    ([5, 6], {"momentum": 0.0, "nesterov": False, "maximize": True}),
]


def long_run_grads(params: list[torch.Tensor], steps: int, seed: int):
    """Gradients for 7 parameters: one arrives at step 10, one is None every third step, some have odd
    layouts (a transposed gradient for a square parameter, a strided one), one is sometimes all zeros."""
    layouts = ["contiguous", "transposed", "contiguous", "strided", "transposed", "contiguous", "contiguous"]
    dense = seeded_grads(params, steps, seed, scale=0.5)
    for t, grads in enumerate(dense):

        def build(grads=grads, t=t):
            out: list[torch.Tensor | None] = [with_layout(g, layout) for g, layout in zip(grads, layouts)]
            if t < 10:
                out[2] = None
            if t % 3 == 1:
                out[4] = None
            if t % 7 == 3:
                out[5] = torch.zeros_like(grads[5])
            return out

        yield build


@pytest.mark.parametrize(("engine", "dtype"), engine_dtype_cases())
def test_120_steps_several_groups(engine: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    shapes = [(5, 5), (67,), (3, 4), (2, 3, 4), (6, 6), (), (64,)]
    initial = [random_tensor(s, dtype, generator) for s in shapes]
    twins = make_twins(
        initial,
        engine=engine,
        groups=LONG_RUN_GROUPS,
        lr=torch.tensor(0.01),
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
    )
    for t, build in enumerate(long_run_grads(initial, 120, seed=11)):
        twins.step(build)
        if t % 10 == 9:
            twins.assert_match()
    twins.assert_match()
    assert twins.steps_taken == 120
    moved = [not torch.equal(p, q) for p, q in zip(twins.our_params, initial)]
    assert all(moved), f"every parameter should have moved: {moved}"


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a loaded 2-core machine OpenMP's waits make them
    100x slower; numbers are the same either way (both optimizers run under the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_model_trains_100_steps_like_torch(engine: str, one_thread: None) -> None:
    """A small conv net, through autograd: the gradients come from backward, not from a generator."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4)
    )
    twin = copy.deepcopy(model)
    options = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    ours = torchsgd.SGD(model.parameters(), **options, **ENGINES[engine])
    theirs = torch.optim.SGD(twin.parameters(), **options, foreach=False)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))
    for _ in range(100):
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_same_as_reference(p, q, engine=engine, dtype=q.dtype, what=f"param {i}")
        assert_same_as_reference(
            ours.state[p]["momentum_buffer"],
            theirs.state[q]["momentum_buffer"],
            engine=engine,
            dtype=q.dtype,
            what=f"buffer {i}",
        )


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("engine", "dtype"), engine_dtype_cases(dtypes=(torch.float32, torch.float16)))
def test_every_shape(engine: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    initial = [random_tensor(shape, dtype, generator), random_tensor(shape, dtype, generator)]
    run_twins(initial, seeded_grads(initial, 4, seed=5), engine=engine, lr=0.1, momentum=0.9, weight_decay=0.01)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"lr": 0.0, "momentum": 0.9},
        {"momentum": 0.9, "dampening": 1.0},
        {"momentum": 0.9, "nesterov": True, "maximize": True, "weight_decay": 0.1},
        {"momentum": 0.99, "dampening": 0.5, "weight_decay": torch.tensor(0.05)},
        {"lr": torch.tensor([0.3], dtype=torch.float64), "momentum": 0.5},
        {"maximize": True},
    ],
    ids=repr,
)
@pytest.mark.parametrize(("engine", "dtype"), engine_dtype_cases())
def test_options(engine: str, dtype: torch.dtype, options: dict[str, Any]) -> None:
    generator = torch.Generator().manual_seed(1)
    initial = [random_tensor(s, dtype, generator) for s in [(4, 4), (67,), (3,)]]
    options = dict(options)
    run_twins(initial, seeded_grads(initial, 6, seed=2), engine=engine, lr=options.pop("lr", 0.1), **options)


@pytest.mark.parametrize(("engine", "dtype"), engine_dtype_cases())
def test_non_finite_gradients_propagate_like_torch(engine: str, dtype: torch.dtype) -> None:
    """inf and NaN in a gradient poison the same elements, in the params and the buffers, as in torch."""
    initial = [torch.linspace(-1, 1, 67).to(dtype), torch.linspace(-1, 1, 64).to(dtype)]
    grads = seeded_grads(initial, 3, seed=4)
    grads[1][0][5] = float("nan")
    grads[1][1][7] = float("inf")
    grads[2][1][9] = float("-inf")
    run_twins(initial, grads, engine=engine, lr=0.1, momentum=0.9, weight_decay=0.1)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_param_without_any_grad_gets_no_state(engine: str) -> None:
    initial = [torch.ones(3), torch.ones(3)]
    twins = run_twins(initial, [[torch.ones(3), None]] * 3, engine=engine, lr=0.1, momentum=0.9, weight_decay=0.5)
    assert twins.our_params[1] not in twins.ours.state or not twins.ours.state[twins.our_params[1]]
    assert torch.equal(twins.our_params[1], torch.ones(3)), "a parameter without gradient gets no weight decay"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_same_options_as_torch_after_changing_a_group(engine: str) -> None:
    """Options are read from param_groups at every step, as schedulers and users rely on."""
    initial = [torch.randn(5, generator=torch.Generator().manual_seed(0))]
    twins = make_twins(initial, engine=engine, lr=0.1, momentum=0.9)
    grads = seeded_grads(initial, 6, seed=9)
    for t, g in enumerate(grads):
        for opt in (twins.ours, twins.theirs):
            opt.param_groups[0]["lr"] = 0.1 / (t + 1)
            opt.param_groups[0]["momentum"] = 0.0 if t == 3 else 0.8
            opt.param_groups[0]["maximize"] = t == 4
        twins.step(g)
        twins.assert_match()


# ---------------------------------------------------------------------------------------------------------
# Complex parameters and sparse gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", COMPLEX_DTYPES, ids=str)
@pytest.mark.parametrize("engine", ["reference", "foreach", "default"])
def test_complex_100_steps(engine: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    initial = [
        random_tensor((4, 4), dtype, generator),
        random_tensor((67,), dtype, generator),
        random_tensor((), dtype, generator),
    ]
    run_twins(
        initial,
        seeded_grads(initial, 100, seed=1, scale=0.1),
        engine=engine,
        check_every_step=False,
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.01,
        maximize=True,
    )


@pytest.mark.parametrize("dtype", COMPLEX_DTYPES, ids=str)
def test_complex_moves_like_its_real_view(dtype: torch.dtype) -> None:
    """torch's documented contract: a complex parameter moves like its view_as_real twin. torch itself holds
    it only to rounding (complex arithmetic rounds differently), so: bitwise torch on the complex parameter,
    and as close to the real view as torch is."""
    generator = torch.Generator().manual_seed(0)
    z = random_tensor((3, 2), dtype, generator)
    twins = make_twins([z], lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1)
    r = torch.view_as_real(z.clone()).clone()
    real_view = torch.optim.SGD([r], lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.1, foreach=False)
    for g in seeded_grads([z], 5, seed=3):
        twins.step(g)
        r.grad = torch.view_as_real(g[0]).clone()
        real_view.step()
    twins.assert_match()
    ours = torch.view_as_real(twins.our_params[0])
    torch.testing.assert_close(ours, r)
    torch_gap = (torch.view_as_real(twins.their_params[0]) - r).abs().max()
    assert (ours - r).abs().max() <= torch_gap


def sparse_grad(shape: tuple[int, int], rows: list[int], seed: int, dtype=torch.float32) -> torch.Tensor:
    values = random_tensor((len(rows), shape[1]), dtype, torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_sparse_gradients(engine: str, momentum: float) -> None:
    """Sparse gradients (an embedding's): with momentum the buffer is sparse, as torch keeps it."""
    initial = [
        torch.randn(6, 3, generator=torch.Generator().manual_seed(0)),
        torch.randn(4, generator=torch.Generator().manual_seed(1)),
    ]
    rows = [[0, 2], [2, 2, 5], [1], [4, 0]]  # the second has a duplicate index: uncoalesced
    grads = [
        [sparse_grad((6, 3), r, seed=t), random_tensor((4,), torch.float32, torch.Generator().manual_seed(t))]
        for t, r in enumerate(rows)
    ]
    kwargs = dict(lr=0.1, momentum=momentum, dampening=0.1 if momentum else 0.0, maximize=True)
    if engine == "fused":
        error = capture_error(lambda: run_twins(initial, grads, engine=engine, **kwargs))
        if error is not None:  # allowed only as torch's fused refusal
            assert_same_error(lambda: _raise(error), lambda: _torch_sparse_fused(initial, grads, kwargs))
            return
    twins = run_twins(initial, grads, engine=engine, **kwargs)
    if momentum:
        assert twins.ours.state[twins.our_params[0]]["momentum_buffer"].is_sparse


def _raise(error: BaseException) -> None:
    raise error


def _torch_sparse_fused(initial, grads, kwargs) -> None:
    params = [p.clone() for p in initial]
    opt = torch.optim.SGD(params, **kwargs, fused=True)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("engine", ["reference", "foreach", "default"])
def test_sparse_gradient_with_weight_decay_raises_like_torch(engine: str, momentum: float) -> None:
    def attempt(optimizer_class, **flags):
        p = torch.randn(6, 3)
        opt = optimizer_class([p], lr=0.1, momentum=momentum, weight_decay=0.1, **flags)
        p.grad = sparse_grad((6, 3), [1, 3], seed=0)
        opt.step()

    error = assert_same_error(
        lambda: attempt(torchsgd.SGD, **ENGINES[engine]), lambda: attempt(torch.optim.SGD, foreach=False)
    )
    assert "add(sparse, dense) is not supported" in str(error)


@pytest.mark.parametrize("hyper", ["lr", "weight_decay"])
@pytest.mark.parametrize(("engine", "dtype"), engine_dtype_cases(dtypes=(torch.float32, torch.float64)))
def test_tensor_hyperparameter_that_requires_grad_outside_differentiable_mode(
    engine: str, dtype: torch.dtype, hyper: str
) -> None:
    """A learnable lr or weight_decay Tensor (requires_grad) with differentiable=False: nothing is recorded
    and the numbers are torch's. (torch adds weight decay into p.grad in place on this path, so only the
    parameters and buffers are compared; for fp16/bf16 torch also rounds such an lr to the parameter's
    dtype, which torchsgd does not copy.)"""
    generator = torch.Generator().manual_seed(0)
    initial = [random_tensor((67,), dtype, generator), random_tensor((4, 4), dtype, generator)]
    options = {"lr": 0.1, "momentum": 0.9, "nesterov": True, hyper: torch.tensor(0.1 if hyper == "lr" else 0.05)}
    twins = make_twins(initial, engine=engine, **options)
    for opt in (twins.ours, twins.theirs):
        opt.param_groups[0][hyper].requires_grad_(True)
    for t, grads in enumerate(seeded_grads(initial, 5, seed=1)):
        twins.set_grads(grads)
        twins.ours.step()
        twins.theirs.step()
        assert_optimizers_match(
            twins.ours, twins.theirs, twins.our_params, twins.their_params, engine=engine, what=f"step {t}: "
        )
        assert all(p.grad_fn is None for p in twins.our_params), "the step recorded autograd history"
