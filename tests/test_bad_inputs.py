"""Bad input, faults and unsafe files: each row of the tables in docs/robustness.md.

Every case either raises a clear error (naming the file and line, or the option at fault)
or has a documented recovery whose output keeps exactly one row per input row. Rows already
covered elsewhere are named in those tables; the rest are here.
"""

from __future__ import annotations

import json
import io
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
from pipeline.engine import runtime
from pipeline.checkpoint import load_checkpoint, save_checkpoint, save_probabilities
from pipeline.io import CheckpointError, atomic_torch_save, safe_torch_load
from pipeline.data.dataset import (
    DataFormatError,
    DatasetPaths,
    GivenFiles,
    LabelSet,
    load_train_val,
    read_csv,
    read_prediction_csv,
)
from pipeline.data.images import ImageDataset
from pipeline.features import ExtractionSettings, cached_features
from pipeline.fusion import FusionError, FusionSettings, save_fusion, weighted_average
from pipeline.models.backbones import BackboneWeightsError, create_backbone
from pipeline.prediction import BranchProbabilities, Inputs, predict_in_chunks
from tests.conftest import count_extracted_rows, make_tiny_dataset

REPO = Path(__file__).resolve().parents[1]
HEADER = "ImageID,Labels,Caption\n"
GOOD_ROW = '0.jpg,1,"a person"\n'

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# --- Input files ----------------------------------------------------------------------------------

# (case, content of train.csv, error expected from read_csv: file:line and the reason)
BAD_TRAIN_CSV = [
    ("empty file", "", r"train\.csv:1: header '' has no ImageID column"),
    ("missing ImageID column", 'Labels,Caption\n1,"a"\n', r"train\.csv:1: .*no ImageID column"),
    ("unknown column", 'ImageID,Labels,Caption,Extra\n0.jpg,1,"a",x\n', r"train\.csv:1: unknown column"),
    ("row with a missing field", HEADER + GOOD_ROW + "1.jpg,1\n", r"train\.csv:3: cannot read this record"),
    ("byte that is not UTF-8", (HEADER + GOOD_ROW).encode() + b'1.jpg,1,"caf\xe9"\n',
     r"train\.csv:3: byte 0xe9 is not UTF-8"),
    ("UTF-16 file", (HEADER + GOOD_ROW).encode("utf-16"), r"train\.csv:1: byte 0xff is not UTF-8"),
    ("empty Labels field", HEADER + GOOD_ROW + '1.jpg,,"a dog"\n', r"train\.csv:3: empty Labels field"),
    ("blank Labels field", HEADER + GOOD_ROW + '1.jpg," ","a dog"\n', r"train\.csv:3: empty Labels field"),
    ("label id is a word", HEADER + GOOD_ROW + '1.jpg,1 dog,"a dog"\n', r"train\.csv:3: Labels '1 dog'.*'dog' is not"),
    ("label id is a decimal", HEADER + GOOD_ROW + '1.jpg,1.5,"a"\n', r"train\.csv:3: Labels '1\.5'"),
    ("label id is negative", HEADER + GOOD_ROW + '1.jpg,-1,"a"\n', r"train\.csv:3: Labels '-1'"),
    ("label id in non-ASCII digits", HEADER + GOOD_ROW + '1.jpg,\u0663,"a"\n', r"train\.csv:3: Labels"),
    ("duplicate ImageID", HEADER + GOOD_ROW + '1.jpg,3,"a car"\n0.jpg,18,"a dog"\n',
     r"train\.csv:4: ImageID '0\.jpg' repeats line 2"),
    ("empty ImageID", HEADER + GOOD_ROW + ',1,"a"\n', r"train\.csv:3: ImageID '' is not a plain file name"),
    ("ImageID ../x.jpg", HEADER + GOOD_ROW + '../x.jpg,1,"a"\n', r"train\.csv:3: ImageID '\.\./x\.jpg' is not"),
    ("ImageID /etc/passwd", HEADER + GOOD_ROW + '/etc/passwd,1,"a"\n', r"train\.csv:3: ImageID '/etc/passwd'"),
    ("ImageID a/b.jpg", HEADER + GOOD_ROW + 'a/b.jpg,1,"a"\n', r"train\.csv:3: ImageID 'a/b\.jpg'"),
    ("ImageID with NUL", HEADER + GOOD_ROW + 'x.jpg\0,1,"a"\n', r"train\.csv:3: ImageID 'x\.jpg\\x00'"),
    ("ImageID ..", HEADER + GOOD_ROW + '..,1,"a"\n', r"train\.csv:3: ImageID '\.\.'"),
    ("ImageID with backslash", HEADER + GOOD_ROW + 'a\\b.jpg,1,"a"\n', r"train\.csv:3: ImageID 'a\\\\b\.jpg'"),
    ("quote never closed", HEADER + GOOD_ROW + '1.jpg,1,"a person\n2,3,"x"\n3,4,"y"\n',
     r"train\.csv:3: the quote opened in this record is never closed.* 2 line"),
    ("quirky caption not in the last column", 'Caption,ImageID,Labels\n"a "b" c",0.jpg,1\n',
     r"train\.csv:2: cannot read this record"),
]


