"""The three scripts run as programs: an error in the input is one line on stderr and exit status 2."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

import inference
import train_caption_rnn
import train_efficientnet
from pipeline.config import OptionError, run_main
from pipeline.data.dataset import DataFormatError

SCRIPTS = [train_efficientnet, train_caption_rnn, inference]
ROOT = Path(__file__).resolve().parents[1]
HEADER = "ImageID,Labels,Caption\n"


def one_label_dataset(root: Path) -> Path:
    """A train.csv whose every row has label 1 (and a test.csv), no images: refused on reading."""
    root.mkdir()
    (root / "train.csv").write_text(HEADER + "".join(f'{i}.jpg,1,"a person {i}"\n' for i in range(60)))
    (root / "test.csv").write_text("ImageID,Caption\n100.jpg,a person\n")
    return root


def run(script, argv: list[str]) -> int:
    return run_main(script.main, script.get_args_parser(), argv)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_a_data_error_is_one_line_on_stderr_with_status_2(script, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    data = one_label_dataset(tmp_path / "data")
    argv = ["--data", str(data), "--weights", str(tmp_path / "w"), "--device", "cpu"]
    assert run(script, argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: {data / 'train.csv'}: the training split holds only label 1; a multi-label model "
                        "needs at least two distinct label ids among its training images\n")
    assert "Traceback" not in err
    # main() itself raises, for the tests and any other caller.
    with pytest.raises(DataFormatError, match="the training split holds only label 1"):
        script.main(argv)


def test_an_impossible_option_is_one_line_naming_it(tmp_path, capsys):
    assert run(train_efficientnet, ["--data", str(tmp_path / "absent"), "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "error: --epochs must be >= 1, got 0\n"
    with pytest.raises(OptionError, match="^--epochs must be >= 1, got 0$"):
        train_efficientnet.main(["--data", str(tmp_path / "absent"), "--epochs", "0"])


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    assert run(train_caption_rnn, ["--data", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == f"error: --data {tmp_path / 'absent'}: no such directory\n"


@pytest.mark.parametrize("how", ["--debug", "PIPELINE_DEBUG=1"])
def test_debug_shows_the_traceback(how, tmp_path, monkeypatch, capsys):
    argv = ["--data", str(tmp_path / "absent"), "--epochs", "0"]
    if how == "--debug":
        argv.append(how)
    else:
        monkeypatch.setenv("PIPELINE_DEBUG", "1")
    with pytest.raises(OptionError, match="^--epochs must be >= 1"):
        run(train_efficientnet, argv)
    assert capsys.readouterr().err == ""


def test_an_unexpected_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(config):
        raise KeyError("a bug")

    monkeypatch.setattr("pipeline.inference.run_inference", broken)
    with pytest.raises(KeyError, match="a bug"):
        run(inference, ["--data", str(tmp_path)])


def test_debug_is_an_option_of_each_script_but_no_setting(tmp_path):
    for script in SCRIPTS:
        assert "--debug" in script.get_args_parser().format_help()
    from pipeline.config import parse_config
    from pipeline.train.caption_config import CaptionTrainConfig
    config = parse_config(CaptionTrainConfig, train_caption_rnn.get_args_parser(), ["--debug"])
    assert not hasattr(config, "debug")  # not saved in caption_config.json, not part of a resumed run's identity


def test_the_script_as_a_program_prints_no_traceback(tmp_path, monkeypatch, capsys):
    """The ``__main__`` path of a script file, run in-process (a new interpreter costs seconds)."""
    data = one_label_dataset(tmp_path / "data")
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_caption_rnn.py", "--data", str(data), "--weights", str(tmp_path / "w"),
                                      "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "train_caption_rnn.py"), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: {data / 'train.csv'}: the training split holds only label 1; a multi-label model needs at least "
        "two distinct label ids among its training images")
