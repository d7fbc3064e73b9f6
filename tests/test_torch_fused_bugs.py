"""The four known bugs of torch 2.13's fused CPU SGD (shared/reference/torch-sgd.md), as regression tests
that every torchsgd engine must pass.

Each ``test_bugN_*`` runs every engine of ours against torch's loop; each ``test_bugN_on_torchs_repro``
feeds torchsgd the very input on which torch's ``fused=True`` goes wrong, and checks that the input does
show the bug (ours would fail there if it had it). Torch's own behaviour, for the record (torch 2.13,
fused=True on CPU): (1) float16/bfloat16 parameters are not updated inside its vectorised blocks (64
elements: none moves; 67: only the last 3); (2) a first step that found_inf skips leaves empty_like
garbage as momentum buffers; (3) a parameter whose first gradient arrives after others have buffers
raises TypeError; (4) a gradient whose strides differ from its parameter's is read in the parameter's
memory order.
"""

from __future__ import annotations

import pytest
import torch

import torchsgd
from helpers import (
    ENGINE_NAMES,
    ENGINES,
    LOW_PRECISION_DTYPES,
    assert_optimizers_match,
    capture_error,
    make_twins,
    random_tensor,
    seeded_grads,
    with_layout,
)

OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


# ---------------------------------------------------------------------------------------------------------
# Bug 1: fp16/bf16 parameters are not updated inside vectorised blocks
# ---------------------------------------------------------------------------------------------------------
def low_precision_case(dtype: torch.dtype, numel: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    generator = torch.Generator().manual_seed(numel)
    initial = [random_tensor((numel,), dtype, generator)]
    return initial, seeded_grads(initial, 3, seed=numel)


@pytest.mark.parametrize("numel", [64, 67, 3, 1000])
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug1_every_low_precision_element_moves(engine: str, dtype: torch.dtype, numel: int) -> None:
    initial, grad_steps = low_precision_case(dtype, numel)
    twins = make_twins(initial, engine=engine, **OPTIONS)
    for t, grads in enumerate(grad_steps):
        before = twins.our_params[0].detach().clone()
        twins.step(grads)
        p, q = twins.our_params[0], twins.their_params[0]
        moved, torch_moved = p != before, q != before
        # Every element torch's loop moves, ours moves (an update smaller than half an ulp may round away).
        assert bool((moved | ~torch_moved).all()), (
            f"step {t}: {int((torch_moved & ~moved).sum())} of {numel} elements did not move"
        )
        assert int(moved.sum()) >= numel // 2
        buffer, torch_buffer = twins.ours.state[p]["momentum_buffer"], twins.theirs.state[q]["momentum_buffer"]
        assert buffer.dtype == dtype and bool(((buffer != 0) | (torch_buffer == 0)).all()), "the buffer did not update"
        twins.assert_match()


@pytest.mark.parametrize("numel", [64, 67])
@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=str)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug1_on_torchs_repro(engine: str, dtype: torch.dtype, numel: int) -> None:
    """One step on torch's repro: every element of the vectorised block (the first 64) moves, as the tail
    does, and the step is torch's loop's (within the engine's bound)."""
    initial, grad_steps = low_precision_case(dtype, numel)
    twins = make_twins(initial, engine=engine, **OPTIONS)
    twins.step(grad_steps[0])
    moved = twins.our_params[0] != initial[0]
    torch_moved = twins.their_params[0] != initial[0]
    assert bool(torch_moved[:64].all()), (
        "on this input torch's loop moves every element of the block: the repro changed"
    )
    assert bool(moved[:64].all()), f"{int((~moved[:64]).sum())} of the first 64 elements did not move"
    twins.assert_match()