@pytest.mark.parametrize("case, content, error", BAD_TRAIN_CSV, ids=[c[0] for c in BAD_TRAIN_CSV])
def test_bad_csv_is_an_error_naming_file_and_line(tmp_path, case, content, error):
    path = write(tmp_path / "train.csv", content)
    with pytest.raises(DataFormatError, match=error):
        read_csv(path)


def test_train_csv_without_labels_column_is_an_error(tmp_path):
    # A missing Caption column is an images-only dataset (see test_convert); Labels is required.
    write(tmp_path / "train.csv", "ImageID,Caption\n0.jpg,x\n")
    with pytest.raises(DataFormatError, match=r"train\.csv:1: header .* has no Labels column"):
        load_train_val(DatasetPaths.resolve(tmp_path), 0.15)


def test_train_csv_with_no_rows_is_an_error(tmp_path):
    write(tmp_path / "train.csv", HEADER)
    with pytest.raises(DataFormatError, match=r"train\.csv: no training rows"):
        load_train_val(DatasetPaths.resolve(tmp_path), 0.15)


# (case, content, expected rows as (ImageID, Labels, Caption)): documented recoveries.
READ_AS_WRITTEN = [
    ("columns in another order", 'Caption,Labels,ImageID\n"a person",1,0.jpg\n"a car, red",3 1,1.jpg\n',
     [("0.jpg", [1], "a person"), ("1.jpg", [3, 1], "a car, red")]),
    ("UTF-8 byte-order mark", "\ufeff" + HEADER + GOOD_ROW, [("0.jpg", [1], "a person")]),
    ("CRLF line endings", (HEADER + GOOD_ROW + '1.jpg,3,"a car"\n').replace("\n", "\r\n"),
     [("0.jpg", [1], "a person"), ("1.jpg", [3], "a car")]),
    ("CR line endings", (HEADER + GOOD_ROW + '1.jpg,3,"a car"\n').replace("\n", "\r"),
     [("0.jpg", [1], "a person"), ("1.jpg", [3], "a car")]),
    ("empty caption", HEADER + "0.jpg,1,\n1.jpg,3,\"\"\n", [("0.jpg", [1], ""), ("1.jpg", [3], "")]),
    ("blank lines", HEADER + GOOD_ROW + "\n\n" + '1.jpg,3,"a car"\n\n', [("0.jpg", [1], "a person"),
                                                                          ("1.jpg", [3], "a car")]),
    ("unclosed quote on the last line only", HEADER + '0.jpg,1,"a 5" screen\n', [("0.jpg", [1], '"a 5" screen')]),
]


@pytest.mark.parametrize("case, content, rows", READ_AS_WRITTEN, ids=[c[0] for c in READ_AS_WRITTEN])
def test_documented_quirks_read_every_row_as_written(tmp_path, case, content, rows):
    frame = read_csv(write(tmp_path / "train.csv", content))
    assert list(frame.columns) == ["ImageID", "Labels", "Caption"]
    assert [tuple(row) for row in frame.itertuples(index=False)] == rows


def test_duplicate_image_ids_can_be_allowed_explicitly(tmp_path):
    """One row per caption (e.g. a COCO conversion): every row kept, an image never split across sides."""
    rows = "".join(f'{i % 30}.jpg,{1 + i % 2},"caption {i}"\n' for i in range(60))
    write(tmp_path / "train.csv", HEADER + rows)
    assert len(read_csv(tmp_path / "train.csv", allow_duplicate_ids=True)) == 60
    _, train, val = load_train_val(DatasetPaths.resolve(tmp_path), 0.3, allow_duplicate_ids=True)
    assert len(train) + len(val) == 60
    assert set(train.ImageID).isdisjoint(val.ImageID)
    with pytest.raises(DataFormatError, match=r"train\.csv:32: ImageID '0\.jpg' repeats line 2"):
        load_train_val(DatasetPaths.resolve(tmp_path), 0.3)


