"""docs/integrations.md, run: Lightning, HF Trainer and accelerate examples and their numbers.

Every python block of the doc runs here as written (the ``setup`` block first, ``workdir`` then pointed at
pytest's tmp_path). The same blocks with ``torchsgd.SGD`` replaced by ``torch.optim.SGD`` (or
``torchsgd.ScheduleFreeSGD`` by ``schedulefree.SGDScheduleFree``) are the oracle: final weights must be
bitwise equal, and resumed runs bitwise equal to uninterrupted ones. Each framework's tests skip when it
is not installed (``make test`` installs them: the ``frameworks`` extra).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import torchsgd
from torchsgd.optim.frameworks import MAX_DEPTH, spent_gradient_clipping

# Lightning 2.6 on torch 2.13 deprecates its own pytree call: not ours to fix.
pytestmark = pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")
EXPECTED_CLIPPING_WARNING = pytest.mark.filterwarnings("ignore:.*step_in_backward has already applied:RuntimeWarning")

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
TORCH = {"torchsgd.SGD": "torch.optim.SGD"}
SCHEDULEFREE = {"torchsgd.ScheduleFreeSGD": "schedulefree.SGDScheduleFree"}


def doc_examples() -> dict[str, str]:
    """The doc's python blocks by the name in the ``<!-- example: NAME -->`` line above each."""
    text = DOC.read_text()
    found = re.findall(r"<!-- example: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S)
    blocks = dict(found)
    assert len(blocks) == len(found), "two examples share a name"
    assert len(found) == text.count("```python"), "a python block of the doc has no example name"
    return blocks


EXAMPLES = doc_examples()


def run(
    *names: str, ns: dict[str, Any] | None = None, workdir: Path | None = None, replace: dict[str, str] | None = None
) -> dict[str, Any]:
    """Execute the named blocks in one namespace (a new one starts with ``setup``); returns the namespace."""
    if ns is None:
        ns = {"__name__": "integrations_example"}
        exec(compile(EXAMPLES["setup"], f"{DOC}:setup", "exec"), ns)
        ns["workdir"] = workdir
    replaced = set()
    for name in names:
        code = EXAMPLES[name]
        for old, new in (replace or {}).items():
            if old in code:
                code = code.replace(old, new)
                replaced.add(old)
        exec(compile(code, f"{DOC}:{name}", "exec"), ns)
    assert replaced == set(replace or ()), f"not in the examples {names}: {set(replace or ()) - replaced}"
    return ns


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), f"parameter {i} differs: max |diff| {(a - e).abs().max().item():.3g}"


def assert_differs(actual: list[torch.Tensor], other: list[torch.Tensor]) -> None:
    assert any(not torch.equal(a, o) for a, o in zip(actual, other))


@pytest.fixture(autouse=True)
def restore_global_state():
    """Lightning's deterministic=True and the Trainer's set_seed change process-wide state: put it back."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.random.get_rng_state()
    python_rng = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_rng = numpy.random.get_state() if numpy is not None else None
    environ = dict(os.environ)
    # torch.testing._internal.common_utils (imported by test_torch_suite.py at collection) freezes
    # torch.backends' flags; Lightning's deterministic=True sets cudnn's, so allow that inside each test.
    with torch.backends.__allow_nonbracketed_mutation():
        cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        yield
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.random.set_rng_state(rng)
    random.setstate(python_rng)
    if numpy_rng is not None:
        numpy.random.set_state(numpy_rng)
    os.environ.clear()
    os.environ.update(environ)
    state = sys.modules.get("accelerate.state")
    if state is not None:  # accelerate's process-wide singletons
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


@pytest.fixture
def lightning():
    return pytest.importorskip("lightning")


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def accelerate():
    return pytest.importorskip("accelerate")


@pytest.fixture
def schedulefree():
    return pytest.importorskip("schedulefree")


@contextlib.contextmanager
def torchsgd_warnings():
    """Collects the messages of the step_in_backward RuntimeWarnings raised inside the block."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(
        str(w.message)
        for w in caught
        if issubclass(w.category, RuntimeWarning) and "step_in_backward" in str(w.message)
    )


CLIPPING_VOID = "has already applied and freed: the clipping has no effect"
NOT_ACCUMULATED = "a second backward() ran without a step() in between"


