"""fusion.json as users edit it: every value checked on load, the hand overrides checked the same
way, ablations that leave it alone, and label sets that do not match the weights."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

import inference
from pipeline.data.dataset import DataFormatError, validation_mask
from pipeline.fusion import FusionError, FusionSettings, load_fusion, save_fusion

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

# A valid file for two branches and the four labels of the tiny dataset.
VALID = {"branches": ["image", "caption"], "label_ids": [1, 3, 18, 19], "method": "weighted",
         "weights": {"image": 0.6, "caption": 0.4}, "threshold": 0.4, "per_label_thresholds": {"3": 0.3}}
STACKER = {"coef": [[0.0] * 8 for _ in range(4)], "intercept": [0.0] * 4, "C": 1.0}


def edited(**changes: object) -> dict:
    return {**VALID, **changes}


# (case, the file's text, the error after "<file>: ")
BAD_FILES = [
    ("NaN weight", edited(weights={"image": float("nan"), "caption": 0.4}),
     "weights: image = NaN; a weight is a finite number >= 0"),
    ("infinite weight", edited(weights={"image": float("inf")}),
     "weights: image = Infinity; a weight is a finite number >= 0"),
    ("negative weight", edited(weights={"image": -0.5, "caption": 0.4}),
     "weights: image = -0.5; a weight is a finite number >= 0"),
    ("all weights 0", edited(weights={"image": 0, "caption": 0.0}),
     "weights: every weight is 0; give at least one of the branches ['image', 'caption'] a weight > 0"),
    ("no weights", edited(weights={}),
     "weights: every weight is 0; give at least one of the branches ['image', 'caption'] a weight > 0"),
    ("boolean weight", edited(weights={"image": True}), "weights: image = true; a weight is a finite number >= 0"),
    ("misspelt branch", edited(weights={"image": 0.6, "captoin": 0.4}),
     "weights: 'captoin' is not one of the file's branches ['image', 'caption']"),
    ("weights as a string", edited(weights="image=1"), 'weights: must be an object of branch: weight, got "image=1"'),
    ("global threshold 2.0", edited(threshold=2.0),
     "threshold: 2.0; a threshold is a number between 0 and 1 (exclusive)"),
    ("global threshold 0", edited(threshold=0), "threshold: 0; a threshold is a number between 0 and 1 (exclusive)"),
    ("threshold as a string", edited(threshold="0.4"),
     'threshold: "0.4"; a threshold is a number between 0 and 1 (exclusive)'),
    ("per-label threshold 2.0", edited(per_label_thresholds={"3": 2.0}),
     "per_label_thresholds.3: 2.0; a threshold is a number between 0 and 1 (exclusive)"),
    ("per-label NaN", edited(per_label_thresholds={"18": float("nan")}),
     "per_label_thresholds.18: NaN; a threshold is a number between 0 and 1 (exclusive)"),
    ("label 99", edited(per_label_thresholds={"99": 0.5}),
     "per_label_thresholds.99: '99' is not one of the trained labels in label_ids [1, 3, 18, 19]"),
    ("label 12", edited(per_label_thresholds={"3": 0.3, "12": 0.5}),
     "per_label_thresholds.12: '12' is not one of the trained labels in label_ids [1, 3, 18, 19]"),
    ("label 03", edited(per_label_thresholds={"03": 0.5}),
     "per_label_thresholds.03: '03' is not one of the trained labels in label_ids [1, 3, 18, 19]"),
    ("per-label thresholds as a list", edited(per_label_thresholds=[0.5]),
     "per_label_thresholds: [0.5]; an object of label id: threshold"),
    ("null file", None,
     "holds null; fusion.json is a JSON object with keys ['branches', 'label_ids', 'method', 'weights', 'threshold', "
     "'per_label_thresholds', 'stacker', 'val_samples_f1', 'cv_samples_f1', 'tuned_on', 'version']"),
    ("a list file", [VALID, VALID], "holds [{\"branches\": [\"image\", \"caption\"], \"label_ids\": [1, 3, 1...; "
     "fusion.json is a JSON object with keys ['branches', 'label_ids', 'method', 'weights', 'threshold', "
     "'per_label_thresholds', 'stacker', 'val_samples_f1', 'cv_samples_f1', 'tuned_on', 'version']"),
    ("branches as a string", edited(branches="image,caption"),
     "branches: \"image,caption\"; a non-empty list of branch names from ['image', 'decoder', 'caption', 'stacker']"),
    ("unknown branch", edited(branches=["image", "audio"]),
     "branches: [\"image\", \"audio\"]; a non-empty list of branch names from ['image', 'decoder', 'caption', 'stacker']"),
    ("repeated branch", edited(branches=["image", "image"]), "branches: ['image', 'image'] names a branch twice"),
    ("label ids as strings", edited(label_ids=["1", "3"]),
     'label_ids: ["1", "3"]; a non-empty list of integer label ids'),
    ("no label ids", edited(label_ids=[]), "label_ids: []; a non-empty list of integer label ids"),
    ("method misspelt", edited(method="weigthed"), 'method: "weigthed"; valid: "weighted", "stacker"'),
    ("stacker as a list", edited(stacker=[1]),
     "stacker: [1]; null, or an object with keys coef, intercept and optionally C"),
    ("stacker of the wrong shape", edited(method="stacker", stacker={**STACKER, "coef": [[0.0] * 4] * 4}),
     "stacker.coef: 4 rows (one per label) of 8 finite numbers (2 branches x 4 labels)"),
    ("stacker with a NaN intercept",
     edited(method="stacker", stacker={**STACKER, "intercept": [0.0, float("nan"), 0, 0]}),
     "stacker.intercept: 4 finite numbers, one per label"),
    ("score as a string", edited(val_samples_f1="high"), 'val_samples_f1: "high"; a number or null'),
    ("missing label ids", {"branches": ["image"], "weights": {"image": 1}},
     "missing key(s) ['label_ids']; valid keys: ['branches', 'cv_samples_f1', 'label_ids', 'method', "
     "'per_label_thresholds', 'stacker', 'threshold', 'tuned_on', 'val_samples_f1', 'version', 'weights']"),
]


@pytest.mark.parametrize("content, error", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_a_bad_value_in_fusion_json_is_an_error_naming_file_and_key(tmp_path, content, error):
    path = tmp_path / "weights" / "fusion.json"
    path.parent.mkdir()
    path.write_text(json.dumps(content))  # json writes NaN and Infinity as Python reads them back
    with pytest.raises(FusionError) as caught:
        load_fusion(path)
    assert str(caught.value) == f"{path}: {error}"


def test_a_key_given_twice_and_bytes_that_are_not_text_are_errors(tmp_path):
    path = tmp_path / "fusion.json"
    path.write_text('{"branches": ["image"], "label_ids": [1], "threshold": 0.3, "threshold": 0.6}')
    with pytest.raises(FusionError) as caught:
        load_fusion(path)
    assert str(caught.value) == f"{path}: key(s) ['threshold'] given twice; give each once"
    path.write_bytes(b'{"branches": ["\xff"]}')
    with pytest.raises(FusionError) as caught:
        load_fusion(path)
    assert str(caught.value) == f"{path}: not UTF-8 text; fusion.json is plain JSON"


def test_every_valid_field_loads_as_written(tmp_path):
    """The checks refuse only what fusion cannot use: a stacker file, integer weights, a
    weight of 0 beside a positive one and a partial per-label table all load unchanged."""
    path = tmp_path / "fusion.json"
    raw = edited(method="stacker", stacker=STACKER, weights={"image": 1, "caption": 0},
                 per_label_thresholds={"19": 0.75}, val_samples_f1=None, cv_samples_f1={"weighted": 0.5})
    path.write_text(json.dumps(raw))
    settings = load_fusion(path)
    assert settings == FusionSettings(**raw)
    assert settings.thresholds().tolist() == [0.4, 0.4, 0.4, 0.75]


# --- The hand overrides ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, error", [
    (["--threshold", "2"], "--threshold must be between 0 and 1 (exclusive), got 2.0"),
    (["--threshold", "nan"], "--threshold must be between 0 and 1 (exclusive), got nan"),
    (["--fusion-weights", "image=nan"], "--fusion-weights 'image=nan': 'nan' must be a finite number >= 0"),
    (["--fusion-weights", "image=-1"], "--fusion-weights 'image=-1': '-1' must be a finite number >= 0"),
    (["--fusion-weights", "captoin=1"],
     "--fusion-weights 'captoin=1': expected branch=weight pairs with branches from image, decoder, caption, stacker"),
    (["--fusion-weights", ""],
     "--fusion-weights '': expected branch=weight pairs with branches from image, decoder, caption, stacker"),
], ids=["threshold 2", "threshold nan", "weight nan", "weight -1", "captoin", "empty weights"])
def test_bad_overrides_are_refused_before_any_file_is_read(tmp_path, argv, error):
    with pytest.raises(ValueError) as caught:
        inference.main(["--data", str(tmp_path / "absent"), "--weights", str(tmp_path / "absent"), *argv])
    assert str(caught.value) == error


def _copy(trained_branches, tmp_path: Path) -> tuple[Path, Path]:
    data, weights = trained_branches
    return Path(shutil.copytree(data, tmp_path / "data")), Path(shutil.copytree(weights, tmp_path / "weights"))


def _infer(data: Path, weights: Path, output: Path, *extra: str) -> dict:
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


@pytest.mark.parametrize("weights, error", [
    ("image=0,caption=0", "--fusion-weights 'image=0,caption=0': every weight is 0; give at least one of the "
                          "branches ['image', 'caption'] a weight > 0"),
    ("image=1,decoder=1", "--fusion-weights 'image=1,decoder=1': 'decoder' is not one of the loaded branches "
                          "['image', 'caption']"),
], ids=["all zero", "not loaded"])
def test_override_weights_must_fit_the_loaded_branches(trained_branches, tmp_path, weights, error):
    data, weights_dir = _copy(trained_branches, tmp_path)
    with pytest.raises(FusionError) as caught:
        _infer(data, weights_dir, tmp_path / "out", "--branches", "image,caption", "--fusion-weights", weights)
    assert str(caught.value) == error
    assert not list(weights_dir.glob("fusion*.json"))  # refused before tuning


# --- Ablations leave fusion.json alone ------------------------------------------------------------

def test_an_ablation_leaves_a_hand_edited_fusion_json_byte_for_byte(trained_branches, tmp_path, caplog):
    data, weights = _copy(trained_branches, tmp_path)
    hand = FusionSettings(branches=["image", "decoder", "caption"], label_ids=[1, 3, 18, 19],
                          weights={"image": 0.2, "decoder": 0.1, "caption": 0.7}, threshold=0.37,
                          per_label_thresholds={"18": 0.61}, val_samples_f1=0.123)
    # Laid out as a person might type it, so a rewrite in the code's layout would show.
    text = json.dumps(asdict(hand), indent=4, sort_keys=True) + "\n\n"
    (weights / "fusion.json").write_text(text)
    caplog.set_level(logging.INFO, logger="pipeline.prediction")

    summary = _infer(data, weights, tmp_path / "image", "--branches", "image")
    assert (weights / "fusion.json").read_text() == text
    own = load_fusion(weights / "fusion-image.json")
    assert own.branches == ["image"] and own.label_ids == [1, 3, 18, 19]
    assert summary["fusion_val_samples_f1"] == own.val_samples_f1
    assert (f"wrote {weights / 'fusion-image.json'} for branches ['image']" in caplog.text
            and f"{weights / 'fusion.json'} was left as it is (this run does not use every trained branch "
                "['image', 'decoder', 'caption'])" in caplog.text)

    # The same ablation again reads its own file instead of tuning.
    own_text = (weights / "fusion-image.json").read_text()
    caplog.clear()
    _infer(data, weights, tmp_path / "again", "--branches", "image")
    assert f"thresholds from {weights / 'fusion-image.json'}" in caplog.text and "tuning" not in caplog.text
    assert (weights / "fusion-image.json").read_text() == own_text

    # Two branches get a file named by both, in sorted order; the full run still uses the hand file.
    _infer(data, weights, tmp_path / "two", "--branches", "image,caption")
    assert load_fusion(weights / "fusion-caption+image.json").branches == ["image", "caption"]
    summary = _infer(data, weights, tmp_path / "all")
    assert summary["fusion_val_samples_f1"] == 0.123
    assert (weights / "fusion.json").read_text() == text


def test_a_full_run_replaces_a_fusion_json_tuned_for_other_labels(trained_branches, tmp_path, caplog):
    data, weights = _copy(trained_branches, tmp_path)
    stale = FusionSettings(branches=["image", "decoder", "caption"], label_ids=[1, 2], weights={"image": 1.0})
    save_fusion(stale, weights / "fusion.json")
    caplog.set_level(logging.INFO, logger="pipeline.prediction")
    _infer(data, weights, tmp_path / "a")
    assert load_fusion(weights / "fusion.json").label_ids == [1, 3, 18, 19]
    assert not (weights / "fusion-caption+decoder+image.json").exists()
    assert (f"{weights / 'fusion.json'} was tuned for branches ['image', 'decoder', 'caption'] and labels [1, 2]; "
            "this run has branches ['image', 'decoder', 'caption'] and labels [1, 3, 18, 19], so it is not used"
            in caplog.text)


def test_an_ablation_without_fusion_json_does_not_create_it(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    _infer(data, weights, tmp_path / "a", "--branches", "caption", "--tune")
    assert not (weights / "fusion.json").exists()
    assert load_fusion(weights / "fusion-caption.json").branches == ["caption"]


# --- Label sets that differ from the trained ones -------------------------------------------------

def _first_validation_row(train: pd.DataFrame) -> int:
    return int(validation_mask(train["ImageID"], 0.25).nonzero()[0][0])


def test_a_validation_label_the_weights_never_saw_names_file_line_and_both_label_sets(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    train = pd.read_csv(data / "train.csv", dtype=str)
    row = _first_validation_row(train)
    train.loc[row, "Labels"] = "1 7"
    train.to_csv(data / "train.csv", index=False)
    with pytest.raises(DataFormatError) as caught:
        _infer(data, weights, tmp_path / "out")  # no fusion.json: tuning needs the validation labels
    train_csv = data / "train.csv"
    assert str(caught.value) == (
        f"{train_csv}:{row + 2}: label id 7 is not one of the labels the model was trained on [1, 3, 18, 19] "
        f"(the weights in {weights}); {train_csv} has labels [1, 3, 7, 18, 19]: the weights were trained on other "
        "data; retrain on this dataset, or give --weights-dir the weights trained on it")


def test_a_dataset_with_other_labels_is_a_warning_naming_both_lists(trained_branches, tmp_path, caplog):
    data, weights = _copy(trained_branches, tmp_path)
    _infer(data, weights, tmp_path / "first")  # tunes fusion.json on the data the weights were trained on
    train = pd.read_csv(data / "train.csv", dtype=str)
    train = train[~train["Labels"].str.contains("19")]  # a dataset without label 19
    train.to_csv(data / "train.csv", index=False)
    caplog.set_level(logging.WARNING, logger="pipeline.prediction")
    _infer(data, weights, tmp_path / "out")
    assert (f"{data / 'train.csv'} has labels [1, 3, 18]; the weights in {weights} were trained on labels "
            "[1, 3, 18, 19] (not trained: []; not in train.csv: [19]), so the predictions use the trained labels"
            in caplog.text)
    # Tuned on this dataset, the settings are not the weights' own: they go beside fusion.json.
    (weights / "fusion.json").unlink()
    _infer(data, weights, tmp_path / "tuned")
    assert not (weights / "fusion.json").exists()
    assert load_fusion(weights / "fusion-caption+decoder+image.json").label_ids == [1, 3, 18, 19]