# --- Files to predict: test.csv and --eval-csv ----------------------------------------------------

# (case, content of test.csv, keyword arguments, error)
BAD_PREDICTION_CSV = [
    ("zero rows", "ImageID,Caption\n", {}, r"test\.csv: no rows after the header"),
    ("zero rows, CRLF", "ImageID,Caption\r\n\r\n", {}, r"test\.csv: no rows after the header"),
    ("duplicate ImageID", 'ImageID,Caption\n0.jpg,"a"\n0.jpg,"b"\n', {},
     r"test\.csv:3: ImageID '0\.jpg' repeats line 2"),
    ("no Caption column for the caption branch", "ImageID\n0.jpg\n", {"captions": True},
     r"test\.csv:1: header 'ImageID' has no Caption column"),
    ("evaluation file without Labels", 'ImageID,Caption\n0.jpg,"a"\n', {"labels": LabelSet((1, 3))},
     r"test\.csv:1: header .* has no Labels column"),
    ("label id the model does not know", 'ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,3 7,"b"\n',
     {"labels": LabelSet((1, 3))}, r"test\.csv:3: label id 7 is not one of the labels the model was trained on"),
]


@pytest.mark.parametrize("case, content, kwargs, error", BAD_PREDICTION_CSV, ids=[c[0] for c in BAD_PREDICTION_CSV])
def test_bad_csv_to_predict_is_an_error(tmp_path, case, content, kwargs, error):
    path = write(tmp_path / "test.csv", content)
    with pytest.raises(DataFormatError, match=error):
        read_prediction_csv(path, **{"captions": False, **kwargs})


def test_test_csv_without_captions_is_fine_for_image_branches_only(tmp_path):
    frame = read_prediction_csv(write(tmp_path / "test.csv", "ImageID\n0.jpg\n1.jpg\n"), captions=False)
    assert frame["ImageID"].tolist() == ["0.jpg", "1.jpg"]