class ClipProbe(torchsgd.SGD):
    """SGD that records, at each step(), what spent_gradient_clipping finds on the stack."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.found: list[str | None] = []

    def step(self, closure=None):
        self.found.append(spent_gradient_clipping(self))
        return super().step(closure)


# ----------------------------------------------------------------------------------------- Lightning


def fit_lightning(
    ns: dict[str, Any], module: Any, *, validate: bool = False, ckpt_path: Path | None = None, **trainer_args: Any
) -> Any:
    """Fit ``module`` 4 epochs on the doc's data (and validate on it), with the doc's quiet settings."""
    args = {"max_epochs": 4, "deterministic": True, **ns["QUIET"], **trainer_args}
    val = ns["train_loader"]() if validate else None
    ns["L"].Trainer(**args).fit(module, ns["train_loader"](), val_dataloaders=val, ckpt_path=ckpt_path)
    return module


def test_lightning_fit_matches_torch(lightning, tmp_path):
    ours = run("lightning-module", "lightning-fit", workdir=tmp_path)
    theirs = run("lightning-module", "lightning-fit", workdir=tmp_path, replace=TORCH)
    assert type(ours["model"].trainer.optimizers[0]) is torchsgd.SGD
    assert type(theirs["model"].trainer.optimizers[0]) is torch.optim.SGD
    assert_bitwise(weights(ours["model"]), weights(theirs["model"]))
    assert_differs(weights(ours["model"]), weights(ours["make_net"]()))
    # gradient_clip_val=0.5 clips here (without it the run ends elsewhere), so clipping is checked too
    unclipped = fit_lightning(ours, ours["LitRegressor"](), accumulate_grad_batches=2)
    assert_differs(weights(unclipped), weights(ours["model"]))


@pytest.mark.parametrize("first,second", [("torchsgd", "torchsgd"), ("torch", "torchsgd"), ("torchsgd", "torch")])
def test_lightning_resume_is_bitwise_the_uninterrupted_run(lightning, tmp_path, first, second):
    uninterrupted = run("lightning-module", "lightning-fit", workdir=tmp_path)["model"]
    ns = run("lightning-module", "lightning-save", workdir=tmp_path, replace=TORCH if first == "torch" else None)
    run("lightning-module", "lightning-resume", ns=ns, replace=TORCH if second == "torch" else None)
    expected_cls = torch.optim.SGD if second == "torch" else torchsgd.SGD
    assert type(ns["model"].trainer.optimizers[0]) is expected_cls
    assert ns["model"].trainer.global_step == uninterrupted.trainer.global_step == 8
    assert_bitwise(weights(ns["model"]), weights(uninterrupted))


def schedule_free_probe(lightning: Any) -> Any:
    class ModeProbe(lightning.Callback):
        """Records the optimizer's mode at each training step and each validation batch."""

        def __init__(self) -> None:
            self.train_steps: list[bool] = []
            self.validation: list[bool] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.train_steps.append(trainer.optimizers[0].training)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if trainer.optimizers:
                self.validation.append(trainer.optimizers[0].training)

    return ModeProbe()


def test_lightning_schedule_free(lightning, schedulefree, tmp_path):
    ours = run("lightning-module", "lightning-schedule-free", workdir=tmp_path)
    optimizer = ours["trainer"].optimizers[0]
    assert type(optimizer) is torchsgd.ScheduleFreeSGD
    assert not optimizer.training  # after fit() the model holds the average x
    ns = run("lightning-module", workdir=tmp_path)
    ns["schedulefree"] = schedulefree
    theirs = run("lightning-schedule-free", ns=ns, replace=SCHEDULEFREE)
    assert type(theirs["trainer"].optimizers[0]) is schedulefree.SGDScheduleFree
    assert_bitwise(weights(ours["model"]), weights(theirs["model"]))

    # The hooks put the optimizer in train mode for every step and in eval mode for every validation batch.
    probe = schedule_free_probe(lightning)
    model = fit_lightning(
        ours, ours["LitScheduleFree"](), validate=True, val_check_interval=2, callbacks=[probe], num_sanity_val_steps=0
    )
    assert probe.train_steps == [True] * 16
    assert probe.validation == [False] * 4 * 8  # 2 validation runs an epoch, 4 batches each
    assert_bitwise(weights(model), weights(ours["model"]))  # the sanity check changes nothing

    # A checkpoint saved at the end of an epoch holds x; resuming from it is bitwise the uninterrupted run.
    args = dict(val_check_interval=2, deterministic=True, **ours["QUIET"])
    first = ours["L"].Trainer(max_epochs=2, **args)
    first.fit(ours["LitScheduleFree"](), ours["train_loader"](), val_dataloaders=ours["train_loader"]())
    first.save_checkpoint(tmp_path / "sf.ckpt")
    saved = torch.load(tmp_path / "sf.ckpt", weights_only=True)
    assert [g["train_mode"] for g in saved["optimizer_states"][0]["param_groups"]] == [False]
    resumed = ours["LitScheduleFree"]()
    ours["L"].Trainer(max_epochs=4, **args).fit(
        resumed, ours["train_loader"](), val_dataloaders=ours["train_loader"](), ckpt_path=tmp_path / "sf.ckpt"
    )
    assert_bitwise(weights(resumed), weights(ours["model"]))


