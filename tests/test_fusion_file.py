"""fusion.json as users edit it: every value checked on load."""

from __future__ import annotations

import json

import pytest

from pipeline.fusion import FusionError, FusionSettings, load_fusion

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
     "branches: \"image,caption\"; a non-empty list of branch names from ['image', 'decoder', 'caption']"),
    ("unknown branch", edited(branches=["image", "audio"]),
     "branches: [\"image\", \"audio\"]; a non-empty list of branch names from ['image', 'decoder', 'caption']"),
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
