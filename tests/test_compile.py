"""--compile (torch.compile of the trained trunk, with its eager fallback), the backends set up
for inference, and the precision inference runs the backbone in on its own device."""

from __future__ import annotations

import functools
import logging
import warnings

import pytest
import torch

import inference
import train_efficientnet
from pipeline.checkpoint import load_checkpoint
from pipeline.engine.loop import ModelEma, TrainStep
from pipeline.engine.runtime import compiled_forward, inference_precision, resolve_compile
from pipeline.io import OptionError
from pipeline.models.backbones import create_backbone
from pipeline.models.decoder import LabelOrder
from pipeline.train.image_config import ImageTrainConfig
from pipeline.train.image_fit import build_image_model, joint_loss
from tests.conftest import TINY_IMAGE_ARGS
from tests.test_resume import SimulatedCrash, crash_after

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# The tests compile with aot_eager: it traces and partitions the graph as inductor does, with
# no C++ compilation, which would take minutes on a small CPU.
_REAL_COMPILE = torch.compile


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(_REAL_COMPILE, backend="aot_eager"))


@pytest.mark.parametrize("name, device, expected", [
    ("auto", CUDA, True), ("auto", CPU, False), ("on", CPU, True), ("on", CUDA, True),
    ("off", CUDA, False), ("off", CPU, False),
])
def test_compile_option_resolves_per_device(name, device, expected):
    assert resolve_compile(name, device) is expected


def test_a_bad_compile_value_names_the_option():
    with pytest.raises(OptionError, match="--compile 'yes': valid values are auto, on, off"):
        resolve_compile("yes", CPU)


@pytest.mark.parametrize("device, trained, native, expected", [
    (CPU, "fp32", True, "fp32"), (CPU, "fp32", False, "fp32"),
    (CPU, "bf16", True, "bf16"), (CPU, "bf16", False, "fp32"),  # no emulated bf16 autocast
    (CPU, "fp16", True, "fp32"), (CPU, "fp16", False, "fp32"),  # fp16 never on a CPU
    (CUDA, "fp32", True, "fp32"), (CUDA, "bf16", True, "bf16"), (CUDA, "bf16", False, "fp32"),
    (CUDA, "fp16", False, "fp16"), (CUDA, "fp16", True, "fp16"),
])
def test_inference_precision_follows_the_inference_device(device, trained, native, expected):
    assert inference_precision(device, trained, native) == expected


