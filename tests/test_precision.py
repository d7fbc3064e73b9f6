"""Lean training: low-precision momentum, stochastic rounding, and the step fused into backward.

The oracles: a hand-written float32 computation for the lifted arithmetic, statistics for the rounding's
unbiasedness, and the ordinary step (itself held bitwise to torch elsewhere) for step_in_backward.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import torchsgd
from helpers import ENGINES, train
from torchsgd.rules.rounding import stochastic_round, stream_key


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4)).to(dtype)


X = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
Y = torch.arange(32) % 4
DATA = (X, Y)


def loss_of(model):
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.cross_entropy(model(X.to(dtype)).float(), Y)


def same(a, b):
    params = list(zip(a.parameters(), b.parameters()))
    assert all(torch.isfinite(p).all() for p, _ in params), "the run diverged: the comparison would prove nothing"
    return all(torch.equal(p, q) for p, q in params)


# ------------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    x = torch.cat([torch.randn(400, generator=torch.Generator().manual_seed(0)) * 3, torch.tensor([1e-3, -7.25])])
    nearest = x.to(dtype)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf"))).double()
    down = torch.nextafter(nearest, torch.full_like(nearest, -float("inf"))).double()
    lo = torch.where(nearest.double() <= x.double(), nearest.double(), down)
    hi = torch.where(nearest.double() >= x.double(), nearest.double(), up)
    samples = torch.stack([stochastic_round(x, dtype, stream_key(7, step, 0)).double() for step in range(3000)])
    assert ((samples == lo) | (samples == hi)).all()
    # E[round(x)] = x: each element's mean is within 5 standard errors of x (p(hi) = (x - lo) / (hi - lo)).
    p_hi = ((x.double() - lo) / (hi - lo).clamp_min(1e-300)).clamp(0, 1)
    std_err = (hi - lo) * (p_hi * (1 - p_hi) / samples.shape[0]).sqrt()
    assert ((samples.mean(0) - x.double()).abs() <= 5 * std_err + 1e-12).all()
    # round-to-nearest, for contrast, is biased on the same inputs
    assert (nearest.double() - x.double()).abs().mean() > 10 * (samples.mean(0) - x.double()).abs().mean()


def test_stochastic_rounding_is_a_function_of_its_key():
    x = torch.randn(1000)
    assert torch.equal(stochastic_round(x, torch.bfloat16, 11), stochastic_round(x, torch.bfloat16, 11))
    assert not torch.equal(stochastic_round(x, torch.bfloat16, 11), stochastic_round(x, torch.bfloat16, 12))
    special = torch.tensor([float("inf"), -float("inf"), 0.0])
    assert torch.equal(stochastic_round(special, torch.bfloat16, 3), special.bfloat16())
    assert stochastic_round(torch.tensor([float("nan")]), torch.float16, 3).isnan().all()


# ------------------------------------------------------------------ lifted storage: every engine equal

STORAGE_CASES = [
    (torch.float32, dict(momentum_dtype=torch.bfloat16)),
    (torch.float32, dict(momentum_dtype=torch.float16, stochastic_rounding=True)),
    (torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.bfloat16, dict(momentum_dtype=torch.bfloat16, stochastic_rounding=True)),
    (torch.bfloat16, dict(momentum_dtype=torch.float32)),
    (torch.bfloat16, dict(momentum_dtype=torch.bfloat16)),  # lifted, rounded to nearest once
    (torch.float16, dict(stochastic_rounding=True)),
    # float16 rounded to nearest: the kernel's eight-lane F16C path, with every storage next to it
    (torch.float32, dict(momentum_dtype=torch.float16)),
    (torch.float16, dict(momentum_dtype=torch.float32)),
    (torch.bfloat16, dict(momentum_dtype=torch.float16)),
    (torch.float16, dict(momentum_dtype=torch.bfloat16)),
]
OPTIONS = [
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.9, dampening=0.2, maximize=True, decoupled_weight_decay=True, weight_decay=1e-2),
    dict(weight_decay=1e-2),
]


@pytest.mark.parametrize("dtype,storage", STORAGE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("options", OPTIONS, ids=["nesterov", "dampened-decoupled-maximize", "plain"])
def test_every_engine_and_step_in_backward_agree_bitwise(dtype, storage, options):
    models = {}
    for name, flags in {**ENGINES, "in-backward": dict(step_in_backward=True)}.items():
        model = mlp(dtype)
        opt = torchsgd.SGD(model.parameters(), lr=0.05, seed=99, **options, **storage, **flags)
        train(model, opt, 100, DATA)
        models[name] = (model, opt)
    reference, ref_opt = models.pop("reference")
    for name, (model, opt) in models.items():
        assert same(model, reference), name
        for p, q in zip(model.parameters(), reference.parameters()):
            if "momentum_buffer" in ref_opt.state[q]:
                assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"]), name
    if options.get("momentum"):
        buffer = ref_opt.state[next(reference.parameters())]["momentum_buffer"]
        assert buffer.dtype == storage.get("momentum_dtype", dtype)


def _edge_values() -> torch.Tensor:
    """float32 values where rounding to float16/bfloat16 has special cases, 109 of them (eight-lane blocks and
    a remainder): NaN (with a full payload too), infinities, signed zeros, float16's largest finite values
    and the overflow beyond them, its subnormals and values below the smallest one, exact values, and
    ordinary values of both signs. Values whose nearest float16 is a signed zero come 24 at a time, so that
    stochastic rounding picks both neighbours (the one away from zero has the sign of the value)."""
    bits = torch.tensor([0x7FFFFFFF, 0xFFC00001], dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = [
        float("nan"),
        float("inf"),
        -float("inf"),
        0.0,
        -0.0,
        65504.0,
        -65504.0,
        65519.0,
        65520.0,
        -65530.0,
        6e-8,
        -6e-8,
        3e-8,
        -2.9e-8,
        1e-9,
        -1e-9,
        1e-6,
        -3.3e-6,
        0.5,
        -1.0,
        1.0009765625,
        3.4e38,
        -3.4e38,
    ]
    ordinary = torch.randn(36, generator=torch.Generator().manual_seed(4)) * 10.0
    near_zero = torch.cat([torch.full((24,), 2.2e-8), torch.full((24,), -2.9e-8)])
    return torch.cat([bits, torch.tensor(special), ordinary, near_zero])


@pytest.mark.parametrize("momentum_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_edge_values_are_stored_alike_on_every_engine(momentum_dtype, stochastic):
    """The first step stores the gradient itself as the buffer: every engine (the kernel's lanes and its
    element loop among them) rounds each edge value to the same bits. NaN is compared as NaN: torch's own
    bfloat16 conversion writes 0xFFFF in its vector blocks and 0x7FC0 in its scalar tail, the kernel 0x7FC0."""
    stored = {}
    for name, flags in ENGINES.items():
        p = torch.zeros(109, requires_grad=True)
        p.grad = _edge_values()
        opt = torchsgd.SGD(
            [p], lr=0.1, momentum=0.9, momentum_dtype=momentum_dtype, stochastic_rounding=stochastic, seed=5, **flags
        )
        opt.step()
        stored[name] = opt.state[p]["momentum_buffer"]
    expected = stored["reference"]
    for name, buffer in stored.items():
        assert torch.equal(buffer.isnan(), expected.isnan()), name
        kept = ~expected.isnan()
        assert torch.equal(buffer[kept].view(torch.int16), expected[kept].view(torch.int16)), name


# Sizes around the kernel's 32-element bfloat16 blocks, in one group: a block and a remainder, and a tensor of
# 131,075 that torch's two threads split at an offset that is not a multiple of 32 (when it has two).
BF16_SIZES = [1, 31, 32, 33, 95, 131_075]


def _bf16_values(n: int, generator: torch.Generator, specials: list[float]) -> torch.Tensor:
    values = torch.randn(n, generator=generator) * 4.0
    stride = 7 * len(specials) + 1  # odd: each special value lands on even and odd positions, in blocks and tails
    for k, value in enumerate(specials):
        values[7 * k :: stride] = value
    return values.bfloat16()


BF16_PARAM_SPECIALS = [0.0, -0.0, 3.3895e38, -3.3895e38, 9.2e-41, -1.1e-39, 1.0, 1e-38]
BF16_GRAD_SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38, -2.5e38, 4e-40]


@pytest.mark.parametrize(
    "storage",
    [
        dict(stochastic_rounding=True),
        dict(momentum_dtype=torch.bfloat16, stochastic_rounding=True),
        dict(momentum_dtype=torch.bfloat16),
    ],
    ids=["sr", "sr-bf16-momentum", "nearest-bf16-momentum"],
)
@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.9, dampening=0.3, maximize=True, decoupled_weight_decay=True, weight_decay=1e-2),
        dict(weight_decay=1e-2),
        dict(momentum=0.9, max_grad_norm=50.0),
    ],
    ids=["nesterov", "dampened-decoupled-maximize", "no-momentum", "clipped"],
)
def test_bf16_parameters_in_blocks_and_tails_match_the_reference(storage, options):
    """bfloat16 parameters on the lifted path: the kernel runs 32 elements at a time (even and odd elements in
    separate lanes) and the rest one at a time, and each piece of a thread starts its hashes at its own
    offset. Every element, NaN, infinities, signed zeros, overflow past the largest bfloat16 and subnormals
    included, gets the reference engine's bits over four steps (the first creates the buffers)."""
    clipped = "max_grad_norm" in options  # a non-finite gradient would make every clipped value NaN
    results = {}
    for name in ("reference", "fused"):
        generator = torch.Generator().manual_seed(11)
        params = [torch.nn.Parameter(_bf16_values(n, generator, BF16_PARAM_SPECIALS)) for n in BF16_SIZES]
        opt = torchsgd.SGD(params, lr=0.37, seed=3, **storage, **options, **ENGINES[name])
        for _ in range(4):
            for p in params:
                p.grad = _bf16_values(p.numel(), generator, [] if clipped else BF16_GRAD_SPECIALS)
            opt.step()
        buffers = [opt.state[p].get("momentum_buffer") for p in params]
        results[name] = (params, buffers)
    (ref_params, ref_buffers), (params, buffers) = results["reference"], results["fused"]
    assert all(b is None for b in buffers) == ("momentum" not in options)
    for ours, expected in [*zip(params, ref_params), *zip(buffers, ref_buffers)]:
        if expected is None:
            continue
        assert torch.equal(ours.isnan(), expected.isnan())
        kept = ~expected.isnan()
        assert torch.equal(ours.detach()[kept].view(torch.int16), expected.detach()[kept].view(torch.int16))
    assert any(p.isnan().any() for p in ref_params) != clipped  # the NaN gradients reached the parameters


