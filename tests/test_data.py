"""The data layer: exact reading of the competition's quirky CSVs, labels and the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.dataset import (
    DataFormatError,
    DatasetPaths,
    LabelSet,
    group_by_image,
    load_train_val,
    read_csv,
    split_train_val,
    validation_mask,
)

# Lines copied in the shape of the original train.csv, one per quirk.
QUIRKY_TRAIN = (
    "ImageID,Labels,Caption\n"
    '0.jpg,1,"Woman in swim suit holding parasol on sunny day."\n'
    '1014.jpg,18,"Atop an oriental rug rests a dog and two low-lying tables and a taller one\n'
    'full of very tidily arranged piles of jeans and tops."\n'
    '4787.jpg,1 18,"Man and his dog laying on the floor inside of a room/"\n'
    '4788.jpg,1,"the batter is swinging his bat to hit the ball"\n'
    '9084.jpg,3 1 11,"A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground."\n'
    '9508.jpg,1,"A cow in street with writing that reads "oh no, not beef on the menu again!""\n'
    '6751.jpg,4,"Red motor \n'
    'scooter parked on the sand with a sunset in background."\n'
    '14957.jpg,3 13,"A red stop sign next to a paper sign that reads "COURT"/"\n'
)

EXPECTED = {
    "0.jpg": ([1], "Woman in swim suit holding parasol on sunny day."),
    "1014.jpg": ([18], "Atop an oriental rug rests a dog and two low-lying tables and a taller one\n"
                       "full of very tidily arranged piles of jeans and tops."),
    "4787.jpg": ([1, 18], "Man and his dog laying on the floor inside of a room/"),
    "4788.jpg": ([1], "the batter is swinging his bat to hit the ball"),
    "9084.jpg": ([3, 1, 11], 'A street sign labeled "Seltzer Way," with a red fire hydrant in the foreground.'),
    "9508.jpg": ([1], 'A cow in street with writing that reads "oh no, not beef on the menu again!"'),
    "6751.jpg": ([4], "Red motor \nscooter parked on the sand with a sunset in background."),
    "14957.jpg": ([3, 13], 'A red stop sign next to a paper sign that reads "COURT"/'),
}


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def check_expected(frame: pd.DataFrame) -> None:
    assert list(frame.columns) == ["ImageID", "Labels", "Caption"]
    assert frame["ImageID"].tolist() == list(EXPECTED)
    for image_id, labels, caption in frame.itertuples(index=False):
        assert (labels, caption) == EXPECTED[image_id], image_id


def test_reads_every_quirk_of_the_original_train_file(tmp_path):
    check_expected(read_csv(write(tmp_path / "train.csv", QUIRKY_TRAIN)))


def test_the_naive_readers_fail_on_the_same_file(tmp_path):
    """The reason read_csv exists: pandas raises, and skipping bad lines loses rows."""
    path = write(tmp_path / "train.csv", QUIRKY_TRAIN)
    with pytest.raises(pd.errors.ParserError):
        pd.read_csv(path)
    assert len(pd.read_csv(path, on_bad_lines="skip")) < len(EXPECTED)


def test_clean_csv_written_by_pandas_reads_the_same(tmp_path):
    original = read_csv(write(tmp_path / "train.csv", QUIRKY_TRAIN))
    clean = original.assign(Labels=[" ".join(map(str, labels)) for labels in original["Labels"]])
    clean.to_csv(tmp_path / "clean.csv", index=False)
    check_expected(read_csv(tmp_path / "clean.csv"))


def test_reads_a_test_file_without_labels(tmp_path):
    path = write(tmp_path / "test.csv", (
        "ImageID,Caption\n"
        '30000.jpg,"A little girl waring a krispy kreme hat holding a box of krispy kreme donuts."\n'
        '36889.jpg,"Stop sign with added "war" annotation, at an intersection."\n'
    ))
    frame = read_csv(path)
    assert list(frame.columns) == ["ImageID", "Caption"]
    assert frame["Caption"].tolist()[1] == 'Stop sign with added "war" annotation, at an intersection.'


def test_crlf_line_endings_and_bom_read_the_same(tmp_path):
    data = b"\xef\xbb\xbf" + QUIRKY_TRAIN.replace("\n", "\r\n").encode("utf-8")
    frame = read_csv(write(tmp_path / "train.csv", data))
    # Newlines inside captions come back as "\n" whatever the file used.
    check_expected(frame)


def test_a_record_that_cannot_be_read_names_its_line(tmp_path):
    path = write(tmp_path / "train.csv", QUIRKY_TRAIN + "not a record at all\n")
    with pytest.raises(DataFormatError, match=r"train\.csv:12:"):
        read_csv(path)


def test_non_integer_label_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,dog,"b"\n')
    with pytest.raises(DataFormatError, match=r"train\.csv:3: Labels 'dog'"):
        read_csv(path)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = write(tmp_path / "train.csv", b'ImageID,Labels,Caption\n0.jpg,1,"a"\n1.jpg,1,"caf\xe9"\n')
    with pytest.raises(DataFormatError, match=r"train\.csv:3: byte 0xe9 is not UTF-8"):
        read_csv(path)


def test_missing_id_column_is_an_error(tmp_path):
    path = write(tmp_path / "train.csv", 'Labels,Caption\n1,"a"\n')
    with pytest.raises(DataFormatError, match="no ImageID column"):
        read_csv(path)


def test_label_set_encodes_and_decodes_original_ids():
    frame = pd.DataFrame({"ImageID": ["a", "b"], "Labels": [[19, 1], [3]], "Caption": ["", ""]})
    labels = LabelSet.from_frame(frame)
    assert labels.ids == (1, 3, 19)
    matrix = labels.encode(frame["Labels"])
    np.testing.assert_array_equal(matrix, [[1, 0, 1], [0, 1, 0]])
    assert labels.decode(matrix) == [[1, 19], [3]]
    with pytest.raises(ValueError, match="label id 7"):
        labels.encode([[7]])


def test_split_is_deterministic_and_independent_of_other_rows():
    ids = [f"{i}.jpg" for i in range(4000)]
    mask = validation_mask(ids, 0.15)
    assert 0.13 < mask.mean() < 0.17
    # The same image lands on the same side whatever else is in the file.
    np.testing.assert_array_equal(validation_mask(ids[::-1], 0.15)[::-1], mask)
    np.testing.assert_array_equal(validation_mask(ids[:100], 0.15), mask[:100])
    frame = pd.DataFrame({"ImageID": ids, "Labels": [[1]] * 4000, "Caption": [""] * 4000})
    train, val = split_train_val(frame, 0.15)
    assert len(train) + len(val) == 4000 and set(train.ImageID).isdisjoint(val.ImageID)


def test_empty_training_split_is_an_error(tmp_path):
    write(tmp_path / "train.csv", 'ImageID,Labels,Caption\n0.jpg,1,"a"\n')
    paths = DatasetPaths.resolve(tmp_path)
    with pytest.raises(DataFormatError, match="training split is empty"):
        load_train_val(paths, val_fraction=0.999999)


@pytest.mark.parametrize("image_id", ["../x.jpg", "/etc/passwd", "a/b.jpg", "x.jpg\0", "..", "a\\b.jpg"])
def test_image_ids_that_are_paths_are_refused(tmp_path, image_id):
    paths = DatasetPaths.resolve(tmp_path)
    with pytest.raises(ValueError, match="not a plain file name"):
        paths.image_path(image_id)


CAPTION_ROWS = (
    "ImageID,Labels,Caption\n"
    '1.jpg,1 3,"a man by a car"\n'
    '2.jpg,18,"a dog"\n'
    '1.jpg,1 3,"a car and a person"\n'
)


def test_a_repeated_image_id_is_an_error_naming_both_lines(tmp_path):
    path = write(tmp_path / "train.csv", CAPTION_ROWS)
    with pytest.raises(DataFormatError, match=r"train\.csv:4: ImageID '1\.jpg' repeats line 2.*dataset\.json"):
        read_csv(path)
    assert read_csv(path, allow_duplicate_ids=True)["ImageID"].tolist() == ["1.jpg", "2.jpg", "1.jpg"]


def test_caption_rows_are_declared_in_dataset_json(tmp_path):
    write(tmp_path / "train.csv", CAPTION_ROWS)
    write(tmp_path / "test.csv", CAPTION_ROWS)
    with pytest.raises(DataFormatError, match="repeats line 2"):
        read_csv(tmp_path / "train.csv")
    write(tmp_path / "dataset.json", '{"train.csv": {"repeated_ids": true}, "test.csv": {"repeated_ids": false}}')
    assert len(read_csv(tmp_path / "train.csv")) == 3
    with pytest.raises(DataFormatError, match="repeats line 2"):
        read_csv(tmp_path / "test.csv")
    _, train, val = load_train_val(DatasetPaths.resolve(tmp_path), val_fraction=0.0)
    assert len(train) == 3 and val.empty
    write(tmp_path / "dataset.json", '{"train.csv": ')
    with pytest.raises(DataFormatError, match=r"dataset\.json: not valid JSON"):
        read_csv(tmp_path / "train.csv")


def test_group_by_image_keeps_first_appearance_order_and_averages_rows(tmp_path):
    frame = read_csv(write(tmp_path / "train.csv", CAPTION_ROWS), allow_duplicate_ids=True)
    groups = group_by_image(frame)
    assert groups.images["ImageID"].tolist() == ["1.jpg", "2.jpg"]
    assert groups.images["Labels"].tolist() == [[1, 3], [18]]
    assert groups.row_image.tolist() == [0, 1, 0]
    probs = np.array([[0.2, 0.4], [0.9, 0.1], [0.6, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(groups.mean(probs), [[0.4, 0.2], [0.9, 0.1]], rtol=1e-6)
    assert groups.mean(probs).dtype == np.float32
    # Without repeats, the grouping is the frame itself.
    unique = group_by_image(frame.iloc[:2])
    assert unique.images["ImageID"].tolist() == ["1.jpg", "2.jpg"] and unique.row_image.tolist() == [0, 1]


def test_caption_rows_of_one_image_must_agree_on_labels(tmp_path):
    path = write(tmp_path / "train.csv", CAPTION_ROWS.replace('1.jpg,1 3,"a car and', '1.jpg,1,"a car and'))
    with pytest.raises(DataFormatError, match=r"rows of ImageID '1\.jpg' disagree on Labels \(\[1, 3\] and \[1\]\)"):
        group_by_image(read_csv(path, allow_duplicate_ids=True))


def test_decoded_images_stack_channels_last_without_changing_a_pixel(tmp_path):
    import torch
    from PIL import Image

    from pipeline.data.dataset import DatasetPaths
    from pipeline.data.images import ImageDataset
    from pipeline.data.transforms import build_transform, stack_pixels

    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (40, 30)), ("b.png", (17, 23))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "data" / name)
    preprocessing = {"resolution": 12, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    dataset = ImageDataset(DatasetPaths.resolve(str(tmp_path), None), ["a.jpg", "b.png", "missing.jpg"],
                           build_transform(preprocessing, normalize=False), 12, blank_dtype=torch.uint8)
    images = [dataset[i][0] for i in range(3)]  # two decoded (channel-last in memory), one blank
    batch = stack_pixels(images)
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 12, 12)
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(images))
