"""Checks on the real competition data (`make check-real`); never part of `make test`."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.data.dataset import LabelSet, read_csv, split_train_val
from pipeline.labels import COMP5329_LABEL_IDS


def test_train_csv_reads_all_15000_rows(shared):
    frame = read_csv(shared / "train.csv")
    assert len(frame) == 15000
    assert frame["ImageID"].tolist() == [f"{i}.jpg" for i in range(15000)]
    assert list(LabelSet.from_frame(frame).ids) == COMP5329_LABEL_IDS


def test_test_csv_reads_all_10000_rows(shared):
    frame = read_csv(shared / "test.csv")
    assert len(frame) == 10000
    assert frame["ImageID"].tolist() == [f"{i}.jpg" for i in range(30000, 40000)]
    caption = frame.set_index("ImageID").loc["36889.jpg", "Caption"]
    assert caption == 'Stop sign with added "war" annotation, at an intersection.'


@pytest.mark.parametrize(
    "image_id, labels, caption",
    [
        (
            "9084.jpg",
            [3, 1, 11],
            'A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground '
            "and a street stretching into the background.",
        ),
        ("9508.jpg", [1], 'A cow in street with writing that reads "oh no, not beef on the menu again!"'),
        ("4787.jpg", [1, 18], "Man and his dog laying on the floor inside of a room/"),
        ("4788.jpg", [1], "the batter is swinging his bat to hit the ball"),
        ("14712.jpg", [8, 1, 3, 6], "A bus stops at a small city bus stop/"),
        ("14957.jpg", [3, 13], 'A red stop sign next to a paper sign that reads "COURT"/'),
        (
            "1014.jpg",
            [18],
            "Atop an oriental rug rests a dog and two low-lying tables and a taller one\n"
            "full of very tidily arranged piles of jeans and tops.",
        ),
        ("6751.jpg", [4], "Red motor \nscooter parked on the sand with a sunset in background."),
    ],
)
def test_quirky_rows_are_intact(shared, image_id, labels, caption):
    row = read_csv(shared / "train.csv").set_index("ImageID").loc[image_id]
    assert row["Labels"] == labels
    assert row["Caption"] == caption


def test_naive_pandas_loses_rows_that_read_csv_keeps(shared):
    skipped = pd.read_csv(shared / "train.csv", on_bad_lines="skip")
    assert len(skipped) < 15000 < len(skipped) + 10


def test_split_is_about_15_percent_and_stable(shared):
    frame = read_csv(shared / "train.csv")
    _, val = split_train_val(frame, 0.15)
    assert 0.14 < len(val) / len(frame) < 0.16
    _, again_val = split_train_val(frame.sample(frac=1.0, random_state=1), 0.15)
    assert set(val["ImageID"]) == set(again_val["ImageID"])
