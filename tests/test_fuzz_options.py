"""Fuzzed parity for what torch lacks: every engine against the reference engine, option by option.

torch has no oracle for SGDW, clipping inside the step, the non-finite guard, low-precision momentum,
stochastic rounding, the step inside backward, LARS or schedule-free SGD. The reference engine
(``foreach=False``) is the oracle here; it is itself held to hand-written formulas and to independent
packages in test_features.py and test_precision.py. Each drawn scenario runs the reference and, on the very
same parameters and gradients, every other way of running the optimizer:

- ``foreach`` (``foreach=True``), ``fused`` (``fused=True``) and ``default`` (no flags: the fused engine);
- ``in-backward``: ``step_in_backward=True`` on an engine drawn among the four (where the options allow
  it: no clipping, no guard), its gradients made by ``backward()`` of a loss whose gradient is exactly the
  drawn one.

The sweeps draw dtype × shape × memory layout × options × engine × number of param groups × steps, with
gradients that are None on some steps, all zeros, or (occasionally) hold NaN or ±inf. After every step the
parameters, the momentum buffers (values and dtype), the state keys, ``skipped_steps``, ``rounding_step``
and ``last_grad_norm`` must equal the reference's: bitwise, except the fused engine (``fused``, ``default``
and ``in-backward`` on it) on float16/bfloat16 parameters without ``momentum_dtype`` or
``stochastic_rounding``, which is held to helpers.ENGINE_BOUNDS per step (then restarted from the
reference's numbers, as the parity suite does). With ``momentum_dtype`` or ``stochastic_rounding`` the
arithmetic is lifted to float32 and rounded once on every engine: bitwise everywhere. (An earlier gap of
the fused engine, clipping a 0-d parameter next to float64 ones, is closed and pinned in test_hardening.py.)

``make fuzz`` runs these with the long profile; CI runs the derandomized profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from torch import Tensor

import torchsgd
from helpers import (
    ENGINE_BOUNDS,
    ENGINES,
    LOW_PRECISION_DTYPES,
    REAL_DTYPES,
    assert_same_as_reference,
    clone_options,
    param_values,
    random_tensor,
    with_layout,
)
from helpers import take_step as shared_take_step

SHAPES = [(), (0,), (1,), (3,), (7,), (64,), (67,), (4, 4), (3, 5), (2, 3, 4), (2, 0, 3)]
LAYOUTS = ["contiguous", "contiguous", "transposed", "strided"]
VARIANTS = ("foreach", "fused", "default", "in-backward")
MOMENTUM_DTYPES = [None, None, None, torch.bfloat16, torch.float16, torch.float32, torch.float64]


# ---------------------------------------------------------------------------------------------------------
# Scenarios: SGD, SGDW and LARS with torchsgd's options
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Scenario:
    kind: str  # "SGD", "SGDW" or "LARS"
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    layouts: list[str]
    grads: list[list[str]]  # per step, per parameter: "value", "none", "zeros", "nan", "inf" or "-inf"
    defaults: dict[str, Any]
    groups: list[tuple[list[int], dict[str, Any]]]  # the first group inherits the defaults
    extras: dict[str, Any]  # max_grad_norm, skip_nonfinite, momentum_dtype, stochastic_rounding, seed
    in_backward_engine: str
    seed: int
    variants: list[str] = field(default_factory=list)

    @property
    def lifted(self) -> bool:
        return self.extras.get("momentum_dtype") is not None or bool(self.extras.get("stochastic_rounding"))


def scalar_option(draw: st.DrawFn, name: str, values: list[float], tensor_ok: bool = True) -> Any:
    value = draw(st.sampled_from(values), label=name)
    if tensor_ok and draw(st.integers(0, 4), label=f"{name} as a 0-d Tensor") == 0:
        return torch.tensor(value)
    return value


def group_options(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """A full set of options for one group (every key given, so validity never depends on inheritance)."""
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9, 0.9]), label="momentum")
    dampening = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]), label="dampening") if momentum else 0.0
    options: dict[str, Any] = {
        "lr": scalar_option(draw, "lr", [0.0, 0.01, 0.1, 0.5]),
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": scalar_option(draw, "weight_decay", [0.0, 0.0, 1e-3, 0.1]),
        "nesterov": bool(momentum and dampening == 0 and draw(st.booleans(), label="nesterov")),
        "maximize": draw(st.booleans(), label="maximize"),
    }
    if kind == "LARS":
        options["trust_coefficient"] = draw(st.sampled_from([1e-3, 0.02, 1.0]), label="trust_coefficient")
        options["eps"] = draw(st.sampled_from([0.0, 1e-8, 1e-3]), label="eps")
        options["trust_clip"] = draw(st.booleans(), label="trust_clip")
        options["exclude_1d"] = draw(st.booleans(), label="exclude_1d")
    else:
        options["decoupled_weight_decay"] = draw(st.booleans(), label="decoupled_weight_decay")
        if kind == "SGDW":
            options.pop("decoupled_weight_decay")  # SGDW's default (True) when absent
    return options


@st.composite
def scenarios(draw: st.DrawFn, *, max_params: int = 4, max_steps: int = 6) -> Scenario:
    kind = draw(st.sampled_from(["SGD", "SGD", "SGDW", "LARS"]), label="optimizer")
    dtype_pool = draw(st.lists(st.sampled_from(REAL_DTYPES), min_size=1, max_size=2, unique=True), label="dtypes")
    n_params = draw(st.integers(1, max_params), label="params")
    shapes = [draw(st.sampled_from(SHAPES), label="shape") for _ in range(n_params)]
    dtypes = [draw(st.sampled_from(dtype_pool), label="dtype") for _ in range(n_params)]
    layouts = [draw(st.sampled_from(LAYOUTS), label="layout") for _ in range(n_params)]

    extras: dict[str, Any] = {}
    if draw(st.integers(0, 2), label="clip") == 0:
        extras["max_grad_norm"] = draw(st.sampled_from([0.01, 1.0, 100.0]), label="max_grad_norm")
    if draw(st.booleans(), label="skip_nonfinite"):
        extras["skip_nonfinite"] = True
    momentum_dtype = draw(st.sampled_from(MOMENTUM_DTYPES), label="momentum_dtype")
    if momentum_dtype is not None:
        extras["momentum_dtype"] = momentum_dtype
    if draw(st.integers(0, 2), label="stochastic_rounding") == 0:
        extras["stochastic_rounding"] = True
        extras["seed"] = draw(st.integers(0, 2**63 - 1), label="rounding seed")

    steps = draw(st.integers(1, max_steps), label="steps")
    # Non-finite gradients in about a third of the scenarios (half of those with the guard), then on
    # about one gradient in eight: enough to skip steps and poison state, not so many that all is NaN.
    poisoned = draw(st.integers(0, 3 if not extras.get("skip_nonfinite") else 1), label="non-finite gradients") == 0
    kinds = ["value"] * 6 + ["none", "zeros"]
    grads = []
    for _ in range(steps):
        row = []
        for _ in range(n_params):
            if poisoned and draw(st.integers(0, 7), label="poison this gradient") == 0:
                row.append(draw(st.sampled_from(["nan", "inf", "-inf"]), label="non-finite"))
            else:
                row.append(draw(st.sampled_from(kinds), label="gradient"))
        grads.append(row)

    defaults = group_options(draw, kind)
    if n_params > 1 and draw(st.booleans(), label="several groups"):
        labels = draw(st.lists(st.integers(0, 2), min_size=n_params, max_size=n_params), label="group of each param")
        indices = [[i for i, label in enumerate(labels) if label == g] for g in sorted(set(labels))]
        groups = [(indices[0], {})] + [(ix, group_options(draw, kind)) for ix in indices[1:]]
    else:
        groups = [(list(range(n_params)), {})]

    scenario = Scenario(
        kind,
        shapes,
        dtypes,
        layouts,
        grads,
        defaults,
        groups,
        extras,
        in_backward_engine=draw(st.sampled_from(list(ENGINES)), label="engine under step_in_backward"),
        seed=draw(st.integers(0, 2**16), label="seed"),
    )
    in_backward_ok = (
        "max_grad_norm" not in extras
        and not extras.get("skip_nonfinite")
        and all(any(kind != "none" for kind in row) for row in grads)  # one rounding step per backward
    )
    scenario.variants = [v for v in VARIANTS if v != "in-backward" or in_backward_ok]
    return scenario


# ---------------------------------------------------------------------------------------------------------
# Running a scenario
# ---------------------------------------------------------------------------------------------------------
def step_gradients(scenario: Scenario, step: int) -> list[Tensor | None]:
    generator = torch.Generator().manual_seed(scenario.seed * 1000 + step + 1)
    grads: list[Tensor | None] = []
    for shape, dtype, kind in zip(scenario.shapes, scenario.dtypes, scenario.grads[step]):
        values = random_tensor(shape, dtype, generator)
        if kind == "none":
            grads.append(None)
            continue
        if kind == "zeros":
            values = torch.zeros_like(values)
        elif kind != "value" and values.numel():
            position = int(torch.randint(values.numel(), (), generator=generator))
            values.view(-1)[position] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
        grads.append(values)
    return grads


@dataclass
class Run:
    name: str
    engine: str  # the engine whose bound applies (helpers.ENGINE_BOUNDS)
    optimizer: torch.optim.Optimizer
    params: list[Tensor]
    in_backward: bool = False


OPTIMIZERS = {"SGD": torchsgd.SGD, "SGDW": torchsgd.SGDW, "LARS": torchsgd.LARS}


def build(scenario: Scenario, variant: str) -> Run:
    generator = torch.Generator().manual_seed(scenario.seed)
    params = [random_tensor(s, d, generator) for s, d in zip(scenario.shapes, scenario.dtypes)]
    in_backward = variant == "in-backward"
    engine = scenario.in_backward_engine if in_backward else variant
    if in_backward:
        for p in params:
            p.requires_grad_(True)
    groups = [{"params": [params[i] for i in ix], **clone_options(options)} for ix, options in scenario.groups]
    extras = dict(scenario.extras)
    if in_backward:
        extras["step_in_backward"] = True
    optimizer = OPTIMIZERS[scenario.kind](groups, **clone_options(scenario.defaults), **extras, **ENGINES[engine])
    return Run(variant, engine, optimizer, params, in_backward)


def take_step(run: Run, grads: list[Tensor | None], layouts: list[str]) -> None:
    """helpers.take_step with each gradient in its drawn memory layout (in backward: the hooks see the
    gradient autograd makes, whatever the layout)."""
    laid_out = [None if g is None else with_layout(g, layout) for g, layout in zip(grads, layouts)]
    shared_take_step(run.optimizer, run.params, laid_out)


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def operand_scales(ref: Run, grads: list[Tensor | None], before: list, after: list) -> list:
    """Per parameter, the elementwise operand scale of its step (float64), for the bounded comparisons.

    The bound is in ulps at the scale of the step's operands, not of its result (which may cancel to
    near zero): the direction d = t·(c·g + λ·θ) (clip coefficient c, LARS trust ratio t, coupled decay λ;
    written out here in float64), the buffer before and after (μ·b + (1 − τ)·d), and the parameter before
    and its change (θ − γ·(d + μ·b) or θ − γ·b).
    """
    opt = ref.optimizer
    clip = 1.0
    if opt.max_grad_norm is not None and opt.last_grad_norm is not None:
        norm = float(opt.last_grad_norm)
        clip = min(opt.max_grad_norm / (norm + 1e-6), 1.0) if math.isfinite(norm) else 1.0
    group_of = {id(p): group for group in opt.param_groups for p in group["params"]}
    scales = []
    for p, g, (p0, b0), (p1, b1) in zip(ref.params, grads, before, after):
        if g is None:
            scales.append((None, None))
            continue
        group = group_of[id(p)]
        lr, decay = _as_float(group["lr"]), _as_float(group["weight_decay"])
        theta, grad = p0.double(), g.double() * clip
        trust = 1.0
        if isinstance(opt, torchsgd.LARS):
            if p.ndim <= 1 and group["exclude_1d"]:
                decay = 0.0  # LARS leaves these out of decay and adaptation
            else:
                w, n = theta.norm().item(), grad.norm().item()
                if w > 0 and n > 0 and math.isfinite(w) and math.isfinite(n):
                    trust = group["trust_coefficient"] * w / (n + decay * w + group["eps"])
                    trust = min(trust / lr, 1.0) if group["trust_clip"] and lr > 0 else trust
        coupled = 0.0 if group.get("decoupled_weight_decay") else decay
        direction = trust * torch.maximum(grad.abs(), (coupled * theta).abs())
        buffer = direction
        for b in (b0, b1):
            if b is not None:
                buffer = torch.maximum(buffer, b.double().abs())
        param = torch.maximum(theta.abs(), (p1.double() - theta).abs())
        param = torch.maximum(param, lr * (1 + _as_float(group["momentum"])) * buffer)
        scales.append((param, buffer if b1 is not None else None))
    return scales


def assert_run_matches(run: Run, ref: Run, scenario: Scenario, step: int, scales: list | None) -> bool:
    """Compare ``run`` with the reference after ``step``; return whether to restart it from the reference
    (a bound, not bitwise, was used)."""
    label = f"{run.name} ({run.engine} engine), step {step}: "
    bounded = False
    for i, (p, q) in enumerate(zip(run.params, ref.params)):
        bound = 0 if scenario.lifted else ENGINE_BOUNDS.get((run.engine, q.dtype), 0)
        bounded |= bound > 0

        def check(actual: Tensor, expected: Tensor, what: str, scale: Tensor | None) -> None:
            # bitwise, or ENGINE_BOUNDS' bound where it applies
            assert_same_as_reference(
                actual.detach(),
                expected,
                engine=run.engine if bound else "reference",
                dtype=expected.dtype,
                what=what,
                scale=scale,
            )

        scale_p, scale_b = scales[i] if scales else (None, None)
        check(p, q, f"{label}param {i}", scale_p)
        ours, theirs = run.optimizer.state.get(p, {}), ref.optimizer.state.get(q, {})
        assert set(ours) == set(theirs), f"{label}param {i}: state keys {set(ours)} != reference's {set(theirs)}"
        if theirs.get("momentum_buffer") is not None:
            b, c = ours["momentum_buffer"], theirs["momentum_buffer"]
            assert isinstance(b, Tensor), f"{label}momentum_buffer {i} is {b!r}"
            assert b.dtype == c.dtype, f"{label}momentum_buffer {i}: dtype {b.dtype} != reference's {c.dtype}"
            check(b, c, f"{label}momentum_buffer {i}", scale_b)
    ours, theirs = run.optimizer, ref.optimizer
    assert ours.skipped_steps == theirs.skipped_steps, (
        f"{label}skipped_steps {ours.skipped_steps} != {theirs.skipped_steps}"
    )
    assert ours.rounding_step == theirs.rounding_step, (
        f"{label}rounding_step {ours.rounding_step} != {theirs.rounding_step}"
    )
    if theirs.last_grad_norm is None:
        assert ours.last_grad_norm is None, f"{label}last_grad_norm is set, the reference's is None"
    else:
        assert_same_as_reference(
            ours.last_grad_norm,
            theirs.last_grad_norm,
            engine="reference",
            dtype=theirs.last_grad_norm.dtype,
            what=f"{label}last_grad_norm",
        )
    return bounded


def resync(run: Run, ref: Run) -> None:
    """Restart ``run`` from the reference's numbers (after a step checked against a bound)."""
    with torch.no_grad():
        for p, q in zip(run.params, ref.params):
            p.copy_(q)
            theirs = ref.optimizer.state.get(q, {}).get("momentum_buffer")
            if theirs is not None:
                run.optimizer.state[p]["momentum_buffer"].copy_(theirs)