# ---------------------------------------------------------------------------------------------------------
# Bug 2: a first step skipped by found_inf leaves garbage momentum buffers
# ---------------------------------------------------------------------------------------------------------
def scaled_run(make, grads_per_step: list[list[torch.Tensor]], overflow_first: bool):
    """Steps under torch.amp.GradScaler("cpu"); with ``overflow_first``, an extra first step whose gradient
    holds an inf (GradScaler must skip it)."""
    generator = torch.Generator().manual_seed(0)
    params = [random_tensor(s, torch.float32, generator) for s in [(4, 3), (5,)]]
    opt = make(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # GradScaler creates its scale lazily, on the first scale()
    steps = ([[torch.full_like(g, float("inf")) for g in grads_per_step[0]]] if overflow_first else []) + grads_per_step
    states = []
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g * scaler.get_scale()  # as if backward had run on the scaled loss (exact: powers of 2)
        scaler.step(opt)
        scaler.update()
        states.append({i: dict(opt.state[p]) for i, p in enumerate(params) if opt.state.get(p)})
    return opt, params, states


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug2_skipped_first_step_leaves_no_state(engine: str) -> None:
    grads = seeded_grads([torch.zeros(4, 3), torch.zeros(5)], 3, seed=1)
    skipped, skipped_params, states = scaled_run(lambda ps: torchsgd.SGD(ps, **OPTIONS, **ENGINES[engine]), grads, True)
    assert states[0] == {}, f"the skipped first step left state: {states[0]}"
    never, never_params, _ = scaled_run(lambda ps: torchsgd.SGD(ps, **OPTIONS, **ENGINES[engine]), grads, False)
    reference, reference_params, _ = scaled_run(lambda ps: torch.optim.SGD(ps, **OPTIONS, foreach=False), grads, False)
    # The run that saw the overflow equals the run that never did, and torch's loop.
    assert_optimizers_match(skipped, never, skipped_params, never_params, engine="reference", what="overflow vs none: ")
    assert_optimizers_match(skipped, reference, skipped_params, reference_params, engine=engine, what="vs torch: ")


def test_bug2_on_torchs_repro() -> None:
    """torch's repro, the in-step protocol GradScaler uses with fused=True (opt.grad_scale / opt.found_inf)
    set by hand: the skipped first step leaves no state and the weights as they were, and the steps after
    it are torch's loop's from the start. Only fused=True takes this protocol (GradScaler unscales and
    skips for the other engines itself: test_bug2_skipped_first_step_leaves_no_state)."""
    generator = torch.Generator().manual_seed(3)
    initial = [random_tensor((67,), torch.float32, generator), random_tensor((2, 3), torch.float32, generator)]
    twins = make_twins(initial, engine="fused", **OPTIONS)
    grads = seeded_grads(initial, 3, seed=4)
    twins.ours.grad_scale, twins.ours.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    for p, g in zip(twins.our_params, grads[0]):
        p.grad = g * 4
    twins.ours.step()
    assert len(twins.ours.state) == 0 or all(not s for s in twins.ours.state.values())
    assert all(torch.equal(p, q) for p, q in zip(twins.our_params, initial)), "a skipped step moved the weights"
    twins.ours.found_inf = torch.tensor(0.0)
    for t, step_grads in enumerate(grads):
        for p, g in zip(twins.our_params, step_grads):
            p.grad = g * 4
        for q, g in zip(twins.their_params, step_grads):
            q.grad = g.clone()
        twins.ours.step()
        twins.theirs.step()
        twins.assert_match(f"step {t} after the skipped one: ")


# ---------------------------------------------------------------------------------------------------------
# Bug 3: a parameter whose first gradient arrives after others have buffers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug3_late_first_gradient(engine: str) -> None:
    generator = torch.Generator().manual_seed(5)
    initial = [random_tensor(s, torch.float32, generator) for s in [(4, 4), (67,), (3,)]]
    twins = make_twins(initial, engine=engine, **OPTIONS)
    grads = seeded_grads(initial, 5, seed=6)
    twins.step([grads[0][0], None, None])  # only the first parameter has a gradient: it gets a buffer
    twins.assert_match()
    twins.step([grads[1][0], grads[1][1], None])  # the second arrives: its first step, no dampening
    twins.assert_match()
    twins.step([None, grads[2][1], grads[2][2]])
    twins.assert_match()
    for g in grads[3:]:
        twins.step(g)
        twins.assert_match()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug3_on_torchs_repro(engine: str) -> None:
    """torch's repro: the second parameter's first gradient comes one step late. The step does not raise,
    and gives torch's loop's numbers (its first step: no dampening, a buffer that is the gradient)."""
    twins = make_twins([torch.ones(4), torch.ones(4)], engine=engine, **OPTIONS)
    twins.step([torch.full((4,), 0.5), None])
    twins.assert_match()
    twins.set_grads([torch.full((4,), 0.5), torch.full((4,), 0.25)])
    error = capture_error(twins.ours.step)
    assert error is None, f"the late first gradient raised {error!r}"
    twins.theirs.step()
    twins.assert_match("after the late first gradient: ")
    assert not torch.equal(twins.our_params[1], torch.ones(4)), "the late parameter did not move"


# ---------------------------------------------------------------------------------------------------------
# Bug 4: gradient strides are ignored
# ---------------------------------------------------------------------------------------------------------
LAYOUT_CASES = {
    "transposed grad, square param": ((5, 5), "contiguous", "transposed"),
    "transposed grad": ((3, 7), "contiguous", "transposed"),
    "strided (non-dense) grad": ((4, 6), "contiguous", "strided"),
    "transposed param, contiguous grad": ((4, 6), "transposed", "contiguous"),
    "both transposed": ((4, 6), "transposed", "transposed"),
    "3-d, reversed grad": ((2, 3, 4), "contiguous", "transposed"),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug4_gradient_layout_differs_from_param(engine: str, case: str) -> None:
    shape, param_layout, grad_layout = LAYOUT_CASES[case]
    generator = torch.Generator().manual_seed(7)
    initial = [
        with_layout(random_tensor(shape, torch.float32, generator), param_layout),
        random_tensor((6,), torch.float32, generator),
    ]
    twins = make_twins(initial, engine=engine, **OPTIONS, nesterov=True)
    assert twins.our_params[0].stride() == initial[0].stride()
    for _t, grads in enumerate(seeded_grads(initial, 4, seed=8)):
        twins.step(lambda grads=grads: [with_layout(grads[0], grad_layout), grads[1].clone()])
        twins.assert_match()
        assert twins.our_params[0].stride() == initial[0].stride(), "the parameter's layout changed"


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug4_channels_last_param(engine: str) -> None:
    generator = torch.Generator().manual_seed(9)
    initial = [random_tensor((2, 3, 2, 2), torch.float32, generator).to(memory_format=torch.channels_last)]
    twins = make_twins(initial, engine=engine, **OPTIONS)
    for grads in seeded_grads(initial, 3, seed=10):
        twins.step(grads)  # contiguous gradient, channels_last parameter
        twins.assert_match()


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bug4_on_torchs_repro(engine: str) -> None:
    """torch's repro: a square parameter, its gradient transposed in memory, one plain step. Ours is torch's
    loop's, and far from what reading the gradient in the parameter's memory order would give."""
    generator = torch.Generator().manual_seed(7)
    p0 = random_tensor((5, 5), torch.float32, generator)
    g = with_layout(random_tensor((5, 5), torch.float32, generator), "transposed")
    twins = make_twins([p0], engine=engine, lr=0.1)
    twins.step([g])
    twins.assert_match()
    misread = p0 - 0.1 * torch.as_strided(g, (5, 5), (5, 1))  # the bug: storage order read as row-major
    assert not torch.allclose(twins.our_params[0], misread, rtol=0, atol=1e-3), "the gradient was read in memory order"
