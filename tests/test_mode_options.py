"""Options that act in some training modes only are never accepted in silence, and the saved
settings hold what the run resolved ``auto`` to, with the request beside them."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import train_caption_rnn
import train_efficientnet
from pipeline.config import parse_config, read_config_file
from pipeline.train.image_config import (
    FINETUNE,
    FROZEN,
    MODE_ONLY_OPTIONS,
    MODES,
    PARTIAL,
    TRAINING_MODES,
    ImageTrainConfig,
    idle_options,
    resolve_mode,
    resolved_settings,
)
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS, make_tiny_dataset


def _config(*argv: str) -> ImageTrainConfig:
    return parse_config(ImageTrainConfig, train_efficientnet.get_args_parser(), list(argv))


def test_each_mode_answers_what_the_trainer_asks():
    """The table the trainer asks instead of comparing mode names: what each mode trains on,
    whether the backbone trains, whether there is a frozen front for int8, whether it augments."""
    answers = {mode.name: (mode.trains_on, mode.trains_backbone, mode.has_frozen_front, mode.augments)
               for mode in TRAINING_MODES.values()}
    assert answers == {"frozen": ("pooled features", False, True, False),
                       "partial": ("stage maps", True, True, False),
                       "finetune": ("images", True, False, True)}
    assert MODES == ("auto", "frozen", "partial", "finetune")
    assert resolve_mode("auto", torch.device("cpu")) is PARTIAL
    assert resolve_mode("auto", torch.device("cuda")) is FINETUNE
    assert resolve_mode("frozen", torch.device("cuda")) is FROZEN


def test_epochs_in_partial_mode_is_named_with_the_option_that_acts():
    """``train_efficientnet.py --epochs 1`` on a CPU ran 8 partial epochs without a word."""
    messages = idle_options(_config("--epochs", "1"), PARTIAL)
    assert messages == ["--epochs 1 has no effect: it acts in frozen mode only, and this run trains in partial mode "
                        "(--mode auto resolved to partial); in partial mode use --finetune-epochs"]


@pytest.mark.parametrize("argv, mode, flags", [
    (["--lr", "0.01", "--head-batch-size", "8", "--head-threads", "2"], "finetune",
     ["--lr", "--head-batch-size", "--head-threads"]),
    (["--mode", "frozen", "--finetune-epochs", "2", "--finetune-lr", "0.001", "--layer-decay", "0.5"], "frozen",
     ["--finetune-epochs", "--finetune-lr", "--layer-decay"]),
    (["--mode", "partial", "--augment", "light", "--scale-jitter", "0.9"], "partial", ["--augment", "--scale-jitter"]),
    (["--mode", "finetune", "--train-from-stage", "3"], "finetune", ["--train-from-stage"]),
    (["--mode", "frozen", "--csra-temperature", "2"], "frozen", ["--csra-temperature"]),  # no map, no attention
])
def test_each_mode_only_option_is_named_outside_its_modes(argv, mode, flags):
    assert [message.split()[0] for message in idle_options(_config(*argv), TRAINING_MODES[mode])] == flags


def test_options_at_their_defaults_or_in_their_mode_say_nothing():
    assert idle_options(_config(), PARTIAL) == idle_options(_config(), FROZEN) == []
    assert idle_options(_config("--epochs", "3", "--lr", "0.01"), FROZEN) == []
    assert idle_options(_config("--finetune-epochs", "2", "--train-from-stage", "4"), PARTIAL) == []
    assert set(MODE_ONLY_OPTIONS) <= set(ImageTrainConfig.__dataclass_fields__)


def test_resolved_settings_keep_the_request_beside_them():
    config = _config()
    resolved, requested = resolved_settings(config, PARTIAL, torch.device("cpu"), "fp32", "fp32", "openvino")
    assert (resolved.mode, resolved.device, resolved.precision, resolved.runtime) == (
        "partial", "cpu", "fp32", "openvino")
    assert requested == {"mode": "auto", "device": "auto", "precision": "auto", "runtime": "auto"}
    # bf16 features and fp32 training: no one value of --precision says both, so auto stays.
    resolved, _ = resolved_settings(config, PARTIAL, torch.device("cpu"), "bf16", "fp32", "openvino")
    assert resolved.precision == "auto"


def test_a_saved_image_config_holds_the_resolved_run_and_reproduces_it(tiny_dataset, tmp_path, caplog, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    auto = ["--device", "auto", "--precision", "auto", "--runtime", "auto", "--finetune-epochs", "2"]
    with pytest.warns(UserWarning, match="RANDOM"), caplog.at_level(logging.WARNING):
        summary = train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(first), *TINY_IMAGE_ARGS,
                                           *auto])
    assert "--finetune-epochs 2 has no effect: it acts in partial and finetune mode only" in caplog.text
    assert [message.split()[0] for message in summary["options_without_effect"]] == ["--finetune-epochs"]
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the line a person reads; the rest is in the JSON
    assert last.startswith("image branch: validation samples-F1 ") and "frozen mode, 3 epochs (best " in last
    assert last.endswith(f"every figure: {first / 'image_summary.json'}; 1 option(s) had no effect (warned above)")
    assert len(last.replace(str(first), "W")) < 250
    saved = json.loads((first / "image_config.json").read_text())
    assert saved["requested"] == {"mode": "frozen", "device": "auto", "precision": "auto", "runtime": "auto"}
    assert saved["device"] == "cpu" and saved["precision"] in ("fp32", "bf16")
    assert saved["runtime"] in ("torch", "openvino")
    assert "requested" not in read_config_file(ImageTrainConfig, first / "image_config.json")
    with pytest.warns(UserWarning, match="RANDOM"):
        train_efficientnet.main(["--config", str(first / "image_config.json"), "--weights-dir", str(again)])
    for name in ("image.pt", "decoder.pt"):
        a, b = (torch.load(w / name, weights_only=True)["state_dict"] for w in (first, again))
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert str(first / "image.pt") in summary["files"]


def test_the_caption_config_saves_the_device_it_ran_on(tmp_path, capsys):
    data = make_tiny_dataset(tmp_path / "data", n_train=40, images=False)
    summary = train_caption_rnn.main(["--data", str(data), "--weights", str(tmp_path / "w"), "--ensemble", "1",
                                      *TINY_CAPTION_ARGS, "--device", "auto"])
    saved = json.loads((tmp_path / "w" / "caption_config.json").read_text())
    assert saved["device"] == "cpu" and saved["requested"] == {"device": "auto"}
    # The readable last line, and the full record as JSON.
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("caption branch: validation samples-F1 ") and " min; wrote " in last
    assert last.endswith(f"every figure: {tmp_path / 'w' / 'caption_summary.json'}")
    recorded = json.loads((tmp_path / "w" / "caption_summary.json").read_text())
    assert recorded["val_samples_f1"] == summary["val_samples_f1"]


def test_inference_options_without_their_partner_are_refused():
    import inference
    from pipeline.inference_config import InferenceConfig
    from pipeline.io import OptionError

    for argv, message in ((["--format", "json"], "--format json sets how --image predictions print"),
                          (["--no-report"], "--no-report acts with --evaluate only")):
        with pytest.raises(OptionError, match=message):
            parse_config(InferenceConfig, inference.get_args_parser(), argv)
    assert parse_config(InferenceConfig, inference.get_args_parser(), ["--evaluate", "--no-report"]).report is False


def test_the_image_last_line_reads_without_validation_scores(tmp_path):
    from pipeline.train.image import summary_line

    summary = {"recipe": {"epochs": 1}, "image_val_samples_f1": None, "decoder_val_samples_f1_beam": float("nan"),
               "beam_width": 3, "mode": "frozen", "image_best_epoch": 1, "total_seconds": 90.0,
               "options_without_effect": []}
    assert summary_line(summary, tmp_path) == (
        f"image branch: validation samples-F1 n/a (image head), n/a (decoder, beam 3); frozen mode, 1 epoch "
        f"(best 1), 1.5 min; wrote {tmp_path / 'image.pt'}, {tmp_path / 'decoder.pt'}; every figure: "
        f"{tmp_path / 'image_summary.json'}")