def run_scenario(scenario: Scenario, *, in_hypothesis: bool = True) -> None:
    if in_hypothesis:
        note(repr(scenario))
        for feature in describe(scenario):
            event(feature)
    # backward() makes gradients laid out like their parameters (contiguous here), and torch's own
    # arithmetic depends on the layout (float16 adds, the norms of LARS and clipping round differently on
    # strided memory): the in-backward variant is compared with a reference fed contiguous gradients.
    contiguous = ["contiguous"] * len(scenario.layouts)
    references = {"drawn": (build(scenario, "reference"), scenario.layouts)}
    if "in-backward" in scenario.variants and scenario.layouts != contiguous:
        references["contiguous"] = (build(scenario, "reference"), contiguous)
    runs = [
        (build(scenario, v), "contiguous" if v == "in-backward" and "contiguous" in references else "drawn")
        for v in scenario.variants
    ]
    for ref, _ in references.values():
        assert ref.optimizer.param_groups[0]["foreach"] is False
    for step in range(len(scenario.grads)):
        grads = step_gradients(scenario, step)
        scales = {}
        for name, (ref, layouts) in references.items():
            before = param_values(ref.optimizer, ref.params)
            take_step(ref, grads, layouts)
            after = param_values(ref.optimizer, ref.params)
            scales[name] = operand_scales(ref, grads, before, after)
        for run, against in runs:
            ref, layouts = references[against]
            take_step(run, grads, layouts)
            if assert_run_matches(run, ref, scenario, step, scales[against]):
                resync(run, ref)
    ref = references["drawn"][0]
    if in_hypothesis and ref.optimizer.skipped_steps:
        event("a step was skipped (non-finite gradient)")


