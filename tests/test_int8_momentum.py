"""8-bit momentum (momentum_dtype=torch.int8): the quantizer, the step against its definition, checkpoints.

The definition of a step: the optimizer's own reference engine (torch.optim.SGD(foreach=False)'s
arithmetic for torch's options) on float32 copies, with a float32 buffer holding the dequantized codes,
then the new buffer quantized by rules/quantize.py. Every engine that takes int8 momentum (the reference
and foreach engines, the default engine's fallback to foreach, step_in_backward) is compared with that,
bitwise, over many steps; the quantizer is tested on its own against its stated error bounds.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchsgd
from torchsgd.rules import quantize as q
from torchsgd.rules.quantize import BLOCK, QuantizedMomentum
from torchsgd.rules.rounding import stream_key

SHAPES = [(), (1,), (255,), (256,), (257,), (33, 17), (3, 300), (1100,)]
ENGINES = {"reference": dict(foreach=False), "foreach": dict(foreach=True), "default": dict()}
OPTIONS = [
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.8, dampening=0.3, maximize=True),
    dict(momentum=0.9, weight_decay=5e-2, decoupled_weight_decay=True),
    dict(momentum=0.9, max_grad_norm=0.5),
    dict(momentum=0.9, skip_nonfinite=True),
]


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


# ----------------------------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("code", q.CODES)
def test_nearest_is_within_half_a_step_of_the_code_book(code):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5 * BLOCK + 17, generator=generator) * torch.logspace(-4, 2, 5 * BLOCK + 17)
    codes, scales = q.quantize(x, code)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scales.shape == (6,)
    assert int(codes.min()) >= -127 and int(codes.max()) <= 127
    values = q.code_values(code)
    y = q.dequantize(codes, scales, code)
    per_block = torch.nn.functional.pad(x, (0, 6 * BLOCK - x.numel())).view(6, BLOCK)
    assert torch.equal(scales, per_block.abs().amax(dim=1))
    # Each element is the nearest entry of the book (at its block's scale).
    ratio = (torch.nn.functional.pad(x, (0, 6 * BLOCK - x.numel())).view(6, BLOCK) / scales[:, None]).view(-1)
    ratio = ratio[: x.numel()]
    distance_to_book = (ratio[:, None] - values[None, :]).abs().amin(dim=1)
    chosen = values[codes.long() + 127]
    assert torch.allclose((ratio - chosen).abs(), distance_to_book, atol=1e-7)
    # And each block's largest element is its code's ±1: exact for the dynamic book (the scale times ±1),
    # within an ulp for the linear one (±127 · (s / 127), two float32 roundings).
    padded = torch.nn.functional.pad(y, (0, 6 * BLOCK - y.numel())).view(6, BLOCK)
    largest = per_block.abs().argmax(dim=1)
    kept, exact = padded.gather(1, largest[:, None]), per_block.gather(1, largest[:, None])
    assert codes.view(-1)[largest + torch.arange(6) * BLOCK].abs().eq(127).all() if code == "linear" else True
    ulp = torch.finfo(torch.float32).eps * exact.abs()
    assert torch.equal(kept, exact) if code == "dynamic" else bool(((kept - exact).abs() <= ulp).all())


def test_linear_is_its_float32_formula():
    # c = round(b · (127 / s)) with 127 / s one correctly rounded division a block; b̂ = c · (s / 127).
    x = torch.randn(3 * BLOCK, generator=torch.Generator().manual_seed(3)) * 1e-3
    codes, scales = q.quantize(x, "linear")
    rows = x.view(3, BLOCK)
    s = rows.abs().amax(dim=1)
    inverse = torch.tensor((127.0 / s.double()).tolist(), dtype=torch.float32)  # each rounded once from exact
    assert torch.equal(codes.view(3, BLOCK), torch.round(rows * inverse[:, None]).to(torch.int8))
    expected = codes.view(3, BLOCK).float() * torch.tensor((s.double() / 127).tolist(), dtype=torch.float32)[:, None]
    assert torch.equal(q.dequantize(codes, scales).view(3, BLOCK), expected)


def test_scales_below_the_floor_are_stored_as_zero_codes():
    x = torch.full((BLOCK,), 2.0**-125)  # 127 / s would overflow float32
    codes, scales = q.quantize(x)
    assert bool(codes.eq(0).all()) and float(scales[0]) == 2.0**-125
    assert bool(q.dequantize(codes, scales).eq(0).all())


def test_linear_error_bound():
    x = torch.randn(4 * BLOCK, generator=torch.Generator().manual_seed(1))
    codes, scales = q.quantize(x, "linear")
    error = (q.dequantize(codes, scales, "linear") - x).abs().view(4, BLOCK)
    assert bool((error <= scales[:, None] / 254 * (1 + 1e-6)).all())


def test_zero_and_non_finite_blocks():
    x = torch.zeros(3 * BLOCK)
    x[BLOCK + 5] = math.inf
    x[2 * BLOCK :] = torch.linspace(-1, 1, BLOCK)
    codes, scales = q.quantize(x)
    assert scales[0] == 0 and bool(q.dequantize(codes, scales)[:BLOCK].eq(0).all())
    assert math.isnan(float(scales[1])) and bool(q.dequantize(codes, scales)[BLOCK : 2 * BLOCK].isnan().all())
    assert scales[2] == 1


def test_stochastic_quantization_is_unbiased_and_reproducible():
    x = torch.full((BLOCK,), 0.3)
    x[0] = 1.0  # the scale
    draws = torch.stack([q.dequantize(*q.quantize(x, "linear", key=k)) for k in range(400)])
    assert abs(float(draws[:, 1:].mean()) - 0.3) < 2e-4  # the nearest code is 38/127 = 0.2992
    assert float(q.dequantize(*q.quantize(x, "linear"))[1]) == pytest.approx(38 / 127)
    again = q.quantize(x, "linear", key=7)
    assert torch.equal(q.quantize(x, "linear", key=7)[0], again[0])
    with pytest.raises(ValueError, match="multiple of BLOCK"):
        q.quantize(x, key=1, start=3)


def test_pieces_quantize_as_the_whole():
    x = torch.randn(3 * BLOCK + 40, generator=torch.Generator().manual_seed(2))
    whole_codes, whole_scales = q.quantize(x, key=11)
    first = q.quantize(x[: 2 * BLOCK], key=11, start=0)
    rest = q.quantize(x[2 * BLOCK :], key=11, start=2 * BLOCK)
    assert torch.equal(torch.cat([first[0], rest[0]]), whole_codes)
    assert torch.equal(torch.cat([first[1], rest[1]]), whole_scales)


def test_the_dynamic_code_book():
    values = q.code_values("dynamic")
    assert values.numel() == 255 and bool((values[1:] > values[:-1]).all())
    assert torch.equal(values, -values.flip(0)) and values[127] == 0 and values[-1] == 1
    assert float(values[128]) < 1e-6  # its smallest magnitude, for the small values of a block


# ------------------------------------------------------------------------------------ the step's definition


def make(shapes, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator).to(dtype) for s in shapes]


def gradients(shapes, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        if step == 3:
            grads[1] = None  # a parameter without a gradient this step
        out.append(grads)
    return out


def definition(cls, init, steps, **options):
    """The step by its definition: the reference engine in float32, the buffer dequantized before and
    quantized after (rules/quantize.py), to nearest."""
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, foreach=False, **options)
    kept: dict[int, QuantizedMomentum] = {}
    for step, grads in enumerate(steps):
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if g is None else g.clone()
            if i in kept:
                opt.state[p]["momentum_buffer"] = kept[i].dequantize()
        if options.get("skip_nonfinite") and step == 5:
            params[2].grad[0] = math.inf
        opt.step()
        for i, p in enumerate(params):
            buffer = opt.state[p].get("momentum_buffer")
            if buffer is not None:
                kept[i] = QuantizedMomentum.of(buffer)
    return params, kept


def ours(cls, init, steps, flags, **options):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(params, momentum_dtype=torch.int8, **flags, **options)
    for step, grads in enumerate(steps):
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        if options.get("skip_nonfinite") and step == 5:
            params[2].grad[0] = math.inf
        opt.step()
    return params, opt


def assert_matches_definition(result, expected, what):
    (params, opt), (ref_params, kept) = result, expected
    for i, (a, b) in enumerate(zip(params, ref_params)):
        assert torch.equal(a, b), f"{what}: parameter {i}"
        entry = opt.state.get(a, {})
        if i in kept:
            assert torch.equal(entry["momentum_codes"], kept[i].codes), f"{what}: codes {i}"
            assert torch.equal(entry["momentum_scales"], kept[i].scales), f"{what}: scales {i}"
            assert "momentum_buffer" not in entry
        else:
            assert not entry, f"{what}: parameter {i} has state"


@pytest.mark.filterwarnings("ignore:SGD. a gradient holds NaN:RuntimeWarning")
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_is_the_definition_over_many_steps(engine, options):
    init, steps = make(SHAPES), gradients(SHAPES, 12)
    cls = torchsgd.SGDW if options.get("decoupled_weight_decay") else torchsgd.SGD
    options = {k: v for k, v in options.items() if k != "decoupled_weight_decay"}
    result = ours(cls, init, steps, ENGINES[engine], lr=0.05, **options)
    assert_matches_definition(result, definition(cls, init, steps, lr=0.05, **options), f"{engine} {options}")


def test_lars_with_int8_momentum_is_its_definition():
    init, steps = make([(33, 17), (17,), (4, 300)]), gradients([(33, 17), (17,), (4, 300)], 8)
    result = ours(torchsgd.LARS, init, steps, {}, lr=0.5, weight_decay=1e-3)
    assert_matches_definition(result, definition(torchsgd.LARS, init, steps, lr=0.5, weight_decay=1e-3), "LARS")


def test_step_in_backward_is_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
    twin = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
    twin.load_state_dict(model.state_dict())
    a = torchsgd.SGD(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=torch.int8, step_in_backward=True)
    b = torchsgd.SGD(twin.parameters(), lr=0.05, momentum=0.9, momentum_dtype=torch.int8)
    x, y = torch.randn(16, 20), torch.randn(16, 1)
    for _ in range(10):
        torch.nn.functional.mse_loss(model(x), y).backward()
        a.step()
        b.zero_grad()
        torch.nn.functional.mse_loss(twin(x), y).backward()
        b.step()
    for p, r in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, r)
        assert torch.equal(a.state[p]["momentum_codes"], b.state[r]["momentum_codes"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_loaded_state_stays_one_byte_a_parameter(dtype):
    # torch's load_state_dict casts every state tensor to its parameter's dtype; codes must come back int8
    # (and contiguous), scales float32, or the state would silently take four bytes a parameter.
    p = torch.nn.Parameter(torch.ones(300, dtype=dtype))
    p.grad = torch.ones(300, dtype=dtype)
    opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    opt.step()
    other = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    other.load_state_dict(opt.state_dict())
    entry = other.state[p]
    assert entry["momentum_codes"].dtype == torch.int8 and entry["momentum_codes"].is_contiguous()
    assert entry["momentum_scales"].dtype == torch.float32
    assert torch.equal(entry["momentum_codes"], opt.state[p]["momentum_codes"])


def test_one_byte_a_parameter():
    p = torch.nn.Parameter(torch.zeros(1 << 16))
    p.grad = torch.ones(1 << 16)
    opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    opt.step()
    state_bytes = sum(t.numel() * t.element_size() for t in opt.state[p].values())
    assert state_bytes == (1 << 16) + 4 * (1 << 16) // BLOCK  # 1.016 bytes a parameter


def test_pure_bf16_with_stochastic_rounding_trains_and_is_reproducible():
    """bfloat16 parameters, stochastic rounding of the parameters and of the codes: the loss falls, and
    the same seed gives the same bits."""

    def train(seed):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).bfloat16()
        opt = torchsgd.SGD(
            model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=torch.int8, stochastic_rounding=True, seed=seed
        )
        x = torch.randn(64, 20, generator=torch.Generator().manual_seed(1)).bfloat16()
        y = x[:, :1] * 2
        losses = []
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, [p.detach().clone() for p in model.parameters()]

    losses, weights = train(3)
    assert losses[-1] < 0.3 * losses[0]
    again, same = train(3)
    assert again == losses and all(torch.equal(a, b) for a, b in zip(weights, same))
    other, _ = train(4)
    assert other != losses


@settings(max_examples=max(15, settings.default.max_examples // 4))  # 15 in make test; 750 in make fuzz
@given(
    numel=st.integers(0, 3 * BLOCK + 5),
    momentum=st.sampled_from([0.5, 0.9, 0.99]),
    dampening=st.sampled_from([0.0, 0.1]),
    nesterov=st.booleans(),
    engine=st.sampled_from(list(ENGINES)),
)
def test_fuzz_int8_momentum_is_its_definition(numel, momentum, dampening, nesterov, engine):
    if nesterov:
        dampening = 0.0
    shapes = [(numel,), (3, 5)]
    init, steps = make(shapes, seed=numel), gradients(shapes, 6, seed=numel + 1)
    options = dict(lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov)
    result = ours(torchsgd.SGD, init, steps, ENGINES[engine], **options)
    assert_matches_definition(result, definition(torchsgd.SGD, init, steps, **options), str(options))


# ------------------------------------------------------------------------------------------------ checkpoints


def stepped(shapes=((300,), (4, 70)), steps=3, **options):
    params = [torch.nn.Parameter(p) for p in make(list(shapes))]
    opt = torchsgd.SGD(params, lr=0.1, momentum=0.9, **options)
    for grads in gradients(list(shapes), steps):
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    return params, opt


def saved(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_checkpoint_resumes_bitwise_through_weights_only_load():
    params, opt = stepped(momentum_dtype=torch.int8)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = torchsgd.SGD(copies, lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    resumed.load_state_dict(saved(opt.state_dict()))
    for grads in gradients([(300,), (4, 70)], 4, seed=9):
        for p, c, g in zip(params, copies, grads):
            p.grad = g
            c.grad = None if g is None else g.clone()
        opt.step()
        resumed.step()
    for p, c in zip(params, copies):
        assert torch.equal(p, c)
        assert torch.equal(opt.state[p]["momentum_codes"], resumed.state[c]["momentum_codes"])


def test_scales_of_a_bfloat16_parameter_stay_float32_on_load():
    params, opt = stepped(momentum_dtype=torch.int8)
    bf16 = [torch.nn.Parameter(p.detach().bfloat16()) for p in params]
    other = torchsgd.SGD(bf16, lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    other.load_state_dict(opt.state_dict())
    for p, b in zip(params, bf16):
        assert other.state[b]["momentum_scales"].dtype == torch.float32
        assert torch.equal(other.state[b]["momentum_scales"], opt.state[p]["momentum_scales"])


def test_a_torch_checkpoint_is_quantized_on_load_and_torch_resumes_from_ours():
    params = [torch.nn.Parameter(p) for p in make([(300,), (4, 70)])]
    theirs = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for grads in gradients([(300,), (4, 70)], 2):
        for p, g in zip(params, grads):
            p.grad = g
        theirs.step()
    ours_opt = torchsgd.SGD(params, lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    ours_opt.load_state_dict(saved(theirs.state_dict()))
    for p in params:
        expected = QuantizedMomentum.of(theirs.state[p]["momentum_buffer"])
        assert torch.equal(ours_opt.state[p]["momentum_codes"], expected.codes)
        assert "momentum_buffer" not in ours_opt.state[p]
    back = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    back.load_state_dict(saved(ours_opt.torch_state_dict()))
    for p in params:
        assert torch.equal(
            back.state[p]["momentum_buffer"], QuantizedMomentum.from_state(ours_opt.state[p]).dequantize()
        )
    assert set(ours_opt.state_dict()["state"][0]) == {"momentum_codes", "momentum_scales"}  # unchanged by export


def test_an_int8_checkpoint_into_a_float_optimizer_is_dequantized():
    params, opt = stepped(momentum_dtype=torch.int8)
    other = torchsgd.SGD(params, lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16)
    other.load_state_dict(opt.state_dict())
    for p in params:
        expected = QuantizedMomentum.from_state(opt.state[p]).dequantize().bfloat16()
        assert torch.equal(other.state[p]["momentum_buffer"], expected)
        assert set(other.state[p]) == {"momentum_buffer"}


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda e: e["momentum_codes"].view(-1).__setitem__(0, -128), ValueError, "holds -128"),
        (lambda e: e.__setitem__("momentum_codes", e["momentum_codes"].float()), TypeError, "must be int8"),
        (lambda e: e.__setitem__("momentum_scales", e["momentum_scales"][:-1]), ValueError, "1-D float tensor of"),
        (lambda e: e.pop("momentum_scales"), ValueError, "without 'momentum_scales'"),
        (lambda e: e.__setitem__("momentum_codes", e["momentum_codes"].view(-1)[:10]), ValueError, "1-D float"),
        (lambda e: e.__setitem__("momentum_scales", [1.0]), TypeError, "must be a Tensor"),
    ],
    ids=["code -128", "float codes", "scales count", "no scales", "codes shape", "scales not a tensor"],
)
@pytest.mark.parametrize("receiver_dtype", [torch.int8, None], ids=["into int8", "into float"])
def test_a_malformed_int8_state_raises_naming_it_and_changes_nothing(edit, error, match, receiver_dtype):
    _, opt = stepped(momentum_dtype=torch.int8)
    state_dict = saved(opt.state_dict())
    edit(state_dict["state"][1])
    _, receiver = stepped(momentum_dtype=receiver_dtype)
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in receiver.state_dict()["state"].items()}
    with pytest.raises(error, match=match) as raised:
        receiver.load_state_dict(state_dict)
    assert "state[1]" in str(raised.value)
    after = receiver.state_dict()["state"]
    for k, entry in before.items():
        assert set(after[k]) == set(entry) and all(torch.equal(after[k][n], v) for n, v in entry.items())


def test_codes_of_another_shape_than_the_parameter_are_refused():
    _, opt = stepped(momentum_dtype=torch.int8)
    state_dict = saved(opt.state_dict())
    entry = state_dict["state"][1]
    entry["momentum_codes"] = entry["momentum_codes"].reshape(70, 4)
    _, receiver = stepped(momentum_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"'momentum_codes' has shape \(70, 4\), the parameter \(4, 70\)"):
        receiver.load_state_dict(state_dict)


def test_noise_of_the_codes_is_keyed_like_the_rest():
    """With stochastic rounding the codes draw their own noise stream of (seed, step, parameter): two steps
    recomputed from rules/quantize.py with those keys."""
    shapes = [(600,)]
    params, opt = stepped(shapes=shapes, steps=2, momentum_dtype=torch.int8, stochastic_rounding=True, seed=5)
    g1, g2 = (grads[0] for grads in gradients(shapes, 2))
    codes, scales = q.quantize(g1, key=stream_key(5, 0, 0) ^ q.QUANTIZE)
    b2 = q.dequantize(codes, scales).mul(0.9).add(g2)
    codes, scales = q.quantize(b2, key=stream_key(5, 1, 0) ^ q.QUANTIZE)
    assert torch.equal(opt.state[params[0]]["momentum_codes"], codes)
    assert torch.equal(opt.state[params[0]]["momentum_scales"], scales)
    nearest = q.quantize(b2)[0]
    assert not torch.equal(nearest, codes)  # (the noise moved some codes)


def test_int8_momentum_trains_the_digits_as_float32_does():
    """The demo's convnet on the digits data, 12 epochs with the demo's optimizer settings: 8-bit momentum
    ends within 0.3 points of float32 momentum's test accuracy (one image is 0.22 points).
    benchmarks/int8_momentum_codes.py runs more seeds and every code book."""
    from torchsgd.cli.data import load_digits_split
    from torchsgd.cli.models import small_convnet

    data = load_digits_split(0)

    def accuracy(**options):
        torch.manual_seed(0)
        model = small_convnet()
        opt = torchsgd.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, **options)
        order = torch.Generator().manual_seed(0)
        for _ in range(12):
            for batch in torch.randperm(len(data.train_images), generator=order).split(32):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(data.train_images[batch]), data.train_labels[batch]).backward()
                opt.step()
        with torch.no_grad():
            return 100 * float((model(data.test_images).argmax(1) == data.test_labels).float().mean())

    float32, int8 = accuracy(), accuracy(momentum_dtype=torch.int8)
    assert float32 > 97 and abs(int8 - float32) <= 0.3, (float32, int8)


def test_loading_copies_the_state_and_never_writes_the_state_dict():
    p = torch.nn.Parameter(torch.ones(300))
    p.grad = torch.ones(300)
    opt = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    opt.step()
    saved = opt.state_dict()
    before = {key: value.clone() for key, value in saved["state"][0].items()}
    other = torchsgd.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    other.load_state_dict(saved)
    p.grad = torch.full((300,), -3.0)
    other.step()
    for key, value in before.items():
        assert torch.equal(saved["state"][0][key], value), key
