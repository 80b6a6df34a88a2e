"""The command-line contract of the three scripts: grouped --help, only options that act, option values parsed exactly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
import train_caption_rnn
import train_efficientnet
from pipeline.engine.runtime import resolve_device
from pipeline.io import OptionError
from pipeline.inference_config import parse_weights

SCRIPTS = [train_efficientnet, train_caption_rnn, inference]
SHARED_OPTIONS = ["--data", "--images", "--weights-dir", "--device", "--seed", "--val-fraction"]
ROOT = Path(__file__).resolve().parents[1]
# Options a script would accept without acting on them: each must be absent from its --help.
NOT_ACTING = {
    train_efficientnet: ["--output", "--threads", "--format"],
    train_caption_rnn: ["--output", "--workers", "--backbone", "--format"],
    inference: ["--resume", "--epochs", "--backbone"],
}
GROUP_TITLES = {
    train_efficientnet: ["data (", "model (", "frozen mode (", "partial and finetune modes (", "CNN-RNN label decoder",
                         "run ("],
    train_caption_rnn: ["data (", "model (", "training", "run ("],
    inference: ["data (", "prediction and fusion", "run ("],
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_every_script_has_the_shared_options_and_defaults(script):
    help_text = script.get_args_parser().format_help()
    for option in SHARED_OPTIONS:
        assert option in help_text, f"{script.__name__} lacks {option}"
    defaults = script.get_args_parser().parse_args([])
    assert defaults.data == "data/demo" and defaults.weights_dir == "weights" and defaults.device == "auto"
    assert script.get_args_parser().parse_args(["--weights", "w"]).weights_dir == "w"  # the short spelling


@pytest.mark.parametrize("script, default", [(train_efficientnet, 64), (train_caption_rnn, 32), (inference, 64)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_each_script_declares_its_own_batch_size(script, default):
    """Images and captions batch differently, so --batch-size is each script's, not a shared option."""
    assert script.get_args_parser().parse_args([]).batch_size == default
    assert "--batch-size" in script.get_args_parser().format_help()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_is_grouped_and_shows_only_acting_options(script):
    parser = script.get_args_parser()
    help_text = parser.format_help()
    for option in NOT_ACTING[script]:
        assert f"{option} " not in help_text, f"{script.__name__} --help shows {option}, which it ignores"
        with pytest.raises(SystemExit):
            parser.parse_args([option, "1"])
    titles = [group.title for group in parser._action_groups if group._group_actions]
    for expected in GROUP_TITLES[script]:
        assert any(title.startswith(expected) for title in titles), f"{script.__name__}: no {expected!r} group"
    # Positions follow GROUPS: data first, run last.
    assert titles[1].startswith("data (") and titles[-1].startswith("run (")


def test_help_runs_as_a_program():
    """One real process start (the parsers of all three are checked above, in-process)."""
    result = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--image" in result.stdout and "default" in result.stdout


def test_bad_option_values_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        train_efficientnet.get_args_parser().parse_args(["--device", "tpu"])
    assert "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_caption_rnn.get_args_parser().parse_args(["--seed", "one"])
    assert "--seed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["--epochs", "0"], "--epochs"), (["--decoder-epochs", "0"], "--decoder-epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--head-dropout", "1.5"], "--head-dropout"),
    (["--workers", "-1"], "--workers"),
])
def test_impossible_image_settings_fail_naming_the_option_before_any_work(argv, option, tmp_path):
    with pytest.raises(ValueError, match=f"^{option} "):
        train_efficientnet.main(["--data", str(tmp_path / "absent"), *argv])


@pytest.mark.parametrize("text, weights", [
    ("image=0.5,caption=0.4", {"image": 0.5, "caption": 0.4}),
    (" image = 0.5 , decoder=1 ", {"image": 0.5, "decoder": 1.0}),  # spaces around names and values
    ("caption=1e-1", {"caption": 0.1}),
    ("image=0,caption=2", {"image": 0.0, "caption": 2.0}),  # not normalised: fusion divides by the sum
])
def test_fusion_weights_parse_to_exact_values(text, weights):
    parsed = parse_weights(text)
    assert parsed == weights and list(parsed) == list(weights)


PAIRS = "expected branch=weight pairs with branches from image, decoder, caption, stacker"


@pytest.mark.parametrize("text, message", [
    ("imag=1", f"--fusion-weights 'imag=1': {PAIRS}"),
    ("image", f"--fusion-weights 'image': {PAIRS}"),
    ("image=", f"--fusion-weights 'image=': {PAIRS}"),
    ("=1", f"--fusion-weights '=1': {PAIRS}"),
    ("image=1,", f"--fusion-weights 'image=1,': {PAIRS}"),
    ("image=abc", "--fusion-weights 'image=abc': 'abc' is not a number"),
    ("image= ", "--fusion-weights 'image= ': ' ' is not a number"),
    ("image=1,image=2", "--fusion-weights 'image=1,image=2': image is given twice"),
    ("image=-0.5", "--fusion-weights 'image=-0.5': '-0.5' must be a finite number >= 0"),
    ("image=nan", "--fusion-weights 'image=nan': 'nan' must be a finite number >= 0"),
    ("caption=inf", "--fusion-weights 'caption=inf': 'inf' must be a finite number >= 0"),
])
def test_bad_fusion_weights_are_refused_with_exact_messages(text, message):
    with pytest.raises(ValueError) as caught:
        parse_weights(text)
    assert str(caught.value) == message


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == "cpu"  # the suite is pinned to the CPU (conftest)
    with pytest.raises(OptionError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(ValueError, match="valid values"):
        resolve_device("tpu")
