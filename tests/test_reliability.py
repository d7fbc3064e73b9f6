"""Reliability, second round: inputs that used to crash, race or be silently ignored.

Each test pins one reported failure: parameters whose memory overlaps (the kernel raced), optimizer-wide
options in a param group (accepted and ignored), finite gradients whose norm overflows (skipped as NaN),
step_in_backward where its semantics change training, errors that named nothing, and two contracts of
torch's own optimizer suite (fused=True on the meta device; engine flags mixed between group and defaults).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchsgd
from helpers import ENGINES

# --------------------------------------------------------------------------------------------------------
# Parameters that share memory: torch's loop, in order, on every engine and any thread count
# --------------------------------------------------------------------------------------------------------


def aliased_params(storage: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(storage[start : start + length]) for start, length in spans]


def run_aliased(
    optimizer: type, spans: list[tuple[int, int]], size: int, dtype: torch.dtype, options: dict, steps: int, seed: int
) -> tuple[torch.Tensor, list]:
    generator = torch.Generator().manual_seed(seed)
    storage = torch.randn(size, generator=generator, dtype=torch.float64).to(dtype)
    params = aliased_params(storage, spans)
    opt = optimizer(params, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
        opt.step()
    buffers = [opt.state[p].get("momentum_buffer") for p in params]
    return storage, buffers, opt


OPTIONS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.1, "momentum": 0.5, "dampening": 0.3, "maximize": True},
]


def assert_aliased_matches_torch(spans, size, dtype, options, engine, steps=4, seed=0) -> None:
    ref_storage, ref_buffers, _ = run_aliased(
        torch.optim.SGD, spans, size, dtype, {**options, "foreach": False}, steps, seed
    )
    storage, buffers, opt = run_aliased(torchsgd.SGD, spans, size, dtype, {**options, **ENGINES[engine]}, steps, seed)
    assert torch.equal(storage, ref_storage), f"{engine}: aliased parameters differ from torch's loop"
    for b, ref in zip(buffers, ref_buffers):
        assert (b is None) == (ref is None) and (b is None or torch.equal(b, ref))
    return opt


# Large enough that the kernel splits the storage across threads (its grain is 65,536 elements).
BIG = 300_000


@pytest.mark.parametrize("engine", ["default", "fused", "foreach"])
@pytest.mark.parametrize(
    "spans",
    [
        [(0, BIG), (0, BIG)],  # two Parameters, the same view
        [(0, 200_000), (100_000, 200_000)],  # overlapping views
        [(100_000, 200_000), (0, 200_000)],  # overlapping, listed in descending address order
        [(0, 1000), (500, 1000), (1400, 50)],  # small and overlapping
    ],
    ids=["same-view", "overlap", "overlap-descending", "small"],
)
def test_overlapping_parameters_run_torchs_loop(engine: str, spans) -> None:
    opt = assert_aliased_matches_torch(spans, BIG, torch.float32, OPTIONS[2], engine)
    report = opt.engine_report()[0]
    assert report["ran"] == "reference" and "share memory" in report["reason"]


@pytest.mark.parametrize("threads", [1, 2])
def test_overlapping_parameters_give_the_same_bits_for_any_thread_count(threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_aliased_matches_torch(
            [(0, 200_000), (100_000, 200_000)], BIG, torch.float32, OPTIONS[1], "default", steps=6
        )
    finally:
        torch.set_num_threads(previous)


def test_disjoint_views_of_one_storage_stay_on_the_kernel() -> None:
    """Views that share a storage but not a byte are fine for the parallel loop (DDP-style flat buffers)."""
    opt = assert_aliased_matches_torch([(0, 1000), (1000, 1000), (3000, 5)], 4000, torch.float32, OPTIONS[2], "default")
    assert opt.engine_report()[0] == {"group": 0, "selected": "fused", "ran": "fused", "reason": None}


def test_overlap_is_checked_for_large_groups_in_any_order() -> None:
    """Over 64 parameters (where the old check compared addresses only) and out of address order."""
    spans = [(k * 100, 100) for k in range(100)]
    spans.reverse()
    spans.append((4_950, 100))  # straddles two of the others
    opt = assert_aliased_matches_torch(spans, 10_100, torch.float32, OPTIONS[1], "default")
    assert opt.engine_report()[0]["ran"] == "reference"
    disjoint = [(k * 100, 100) for k in reversed(range(100))]
    opt = assert_aliased_matches_torch(disjoint, 10_000, torch.float32, OPTIONS[1], "default")
    assert opt.engine_report()[0]["ran"] == "fused"


@st.composite
def alias_layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    big = draw(st.booleans(), label="split across threads")
    size = draw(st.sampled_from([200_000, 150_001])) if big else draw(st.integers(2, 300))
    n = draw(st.integers(2, 5), label="params")
    spans = []
    for _ in range(n):
        length = draw(st.integers(1, size), label="length")
        start = draw(st.integers(0, size - length), label="start")
        spans.append((start, length))
    if draw(st.booleans(), label="a span twice"):
        spans.append(spans[0])
    return spans, size


@settings(max_examples=max(10, settings.default.max_examples // 3))
@given(
    layout=alias_layouts(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    options=st.sampled_from(OPTIONS),
    engine=st.sampled_from(["default", "foreach", "reference"]),
    steps=st.integers(1, 5),
)
def test_fuzz_aliased_parameters_equal_torch(layout, dtype, options, engine, steps) -> None:
    spans, size = layout
    assert_aliased_matches_torch(spans, size, dtype, options, engine, steps=steps)


# --------------------------------------------------------------------------------------------------------
# Optimizer-wide options in a param group: refused, naming the key
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_grad_norm", 1e-3),
        ("skip_nonfinite", True),
        ("momentum_dtype", torch.bfloat16),
        ("stochastic_rounding", True),
        ("seed", 3),
        ("step_in_backward", True),
    ],
)
@pytest.mark.parametrize("optimizer", [torchsgd.SGD, torchsgd.SGDW, torchsgd.LARS])
def test_an_optimizer_wide_option_in_a_group_is_refused(optimizer, key: str, value) -> None:
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=f"param group option '{key}' is an optimizer-wide option"):
        optimizer([{"params": [p], key: value}], lr=0.1, momentum=0.9)
    opt = optimizer([p], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=f"'{key}'"):
        opt.add_param_group({"params": [q], key: value})
    assert len(opt.param_groups) == 1  # nothing changed


# --------------------------------------------------------------------------------------------------------
# The guard skips only non-finite gradients; an overflowing norm of finite ones clips
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, value", [(torch.float16, 60000.0), (torch.float32, 1e20), (torch.bfloat16, 1e30)], ids=str
)
@pytest.mark.parametrize("engine", ["reference", "foreach", "default"])
def test_finite_gradients_whose_norm_overflows_are_clipped_not_skipped(dtype, value, engine) -> None:
    p = torch.nn.Parameter(torch.zeros(1000, dtype=dtype))
    opt = torchsgd.SGD([p], lr=1.0, max_grad_norm=1.0, skip_nonfinite=True, **ENGINES[engine])
    p.grad = torch.full((1000,), value, dtype=dtype)
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad])), "the case must overflow torch's norm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "NaN or Inf" warning
        opt.step()
    assert opt.skipped_steps == 0
    true_norm = float(p.grad[0]) * math.sqrt(1000)  # of the values as stored (bfloat16 rounds 1e30)
    assert float(opt.last_grad_norm) == pytest.approx(true_norm, rel=1e-6)
    # Clipped as torch clips when its norm does not overflow: g times the coefficient in g's dtype (for
    # float16 a subnormal 5.4e-7 here, which is why the update is 1.8% off 1/sqrt(1000)).
    coefficient = torch.tensor(1.0 / (true_norm + 1e-6), dtype=dtype)
    torch.testing.assert_close(p.detach(), -(torch.full((1000,), value, dtype=dtype) * coefficient))
    assert abs(float(p.detach()[0]) * math.sqrt(1000) + 1) < (0.02 if dtype == torch.float16 else 0.01)


def test_non_finite_gradients_are_still_skipped_with_clipping() -> None:
    p = torch.nn.Parameter(torch.zeros(10, dtype=torch.float16))
    opt = torchsgd.SGD([p], lr=1.0, max_grad_norm=1.0, skip_nonfinite=True)
    p.grad = torch.full((10,), 60000.0, dtype=torch.float16)
    p.grad[3] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.zeros(10, dtype=torch.float16))


# --------------------------------------------------------------------------------------------------------
# Errors that name the argument or the state entry
# --------------------------------------------------------------------------------------------------------


def test_an_lr_too_large_for_a_float_names_lr() -> None:
    with pytest.raises(ValueError, match="Invalid lr value: an int of 401 digits"):
        torchsgd.SGD([torch.nn.Parameter(torch.ones(1))], lr=10**400)
    with pytest.raises(ValueError, match="weight_decay"):
        torchsgd.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=10**400)


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_a_seed_the_noise_cannot_use_is_refused(seed: int) -> None:
    with pytest.raises(ValueError, match=r"Invalid seed.*2\*\*64"):
        torchsgd.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, stochastic_rounding=True, seed=seed)


def test_the_largest_seed_is_accepted_and_kept() -> None:
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = torchsgd.SGD([p], lr=0.1, stochastic_rounding=True, seed=2**64 - 1)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.state_dict()["torchsgd"]["seed"] == 2**64 - 1


def trained(momentum: float = 0.9) -> tuple[torchsgd.SGD, torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.ones(4))
    opt = torchsgd.SGD([p], lr=0.1, momentum=momentum)
    p.grad = torch.ones(4)
    opt.step()
    return opt, p


@pytest.mark.parametrize(
    "make_buffer, message",
    [
        (lambda: torch.empty(4, device="meta"), "on the meta device"),
        (lambda: torch.zeros(1).expand(4), "share memory"),
    ],
    ids=["meta", "expanded"],
)
def test_a_buffer_the_step_cannot_use_is_refused_at_load_naming_the_entry(make_buffer, message: str) -> None:
    opt, p = trained()
    state = opt.state_dict()
    before = opt.state[p]["momentum_buffer"].clone()
    state["state"][0] = {"momentum_buffer": make_buffer()}  # a new entry: state_dict() shares the live one
    with pytest.raises(ValueError, match=rf"state\[0\] \(param group 0, parameter 0\): 'momentum_buffer' .*{message}"):
        opt.load_state_dict(state)
    assert torch.equal(opt.state[p]["momentum_buffer"], before)


def test_a_sparse_buffer_with_a_dense_gradient_names_the_entry_before_anything_changes() -> None:
    opt, p = trained()
    other = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [other]})
    state = opt.state_dict()
    state["state"][0] = {"momentum_buffer": torch.ones(4).to_sparse()}
    opt.load_state_dict(state)  # torch keeps sparse buffers for sparse gradients: a valid checkpoint
    p.grad, other.grad = torch.ones(4), torch.ones(2)
    before = [p.detach().clone(), other.detach().clone()]
    with pytest.raises(ValueError, match=r"param group 0, parameter 0: 'momentum_buffer' is sparse"):
        opt.step()
    assert torch.equal(p.detach(), before[0]) and torch.equal(other.detach(), before[1])


def test_sparse_gradients_with_momentum_still_step_like_torch() -> None:
    results = []
    for cls in (torch.optim.SGD, torchsgd.SGD):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = cls(emb.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            emb(torch.tensor([1, 2, 2])).sum().backward()
            opt.step()
        results.append(emb.weight.detach())
    assert torch.equal(*results)


# --------------------------------------------------------------------------------------------------------
# torch's contracts: fused=True on the meta device raises; engine flags mixed between groups and defaults
# --------------------------------------------------------------------------------------------------------


def test_fused_on_the_meta_device_raises_torchs_error() -> None:
    messages = []
    for cls in (torch.optim.SGD, torchsgd.SGD):
        p = torch.nn.Parameter(torch.empty(3, device="meta"))
        p.grad = torch.empty(3, device="meta")
        opt = cls([p], lr=0.1, fused=True)
        with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point") as info:
            opt.step()
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_a_fused_group_added_later_is_checked_too() -> None:
    opt = torchsgd.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, fused=True)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    opt.add_param_group({"params": [p]})
    with pytest.raises(RuntimeError, match="`fused=True` requires"):
        opt.step()


@pytest.mark.parametrize(
    "defaults, group",
    [({"foreach": True}, {"fused": True}), ({"fused": True}, {"foreach": True})],
    ids=["group-fused", "group-foreach"],
)
def test_engine_flags_mixed_between_group_and_defaults_run_what_torch_runs(defaults, group) -> None:
    finals = []
    for cls in (torch.optim.SGD, torchsgd.SGD):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 70))
        opt = cls([{"params": [p], **group}], lr=0.1, momentum=0.9, nesterov=True, **defaults)
        for k in range(3):
            p.grad = torch.linspace(0, 1, 70) * (k + 1)
            opt.step()
        finals.append(p.detach())
        assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (True, True)
    assert torch.equal(*finals)
    assert opt.engine_report()[0]["selected"] == "foreach"  # torch's sgd() takes foreach when both are set


def test_both_engine_flags_in_the_constructor_are_still_refused() -> None:
    with pytest.raises(RuntimeError, match=r"^`fused` and `foreach` cannot be `True` together\.$"):
        torchsgd.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, fused=True, foreach=True)


# --------------------------------------------------------------------------------------------------------
# engine_report: what ran, never mislabelled
# --------------------------------------------------------------------------------------------------------


def test_engine_report_names_what_ran_and_why() -> None:
    cpu = torch.nn.Parameter(torch.ones(8))
    complex_param = torch.nn.Parameter(torch.ones(4, dtype=torch.complex64))
    untouched = torch.nn.Parameter(torch.ones(2))
    opt = torchsgd.SGD(
        [{"params": [cpu]}, {"params": [complex_param]}, {"params": [untouched], "foreach": False}],
        lr=0.1,
        momentum=0.9,
    )
    assert [r["ran"] for r in opt.engine_report()] == [None, None, None]  # nothing stepped yet
    cpu.grad, complex_param.grad = torch.ones(8), torch.ones(4, dtype=torch.complex64)
    opt.step()
    report = opt.engine_report()
    assert report[0] == {"group": 0, "selected": "fused", "ran": "fused", "reason": None}
    assert report[1]["selected"] == "fused" and report[1]["ran"] == "foreach"
    assert report[1]["reason"] == "unsupported or mixed dtypes"
    assert report[2] == {"group": 2, "selected": "reference", "ran": "reference", "reason": None}


def test_engine_report_says_when_the_kernel_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchsgd.engines.fused as fused

    monkeypatch.setattr(fused, "native_module", lambda: None)
    monkeypatch.setattr(fused, "native_failure", lambda: "no C++ compiler found")
    p = torch.nn.Parameter(torch.ones(3))
    opt = torchsgd.SGD([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    report = opt.engine_report()[0]
    assert report["selected"] == "fused" and report["ran"] == "foreach"
    assert report["reason"] == "the native CPU kernel is unavailable (no C++ compiler found)"


# --------------------------------------------------------------------------------------------------------
# step_in_backward: refuse or warn where its semantics would silently change training
# --------------------------------------------------------------------------------------------------------


def in_backward_model() -> tuple[torch.nn.Linear, torchsgd.SGD]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, step_in_backward=True)


def test_a_second_backward_without_a_step_warns_once() -> None:
    model, _opt = in_backward_model()
    x = torch.ones(3, 4)
    model(x).sum().backward()
    with pytest.warns(RuntimeWarning, match=r"second backward\(\) ran without a step\(\).*accumulate\(\)"):
        model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # shown once


def test_backward_then_step_and_accumulate_do_not_warn() -> None:
    model, opt = in_backward_model()
    x = torch.ones(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
        with opt.accumulate():
            model(x).sum().backward()
            model(x).sum().backward()
        model(x).sum().backward()
        opt.step()


def test_a_grad_scaler_gets_torchsgds_message() -> None:
    model, opt = in_backward_model()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(3, 4)).sum()).backward()
    with pytest.raises(RuntimeError, match=r"step_in_backward=True\) cannot be used with a GradScaler"):
        scaler.step(opt)


def test_step_in_backward_reads_the_groups_load_state_dict_put_in_place() -> None:
    """Found under accelerate's prepare() and every framework resume: the hooks kept the replaced dicts."""
    model, opt = in_backward_model()
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.0  # as a scheduler would set it on the loaded group
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.ones(3, 4)).sum().backward()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_schedule_free_loads_a_state_dict_twice() -> None:
    """torch's __setstate__ adds 'differentiable' to the defaults after the first load (HF Trainer loads twice)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torchsgd.ScheduleFreeSGD([p], lr=1.0)
    opt.train()
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    for _ in range(2):
        opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"][0]["k"] == 1