def _tiny_step() -> tuple[TrainStep, tuple[torch.Tensor, torch.Tensor]]:
    """A joint training step of the tiny backbone (no dropout, so two calls can be compared) and a batch."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = create_backbone("test_efficientnet", resolution=32)
    config = ImageTrainConfig(head_hidden=16, head_dropout=0.0, decoder_embed=8, decoder_hidden=16,
                              decoder_dropout=0.0)
    model = build_image_model(config, backbone.module, 2 * backbone.feature_dim, 4, CPU)
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    step = TrainStep(model, joint_loss(config, lambda x: x, LabelOrder.from_train(targets.numpy()), CPU))
    return step.eval(), (torch.randn(3, 3, 32, 32), targets)


def test_the_compiled_trunk_gives_the_eager_loss_and_leaves_the_state_dict_alone(aot_eager):
    step, batch = _tiny_step()
    trunk = step.model.trunk
    keys = list(step.state_dict())
    eager = step(*batch)
    try:
        with compiled_forward(trunk, True, "test trunk"):
            compiled = step(*batch)
            ema = ModelEma(step.model, 0.9)
            assert list(step.state_dict()) == keys and list(ema.module.state_dict()) == list(step.model.state_dict())
            assert "forward" in vars(trunk)
    except torch._dynamo.exc.BackendCompilerFailed as err:
        pytest.skip(f"torch.compile (aot_eager) cannot compile on this machine: {err}")
    assert "forward" not in vars(trunk)  # the plain forward again after the block
    assert compiled.item() == pytest.approx(eager.item(), abs=1e-4)
    compiled.backward()  # the compiled graph has a backward


def test_a_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    step, batch = _tiny_step()
    eager = step(*batch).item()
    calls = []

    def broken(*args, **kwargs):
        calls.append("compiled")
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.runtime"), \
            compiled_forward(step.model.trunk, True, "test trunk"):
        first, second = step(*batch).item(), step(*batch).item()
    assert first == pytest.approx(eager, abs=1e-6) and second == pytest.approx(eager, abs=1e-6)
    assert calls == ["compiled"]  # tried once, then eager for good
    assert "torch.compile of the test trunk failed (RuntimeError: no C++ compiler found)" in caplog.text


def test_compile_on_fine_tunes_and_checkpoints_the_plain_modules(tiny_dataset, tmp_path, monkeypatch, aot_eager):
    """A compiled partial run compiles the trunk once and saves the uncompiled names, in the
    resume checkpoint (model and EMA) and in image.pt."""
    compiled_calls = []
    real = torch.compile

    def counting(fn, *args, **kwargs):
        compiled_calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    args = ["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS, "--mode", "partial",
            "--train-from-stage", "3", "--finetune-epochs", "1", "--compile", "on"]
    with monkeypatch.context() as patch:
        crash_after(patch, "partial", 1)  # a finished run removes its resume checkpoints
        with pytest.raises(SimulatedCrash):
            train_efficientnet.main(args)
    assert len(compiled_calls) == 1
    resume = torch.load(tmp_path / "w" / "resume" / "image" / "partial.pt", weights_only=True)
    names = _state_names(resume)
    assert [n for n in names if n.startswith("modules.ema.module.trunk.")]  # the EMA copy of the trunk
    assert not [n for n in names if "_orig_mod" in n]
    train_efficientnet.main([*args, "--resume"])  # nothing left to train: writes image.pt
    saved = load_checkpoint(tmp_path / "w" / "image.pt", branch="image")["backbone"]["state_dict"]
    assert saved and not [n for n in saved if "_orig_mod" in n]


def _state_names(state: object, prefix: str = "") -> list[str]:
    """Every key path of the nested dicts of a checkpoint."""
    if not isinstance(state, dict):
        return []
    return [name for key, value in state.items()
            for name in [f"{prefix}{key}", *_state_names(value, f"{prefix}{key}.")]]


def test_inference_sets_up_the_backends_of_its_device(tiny_dataset, tmp_path, monkeypatch):
    class Reached(Exception):
        pass

    def configure(device):
        raise Reached(device)

    monkeypatch.setattr("pipeline.inference.configure_backends", configure)
    with pytest.raises(Reached) as reached:
        inference.main(["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"), "--output",
                        str(tmp_path / "out"), "--device", "cpu", "--workers", "0"])
    assert reached.value.args == (CPU,)


@pytest.mark.parametrize("trained, native, expected, warned", [
    ("bf16", False, "fp32", True), ("bf16", True, "bf16", False), ("fp16", True, "fp32", True),
    ("fp32", True, "fp32", False),
])
def test_inference_picks_the_backbone_precision_of_its_own_cpu(monkeypatch, caplog, trained, native, expected,
                                                                warned):
    import pipeline.prediction as prediction

    monkeypatch.setattr(prediction, "native_bf16", lambda device: native)
    with caplog.at_level(logging.WARNING, logger="pipeline.prediction"):
        assert prediction.backbone_precision(trained, CPU, "image.pt") == expected
    message = f"image.pt's features were computed in {trained}, which this CPU does not run natively: running fp32"
    assert (message in caplog.text) is warned


def test_a_compile_failing_in_the_first_backward_falls_back_to_eager(caplog):
    """AOTAutograd lowers the backward at the first ``backward()``: a backend whose backward
    compiler raises passes the forward, and the guarded first step falls back to eager there."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def failing_backward(graph, example_inputs):
        raise RuntimeError("backward lowering failed")

    torch._dynamo.reset()
    step, batch = _tiny_step()
    eager_loss = step(*batch)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in step.model.trunk.parameters()]
    step.zero_grad(set_to_none=True)
    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=failing_backward)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", functools.partial(_REAL_COMPILE, backend=backend))
        with caplog.at_level(logging.WARNING, logger="pipeline.engine.runtime"), \
                compiled_forward(step.model.trunk, True, "test trunk") as guard:
            loss = guard(lambda: _backward(step, batch))
            again = guard(lambda: _backward(step, batch))  # proven (eagerly): no second fallback
    torch._dynamo.reset()
    assert "torch.compile of the test trunk failed (" in caplog.text and "backward lowering failed" in caplog.text
    assert caplog.text.count("training continues uncompiled") == 1
    assert loss == pytest.approx(eager_loss.item(), abs=1e-6) and again == pytest.approx(loss, abs=1e-6)
    for param, expected in zip(step.model.trunk.parameters(), eager_grads):  # two steps' gradients
        torch.testing.assert_close(param.grad, 2 * expected)


def _backward(step: TrainStep, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    loss = step(*batch)
    loss.backward()
    return loss.item()


def test_compile_auto_compiles_only_a_run_long_enough_to_pay_it_back():
    from pipeline.engine.runtime import COMPILE_MIN_STEPS

    assert resolve_compile("auto", CUDA, steps=COMPILE_MIN_STEPS) is True
    assert resolve_compile("auto", CUDA, steps=COMPILE_MIN_STEPS - 1) is False  # a check on a subset
    assert resolve_compile("on", CUDA, steps=10) is True and resolve_compile("auto", CPU, steps=10**6) is False