def describe(scenario: Scenario) -> list[str]:
    """Labels for hypothesis' statistics (--hypothesis-show-statistics): what the sweep covered."""
    features = [f"optimizer {scenario.kind}", f"{len(scenario.groups)} param group(s)"]
    features += [f"option {name}" for name in scenario.extras if name != "seed"]
    if "in-backward" in scenario.variants:
        features.append("variant in-backward")
    if any(kind in ("nan", "inf", "-inf") for row in scenario.grads for kind in row):
        features.append("a non-finite gradient")
    if not scenario.lifted and any(d in LOW_PRECISION_DTYPES for d in scenario.dtypes):
        features.append("fused engine held to its float16/bfloat16 bound")
    return features


# The main sweep: 5x the profile's examples (each runs the reference and up to four other variants).
@settings(max_examples=5 * settings.default.max_examples)
@given(scenario=scenarios())
def test_fuzz_options_every_engine_equals_the_reference(scenario: Scenario) -> None:
    run_scenario(scenario)


@settings(max_examples=3 * settings.default.max_examples)
@given(scenario=scenarios(max_params=3, max_steps=4), dtype=st.sampled_from(LOW_PRECISION_DTYPES))
def test_fuzz_options_low_precision(scenario: Scenario, dtype: torch.dtype) -> None:
    """float16/bfloat16 only, where the engines differ most (the fused engine's own arithmetic)."""
    scenario.dtypes = [dtype] * len(scenario.dtypes)
    run_scenario(scenario)


