"""inference.py --image FILE|DIR|GLOB... --caption TEXT...: predictions for given files, end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import inference
from pipeline.config import run_main
from pipeline.data.images import ImageReadError
from pipeline.io import OptionError
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
    for record in records:
        assert record["image_readable"]
        # Without dataset.json, ids 1, 3, 18, 19 (not the competition's 18) are named by their ids.
        assert record["labels"] and all(label["name"] == str(label["id"]) for label in record["labels"])
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


def test_a_missing_image_is_an_error_naming_it_with_exit_status_2(run, tmp_path, capsys):
    data, weights, _, _ = run
    good = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[0]
    argv = ["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"), "--val-fraction",
            "0.25", "--image", str(tmp_path / "absent.jpg"), str(good), "--caption", "a photo of a dog", "a car"]
    assert run_main(inference.main, inference.get_args_parser(), argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith(f"error: --image: {tmp_path / 'absent.jpg'}: missing or not a readable image")
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_skip_bad_images_predicts_a_missing_image_from_its_caption(run, tmp_path, caplog):
    data, _, _, predict = run
    good = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[0]
    result = predict("--image", str(tmp_path / "absent.jpg"), str(good), "--skip-bad-images",
                     "--caption", "a photo of a dog", "a photo of a car")
    absent, present = result["predictions"]
    assert not absent["image_readable"] and present["image_readable"]
    assert all(p is None for p in absent["branches"]["image"].values())
    assert all(p is None for p in absent["branches"]["decoder"].values())
    # With the image branches missing, the fused probabilities are the caption branch's.
    assert absent["fused"] == pytest.approx(absent["branches"]["caption"], abs=1e-4)
    assert absent["labels"]
    assert result["unreadable_images"] == [str(tmp_path / "absent.jpg")]
    assert "absent.jpg" in caplog.text and "predicted from the caption alone" in caplog.text


def test_skip_bad_images_without_captions_leaves_the_bad_file_out_and_names_it(run, tmp_path, caplog):
    data, _, _, predict = run
    good = data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = predict("--image", str(broken), str(good), "--skip-bad-images")
    assert [r["image"] for r in result["predictions"]] == [str(good)]
    assert result["unreadable_images"] == [str(broken)]
    assert "broken.jpg" in caplog.text and "left out" in caplog.text


def test_a_folder_and_a_glob_predict_every_image_in_sorted_order(run, tmp_path):
    data, _, _, predict = run
    folder = tmp_path / "photos"
    folder.mkdir()
    for source, name in (("0.jpg", "b.jpg"), ("1.jpg", "a.jpg"), ("2.jpg", "c.JPG")):
        shutil.copy(data / "data" / source, folder / name)
    Image.open(data / "data" / "3.jpg").save(folder / "d.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    whole = predict("--image", str(folder))["predictions"]
    assert [Path(r["image"]).name for r in whole] == ["a.jpg", "b.jpg", "c.JPG", "d.png"]
    assert all(r["image_readable"] and r["labels"] for r in whole)
    matched = predict("--image", str(folder / "*.jpg"), "--caption", "a dog", "a car")["predictions"]
    assert [Path(r["image"]).name for r in matched] == ["a.jpg", "b.jpg"]
    assert [r["caption"] for r in matched] == ["a dog", "a car"]
    # The same file as given alone gets the same record as in the folder.
    alone = predict("--image", str(folder / "a.jpg"))["predictions"][0]
    assert alone == whole[0]


def test_a_pattern_matching_nothing_and_a_folder_without_images_are_errors_naming_them(run, tmp_path):
    _, _, _, predict = run
    with pytest.raises(OptionError, match=r"^--image '.*nothing/\*\.jpg': no file matches this pattern"):
        predict("--image", str(tmp_path / "nothing" / "*.jpg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(OptionError, match=rf"^--image {empty}: the folder holds no image file"):
        predict("--image", str(empty))
    with pytest.raises(ValueError, match="^--caption: 1 caption.*is 0 files|^--image"):
        predict("--image", str(empty), "--caption", "a dog")


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
    # A label dataset.json does not name is named by its id, never by a COCO name.
    expected = {1: "human", 3: "3", 18: "18", 19: "pony"}
    assert names and all(expected[i] == name for i, name in names.items())


@pytest.mark.parametrize("argv, message", [
    (["--caption", "a dog"], "^--caption needs --image"),
    (["--image", "a.jpg", "--evaluate"], "^--image predicts the given files"),
    (["--threshold", "1.5"], "^--threshold must be between 0 and 1"),
    (["--batch-size", "0"], "^--batch-size must be >= 1"),
    (["--skip-bad-images"], "^--skip-bad-images acts on --image files only"),
])
def test_impossible_inference_settings_fail_naming_the_option_before_any_work(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        inference.main(["--data", str(tmp_path / "absent"), "--weights", str(tmp_path / "none"), *argv])