@pytest.mark.parametrize("shift", [1, 16, 33])
def test_bf16_at_torch_rounding_is_the_same_in_every_position(shift):
    """bfloat16 with no precision option (torch's rounding after every operation): the kernel's 32-element
    blocks and its element loop give an element the same bits wherever it sits, so a tensor and its roll
    step to each other's roll."""
    generator = torch.Generator().manual_seed(5)
    data = _bf16_values(4_099, generator, BF16_PARAM_SPECIALS)
    grads = [_bf16_values(4_099, generator, BF16_GRAD_SPECIALS) for _ in range(3)]
    runs = []
    for roll in (0, shift):
        p = torch.nn.Parameter(data.roll(roll))
        opt = torchsgd.SGD([p], lr=0.37, momentum=0.9, nesterov=True, weight_decay=1e-2)
        for grad in grads:
            p.grad = grad.roll(roll)
            opt.step()
        runs.append((p.detach().roll(-roll), opt.state[p]["momentum_buffer"].roll(-roll)))
    for ours, expected in zip(*runs):
        assert torch.equal(ours.isnan(), expected.isnan())
        kept = ~expected.isnan()
        assert torch.equal(ours[kept].view(torch.int16), expected[kept].view(torch.int16))


def test_lifted_arithmetic_is_float32_then_one_rounding():
    """bf16 momentum for fp32 params: the documented formula, written out by hand."""
    torch.manual_seed(0)
    p = torch.randn(300, requires_grad=True)
    expected_p = p.detach().clone()
    opt = torchsgd.SGD(
        [p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, momentum_dtype=torch.bfloat16, foreach=False
    )
    buffer = None
    for _ in range(5):
        g = torch.randn(300)
        p.grad = g.clone()
        opt.step()
        d = g + 0.01 * expected_p
        b32 = d.clone() if buffer is None else buffer.float() * 0.9 + d
        buffer = b32.bfloat16()
        expected_p = expected_p - 0.1 * (d + 0.9 * b32)
    torch.testing.assert_close(p.detach(), expected_p, rtol=1e-6, atol=1e-6)
    assert torch.equal(opt.state[p]["momentum_buffer"], buffer)


def test_bf16_momentum_state_dict_and_torch_checkpoints():
    model, twin = mlp(), mlp()
    opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16)
    train(model, opt, 3, DATA)
    saved = opt.state_dict()
    assert all(s["momentum_buffer"].dtype == torch.bfloat16 for s in saved["state"].values())
    # a torch.optim.SGD checkpoint (float32 buffers) loads and is converted
    torch_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    train(twin, torch_opt, 3, DATA)
    ours = torchsgd.SGD(twin.parameters(), lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16)
    ours.load_state_dict(torch_opt.state_dict())
    for p in twin.parameters():
        assert ours.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.equal(ours.state[p]["momentum_buffer"], torch_opt.state[p]["momentum_buffer"].bfloat16())