# ---------------------------------------------------------------------------------------------------------
# Schedule-free SGD: foreach=True and the default against foreach=False
# ---------------------------------------------------------------------------------------------------------
@dataclass
class FreeScenario:
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    groups: list[tuple[list[int], dict[str, Any]]]
    defaults: dict[str, Any]
    schedule: list[tuple[list[str], bool]]  # per step: gradient kinds, and whether to eval()/train() after
    seed: int


def free_options(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "lr": draw(st.sampled_from([0.0, 0.1, 1.0, 5.0]), label="lr"),
        "momentum": draw(st.sampled_from([0.1, 0.5, 0.9, 0.99]), label="momentum"),
        "weight_decay": draw(st.sampled_from([0.0, 0.0, 1e-3, 0.1]), label="weight_decay"),
        "warmup_steps": draw(st.sampled_from([0, 0, 1, 3]), label="warmup_steps"),
        "r": draw(st.sampled_from([0.0, 0.0, 1.0]), label="r"),
        "weight_lr_power": draw(st.sampled_from([2.0, 2.0, 0.0, 1.0]), label="weight_lr_power"),
    }


@st.composite
def free_scenarios(draw: st.DrawFn) -> FreeScenario:
    dtype_pool = draw(st.lists(st.sampled_from(REAL_DTYPES), min_size=1, max_size=2, unique=True), label="dtypes")
    n_params = draw(st.integers(1, 4), label="params")
    shapes = [draw(st.sampled_from(SHAPES), label="shape") for _ in range(n_params)]
    dtypes = [draw(st.sampled_from(dtype_pool), label="dtype") for _ in range(n_params)]
    defaults = free_options(draw)
    if n_params > 1 and draw(st.booleans(), label="several groups"):
        labels = draw(st.lists(st.integers(0, 1), min_size=n_params, max_size=n_params), label="group of each param")
        indices = [[i for i, label in enumerate(labels) if label == g] for g in sorted(set(labels))]
        groups = [(indices[0], {})] + [(ix, free_options(draw)) for ix in indices[1:]]
    else:
        groups = [(list(range(n_params)), {})]
    schedule = []
    for _ in range(draw(st.integers(1, 6), label="steps")):
        kinds = [draw(st.sampled_from(["value"] * 6 + ["none", "zeros"]), label="gradient") for _ in range(n_params)]
        schedule.append((kinds, draw(st.integers(0, 2), label="eval and train after") == 0))
    return FreeScenario(shapes, dtypes, groups, defaults, schedule, draw(st.integers(0, 2**16), label="seed"))


