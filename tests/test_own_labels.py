"""Your own data: labels by name in train.csv, recorded in dataset.json and used by every
output (the submission and its dataset.json, the report page, --image and the export); no COCO
names for a dataset that is not the competition's; --evaluate without a test.csv."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

import inference
import train_caption_rnn
import train_efficientnet
from pipeline import Predictor
from pipeline.config import run_main
from pipeline.data.dataset import DataFormatError, DatasetPaths, load_train_val, read_csv, read_prediction_csv
from pipeline.labels import COCO_NAMES, COMP5329_LABEL_IDS, label_names
from pipeline.tools import export
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS, make_tiny_dataset

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

# The tiny dataset's ids, renamed: one name with a space, so the file separates names by "|".
OWN_NAMES = {1: "red box", 3: "green box", 18: "blue box", 19: "yellow box"}


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- Reading names -----------------------------------------------------------------------------

def test_space_separated_names_become_ids_in_sorted_name_order(tmp_path):
    path = write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n0.jpg,dog cat,"a"\n1.jpg,zebra,"b"\n')
    frame = read_csv(path)
    assert frame["Labels"].tolist() == [[2, 1], [3]]
    assert frame.attrs["label_names"] == {"1": "cat", "2": "dog", "3": "zebra"}
    assert frame.attrs["label_separator"] == " "


def test_bar_separated_names_keep_their_spaces(tmp_path):
    path = write(tmp_path / "train.csv", "ImageID,Labels\n0.jpg,traffic light|dog\n1.jpg,No Finding\n2.jpg, dog \n")
    frame = read_csv(path)
    assert frame.attrs["label_names"] == {"1": "No Finding", "2": "dog", "3": "traffic light"}
    assert frame["Labels"].tolist() == [[3, 2], [1], [2]]
    assert frame.attrs["label_separator"] == "|"


def test_the_competitions_ids_read_exactly_as_before(tmp_path):
    path = write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n0.jpg,1 19,"a"\n1.jpg,3,"b"\n')
    frame = read_csv(path)
    assert frame["Labels"].tolist() == [[1, 19], [3]]
    assert "label_names" not in frame.attrs and "label_separator" not in frame.attrs


def test_a_recorded_separator_reads_names_with_spaces_in_a_file_without_any_bar(tmp_path):
    write(tmp_path / "dataset.json", '{"train.csv": {"label_separator": "|"}}')
    frame = read_csv(write(tmp_path / "train.csv", "ImageID,Labels\n0.jpg,No Finding\n1.jpg,Effusion\n"))
    assert frame.attrs["label_names"] == {"1": "Effusion", "2": "No Finding"}
    assert frame["Labels"].tolist() == [[2], [1]]
    # An evaluation file is split on the training data's separator.
    evaluation = write(tmp_path / "eval.csv", "ImageID,Labels\n0.jpg,No Finding\n")
    frame = read_prediction_csv(evaluation, captions=False, label_names={"1": "Effusion", "2": "No Finding"},
                                label_separator="|")
    assert frame["Labels"].tolist() == [[2]]


def test_names_take_the_ids_dataset_json_declares(tmp_path):
    write(tmp_path / "dataset.json", '{"train.csv": {"labels": {"7": "cat", "2": "dog"}}}')
    frame = read_csv(write(tmp_path / "train.csv", "ImageID,Labels\n0.jpg,cat dog\n1.jpg,dog\n"))
    assert frame["Labels"].tolist() == [[7, 2], [2]]


@pytest.mark.parametrize("content, declared, message", [
    ("ImageID,Labels\n0.jpg,cat\n1.jpg,cat 3\n", None, r"train\.csv:3: Labels 'cat 3' mixes a label id \('3'\)"),
    ("ImageID,Labels\n0.jpg,cat\n1.jpg,horse\n", {"1": "cat", "2": "dog"},
     r"train\.csv:3: label 'horse' is not one of the names dataset\.json declares: \['cat', 'dog'\]"),
    ("ImageID,Labels\n0.jpg,cat|\n", None, r"train\.csv:2: Labels 'cat\|' has an empty name"),
    ("ImageID,Labels\n0.jpg,cat\n1.jpg,\n", None, r"train\.csv:3: empty Labels field"),
    ("ImageID,Labels\n0.jpg,cat\n", {"1": "cat", "2": "cat"}, r"dataset\.json: the name 'cat' is given to label ids 1 and 2"),
    ("ImageID,Labels\n0.jpg,cat\n", ";", r"dataset\.json: \"label_separator\" of 'train.csv' must be \" \" or \"\|\""),
])
def test_bad_names_are_errors_naming_file_and_line(tmp_path, content, declared, message):
    if declared is not None:
        entry = {"label_separator": declared} if isinstance(declared, str) else {"labels": declared}
        write(tmp_path / "dataset.json", json.dumps({"train.csv": entry}))
    with pytest.raises(DataFormatError, match=message):
        read_csv(write(tmp_path / "train.csv", content))


def test_training_records_the_names_and_an_evaluation_file_reads_them_with_the_same_ids(tmp_path):
    root = tmp_path / "own"
    (root / "data").mkdir(parents=True)
    rows = "".join(f"{i}.jpg,{'cat|dog' if i % 2 else 'zebra'}\n" for i in range(20))
    write(root / "train.csv", "ImageID,Labels\n" + rows)
    write(root / "dataset.json", '{"test.csv": {"repeated_ids": false}}')
    labels, _, _ = load_train_val(DatasetPaths.resolve(root), 0.25)
    recorded = json.loads((root / "dataset.json").read_text())
    assert recorded == {"test.csv": {"repeated_ids": False},
                        "train.csv": {"labels": {"1": "cat", "2": "dog", "3": "zebra"}, "label_separator": "|"}}
    assert labels.ids == (1, 2, 3)
    # An evaluation file holding only "zebra" would number it 1 alone; with the training names it is 3.
    evaluation = write(tmp_path / "eval.csv", "ImageID,Labels\n0.jpg,zebra\n")
    frame = read_prediction_csv(evaluation, captions=False, labels=labels,
                                label_names=recorded["train.csv"]["labels"])
    assert frame["Labels"].tolist() == [[3]]


def test_label_names_never_borrow_coco_names_but_for_the_competitions_ids():
    assert label_names(COMP5329_LABEL_IDS) == {str(i): COCO_NAMES[i] for i in COMP5329_LABEL_IDS}
    assert label_names([1, 2, 3, 4, 5]) == {"1": "1", "2": "2", "3": "3", "4": "4", "5": "5"}
    assert label_names([1, 3], {"1": "cat"}) == {"1": "cat", "3": "3"}


# --- End to end ------------------------------------------------------------------------------

def own_dataset(root: Path) -> Path:
    """The tiny dataset with its Labels written as names, separated by "|"."""
    data = make_tiny_dataset(root, n_test=6)
    train = pd.read_csv(data / "train.csv", dtype=str)
    train["Labels"] = ["|".join(OWN_NAMES[int(i)] for i in field.split()) for field in train["Labels"]]
    train.to_csv(data / "train.csv", index=False)
    return data


def modes(*folders: Path) -> dict[str, int]:
    return {str(path): stat.S_IMODE(path.stat().st_mode)
            for folder in folders for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_a_dataset_of_names_trains_and_predicts_with_its_own_names(tmp_path, umask_022, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data, weights, output = own_dataset(tmp_path / "own"), tmp_path / "weights", tmp_path / "output"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "backbone test_efficientnet", UserWarning)
        train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS])
        train_caption_rnn.main(["--data", str(data), "--weights", str(weights), "--device", "cpu", *TINY_CAPTION_ARGS])
    # Ids in sorted name order: blue 1, green 2, red 3, yellow 4.
    ids = {name: str(k) for k, name in enumerate(sorted(OWN_NAMES.values()), start=1)}
    recorded = json.loads((data / "dataset.json").read_text())["train.csv"]
    assert recorded == {"labels": {i: name for name, i in ids.items()}, "label_separator": "|"}

    inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output), "--workers", "0",
                    "--val-fraction", "0.25", "--evaluate"])
    submission = pd.read_csv(output / "submission.csv", dtype=str, keep_default_na=False)
    assert len(submission) == 6
    assert all(field and set(field.split("|")) <= set(OWN_NAMES.values()) for field in submission["Labels"])
    assert json.loads((output / "dataset.json").read_text()) == {"submission.csv": recorded}
    # The submission reads back through its dataset.json, names to the training ids.
    assert read_csv(output / "submission.csv")["Labels"].map(len).min() >= 1
    # The Python API writes the same names.
    predictor = Predictor.from_weights(weights, device="cpu", data=str(data), val_fraction=0.25, workers=0)
    assert predictor.predict_csv(data / "test.csv", data / "data").equals(submission)
    page = (output / "report.html").read_text()
    assert all(name in page for name in OWN_NAMES.values())

    record = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                             "--val-fraction", "0.25", "--image", str(data / "data" / "50.jpg"),
                             "--caption", "A photo of a red box."])["predictions"][0]
    assert record["labels"] and all(label["name"] == recorded["labels"][str(label["id"])] for label in record["labels"])

    pytest.importorskip("onnx")
    result = export.main(["--weights-dir", str(weights), "--data", str(data), "--out", str(tmp_path / "export"),
                          "--val-fraction", "0.25"])
    meta = json.loads(Path(result["metadata"]).read_text())
    assert meta["label_names"] == [recorded["labels"][str(i)] for i in meta["label_ids"]]
    assert meta["label_names_source"] == f"{data}/dataset.json"

    # Every file the pipeline wrote is readable by the group and others under umask 022.
    written = modes(weights, output, tmp_path / "export", data / "dataset.json")
    assert written and {path: mode for path, mode in written.items() if mode != 0o644} == {}


def test_evaluate_without_a_test_csv_scores_the_validation_split_only(trained_branches, tmp_path, caplog):
    data, weights = trained_branches
    copy = tmp_path / "data"
    copy.mkdir()
    shutil.copy(data / "train.csv", copy / "train.csv")
    (copy / "data").symlink_to(data / "data")
    weights = Path(shutil.copytree(weights, tmp_path / "weights"))
    output = tmp_path / "output"
    argv = ["--data", str(copy), "--weights", str(weights), "--output", str(output), "--workers", "0",
            "--val-fraction", "0.25"]
    caplog.set_level("INFO")
    assert run_main(inference.main, inference.get_args_parser(), argv + ["--evaluate"]) == 0
    assert f"no {copy / 'test.csv'}: evaluating only (validation metrics and the report page), no submission" \
        in caplog.text
    assert (output / "metrics.json").is_file() and (output / "report.html").is_file()
    assert not (output / "submission.csv").exists()
    summary = json.loads((output / "inference_summary.json").read_text())
    assert summary["submission"] is None and summary["metrics"]["fused"] > 0
    # Without --evaluate a test set is what the run is for: still an error naming it.
    assert run_main(inference.main, inference.get_args_parser(), argv) == 2