def _copy(trained_branches: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the shared dataset and weights, for a test to change."""
    data, weights = trained_branches
    shutil.copytree(data, tmp_path / "data")
    shutil.copytree(weights, tmp_path / "weights")
    return tmp_path / "data", tmp_path / "weights"


def _infer(data: Path, weights: Path, output: Path, *extra: str) -> dict:
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


def test_inference_with_an_empty_caption_keeps_the_row(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    test = pd.read_csv(data / "test.csv")
    test.loc[[0, 3], "Caption"] = ""
    test.to_csv(data / "test.csv", index=False)
    _infer(data, weights, tmp_path / "out", "--branches", "caption")
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str, keep_default_na=False)
    assert submission["ImageID"].tolist() == test["ImageID"].tolist()
    assert all(labels.split() for labels in submission["Labels"])


@pytest.mark.parametrize("content, error", [
    ("ImageID,Caption\n", r"test\.csv: no rows after the header"),
    ('ImageID,Caption\n20.jpg,"a"\n20.jpg,"a"\n', r"test\.csv:3: ImageID '20\.jpg' repeats line 2"),
    ('ImageID,Caption\n50.jpg,"a"\n../secret.jpg,"a"\n', r"test\.csv:3: ImageID '\.\./secret\.jpg'"),
    ('ImageID,Caption\n/etc/passwd,"a"\n', r"test\.csv:2: ImageID '/etc/passwd'"),
], ids=["zero rows", "duplicate ImageID", "relative path", "absolute path"])
def test_inference_refuses_a_bad_test_csv_before_opening_any_image(trained_branches, tmp_path, monkeypatch, content,
                                                                   error):
    data, weights = _copy(trained_branches, tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.jpg")  # what ../secret.jpg would reach
    write(data / "test.csv", content)
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    with pytest.raises(DataFormatError, match=error):
        _infer(data, weights, tmp_path / "out")
    assert opened == []
    assert not (tmp_path / "out" / "submission.csv").exists()


def test_evaluation_csv_with_an_unknown_label_names_it_file_and_line(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    frame = pd.read_csv(data / "train.csv").head(5)
    frame.loc[2, "Labels"] = "1 7"
    frame.to_csv(tmp_path / "eval.csv", index=False)
    with pytest.raises(DataFormatError, match=r"eval\.csv:4: label id 7 is not one of the labels"):
        _infer(data, weights, tmp_path / "out", "--evaluate", "--eval-csv", str(tmp_path / "eval.csv"))


# --- Images ---------------------------------------------------------------------------------------

SIZE = 16  # the transform's resolution in the image tests


def _jpeg(path: Path, image: Image.Image) -> None:
    image.save(path, format="JPEG", quality=95)


def _truncated_jpeg(path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _sixteen_bit(path: Path) -> None:
    # Mid grey in 16 bits: convert("RGB") alone would clip it to white.
    Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)).save(path, format="PNG")


def _float_tiff(path: Path) -> None:
    Image.fromarray(np.linspace(0.0, 1.0, 400, dtype=np.float32).reshape(20, 20)).save(path, format="TIFF")


def _palette_with_transparency(path: Path) -> None:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    image.save(path, format="PNG", transparency=0)


# (case, writer of the file, mean colour the transform receives). The file is always named
# <case>.jpg, as in the dataset, whatever its real format.
READABLE_IMAGES: list[tuple[str, Callable[[Path], None], tuple[int, int, int]]] = [
    ("rgb", lambda p: _jpeg(p, Image.new("RGB", (20, 30), (200, 30, 40))), (200, 30, 40)),
    ("grayscale", lambda p: _jpeg(p, Image.new("L", (20, 30), 90)), (90, 90, 90)),
    ("cmyk", lambda p: _jpeg(p, Image.new("CMYK", (20, 30), (0, 255, 255, 0))), (255, 0, 0)),
    ("rgba fully transparent", lambda p: Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(p, format="PNG"),
     (128, 128, 128)),
    ("rgba opaque", lambda p: Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(p, format="PNG"), (0, 0, 255)),
    ("grey with alpha", lambda p: Image.new("LA", (20, 20), (0, 0)).save(p, format="PNG"), (128, 128, 128)),
    ("palette with transparency", _palette_with_transparency, (128, 128, 128)),
    ("16-bit greyscale", _sixteen_bit, (128, 128, 128)),
    ("float greyscale", _float_tiff, (128, 128, 128)),
    ("png under a .jpg name", lambda p: Image.new("RGB", (20, 20), (10, 220, 10)).save(p, format="PNG"),
     (10, 220, 10)),
    ("bilevel", lambda p: Image.new("1", (20, 20), 1).save(p, format="PNG"), (255, 255, 255)),
    ("1x1", lambda p: _jpeg(p, Image.new("RGB", (1, 1), (250, 250, 0))), (250, 250, 0)),
    ("1x600", lambda p: Image.new("RGB", (1, 600), (0, 250, 250)).save(p, format="PNG"), (0, 250, 250)),
    ("large png", lambda p: Image.new("RGB", (1000, 900), (70, 70, 200)).save(p, format="PNG"), (70, 70, 200)),
]


def _bomb(path: Path) -> None:
    Image.new("RGB", (120, 100), "white").save(path, format="PNG")


UNREADABLE_IMAGES: list[tuple[str, Callable[[Path], None] | None]] = [
    ("missing", None),
    ("empty", lambda p: p.write_bytes(b"")),
    ("truncated jpeg", _truncated_jpeg),
    ("jpeg header only", lambda p: p.write_bytes(b"\xff\xd8 truncated")),
    ("text file", lambda p: p.write_text("this is not an image\n")),
    ("html page", lambda p: p.write_text("<!doctype html><html><body>404</body></html>")),
    ("over the decompression-bomb limit", _bomb),
]


class RecordingTransform:
    """Stands in for the image transform and records what the decoder hands to it."""

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.seen.append(image.copy())
        return torch.ones(3, SIZE, SIZE)


def _dataset(tmp_path: Path, names: list[str]) -> tuple[ImageDataset, RecordingTransform]:
    (tmp_path / "data").mkdir(exist_ok=True)
    transform = RecordingTransform()
    return ImageDataset(DatasetPaths.resolve(tmp_path), names, transform, SIZE), transform


@pytest.mark.parametrize("case, make, colour", READABLE_IMAGES, ids=[c[0] for c in READABLE_IMAGES])
def test_every_image_mode_and_shape_becomes_8_bit_rgb(tmp_path, case, make, colour):
    dataset, transform = _dataset(tmp_path, ["x.jpg"])
    make(tmp_path / "data" / "x.jpg")
    tensor, index, readable = dataset[0]
    assert readable and index == 0 and tensor.shape == (3, SIZE, SIZE)
    (image,) = transform.seen
    assert image.mode == "RGB"
    assert min(image.size) <= 4 * SIZE  # a large file is reduced before the resize
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, colour, atol=6)


def test_a_very_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """8000 x 8000: libjpeg decodes at 1/4 scale, a box filter reduces the rest, the output has its shape."""
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8000, 8000), (30, 160, 90)).save(tmp_path / "data" / "big.jpg", quality=75)
    dataset, transform = _dataset(tmp_path, ["big.jpg"])
    tensor, _, readable = dataset[0]
    assert readable and tensor.shape == (3, SIZE, SIZE)
    (image,) = transform.seen
    assert 2 * SIZE <= min(image.size) <= 4 * SIZE  # what reaches the resize is small, whatever the file
    np.testing.assert_allclose(np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0), (30, 160, 90), atol=6)


@pytest.mark.parametrize("case, make", UNREADABLE_IMAGES, ids=[c[0] for c in UNREADABLE_IMAGES])
def test_unreadable_images_are_flagged_not_fatal(tmp_path, monkeypatch, case, make):
    # 120 x 100 = 12,000 pixels: over a limit of 10,000 (Pillow only warns up to 2x its limit).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    dataset, transform = _dataset(tmp_path, ["ok.jpg", "x.jpg"])
    Image.new("RGB", (20, 20), "red").save(tmp_path / "data" / "ok.jpg")
    if make is not None:
        make(tmp_path / "data" / "x.jpg")
    assert dataset[0][2] is True
    tensor, index, readable = dataset[1]
    assert readable is False and index == 1
    assert torch.equal(tensor, torch.zeros(3, SIZE, SIZE))
    assert len(transform.seen) == 1


def test_far_over_the_decompression_bomb_limit_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # 12,000 > 2 x 1,000: Pillow's own error
    dataset, _ = _dataset(tmp_path, ["x.jpg"])
    _bomb(tmp_path / "data" / "x.jpg")
    assert dataset[0][2] is False


def test_inference_writes_a_row_for_every_image_whatever_its_file(trained_branches, tmp_path):
    """Unreadable images fall back to the caption and are listed; odd but valid ones are read."""
    data, weights = _copy(trained_branches, tmp_path)
    test = pd.read_csv(data / "test.csv")
    kinds = [(case, make) for case, make in UNREADABLE_IMAGES if case != "over the decompression-bomb limit"]
    kinds += [(case, make) for case, make, _ in READABLE_IMAGES]
    kinds.append(("8000x8000", lambda p: Image.new("RGB", (8000, 8000), (40, 40, 220)).save(p, format="JPEG")))
    assert len(kinds) <= len(test)
    for (case, make), image_id in zip(kinds, test["ImageID"]):
        (data / "data" / image_id).unlink()
        if make is not None:
            make(data / "data" / image_id)
    test.loc[0, "Caption"] = ""  # a missing image and an empty caption: still a row
    test.to_csv(data / "test.csv", index=False)

    summary = _infer(data, weights, tmp_path / "out")
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str, keep_default_na=False)
    assert submission["ImageID"].tolist() == test["ImageID"].tolist()
    assert all(labels.split() for labels in submission["Labels"])
    n_unreadable = len(kinds) - len(READABLE_IMAGES) - 1
    listed = (tmp_path / "out" / "unreadable_images.txt").read_text().split()
    assert listed == test["ImageID"][:n_unreadable].tolist()
    assert summary["unreadable_images"] == n_unreadable and summary["rows"] == len(test)


def test_fusion_falls_back_to_the_branches_an_image_has():
    probs = {"image": np.array([[np.nan, np.nan], [0.2, 0.4]]), "caption": np.array([[0.9, 0.1], [0.5, 0.5]])}
    np.testing.assert_allclose(weighted_average(probs, {"image": 1.0, "caption": 0.0}), [[0.9, 0.1], [0.2, 0.4]])
    with pytest.raises(FusionError, match=r"1 image\(s\) have no input for any loaded branch"):
        weighted_average({"image": probs["image"]}, {"image": 1.0})


def test_an_unreadable_image_uses_the_caption_even_when_the_weights_ignore_it(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    test = pd.read_csv(data / "test.csv")
    (data / "data" / test["ImageID"][2]).unlink()
    _infer(data, weights, tmp_path / "out", "--fusion-weights", "image=1,caption=0,decoder=0")
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str, keep_default_na=False)
    assert submission["ImageID"].tolist() == test["ImageID"].tolist()
    assert all(labels.split() for labels in submission["Labels"])


def test_an_unreadable_image_with_no_caption_branch_is_an_error_listing_it(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    test = pd.read_csv(data / "test.csv")
    (data / "data" / test["ImageID"][2]).unlink()
    with pytest.raises(FusionError, match=r"1 image\(s\) have no input .* load the caption branch"):
        _infer(data, weights, tmp_path / "out", "--branches", "image,decoder")
    assert (tmp_path / "out" / "unreadable_images.txt").read_text().split() == [test["ImageID"][2]]
    assert not (tmp_path / "out" / "submission.csv").exists()


# --- Checkpoints and caches -----------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): observable, harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _crafted(path: Path, marker: Path, fmt: str) -> Path:
    payload = {"format_version": 1, "branch": "image", "payload": _RunsCode(marker)}
    if fmt == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)  # a genuine torch zip file with the payload inside
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("fmt", ["pickle", "torch zip"])
def test_a_file_crafted_to_run_code_is_refused_and_the_code_never_runs(tmp_path, fmt):
    # The payload is real: an ordinary unpickling runs it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_RunsCode(proof)))
    assert proof.is_dir()

    marker = tmp_path / "pwned"
    path = _crafted(tmp_path / "image.pt", marker, fmt)
    with pytest.raises(CheckpointError, match=r"image\.pt: refused to load"):
        load_checkpoint(path)
    with pytest.raises(BackboneWeightsError, match=r"--backbone-weights .*image\.pt: refused to load"):
        create_backbone("test_efficientnet", str(path), resolution=32)
    assert not marker.exists()


def _stale_cache(path: Path) -> None:
    """A well-formed file of another cache under this cache's file name: the wrong key or shape."""
    if path.suffix == ".json":
        write(path, json.dumps({"store_version": 1, "key": {"num_images": 2}, "num_rows": 2, "shard_rows": 2,
                                "fields": {"features": {"shape": [4], "dtype": "float16"}}}))
    else:
        np.save(path, np.zeros((2, 4), dtype=np.float16))


def _pickled_npy(path: Path, marker: Path) -> None:
    """A genuine .npy file holding a pickled object array whose unpickling runs code."""
    with open(path, "wb") as handle:  # np.save would append ".npy" to a name without it
        np.save(handle, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)


# (case, writer of a file in place of one of the feature cache's files). A shard cut off
# mid-write is in tests/test_backbones.py.
FOREIGN_CACHES: list[tuple[str, Callable[[Path, Path], None]]] = [
    ("text", lambda p, marker: write(p, "hello")),
    ("JSON", lambda p, marker: write(p, '{"features": [1, 2]}')),
    ("crafted torch zip", lambda p, marker: _crafted(p, marker, "torch zip")),
    ("crafted pickle", lambda p, marker: _crafted(p, marker, "pickle")),
    ("crafted object npy", _pickled_npy),
    ("a checkpoint", lambda p, marker: _good_checkpoint(p)),
    ("a file of another cache", lambda p, marker: _stale_cache(p)),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("target", ["manifest.json", "features-00000.npy", "readable-00000.npy"])
@pytest.mark.parametrize("case, make", FOREIGN_CACHES, ids=[c[0] for c in FOREIGN_CACHES])
def test_a_foreign_file_in_the_feature_cache_is_rebuilt(tmp_path, monkeypatch, case, make, target):
    paths = DatasetPaths.resolve(make_tiny_dataset(tmp_path / "tiny", n_train=6, n_test=0))
    ids = [f"{i}.jpg" for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = create_backbone("test_efficientnet", resolution=32)
    cache = tmp_path / "cache"
    settings = ExtractionSettings(cache_dir=cache, device=torch.device("cpu"), batch_size=4, workers=0)
    fresh, fresh_readable = cached_features(backbone, paths, ids, settings)
    fresh = fresh[:]
    (store,) = cache.glob("features-*")

    marker = tmp_path / "pwned"
    (store / target).unlink()
    make(store / target, marker)  # under the very name the cache would be read from
    extracted = count_extracted_rows(monkeypatch)
    rebuilt, readable = cached_features(backbone, paths, ids, settings)
    assert extracted == [6], "the foreign file was read as part of the cache instead of being rebuilt"
    assert torch.equal(rebuilt[:], fresh) and torch.equal(readable, fresh_readable)
    assert not marker.exists()
    # The foreign file was replaced by a cache the next run reads.
    again, _ = cached_features(backbone, paths, ids, settings)
    assert extracted == [6] and torch.equal(again[:], fresh)


def _good_checkpoint(path: Path, **overrides: object) -> Path:
    args = dict(branch="image", state_dict=torch.nn.Linear(3, 2).state_dict(), config={}, label_ids=[1, 3])
    args.update(overrides)
    save_checkpoint(path, **args)
    return path


def _truncated(path: Path) -> None:
    data = _good_checkpoint(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _without(key: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        raw = torch.load(_good_checkpoint(path), weights_only=True)
        del raw[key]
        torch.save(raw, path)
    return make


# (case, writer of image.pt, error). Text file, other branch, other labels, other format
# version and a dict without format_version are in tests/test_checkpoint.py.
WRONG_CHECKPOINTS: list[tuple[str, Callable[[Path], None], str]] = [
    ("truncated .pt", _truncated, r"image\.pt: not a readable checkpoint"),
    ("empty file", lambda p: p.write_bytes(b""), r"image\.pt: not a readable checkpoint"),
    ("a directory", lambda p: p.mkdir(), r"image\.pt: no such checkpoint"),
    ("a bare tensor", lambda p: torch.save(torch.zeros(3), p), r"image\.pt: not a checkpoint of this project"),
    ("a JSON file", lambda p: p.write_text('{"format_version": 1}'),
     r"image\.pt: (not a readable checkpoint|refused to load)"),
    ("no label_ids", _without("label_ids"), r"image\.pt: incomplete checkpoint, no label_ids"),
    ("no state_dict", _without("state_dict"), r"image\.pt: incomplete checkpoint, no state_dict"),
]


@pytest.mark.parametrize("case, make, error", WRONG_CHECKPOINTS, ids=[c[0] for c in WRONG_CHECKPOINTS])
def test_a_wrong_checkpoint_file_is_a_clear_error(tmp_path, case, make, error):
    make(tmp_path / "image.pt")
    with pytest.raises(CheckpointError, match=error):
        load_checkpoint(tmp_path / "image.pt", branch="image", label_ids=[1, 3])


def test_backbone_weights_that_are_not_a_weights_file_name_the_option(tmp_path):
    path = write(tmp_path / "weights.pth", "not weights")
    with pytest.raises(BackboneWeightsError, match=r"--backbone-weights .*weights\.pth: refused to load"):
        create_backbone("test_efficientnet", str(path), resolution=32)


def test_inference_refuses_another_branch_and_mismatched_label_sets(trained_branches, tmp_path):
    data, weights = _copy(trained_branches, tmp_path)
    original = (weights / "image.pt").read_bytes()
    shutil.copy(weights / "caption.pt", weights / "image.pt")
    with pytest.raises(CheckpointError, match=r"image\.pt: holds the 'caption' branch, expected 'image'"):
        _infer(data, weights, tmp_path / "out")

    (weights / "image.pt").write_bytes(original)
    caption = torch.load(weights / "caption.pt", weights_only=True)
    caption["label_ids"] = [1, 3, 18, 20]
    torch.save(caption, weights / "caption.pt")
    with pytest.raises(CheckpointError, match=r"caption\.pt: labels \[1, 3, 18, 20\] differ from .*image\.pt"):
        _infer(data, weights, tmp_path / "out")


# --- Atomic writes --------------------------------------------------------------------------------

_SLOW_WRITER = """
import io, sys, time
from pathlib import Path
import torch
from pipeline.checkpoint import save_checkpoint

real_save = torch.save

def slow_save(obj, target):
    # Serialise for real, then write half, say so, and hang: the parent kills us here.
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    with open(target, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        print("half written", flush=True)
        time.sleep(120)
        handle.write(data[len(data) // 2:])

torch.save = slow_save
save_checkpoint(Path(sys.argv[1]), branch="image", state_dict={"w": torch.full((500, 500), 2.0)},
                config={"run": 2}, label_ids=[1, 3])
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    target = _good_checkpoint(tmp_path / "image.pt", config={"run": 1})
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        said = child.stdout.readline().strip() if ready else "(nothing within 120 s)"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert said == "half written", child.stderr.read()  # read after the kill: it cannot block
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint(target, branch="image", label_ids=[1, 3])["config"] == {"run": 1}
    # The half-written temporary file is left behind under a name no loader or glob picks up.
    (stray,) = [p for p in tmp_path.iterdir() if p != target]
    assert stray.name.startswith(".image.pt.") and stray.name.endswith(".tmp")
    assert sorted(tmp_path.glob("*.pt")) == [target] and not list(tmp_path.glob("features-*"))
    with pytest.raises(CheckpointError):
        safe_torch_load(stray)


def _interrupted_write(*args: object, **kwargs: object) -> None:
    """Stands in for torch.save, Path.write_text or DataFrame.to_csv: writes part of the
    file it was given, then the process is interrupted."""
    target = next(arg for arg in args if isinstance(arg, (str, os.PathLike)) or hasattr(arg, "write"))
    if hasattr(target, "write"):  # a file being streamed into
        target.write("half a file")
    else:
        Path(target).write_bytes(b"half a file")
    raise KeyboardInterrupt


class _FixedProbabilities:
    """Stands in for the branches: the given image-branch probabilities, every image readable."""

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def probabilities(self, frame: pd.DataFrame, inputs: Inputs, description: str = "") -> BranchProbabilities:
        return BranchProbabilities({"image": self.probs}, [])


def _submission(path: Path, k: int) -> None:
    """submission.csv as inference writes it; versions 1 and 2 swap the labels of the two images."""
    frame = pd.DataFrame({"ImageID": ["0.jpg", "1.jpg"], "Caption": ["", ""]})
    settings = FusionSettings(branches=["image"], label_ids=[1, 3], weights={"image": 1.0})
    predict_in_chunks(_FixedProbabilities(np.eye(2)[:, :: (-1) ** k]), frame, Inputs(GivenFiles.of([])), settings,
                      LabelSet((1, 3)), path, chunk_size=2, description="test")


def _fusion(path: Path, threshold: float) -> None:
    save_fusion(FusionSettings(branches=["image"], label_ids=[1, 3], weights={"image": 1.0}, threshold=threshold),
                path)


# (file, function writing version k of it, what to interrupt)
ATOMIC_WRITERS: list[tuple[str, Callable[[Path, int], None], tuple[object, str]]] = [
    ("image.pt", lambda p, k: _good_checkpoint(p, config={"run": k}), (torch, "save")),
    ("features-x.pt", lambda p, k: atomic_torch_save({"features": torch.full((4, 2), float(k))}, p), (torch, "save")),
    ("fusion.json", lambda p, k: _fusion(p, 0.1 * k), (Path, "write_text")),
    ("submission.csv", _submission, (pd.DataFrame, "to_csv")),
    ("val_probs_image.csv", lambda p, k: save_probabilities(p, ["0.jpg"], [1, 3], np.full((1, 2), 0.1 * k)),
     (pd.DataFrame, "to_csv")),
]


@pytest.mark.parametrize("name, save, target", ATOMIC_WRITERS, ids=[w[0] for w in ATOMIC_WRITERS])
def test_an_interrupted_write_leaves_the_previous_file(tmp_path, monkeypatch, name, save, target):
    path = tmp_path / name
    save(path, 1)
    before = path.read_bytes()
    monkeypatch.setattr(*target, _interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        save(path, 2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [name]  # the temporary file is removed
    save(path, 2)
    assert path.read_bytes() != before


# --- Out of memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("error_class", sorted({torch.cuda.OutOfMemoryError,
                                                getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)},
                                               key=str))
def test_gpu_out_of_memory_suggests_a_smaller_batch_size(error_class):
    with pytest.raises(error_class, match=r"out of GPU memory at --batch-size 64; try --batch-size 32") as caught:
        with runtime.oom_hint(64):
            raise error_class("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "Tried to allocate 2.00 GiB" in str(caught.value)
    assert isinstance(caught.value.__cause__, error_class)
    with pytest.raises(error_class, match=r"--batch-size is already 1: try a smaller --resolution"):
        with runtime.oom_hint(1):
            raise error_class("CUDA out of memory")


def test_oom_hint_leaves_other_errors_and_success_alone():
    with pytest.raises(RuntimeError, match="^something else$"):
        with runtime.oom_hint(64):
            raise RuntimeError("something else")
    with runtime.oom_hint(64):
        value = 1
    assert value == 1