def build_free(scenario: FreeScenario, foreach: bool | None) -> tuple[torchsgd.ScheduleFreeSGD, list[Tensor]]:
    generator = torch.Generator().manual_seed(scenario.seed)
    params = [random_tensor(s, d, generator) for s, d in zip(scenario.shapes, scenario.dtypes)]
    groups = [{"params": [params[i] for i in ix], **options} for ix, options in scenario.groups]
    return torchsgd.ScheduleFreeSGD(groups, **scenario.defaults, foreach=foreach), params


@settings(max_examples=2 * settings.default.max_examples)
@given(scenario=free_scenarios())
def test_fuzz_options_schedule_free_engines_equal_the_reference(scenario: FreeScenario) -> None:
    note(repr(scenario))
    ref, ref_params = build_free(scenario, foreach=False)
    others = {name: build_free(scenario, foreach) for name, foreach in (("foreach", True), ("default", None))}
    optimizers = [(ref, ref_params), *others.values()]
    for opt, _ in optimizers:
        opt.train()
    for step, (kinds, toggle) in enumerate(scenario.schedule):
        generator = torch.Generator().manual_seed(scenario.seed * 1000 + step + 1)
        grads = [
            None if kind == "none" else random_tensor(s, d, generator) * (kind == "value")
            for s, d, kind in zip(scenario.shapes, scenario.dtypes, kinds)
        ]
        for opt, params in optimizers:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            opt.step()
            if toggle:
                opt.eval()
        for name, (opt, params) in others.items():
            label = f"{name}, step {step}{' (eval)' if toggle else ''}: "
            for i, (p, q) in enumerate(zip(params, ref_params)):
                assert_same_as_reference(p, q, engine="reference", dtype=q.dtype, what=f"{label}param {i}")
                ours, theirs = opt.state.get(p, {}), ref.state.get(q, {})
                assert set(ours) == set(theirs), f"{label}param {i}: state keys {set(ours)} != {set(theirs)}"
                if "z" in theirs:
                    assert_same_as_reference(
                        ours["z"], theirs["z"], engine="reference", dtype=q.dtype, what=f"{label}z {i}"
                    )
            for g, h in zip(opt.param_groups, ref.param_groups):
                for key in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode"):
                    assert g[key] == h[key], f"{label}group {key}: {g[key]!r} != {h[key]!r}"
        if toggle:
            for opt, _ in optimizers:
                opt.train()