def test_accumulate_works_through_lightnings_optimizer_wrapper(lightning):
    """LightningOptimizer keeps attribute writes to itself; accumulate() must still reach the hooks."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = torch.nn.Linear(3, 1)
    optimizer = torchsgd.SGD(model.parameters(), lr=0.1, step_in_backward=True)
    for accumulating in (LightningOptimizer(optimizer), optimizer):
        before = weights(model)
        with accumulating.accumulate():
            model(torch.ones(2, 3)).sum().backward()
        assert_bitwise(weights(model), before)  # accumulated, not updated
        model(torch.ones(2, 3)).sum().backward()
        assert_differs(weights(model), before)  # the backward after the block updates
        optimizer.step()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_step_in_backward_matches_torch(lightning, tmp_path, precision):
    ours = run("lightning-module", "lightning-step-in-backward", workdir=tmp_path)
    if precision != "32-true":
        ours["model"] = fit_lightning(ours, ours["LitInBackward"](), precision=precision)
    theirs = run("lightning-module", workdir=tmp_path, replace=TORCH)
    reference = fit_lightning(theirs, theirs["LitRegressor"](), precision=precision)
    assert ours["model"].trainer.optimizers[0].step_in_backward
    assert_bitwise(weights(ours["model"]), weights(reference))


def test_lightning_step_in_backward_resume_is_bitwise_the_uninterrupted_run(lightning, tmp_path):
    ns = run("lightning-module", "lightning-step-in-backward", workdir=tmp_path)
    first = ns["L"].Trainer(max_epochs=2, deterministic=True, **ns["QUIET"])
    first.fit(ns["LitInBackward"](), ns["train_loader"]())
    first.save_checkpoint(tmp_path / "in-backward.ckpt")
    resumed = fit_lightning(ns, ns["LitInBackward"](), ckpt_path=tmp_path / "in-backward.ckpt")
    assert_bitwise(weights(resumed), weights(ns["model"]))


@EXPECTED_CLIPPING_WARNING
def test_lightning_gradient_clip_val_is_void_with_step_in_backward(lightning, tmp_path):
    ns = run("lightning-module", "lightning-step-in-backward", workdir=tmp_path)
    clipped = fit_lightning(ns, ns["LitInBackward"](), gradient_clip_val=0.5)
    assert_bitwise(weights(clipped), weights(ns["model"]))  # the same as no clipping at all
    torch_ns = run("lightning-module", workdir=tmp_path, replace=TORCH)
    assert_differs(
        weights(clipped), weights(fit_lightning(torch_ns, torch_ns["LitRegressor"](), gradient_clip_val=0.5))
    )


def test_lightning_accumulate_in_manual_optimization_matches_torch(lightning, tmp_path):
    ours = run("lightning-module", "lightning-step-in-backward", "lightning-accumulate", workdir=tmp_path)
    theirs = run("lightning-module", workdir=tmp_path, replace=TORCH)
    reference = fit_lightning(theirs, theirs["LitRegressor"](), accumulate_grad_batches=2)
    assert ours["model"].trainer.global_step == reference.trainer.global_step == 8
    assert_bitwise(weights(ours["model"]), weights(reference))


def test_lightning_accumulate_grad_batches_updates_every_backward_with_step_in_backward(lightning, tmp_path):
    ns = run("lightning-module", "lightning-step-in-backward", workdir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # torchsgd says so, where it can
        accumulated = fit_lightning(ns, ns["LitInBackward"](), accumulate_grad_batches=2)
    torch_ns = run("lightning-module", workdir=tmp_path, replace=TORCH)
    assert_differs(
        weights(accumulated), weights(fit_lightning(torch_ns, torch_ns["LitRegressor"](), accumulate_grad_batches=2))
    )


def test_lightning_step_in_backward_warns_of_void_clipping_and_accumulation(lightning, tmp_path):
    ns = run("lightning-module", "lightning-step-in-backward", workdir=tmp_path)
    with torchsgd_warnings() as messages:
        fit_lightning(ns, ns["LitInBackward"](), max_epochs=1, gradient_clip_val=0.5)
    assert len(messages) == 1 and messages[0].startswith("Lightning's Trainer(gradient_clip_val=0.5)")
    with torchsgd_warnings() as messages:
        fit_lightning(ns, ns["LitInBackward"](), max_epochs=1, accumulate_grad_batches=2)
    assert len(messages) == 1 and NOT_ACCUMULATED in messages[0]
    # the doc's settings: no clipping, no framework accumulation (accumulate() in manual optimization)
    with torchsgd_warnings() as messages:
        fit_lightning(ns, ns["LitInBackward"](), max_epochs=1)
        run("lightning-accumulate", ns=ns)
    assert messages == []


@EXPECTED_CLIPPING_WARNING
def test_lightning_stack_holds_the_clipping_trainer(lightning, tmp_path):
    ns = run("lightning-module", workdir=tmp_path)

    class Probed(ns["LitRegressor"]):
        def configure_optimizers(self):
            return ClipProbe(self.parameters(), lr=0.05, step_in_backward=True)

    clipped = fit_lightning(ns, Probed(), max_epochs=1, gradient_clip_val=1.0)
    found = clipped.trainer.optimizers[0].found
    assert len(found) == 4 and found[0] == found[-1]
    assert "Lightning's Trainer(gradient_clip_val=1.0)" in found[0] and "gradient_clip_val=None" in found[0]
    plain = fit_lightning(ns, Probed(), max_epochs=1)
    assert plain.trainer.optimizers[0].found == [None] * 4


# --------------------------------------------------------------------------------------- HF Trainer


def hf_run(
    ns: dict[str, Any],
    output_dir: Path,
    optimizer_cls: Any,
    kwargs: dict[str, Any],
    *,
    trainer_cls: Any = None,
    resume: Path | None = None,
    **args: Any,
) -> Any:
    """A Trainer run like the doc's, with the optimizer and the arguments given."""
    trainer_cls = trainer_cls or ns["Trainer"]
    model = ns["Regressor"]()
    trainer = trainer_cls(
        model=model,
        args=ns["hf_args"](output_dir, **args),
        train_dataset=ns["hf_dataset"](),
        optimizer_cls_and_kwargs=(optimizer_cls, dict(kwargs)),
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def test_hf_trainer_matches_torch(transformers, tmp_path):
    ours = run("hf-setup", "hf-train", workdir=tmp_path / "ours")
    theirs = run("hf-setup", "hf-train", workdir=tmp_path / "theirs", replace=TORCH)
    optimizer = ours["trainer"].optimizer.optimizer  # inside accelerate's wrapper
    assert type(optimizer) is torchsgd.SGD and type(theirs["trainer"].optimizer.optimizer) is torch.optim.SGD
    # the Trainer's groups: weight decay on the two weights, none on the biases; lr from the kwargs
    assert [(len(g["params"]), g["weight_decay"], g["initial_lr"]) for g in optimizer.param_groups] == [
        (2, 0.01, 0.05),
        (2, 0.0, 0.05),
    ]
    assert ours["trainer"].state.global_step == 12
    assert_bitwise(weights(ours["model"]), weights(theirs["model"]))
    assert_differs(weights(ours["model"]), weights(ours["Regressor"]()))


def test_hf_trainer_takes_a_built_optimizer(transformers, tmp_path):
    """The doc's other route, ``optimizers=(torchsgd.SGD(...), None)``: the Trainer adds its scheduler."""
    ns = run("hf-setup", workdir=tmp_path)
    trained = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        model = ns["Regressor"]()
        optimizer = cls(model.parameters(), lr=0.05, momentum=0.9)
        ns["Trainer"](
            model=model,
            args=ns["hf_args"](tmp_path / cls.__module__),
            train_dataset=ns["hf_dataset"](),
            optimizers=(optimizer, None),
        ).train()
        trained.append(weights(model))
    assert_bitwise(*trained)
    assert_differs(trained[0], weights(ns["Regressor"]()))


@pytest.mark.parametrize("first,second", [("torchsgd", "torchsgd"), ("torch", "torchsgd"), ("torchsgd", "torch")])
def test_hf_resume_is_bitwise_the_uninterrupted_run(transformers, tmp_path, first, second):
    saved = run("hf-setup", "hf-save", workdir=tmp_path, replace=TORCH if first == "torch" else None)
    assert (tmp_path / "hf-run" / "checkpoint-6" / "optimizer.pt").exists()
    uninterrupted = saved["model"] if first == "torchsgd" else run("hf-setup", "hf-train", workdir=tmp_path)["model"]
    resumed = run("hf-resume", ns=saved, replace=TORCH if second == "torch" else None)
    assert_bitwise(weights(resumed["resumed"]), weights(uninterrupted))


def test_hf_schedule_free(transformers, schedulefree, tmp_path):
    ours = run("hf-setup", "hf-schedule-free", workdir=tmp_path / "ours")
    optimizer = ours["trainer"].optimizer.optimizer
    assert type(optimizer) is torchsgd.ScheduleFreeSGD and not optimizer.training  # the model holds x
    ns = run("hf-setup", workdir=tmp_path / "theirs")
    ns["schedulefree"] = schedulefree
    theirs = run("hf-schedule-free", ns=ns, replace=SCHEDULEFREE)
    assert type(theirs["trainer"].optimizer.optimizer) is schedulefree.SGDScheduleFree
    assert_bitwise(weights(ours["model"]), weights(theirs["model"]))


def test_hf_schedule_free_checkpoints_hold_x_and_resume_bitwise(transformers, tmp_path):
    ns = run("hf-setup", "hf-schedule-free", workdir=tmp_path)
    sf_kwargs = {"lr": 0.5, "warmup_steps": 2}
    sf_args = dict(lr_scheduler_type="constant", save_strategy="steps", save_steps=6)

    def sf_run(output_dir: Path, resume: Path | None = None) -> Any:
        model = ns["Regressor"]()
        trainer = ns["Trainer"](
            model=model,
            args=ns["hf_args"](output_dir, **sf_args),
            train_dataset=ns["hf_dataset"](),
            callbacks=[ns["ScheduleFreeEval"]()],
            optimizer_cls_and_kwargs=(torchsgd.ScheduleFreeSGD, sf_kwargs),
        )
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        return model

    full = sf_run(tmp_path / "sf")
    for saving, not_saving in zip(weights(full), weights(ns["model"])):  # eval() then train() at a save
        torch.testing.assert_close(saving, not_saving, rtol=0, atol=1e-6)  # costs rounding only
    checkpoint = tmp_path / "sf" / "checkpoint-6"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert [g["train_mode"] for g in saved["param_groups"]] == [False, False]  # the checkpoint holds x
    assert_bitwise(weights(sf_run(tmp_path / "sf-resumed", resume=checkpoint)), weights(full))


def test_hf_step_in_backward_with_accumulation_matches_torch(transformers, tmp_path):
    ours = run("hf-setup", "hf-step-in-backward", workdir=tmp_path)
    theirs = hf_run(
        ours,
        tmp_path / "torch",
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9},
        max_grad_norm=0,
        gradient_accumulation_steps=2,
    )
    assert theirs.state.global_step == 12
    assert_bitwise(weights(ours["model"]), weights(theirs.model))