def test_seeded_runs_repeat_and_resume_exactly():
    def run(seed, steps, resume_at=None):
        model = mlp(torch.bfloat16)
        opt = torchsgd.SGD(
            model.parameters(),
            lr=0.05,
            momentum=0.9,
            momentum_dtype=torch.bfloat16,
            stochastic_rounding=True,
            seed=seed,
        )
        for step in range(steps):
            if step == resume_at:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
                buffer.seek(0)
                checkpoint = torch.load(buffer, weights_only=True)
                model = mlp(torch.bfloat16, seed=1)  # different init: everything must come from the checkpoint
                model.load_state_dict(checkpoint["model"])
                opt = torchsgd.SGD(
                    model.parameters(),
                    lr=0.05,
                    momentum=0.9,
                    momentum_dtype=torch.bfloat16,
                    stochastic_rounding=True,
                    seed=0,
                )
                opt.load_state_dict(checkpoint["opt"])
            train(model, opt, 1, DATA)
        return model

    a, b = run(5, 20), run(5, 20)
    assert same(a, b)
    assert not same(a, run(6, 20))
    assert same(a, run(5, 20, resume_at=9))


def test_precision_options_are_validated():
    params = mlp().parameters
    with pytest.raises(ValueError, match="Invalid momentum_dtype"):
        torchsgd.SGD(params(), lr=0.1, momentum_dtype=torch.int16)
    with pytest.raises(ValueError, match="Invalid seed"):
        torchsgd.SGD(params(), lr=0.1, stochastic_rounding=True, seed=-1)
    with pytest.raises(TypeError, match="stochastic_rounding must be True or False"):
        torchsgd.SGD(params(), lr=0.1, stochastic_rounding=1)


