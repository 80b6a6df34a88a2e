"""``--config FILE``: the scripts read their settings from a saved ``*_config.json``, command-line options winning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import inference
import train_caption_rnn
import train_efficientnet
from pipeline.config import run_main
from pipeline.io import OptionError
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS, make_tiny_dataset


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.json"
    path.write_text(text)
    return path


def captured_inference_config(monkeypatch, argv: list[str]):
    """The settings inference.py would run with, without running it."""
    seen = []
    monkeypatch.setattr("pipeline.inference.run_inference", seen.append)
    inference.main(argv)
    return seen[0]


@pytest.mark.parametrize("text, message", [
    ('{"epochs": 3,\n "lr": }', ":2: not valid JSON (Expecting value)"),
    ("[1, 2]", ": holds a list, not a JSON object of settings (keys: augment, backbone, backbone_weights, "),
    ('{"epochs": 3, "epochs": 4}', ": key(s) ['epochs'] given twice; give each once"),
    ('{"epoch": 3, "lrr": 1}', ": unknown key(s) ['epoch', 'lrr']; valid keys: augment, backbone, backbone_weights, "),
    ('{"epochs": 1.5}', ": key 'epochs' (--epochs) is 1.5; it takes an integer"),
    ('{"epochs": true}', ": key 'epochs' (--epochs) is true; it takes an integer"),
    ('{"lr": "0.1"}', ": key 'lr' (--lr) is \"0.1\"; it takes a number"),
    ('{"resolution": "32"}', ": key 'resolution' (--resolution) is \"32\"; it takes an integer or null"),
    ('{"pretrained": 1}', ": key 'pretrained' (--pretrained) is 1; it takes true or false"),
    ('{"backbone": null}', ": key 'backbone' (--backbone) is null; it takes a string"),
    ('{"mode": "fast"}', ": key 'mode' (--mode) is \"fast\"; valid: auto, frozen, partial, finetune"),
])
def test_each_bad_file_is_refused_naming_the_file_and_what_is_wrong(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(OptionError) as err:
        train_efficientnet.main(["--config", str(path)])
    assert str(err.value).startswith(f"--config {path}{message}")


def test_list_options_check_their_items_and_choices(tmp_path, monkeypatch):
    for text, message in [('{"image": "a.jpg"}', "key 'image' (--image) is \"a.jpg\"; it takes a "
                                                 "non-empty list of str or null"),
                          ('{"image": []}', "key 'image' (--image) is []; it takes a non-empty list"),
                          ('{"format": "csv"}', "key 'format' (--format) is \"csv\"; valid: table, json")]:
        path = write(tmp_path, text)
        with pytest.raises(OptionError, match=f"^{re.escape(f'--config {path}: {message}')}"):
            captured_inference_config(monkeypatch, ["--config", str(path)])


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(OptionError, match=f"^--config {tmp_path / 'absent.json'}: no such file$"):
        train_caption_rnn.main(["--config", str(tmp_path / "absent.json")])
    (tmp_path / "latin1.json").write_bytes(b'{"rnn": "gr\xfc"}')
    with pytest.raises(OptionError, match="not UTF-8 text; a config file is plain JSON$"):
        train_caption_rnn.main(["--config", str(tmp_path / "latin1.json")])


def test_an_impossible_value_in_the_file_is_refused_like_the_option(tmp_path):
    path = write(tmp_path, '{"epochs": 0}')
    with pytest.raises(OptionError, match="^--epochs must be >= 1, got 0$"):
        train_efficientnet.main(["--config", str(path), "--data", str(tmp_path / "absent")])


def test_a_bad_file_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    path = write(tmp_path, '{"rnn": "transformer"}')
    assert run_main(train_caption_rnn.main, train_caption_rnn.get_args_parser(), ["--config", str(path)]) == 2
    assert capsys.readouterr().err == f"error: --config {path}: key 'rnn' (--rnn) is \"transformer\"; valid: lstm, gru\n"


def test_the_file_replaces_defaults_and_the_command_line_wins(tmp_path, monkeypatch):
    path = write(tmp_path, json.dumps({"threshold": 0.3, "batch_size": 5, "evaluate": True, "branches": "caption",
                                       "image": None, "val_fraction": 1}))
    config = captured_inference_config(monkeypatch, ["--config", str(path)])
    assert (config.threshold, config.batch_size, config.evaluate, config.branches) == (0.3, 5, True, "caption")
    # An integer in the file is the number the option reads; a key left out keeps its default.
    assert config.val_fraction == 1.0 and isinstance(config.val_fraction, float)
    assert config.chunk_size == 4096 and config.image is None
    config = captured_inference_config(monkeypatch, ["--threshold", "0.6", "--config", str(path), "--no-evaluate",
                                                     "--branches", "image,decoder"])
    assert (config.threshold, config.batch_size, config.evaluate, config.branches) == (0.6, 5, False, "image,decoder")


def test_an_image_config_is_no_inference_config(tmp_path, monkeypatch):
    path = write(tmp_path, json.dumps({"data": "d", "backbone": "tf_efficientnet_lite0", "mode": "frozen"}))
    with pytest.raises(OptionError, match=r"unknown key\(s\) \['backbone', 'mode'\]; valid keys: batch_size, branches"):
        captured_inference_config(monkeypatch, ["--config", str(path)])


def state_dicts(weights: Path, branches: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    return {b: torch.load(weights / f"{b}.pt", map_location="cpu", weights_only=True)["state_dict"] for b in branches}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for branch in a:
        assert a[branch].keys() == b[branch].keys()
        for name in a[branch]:
            assert torch.equal(a[branch][name], b[branch][name]), f"{branch}: {name} differs"


def test_image_training_rerun_from_its_saved_config_gives_the_same_weights(tiny_dataset, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    with pytest.warns(UserWarning, match="RANDOM"):
        train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(first), *TINY_IMAGE_ARGS])
    with pytest.warns(UserWarning, match="RANDOM"):
        train_efficientnet.main(["--config", str(first / "image_config.json"), "--weights-dir", str(again)])
    saved = [json.loads((w / "image_config.json").read_text()) for w in (first, again)]
    # What each run was asked for differs: the rerun asked for the first run's resolved values.
    assert saved[1]["requested"] == {name: saved[0][name] for name in saved[0]["requested"]}
    assert {**saved[1], "requested": None} == {**saved[0], "requested": None, "weights_dir": str(again)}
    assert saved[0]["epochs"] == 3 and saved[0]["backbone"] == "test_efficientnet"
    assert_bitwise_equal(state_dicts(first, ("image", "decoder")), state_dicts(again, ("image", "decoder")))


def test_caption_training_rerun_from_its_saved_config_gives_the_same_weights(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n_train=60, images=False)
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    train_caption_rnn.main(["--data", str(data), "--weights", str(first), "--device", "cpu", "--ensemble", "2",
                            *TINY_CAPTION_ARGS])
    config = str(first / "caption_config.json")
    train_caption_rnn.main(["--config", config, "--weights", str(again)])
    assert_bitwise_equal(state_dicts(first, ("caption",)), state_dicts(again, ("caption",)))
    # An option on the command line still changes the run: another seed, other weights.
    train_caption_rnn.main(["--config", config, "--weights", str(other), "--seed", "1"])
    assert json.loads((other / "caption_config.json").read_text())["seed"] == 1
    differ = state_dicts(other, ("caption",))["caption"]
    same = state_dicts(first, ("caption",))["caption"]
    assert any(not torch.equal(same[name], differ[name]) for name in same)