@EXPECTED_CLIPPING_WARNING
def test_hf_default_max_grad_norm_is_void_with_step_in_backward(transformers, tmp_path):
    ns = run("hf-setup", workdir=tmp_path)
    in_backward = {"lr": 0.05, "momentum": 0.9, "step_in_backward": True}
    plain = {"lr": 0.05, "momentum": 0.9}
    default = hf_run(ns, tmp_path / "a", torchsgd.SGD, in_backward)  # max_grad_norm=1.0, the default
    assert default.args.max_grad_norm == 1.0
    unclipped = hf_run(ns, tmp_path / "b", torchsgd.SGD, in_backward, max_grad_norm=0)
    assert_bitwise(weights(default.model), weights(unclipped.model))
    torch_clipped = hf_run(ns, tmp_path / "c", torch.optim.SGD, plain)
    torch_unclipped = hf_run(ns, tmp_path / "d", torch.optim.SGD, plain, max_grad_norm=0)
    assert_bitwise(weights(unclipped.model), weights(torch_unclipped.model))
    assert_differs(weights(default.model), weights(torch_clipped.model))  # 1.0 clips these gradients


def test_hf_step_in_backward_warns_of_void_clipping_and_accumulation(transformers, tmp_path):
    ns = run("hf-setup", workdir=tmp_path)
    kwargs = {"lr": 0.05, "momentum": 0.9, "step_in_backward": True}
    with torchsgd_warnings() as messages:
        hf_run(ns, tmp_path / "a", torchsgd.SGD, kwargs)  # TrainingArguments' max_grad_norm=1.0
    assert len(messages) == 1 and "TrainingArguments(max_grad_norm=1.0)" in messages[0] and CLIPPING_VOID in messages[0]
    with torchsgd_warnings() as messages:
        hf_run(ns, tmp_path / "b", torchsgd.SGD, kwargs, max_grad_norm=0, gradient_accumulation_steps=2)
    assert len(messages) == 1 and NOT_ACCUMULATED in messages[0]
    with torchsgd_warnings() as messages:  # the doc's settings
        run("hf-step-in-backward", ns=ns)
    assert messages == []