def test_fuzz_options_variants_include_every_engine() -> None:
    """The sweep above is no sweep if a variant silently drops out: each one is built and steps."""
    scenario = Scenario(
        "SGD",
        [(4,)],
        [torch.float32],
        ["contiguous"],
        [["value"], ["value"]],
        {"lr": 0.1, "momentum": 0.9},
        [([0], {})],
        {"momentum_dtype": torch.bfloat16},
        in_backward_engine="fused",
        seed=1,
        variants=list(VARIANTS),
    )
    run_scenario(scenario, in_hypothesis=False)
    runs = {v: build(scenario, v) for v in VARIANTS}
    assert runs["in-backward"].optimizer.step_in_backward
    assert runs["foreach"].optimizer.param_groups[0]["foreach"] is True
    assert runs["fused"].optimizer.param_groups[0]["fused"] is True


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fuzz_options_detects_a_wrong_engine(momentum: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: an engine that rounds one element differently is caught."""
    from torchsgd.engines import FOREACH

    original = FOREACH.step

    def off_by_one_ulp(params, grads, buffers, hyper, trust=None):
        original(params, grads, buffers, hyper, trust)
        with torch.no_grad():
            for p in params:
                if p.numel():
                    flat = p.view(-1)
                    flat[0] = torch.nextafter(flat[0], torch.tensor(float("inf"), dtype=p.dtype))

    monkeypatch.setattr(FOREACH, "step", off_by_one_ulp)
    scenario = Scenario(
        "SGD",
        [(5,)],
        [torch.float32],
        ["contiguous"],
        [["value"]],
        {"lr": 0.1, "momentum": momentum},
        [([0], {})],
        {},
        in_backward_engine="fused",
        seed=2,
        variants=["foreach"],
    )
    with pytest.raises(AssertionError, match="not bitwise"):
        run_scenario(scenario, in_hypothesis=False)