# ------------------------------------------------------------------------------------ step in backward


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
        dict(momentum=0.9, dampening=0.3, maximize=True),
        dict(weight_decay=1e-2, decoupled_weight_decay=True),
    ],
)
def test_step_in_backward_equals_a_normal_step_with_groups_and_a_scheduler(options):
    def build(step_in_backward):
        model = mlp()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}]
        opt = torchsgd.SGD(groups, lr=0.05, step_in_backward=step_in_backward, **options)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)

    model, opt, sched = build(True)
    ref_model, ref_opt, ref_sched = build(False)
    losses = []
    sign = -1.0 if options.get("maximize") else 1.0
    for _ in range(20):
        opt.zero_grad()
        loss = sign * loss_of(model)
        loss.backward()
        assert all(p.grad is None for p in model.parameters())  # updated and freed inside backward
        losses.append(opt.step(lambda: loss))  # step only returns the closure's loss
        sched.step()
    train(ref_model, ref_opt, 20, DATA, scheduler=ref_sched)
    assert same(model, ref_model)
    assert losses[-1] is not None


def test_step_in_backward_runs_hooks_and_closure():
    model = mlp()
    opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, step_in_backward=True)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and torch.is_tensor(loss)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))  # updated in the closure's backward


def test_gradient_accumulation_under_accumulate():
    model, twin = mlp(), mlp()
    opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, step_in_backward=True)
    ref = torchsgd.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    chunks = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 32, 8)]
    for _ in range(3):
        for k, (x, y) in enumerate(chunks):
            loss = torch.nn.functional.cross_entropy(model(x), y) / len(chunks)
            if k < len(chunks) - 1:
                with opt.accumulate():
                    loss.backward()
                assert model[0].weight.grad is not None
            else:
                loss.backward()  # updates with the accumulated gradient
                opt.step()  # runs the step hooks; without it the next backward warns
        ref.zero_grad()
        for x, y in chunks:
            (torch.nn.functional.cross_entropy(twin(x), y) / len(chunks)).backward()
        ref.step()
    assert same(model, twin)


def test_step_in_backward_refuses_what_needs_every_gradient():
    params = mlp().parameters
    with pytest.raises(ValueError, match="cannot clip by the global norm"):
        torchsgd.SGD(params(), lr=0.1, step_in_backward=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="cannot skip non-finite steps"):
        torchsgd.SGD(params(), lr=0.1, step_in_backward=True, skip_nonfinite=True)
    with pytest.raises(ValueError, match="does not support differentiable"):
        torchsgd.SGD(params(), lr=0.1, step_in_backward=True, differentiable=True)
    model = mlp()
    opt = torchsgd.SGD(model.parameters(), lr=0.1, step_in_backward=True)
    opt.grad_scale = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()


def test_step_in_backward_survives_deepcopy_and_can_be_detached():
    model = mlp()
    opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, step_in_backward=True)
    train(model, opt, 2, DATA)
    copied = copy.deepcopy({"model": model, "opt": opt})
    new_model, new_opt = copied["model"], copied["opt"]
    assert new_opt.param_groups[0]["params"][0] is next(new_model.parameters())
    train(new_model, new_opt, 2, DATA)
    train(model, opt, 2, DATA)
    assert same(model, new_model)
    opt.remove_hooks()
    loss_of(model).backward()
    assert model[0].weight.grad is not None  # no longer updated in backward
