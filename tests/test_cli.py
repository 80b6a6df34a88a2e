"""The command-line contract shared by the three scripts."""

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

SCRIPTS = [train_efficientnet, train_caption_rnn, inference]
SHARED_OPTIONS = ["--data", "--images", "--weights", "--output", "--device", "--seed", "--val-fraction"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_every_script_has_the_shared_options(script):
    help_text = script.get_args_parser().format_help()
    for option in SHARED_OPTIONS:
        assert option in help_text, f"{script.__name__} lacks {option}"
    defaults = script.get_args_parser().parse_args([])
    assert defaults.data is None and defaults.weights == "weights" and defaults.output == "output"
    assert defaults.device == "auto"


def test_help_runs_as_a_program():
    """One real process start (the parsers of all three are checked above, in-process)."""
    result = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--data" in result.stdout and "default" in result.stdout


def test_bad_option_values_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        train_efficientnet.get_args_parser().parse_args(["--device", "tpu"])
    assert "--device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_caption_rnn.get_args_parser().parse_args(["--seed", "one"])
    assert "--seed" in capsys.readouterr().err


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == "cpu"  # the suite is pinned to the CPU (conftest)
    with pytest.raises(RuntimeError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(ValueError, match="valid values"):
        resolve_device("tpu")