@EXPECTED_CLIPPING_WARNING
def test_hf_stack_holds_the_clipping_trainer(transformers, tmp_path):
    ns = run("hf-setup", workdir=tmp_path)
    kwargs = {"lr": 0.05, "step_in_backward": True}
    found = hf_run(ns, tmp_path / "a", ClipProbe, kwargs).optimizer.optimizer.found
    assert len(found) == 12 and found[0] == found[-1]
    assert "TrainingArguments(max_grad_norm=1.0)" in found[0] and "max_grad_norm=0" in found[0]
    assert hf_run(ns, tmp_path / "b", ClipProbe, kwargs, max_grad_norm=0).optimizer.optimizer.found == [None] * 12


# --------------------------------------------------------------------------------------- accelerate


def test_accelerate_matches_torch(accelerate, tmp_path):
    ours = run("accelerate", workdir=tmp_path)
    theirs = run("accelerate", workdir=tmp_path, replace=TORCH)
    assert_bitwise(weights(ours["model"]), weights(theirs["model"]))
    assert_differs(weights(ours["model"]), weights(ours["make_net"]()))
    # and with accelerate's gradient accumulation
    accumulated = []
    for cls in (torchsgd.SGD, torch.optim.SGD):
        model = ours["make_net"]()
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
        ours["train_accelerate"](model, cls(model.parameters(), lr=0.05, momentum=0.9), accelerator)
        accumulated.append(weights(model))
    assert_bitwise(*accumulated)
    assert_differs(accumulated[0], weights(ours["model"]))


