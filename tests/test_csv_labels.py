"""Valid CSV quoting over the record-start rule, over-long ImageIDs, and the label set of a training file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline.data.dataset import DataFormatError, DatasetPaths, load_train_val, read_csv

HEADER = "ImageID,Labels,Caption\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(frame: pd.DataFrame) -> list[tuple]:
    return [tuple(row) for row in frame.itertuples(index=False)]


# --- Valid quoting wins over the record-start rule --------------------------------------------------

# (case, records after the header, expected (ImageID, Labels, Caption) rows, first line of each record)
QUOTED = [
    ("a record-start line inside a quoted caption",
     '0.jpg,1,"first line\n99999.jpg, welcome to town"\n1.jpg,3,"a car"\n',
     [("0.jpg", [1], "first line\n99999.jpg, welcome to town"), ("1.jpg", [3], "a car")], [2, 4]),
    ("doubled quotes around it",
     '0.jpg,1,"a ""sign""\n99999.jpg,3,""welcome"" to town"\n1.jpg,3,"a car"\n',
     [("0.jpg", [1], 'a "sign"\n99999.jpg,3,"welcome" to town'), ("1.jpg", [3], "a car")], [2, 4]),
    ("several such lines and a blank one",
     '0.jpg,1,"a\n\n5.jpg,1,b\n6.jpg,3,c"\n1.jpg,3,"a car"\n',
     [("0.jpg", [1], "a\n\n5.jpg,1,b\n6.jpg,3,c"), ("1.jpg", [3], "a car")], [2, 6]),
    # Not valid CSV: the quote after 5 is an inch mark, so the record ends before the next id.
    ("an unescaped odd quote mid-file",
     '0.jpg,1,"a 5" screen"\n1.jpg,3,"a car"\n2.jpg,18,"a dog"\n',
     [("0.jpg", [1], 'a 5" screen'), ("1.jpg", [3], "a car"), ("2.jpg", [18], "a dog")], [2, 3, 4]),
    ("a caption that never closes its quote, mid-file",
     '0.jpg,1,"a person\n1.jpg,3,"a car"\n2.jpg,18,"a dog"\n',
     [("0.jpg", [1], '"a person'), ("1.jpg", [3], "a car"), ("2.jpg", [18], "a dog")], [2, 3, 4]),
]


@pytest.mark.parametrize("case, body, expected, lines", QUOTED, ids=[c[0] for c in QUOTED])
def test_valid_quoting_is_honoured_and_broken_quotes_still_stop_at_the_next_record(tmp_path, case, body,
                                                                                  expected, lines):
    frame = read_csv(write(tmp_path / "train.csv", HEADER + body))
    assert rows(frame) == expected
    assert frame.attrs["lines"] == lines


def test_captions_written_by_pandas_read_back_exactly(tmp_path):
    """pandas quotes a caption with a newline and doubles its quotes: whatever follows the newline."""
    captions = ['first line\n99999.jpg, welcome to town', 'say "cheese"\n7.jpg,1,"x"', "plain"]
    frame = pd.DataFrame({"ImageID": ["0.jpg", "1.jpg", "2.jpg"], "Labels": ["1", "3 1", "18"],
                          "Caption": captions})
    frame.to_csv(tmp_path / "train.csv", index=False)
    assert rows(read_csv(tmp_path / "train.csv")) == [("0.jpg", [1], captions[0]), ("1.jpg", [3, 1], captions[1]),
                                                      ("2.jpg", [18], captions[2])]


# --- ImageIDs longer than a file name can be ---------------------------------------------------------

def test_an_image_id_longer_than_a_file_name_is_refused_at_its_line(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = "x" * (limit - 4) + ".jpg"
    path = write(tmp_path / "train.csv", HEADER + f'{longest},1,"a"\n1.jpg,3,"b"\n')
    assert read_csv(path)["ImageID"].tolist() == [longest, "1.jpg"]
    write(path, HEADER + f'0.jpg,1,"a"\nx{longest},3,"b"\n')
    with pytest.raises(DataFormatError, match=rf"train\.csv:3: ImageID 'x+'\.\.\. is {limit + 1} bytes long; "
                                              rf"a file name can be at most {limit} bytes here"):
        read_csv(path)
    # The limit is in bytes: 'é' takes two of them.
    wide = "é" * (limit // 2) + ".jpg"
    write(path, HEADER + f'{wide},1,"a"\n')
    with pytest.raises(DataFormatError, match=rf"train\.csv:2: ImageID 'é+'\.\.\. is {2 * (limit // 2) + 4} bytes"):
        read_csv(path)


# --- Label ids declared by dataset.json -------------------------------------------------------------

def test_a_label_id_that_dataset_json_does_not_declare_is_refused_at_its_line(tmp_path):
    write(tmp_path / "dataset.json", '{"train.csv": {"labels": {"1": "person", "3": "car", "18": "dog"}}}')
    path = write(tmp_path / "train.csv", HEADER + '0.jpg,1 3,"a"\n1.jpg,18,"b"\n')
    assert read_csv(path)["Labels"].tolist() == [[1, 3], [18]]
    write(path, HEADER + '0.jpg,1 3,"a"\n1.jpg,18,"b"\n2.jpg,1 12,"c"\n')
    with pytest.raises(DataFormatError, match=r"train\.csv:4: label id 12 is not one of the label ids dataset\.json "
                                              r"beside the file declares: \[1, 3, 18\]$"):
        read_csv(path)
    write(tmp_path / "dataset.json", '{"train.csv": {"labels": ["person", "car"]}}')
    with pytest.raises(DataFormatError, match=r"dataset\.json: \"labels\" of 'train\.csv' must map label ids to names"):
        read_csv(path)


# --- The label set of the training split ------------------------------------------------------------

def labelled(n: int, labels: str = "1") -> str:
    return "".join(f'{i}.jpg,{labels},"caption {i}"\n' for i in range(n))


def test_a_training_split_with_one_label_is_refused_naming_the_file(tmp_path):
    write(tmp_path / "train.csv", HEADER + labelled(60))
    with pytest.raises(DataFormatError, match=r"train\.csv: the training split holds only label 1; a multi-label "
                                              r"model needs at least two distinct label ids among its training images"):
        load_train_val(DatasetPaths.resolve(tmp_path), 0.15)


def test_a_second_label_only_in_the_validation_split_is_named(tmp_path):
    # Of 0.jpg .. 59.jpg, the split (a hash of the ImageID) puts 26, 34, 36 and 38 in validation at 0.15.
    write(tmp_path / "train.csv", HEADER + '0.jpg,1,"a"\n26.jpg,3,"b"\n2.jpg,1,"c"\n')
    with pytest.raises(DataFormatError, match=r"train\.csv: the training split holds only label 1 \(3 only in the "
                                              r"validation split\)"):
        load_train_val(DatasetPaths.resolve(tmp_path), 0.15)


def test_rare_labels_are_warned_about_with_their_lines(tmp_path, caplog):
    """A mistyped id in one row of a 60-row file (``1 12``, ``99 1``) is a class with one example."""
    rows = [f'{i}.jpg,{1 + i % 2},"caption {i}"' for i in range(60)]
    rows[9] = '9.jpg,1 12,"caption 9"'
    rows[40] = '40.jpg,99 1,"caption 40"'
    for i in (3, 5, 7):
        rows[i] = f'{i}.jpg,2 5,"caption {i}"'
    rows[26] = '26.jpg,1 7,"caption 26"'  # in the validation split
    write(tmp_path / "train.csv", HEADER + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.dataset"):
        labels, train, val = load_train_val(DatasetPaths.resolve(tmp_path), 0.15)
    assert labels.ids == (1, 2, 5, 7, 12, 99)
    path = tmp_path / "train.csv"
    assert caplog.messages == [
        f"{path}: label 5 has only 3 training images (lines 5, 7, 9); a label this rare is barely learned: check "
        "the id is not a mistake",
        f"{path}: label 7 is only in the validation split (line 28): the model cannot learn it",
        f"{path}: label 12 has only 1 training image (line 11); a label this rare is barely learned: check the id "
        "is not a mistake",
        f"{path}: label 99 has only 1 training image (line 42); a label this rare is barely learned: check the id "
        "is not a mistake",
    ]
