"""inference.py --image FILE... --caption TEXT...: predictions for given files, end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

import inference
from pipeline.data.images import ImageReadError
from pipeline.fusion import FusionSettings, load_fusion, save_fusion

# Every probability of a record is rounded to 4 places: off by up to this much.
ROUNDING = 5e-5
# The pinned stacker's intercepts, one per label: it returns sigmoid(logit(p_image) + c).
STACKER_INTERCEPTS = [-1.0, -0.5, 0.5, 1.0]


@pytest.fixture
def run(trained_branches, tmp_path):
    """Batch inference once (it tunes fusion.json and writes the submission), then a runner of
    ``inference.py --image ...`` on a copy of the shared weights."""
    data, weights = trained_branches
    weights = Path(shutil.copytree(weights, tmp_path / "weights"))
    batch = tmp_path / "batch"
    inference.main(["--data", str(data), "--weights", str(weights), "--output", str(batch), "--workers", "0",
                    "--val-fraction", "0.25"])
    submission = pd.read_csv(batch / "submission.csv", dtype=str, keep_default_na=False)

    def predict(*argv: str, data_dir: Path = data) -> dict:
        return inference.main(["--data", str(data_dir), "--weights", str(weights), "--output", str(tmp_path / "out"),
                               "--val-fraction", "0.25", *argv])

    return data, weights, submission, predict


def pin_fusion(weights: Path, method: str) -> FusionSettings:
    """Rewrite the tuned fusion.json to use ``method`` with known settings, as a hand edit would
    (inference reads fusion.json as it is when it fits the branches, whatever tuning chose).

    weighted: hand weights. stacker: each label reads the image branch's log-odds alone, shifted
    by its intercept, and the weights (the fallback for images missing a branch) give the caption
    everything, so a fused probability shows which path made it."""
    settings = load_fusion(weights / "fusion.json")
    if method == "weighted":
        settings.method, settings.stacker = "weighted", None
        settings.weights = {"image": 0.5, "decoder": 0.2, "caption": 0.3}
    else:
        labels, image = len(settings.label_ids), settings.branches.index("image")
        coef = [[1.0 if k == image * labels + j else 0.0 for k in range(len(settings.branches) * labels)]
                for j in range(labels)]
        settings.method, settings.stacker = "stacker", {"coef": coef, "intercept": STACKER_INTERCEPTS, "C": 1.0}
        settings.weights = {"image": 0.0, "decoder": 0.0, "caption": 1.0}
    save_fusion(settings, weights / "fusion.json")
    return settings


@pytest.fixture(params=["weighted", "stacker"])
def pinned(run, request, tmp_path):
    """``run`` with fusion.json pinned to each method in turn, and the batch submission under it."""
    data, weights, _, predict = run
    settings = pin_fusion(weights, request.param)
    batch = tmp_path / "pinned"
    inference.main(["--data", str(data), "--weights", str(weights), "--output", str(batch), "--workers", "0",
                    "--val-fraction", "0.25"])
    submission = pd.read_csv(batch / "submission.csv", dtype=str, keep_default_na=False)
    return data, settings, submission, predict


def test_given_files_get_the_labels_batch_inference_gives_them(pinned, capsys):
    data, _, submission, predict = pinned
    test = pd.read_csv(data / "test.csv", dtype=str)
    rows = test.iloc[[0, 3]]
    files = [str(data / "data" / image_id) for image_id in rows["ImageID"]]
    result = predict("--image", *files, "--caption", *rows["Caption"])

    records = result["predictions"]
    assert [r["image"] for r in records] == files
    expected = submission.set_index("ImageID").loc[rows["ImageID"], "Labels"].tolist()
    assert [" ".join(str(label["id"]) for label in r["labels"]) for r in records] == expected
    names = {1: "person", 3: "car", 18: "dog", 19: "horse"}
    for record in records:
        assert record["image_readable"]
        assert record["labels"] and all(label["name"] == names[label["id"]] for label in record["labels"])
        assert set(record["branches"]) == {"image", "decoder", "caption"}
        assert all(0.0 <= p <= 1.0 for p in record["fused"].values())
    table = capsys.readouterr().out
    assert files[0] in table and "labels:" in table and "fused" in table
    assert json.loads(Path(result["output"]).read_text()) == records


def test_fused_probabilities_follow_fusion_json(pinned):
    data, settings, _, predict = pinned
    image_id, caption = pd.read_csv(data / "test.csv", dtype=str).iloc[1][["ImageID", "Caption"]]
    record = predict("--image", str(data / "data" / image_id), "--caption", caption)["predictions"][0]
    assert record["image_readable"] and set(record["branches"]) == set(settings.branches)
    branches = record["branches"]
    assert len(record["fused"]) == len(STACKER_INTERCEPTS)
    for label, c in zip(record["fused"], STACKER_INTERCEPTS):
        if settings.method == "weighted":
            total = sum(settings.weights.values())
            expected = sum(w * branches[b][label] for b, w in settings.weights.items()) / total
            # A weighted average of inputs each off by ROUNDING is off by ROUNDING too.
            bound = 2 * ROUNDING
        else:
            p = min(max(branches["image"][label], 1e-4), 1 - 1e-4)  # the stacker's clip
            expected = 1 / (1 + math.exp(-(math.log(p / (1 - p)) + c)))
            # d expected / d p is at most e^|c|, so the rounded input moves it by up to e^|c| ROUNDING.
            bound = ROUNDING + math.exp(abs(c)) * ROUNDING
        assert record["fused"][label] == pytest.approx(expected, abs=bound + 1e-9)


def test_a_missing_image_is_predicted_from_its_caption(run, tmp_path):
    data, _, _, predict = run
    good = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[0]
    result = predict("--image", str(tmp_path / "absent.jpg"), str(good),
                     "--caption", "a photo of a dog", "a photo of a car")
    absent, present = result["predictions"]
    assert not absent["image_readable"] and present["image_readable"]
    assert all(p is None for p in absent["branches"]["image"].values())
    assert all(p is None for p in absent["branches"]["decoder"].values())
    # With the image branches missing, the fused probabilities are the caption branch's.
    assert absent["fused"] == pytest.approx(absent["branches"]["caption"], abs=1e-4)
    assert absent["labels"]


def test_json_format_prints_exactly_the_records(run, capsys):
    data, _, _, predict = run
    file = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[2]
    capsys.readouterr()
    result = predict("--image", str(file), "--caption", "a person with a horse", "--format", "json")
    assert json.loads(capsys.readouterr().out) == result["predictions"]


def test_without_captions_the_image_branches_predict_and_a_bad_image_is_an_error(run, tmp_path):
    data, _, _, predict = run
    file = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[0]
    record = predict("--image", str(file))["predictions"][0]
    assert record["caption"] is None and set(record["branches"]) == {"image", "decoder"}
    assert record["labels"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        predict("--image", str(broken))


def test_captions_must_match_the_images_one_to_one(run):
    data, _, _, predict = run
    with pytest.raises(ValueError, match="^--caption: 1 caption"):
        predict("--image", str(data / "data" / "0.jpg"), str(data / "data" / "1.jpg"), "--caption", "a dog")


def test_label_names_come_from_dataset_json_when_it_names_them(run, tmp_path):
    data, _, _, predict = run
    named = tmp_path / "named"
    named.mkdir()
    shutil.copy(data / "train.csv", named / "train.csv")
    (named / "dataset.json").write_text(json.dumps({"train.csv": {"labels": {"1": "human", "19": "pony"}}}))
    file = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[0]
    record = predict("--image", str(file), "--caption", "a man on a horse", data_dir=named)["predictions"][0]
    names = {label["id"]: label["name"] for label in record["labels"]}
    expected = {1: "human", 3: "car", 18: "dog", 19: "pony"}
    assert names and all(expected[i] == name for i, name in names.items())


@pytest.mark.parametrize("argv, message", [
    (["--caption", "a dog"], "^--caption needs --image"),
    (["--image", "a.jpg", "--evaluate"], "^--image predicts the given files"),
    (["--threshold", "1.5"], "^--threshold must be between 0 and 1"),
    (["--batch-size", "0"], "^--batch-size must be >= 1"),
])
def test_impossible_inference_settings_fail_naming_the_option_before_any_work(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        inference.main(["--data", str(tmp_path / "absent"), "--weights", str(tmp_path / "none"), *argv])