def test_accelerate_step_in_backward_with_accumulation_matches_torch(accelerate, tmp_path):
    ours = run("accelerate", "accelerate-step-in-backward", workdir=tmp_path)
    model = ours["make_net"]()
    ours["train_accelerate"](
        model,
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2),
    )
    assert_bitwise(weights(ours["model"]), weights(model))


def test_accelerate_step_in_backward_warns_of_accumulation_and_refuses_a_grad_scaler(accelerate, tmp_path):
    ns = run("accelerate", workdir=tmp_path)
    model = ns["make_net"]()
    optimizer = torchsgd.SGD(model.parameters(), lr=0.05, step_in_backward=True)
    with torchsgd_warnings() as messages:  # the plain loop, with accelerate's accumulation
        ns["train_accelerate"](model, optimizer, accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2))
    assert len(messages) == 1 and NOT_ACCUMULATED in messages[0]
    with torchsgd_warnings() as messages:  # the doc's loop, accumulate() where sync_gradients is False
        run("accelerate-step-in-backward", ns=ns)
    assert messages == []

    # fp16 on a GPU: accelerate steps through its GradScaler (on CPU it makes none; built here by hand)
    from accelerate.optimizer import AcceleratedOptimizer

    accelerate.Accelerator(cpu=True)
    model = ns["make_net"]()
    optimizer = torchsgd.SGD(model.parameters(), lr=0.05, step_in_backward=True)
    scaler = torch.amp.GradScaler("cpu")
    prepared = AcceleratedOptimizer(optimizer, scaler=scaler)
    x, y = ns["make_data"]()
    scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"step_in_backward=True\) cannot be used with a GradScaler"):
        prepared.step()


# ---------------------------------------------------------------- spent_gradient_clipping, no framework


FAKE_LIGHTNING = """
class Trainer:
    def __init__(self, gradient_clip_val, optimizers):
        self.gradient_clip_val = gradient_clip_val
        self.optimizers = optimizers

    def fit(self, optimizer, depth):
        return descend(optimizer, depth)
"""

FAKE_TRANSFORMERS = """
class Args:
    def __init__(self, max_grad_norm):
        self.max_grad_norm = max_grad_norm

class Trainer:
    def __init__(self, max_grad_norm, optimizer):
        self.args = Args(max_grad_norm)
        self.optimizer = optimizer

    def train(self, optimizer, depth):
        return descend(optimizer, depth)
"""


def fake_module(name: str, source: str) -> dict[str, Any]:
    """Classes defined as if in ``name`` (a framework's module), calling back into this file."""
    ns: dict[str, Any] = {"__name__": name, "descend": descend}
    exec(source, ns)
    return ns


def descend(optimizer: Any, depth: int) -> str | None:
    """Call spent_gradient_clipping ``depth`` frames below the caller."""
    if depth > 1:
        return descend(optimizer, depth - 1)
    return spent_gradient_clipping(optimizer)


class Wrapper:  # like accelerate's AcceleratedOptimizer
    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer


def test_spent_gradient_clipping_finds_a_lightning_trainer_by_name():
    lightning = fake_module("lightning.pytorch.trainer.trainer", FAKE_LIGHTNING)
    opt = torchsgd.SGD([torch.zeros(2, requires_grad=True)], step_in_backward=True)
    message = lightning["Trainer"](0.5, [opt]).fit(opt, 3)
    assert message.startswith("Lightning's Trainer(gradient_clip_val=0.5) clips gradients")
    assert lightning["Trainer"](None, [opt]).fit(opt, 3) is None
    assert lightning["Trainer"](0, [opt]).fit(opt, 3) is None
    assert lightning["Trainer"](0.5, []).fit(opt, 3) is not None  # no optimizer listed yet: ours
    other = torchsgd.SGD([torch.zeros(2, requires_grad=True)])
    assert lightning["Trainer"](0.5, [other]).fit(opt, 3) is None  # it drives another optimizer
    old_name = fake_module("pytorch_lightning.trainer.trainer", FAKE_LIGHTNING)
    assert old_name["Trainer"](1.0, [opt]).fit(opt, 3) is not None
    assert spent_gradient_clipping(opt) is None  # no framework on the stack
    # the walk is bounded: a trainer further up than MAX_DEPTH frames is not looked for
    assert lightning["Trainer"](0.5, [opt]).fit(opt, MAX_DEPTH - 1) is not None
    assert lightning["Trainer"](0.5, [opt]).fit(opt, MAX_DEPTH + 1) is None


def test_spent_gradient_clipping_finds_a_transformers_trainer_by_name():
    transformers = fake_module("transformers.trainer", FAKE_TRANSFORMERS)
    opt = torchsgd.SGD([torch.zeros(2, requires_grad=True)], step_in_backward=True)
    message = transformers["Trainer"](1.0, Wrapper(opt)).train(opt, 2)
    assert "TrainingArguments(max_grad_norm=1.0)" in message and "max_grad_norm=0" in message
    assert transformers["Trainer"](0, Wrapper(opt)).train(opt, 2) is None
    assert transformers["Trainer"](0.0, opt).train(opt, 2) is None
    assert (
        transformers["Trainer"](2.0, Wrapper(torchsgd.SGD([torch.zeros(1, requires_grad=True)]))).train(opt, 2) is None
    )
    # a class named Trainer elsewhere is not a framework's
    assert fake_module("mylib.trainer", FAKE_TRANSFORMERS)["Trainer"](1.0, opt).train(opt, 2) is None
