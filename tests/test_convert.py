"""pipeline.tools.convert: COCO and Pascal VOC files built here, converted, then trained on and predicted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import inference
import train_caption_rnn
import train_efficientnet
from pipeline.tools.convert import ConvertError, convert_coco, convert_voc, main
from pipeline.data.dataset import DataFormatError, DatasetPaths, load_train_val
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

CATEGORIES = {1: "person", 2: "bicycle", 3: "car", 18: "dog", 19: "horse", 44: "bottle"}
COLOURS = {1: (220, 40, 40), 2: (40, 220, 220), 3: (40, 200, 40), 18: (40, 40, 220), 19: (220, 220, 40),
           44: (200, 40, 200)}


def draw(path: Path, labels: list[int]) -> None:
    """A 32x32 image with one coloured bar per label."""
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    for k, label in enumerate(labels):
        image[4:28, 2 + 10 * k:10 + 10 * k] = COLOURS[label]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_coco(root: Path, images: dict[int, tuple[list[int], list[str]]], name: str = "train2017") -> dict[str, Path]:
    """COCO 2017-style instances and captions files for {image id: (annotated category ids, captions)}.

    Caption annotation ids decrease down the file within an image, so "first" (lowest id)
    is not simply the first one listed.
    """
    entries, annotations, captions = [], [], []
    for image_id, (labels, texts) in images.items():
        file_name = f"{image_id:012d}.jpg"
        entries.append({"license": 1, "file_name": file_name, "coco_url": "", "height": 32, "width": 32,
                        "date_captured": "2013-11-14 16:28:13", "flickr_url": "", "id": image_id})
        for label in labels:
            annotations.append({"segmentation": [[1, 1, 5, 1, 5, 5]], "area": 16.0, "iscrowd": 0, "image_id": image_id,
                                "bbox": [1, 1, 4, 4], "category_id": label, "id": 1000 + len(annotations)})
        for k, text in enumerate(texts):
            captions.append({"image_id": image_id, "id": 100 * image_id + len(texts) - k, "caption": text})
        draw(root / name / file_name, [label for label in labels if label in COLOURS][:3])
    categories = [{"supercategory": "thing", "id": i, "name": n} for i, n in CATEGORIES.items()]
    info = {"description": "tiny COCO", "version": "1.0", "year": 2017}
    files = {"instances": root / f"instances_{name}.json", "captions": root / f"captions_{name}.json",
             "images": root / name}
    files["instances"].write_text(json.dumps({"info": info, "licenses": [], "images": entries,
                                              "annotations": annotations, "categories": categories}))
    files["captions"].write_text(json.dumps({"info": info, "licenses": [], "images": entries,
                                             "annotations": captions}))
    return files


SMALL_COCO = {
    7: ([1, 1, 3], ["A man next to a car.", "A  person\nby a red car. ", "Someone stands near a car."]),
    3: ([18, 1], ["A dog with its owner.", "A person walking a dog."]),
    12: ([44], ["A bottle on a table."]),
    5: ([], ["An empty street."]),
    9: ([3, 2], ["A bicycle leaning on a car.", "A car and a bike.", "Bike by a car."]),
}


def coco_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["coco", "--instances", str(files["instances"]), "--captions", str(files["captions"]),
            "--images", str(files["images"]), "--out", str(out), *extra]


def test_coco_writes_the_chosen_labels_and_the_first_caption(tmp_path, capsys):
    files = write_coco(tmp_path, SMALL_COCO)
    report = main(coco_args(files, tmp_path / "out", "--labels", "1-19"))
    assert (tmp_path / "out" / "train.csv").read_text() == (
        "ImageID,Labels,Caption\n"
        "000000000007.jpg,1 3,Someone stands near a car.\n"
        "000000000003.jpg,1 18,A person walking a dog.\n"
        "000000000009.jpg,2 3,Bike by a car.\n"
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"coco: wrote {tmp_path / 'out' / 'train.csv'}: 3 rows, 3 images linked in {tmp_path / 'out' / 'data'}"
    assert printed[1] == "  2 images without a chosen label dropped (--keep-empty keeps them)"
    assert printed[2] == "  images per label: 1 person: 2, 2 bicycle: 1, 3 car: 2, 18 dog: 1, 19 horse: 0"
    assert report.dropped_empty == 2 and report.label_counts == {1: 2, 2: 1, 3: 2, 18: 1, 19: 0}
    link = tmp_path / "out" / "data" / "000000000007.jpg"
    assert link.is_symlink() and link.resolve() == (files["images"] / "000000000007.jpg").resolve()
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "000000000003.jpg", "000000000007.jpg", "000000000009.jpg"]
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())["train.csv"]
    assert info["labels"] == {"1": "person", "2": "bicycle", "3": "car", "18": "dog", "19": "horse"}
    assert info["repeated_ids"] is False and info["caption"] == "first"


def test_coco_keep_empty_all_labels_and_copies(tmp_path):
    files = write_coco(tmp_path, SMALL_COCO)
    report = main(coco_args(files, tmp_path / "out", "--keep-empty", "--copy"))
    frame = pd.read_csv(tmp_path / "out" / "train.csv", dtype=str, keep_default_na=False)
    assert frame[["ImageID", "Labels"]].values.tolist() == [
        ["000000000007.jpg", "1 3"], ["000000000003.jpg", "1 18"], ["000000000012.jpg", "44"],
        ["000000000005.jpg", ""], ["000000000009.jpg", "2 3"]]
    assert report.kept_empty == 1 and report.dropped_empty == 0
    assert "  1 image without a chosen label kept with no labels (--keep-empty)" in report.lines()
    copied = tmp_path / "out" / "data" / "000000000005.jpg"
    assert copied.is_file() and not copied.is_symlink()
    # The project's reader gives the empty label set as [].
    _, train, val = load_train_val(DatasetPaths.resolve(tmp_path / "out"), 0.0)
    assert train["Labels"].tolist()[3] == []


def test_coco_caption_modes(tmp_path):
    files = write_coco(tmp_path, SMALL_COCO)
    main(coco_args(files, tmp_path / "all", "--labels", "1,3", "--caption", "all"))
    frame = pd.read_csv(tmp_path / "all" / "train.csv", dtype=str)
    # One row per caption, in annotation-id order, whitespace collapsed.
    assert frame.values.tolist() == [
        ["000000000007.jpg", "1 3", "Someone stands near a car."],
        ["000000000007.jpg", "1 3", "A person by a red car."],
        ["000000000007.jpg", "1 3", "A man next to a car."],
        ["000000000003.jpg", "1", "A person walking a dog."],
        ["000000000003.jpg", "1", "A dog with its owner."],
        ["000000000009.jpg", "3", "Bike by a car."],
        ["000000000009.jpg", "3", "A car and a bike."],
        ["000000000009.jpg", "3", "A bicycle leaning on a car."],
    ]
    assert json.loads((tmp_path / "all" / "dataset.json").read_text())["train.csv"]["repeated_ids"] is True
    _, train, val = load_train_val(DatasetPaths.resolve(tmp_path / "all"), 0.0)
    assert len(train) == 8

    chosen = {}
    for seed in ("0", "0", "5"):
        out = tmp_path / f"random{seed}"
        main(coco_args(files, out, "--caption", "random", "--seed", seed))
        chosen.setdefault(seed, []).append(pd.read_csv(out / "train.csv")["Caption"].tolist())
    assert chosen["0"][0] == chosen["0"][1]  # the same seed gives the same captions
    assert chosen["0"][0] != chosen["5"][0]
    for image_id, caption in zip(pd.read_csv(tmp_path / "random0" / "train.csv")["ImageID"], chosen["0"][0]):
        assert caption in [" ".join(t.split()) for t in SMALL_COCO[int(image_id[:-4])][1]]


def test_coco_test_split_writes_captions_and_the_labels_aside(tmp_path):
    files = write_coco(tmp_path, SMALL_COCO, name="val2017")
    report = main(coco_args(files, tmp_path / "out", "--split", "test", "--labels", "1-19"))
    assert (tmp_path / "out" / "test.csv").read_text() == (
        "ImageID,Caption\n"
        "000000000007.jpg,Someone stands near a car.\n"
        "000000000003.jpg,A person walking a dog.\n"
        "000000000009.jpg,Bike by a car.\n"
    )
    assert pd.read_csv(tmp_path / "out" / "test_labels.csv").columns.tolist() == ["ImageID", "Labels", "Caption"]
    assert tmp_path / "out" / "test_labels.csv" in report.extra_files
    assert not (tmp_path / "out" / "train.csv").exists()


def test_converting_again_keeps_the_images_and_never_replaces_another_image(tmp_path):
    files = write_coco(tmp_path, SMALL_COCO)
    main(coco_args(files, tmp_path / "out"))
    link = tmp_path / "out" / "data" / "000000000007.jpg"
    main(coco_args(files, tmp_path / "out", "--labels", "1-19"))
    assert link.resolve() == (files["images"] / "000000000007.jpg").resolve()
    # val2017 images with the same file names must not replace the ones train.csv uses.
    other = write_coco(tmp_path, SMALL_COCO, name="val2017")
    for name in ("000000000007.jpg", "000000000012.jpg"):
        draw(other["images"] / name, [19])
    with pytest.raises(ConvertError, match=r"out/data/000000000007\.jpg already exists and is a different image "
                                           r"than .*val2017"):
        main(coco_args(other, tmp_path / "out", "--split", "test"))
    assert not (tmp_path / "out" / "test.csv").exists()
    assert link.resolve() == (files["images"] / "000000000007.jpg").resolve()
    main(coco_args(files, tmp_path / "copies", "--copy"))
    main(coco_args(files, tmp_path / "copies", "--copy"))
    assert (tmp_path / "copies" / "data" / "000000000007.jpg").is_file()
    assert not (tmp_path / "copies" / "data" / "000000000007.jpg").is_symlink()
    with pytest.raises(ConvertError, match="already exists and is a different image"):
        main(coco_args(other, tmp_path / "copies", "--copy", "--labels", "44"))
    # A link whose image is gone is replaced.
    (tmp_path / "gone").mkdir()
    (tmp_path / "out" / "data" / "000000000009.jpg").unlink()
    (tmp_path / "out" / "data" / "000000000009.jpg").symlink_to(tmp_path / "gone" / "000000000009.jpg")
    main(coco_args(files, tmp_path / "out"))
    assert (tmp_path / "out" / "data" / "000000000009.jpg").resolve() == (files["images"] / "000000000009.jpg").resolve()


def test_coco_without_instances_annotations_keeps_every_image(tmp_path):
    """The COCO test image list (image_info_test*.json) has images and categories only."""
    files = write_coco(tmp_path, SMALL_COCO)
    data = json.loads(files["instances"].read_text())
    del data["annotations"]
    files["instances"].write_text(json.dumps(data))
    main(["coco", "--instances", str(files["instances"]), "--images", str(files["images"]),
          "--out", str(tmp_path / "out"), "--split", "test"])
    assert (tmp_path / "out" / "test.csv").read_text().splitlines() == [
        "ImageID", "000000000007.jpg", "000000000003.jpg", "000000000012.jpg", "000000000005.jpg", "000000000009.jpg"]
    with pytest.raises(ConvertError, match="--split train needs labels: .*instances_train2017.json has no 'annotations'"):
        convert_coco(tmp_path / "o2", instances=files["instances"])
    # A file of images alone converts too; --labels then has nothing to choose from.
    del data["categories"]
    files["instances"].write_text(json.dumps(data))
    assert convert_coco(tmp_path / "o3", instances=files["instances"], split="test").rows == 5
    with pytest.raises(ConvertError, match="--labels chooses among the categories of --instances: .* has no 'categories'"):
        convert_coco(tmp_path / "o3", instances=files["instances"], split="test", labels="1")


def test_coco_input_errors_name_the_file_and_key(tmp_path, capsys):
    files = write_coco(tmp_path, SMALL_COCO)
    with pytest.raises(ConvertError, match=r"--labels '1,12': 12 is not a category id of .*instances_train2017\.json; "
                                           r"valid ids: 1 person, 2 bicycle, 3 car, 18 dog, 19 horse, 44 bottle"):
        main(coco_args(files, tmp_path / "out", "--labels", "1,12"))
    with pytest.raises(ConvertError, match="'dogs' is not a category id"):
        main(coco_args(files, tmp_path / "out", "--labels", "dogs"))
    with pytest.raises(SystemExit):
        main(coco_args(files, tmp_path / "out", "--caption", "best"))
    assert "argument --caption: invalid choice: 'best'" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="--caption 'best': valid: first, random, all"):
        convert_coco(tmp_path / "out", instances=files["instances"], caption="best")
    with pytest.raises(ConvertError, match=r"nope\.json: no such file"):
        convert_coco(tmp_path / "out", instances=tmp_path / "nope.json")

    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1,\n "file_name": }]}')
    with pytest.raises(ConvertError, match=r"broken\.json:2:15: not valid JSON"):
        convert_coco(tmp_path / "out", instances=broken)
    data = json.loads(files["instances"].read_text())
    del data["annotations"][2]["category_id"]
    broken.write_text(json.dumps(data))
    with pytest.raises(ConvertError, match=r"broken\.json: annotations\[2\]\.category_id is missing; expected an integer"):
        convert_coco(tmp_path / "out", instances=broken)
    data = json.loads(files["captions"].read_text())
    data["annotations"][0]["image_id"] = 999
    broken.write_text(json.dumps(data))
    with pytest.raises(ConvertError, match=r"broken\.json: annotations\[0\]\.image_id 999 is not an image of"):
        convert_coco(tmp_path / "out", instances=files["instances"], captions=broken)

    (files["images"] / "000000000003.jpg").unlink()
    with pytest.raises(ConvertError, match=r"1 image file\(s\) named in the annotations are missing:\n  .*000000000003\.jpg"):
        main(coco_args(files, tmp_path / "out"))
    assert not (tmp_path / "out" / "train.csv").exists()


# ---------------------------------------------------------------- Pascal VOC


def voc_xml(filename: str, objects: list[tuple[str, int]]) -> str:
    """A VOC2007 annotation; a person gets a <part> with its own <name>, as in VOC2012 person layout."""
    parts = []
    for name, difficult in objects:
        part = "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></part>"
        parts.append(
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
            f"\t\t<difficult>{difficult}</difficult>\n"
            "\t\t<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>\n"
            f"\t\t{part if name == 'person' else ''}\n\t</object>\n")
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{filename}</filename>\n"
            "\t<source><database>The VOC2007 Database</database></source>\n"
            "\t<size><width>32</width><height>32</height><depth>3</depth></size>\n\t<segmented>0</segmented>\n"
            + "".join(parts) + "</annotation>\n")


VOC_COLOURS = {"car": 3, "dog": 18, "horse": 19, "person": 1, "chair": 2}


def write_voc(root: Path, splits: dict[str, dict[str, list[tuple[str, int]]]]) -> Path:
    """VOCdevkit/VOC2007 with {split: {image id: [(class name, difficult)]}}."""
    year = root / "VOCdevkit" / "VOC2007"
    (year / "Annotations").mkdir(parents=True)
    (year / "ImageSets" / "Main").mkdir(parents=True)
    for split, images in splits.items():
        (year / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in images))
        for voc_id, objects in images.items():
            (year / "Annotations" / f"{voc_id}.xml").write_text(voc_xml(f"{voc_id}.jpg", objects))
            draw(year / "JPEGImages" / f"{voc_id}.jpg", sorted({VOC_COLOURS[n] for n, _ in objects})[:3])
    return year


SMALL_VOC = {
    "000005": [("chair", 0), ("chair", 1), ("person", 0)],
    "000007": [("car", 0)],
    "000009": [("horse", 0), ("person", 1)],
    "000012": [("dog", 1)],
}


def test_voc_labels_by_class_order_with_difficult_objects_ignored(tmp_path, capsys):
    year = write_voc(tmp_path, {"trainval": SMALL_VOC})
    report = main(["voc", "--root", str(year), "--split", "trainval", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "train.csv").read_text() == (
        "ImageID,Labels\n"
        "000005.jpg,9 15\n"
        "000007.jpg,7\n"
        "000009.jpg,13\n"
    )
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"voc: wrote {tmp_path / 'out' / 'train.csv'}: 3 rows, 3 images linked in {tmp_path / 'out' / 'data'}",
        "  1 image without a chosen label dropped (--keep-empty keeps them)",
    ]
    counts = {i: n for i, n in report.label_counts.items() if n}
    assert counts == {7: 1, 9: 1, 13: 1, 15: 1} and len(report.label_counts) == 20
    assert report.images == 3
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())["train.csv"]
    assert info["labels"]["1"] == "aeroplane" and info["labels"]["20"] == "tvmonitor" and len(info["labels"]) == 20
    assert info["difficult"] == "ignore"

    main(["voc", "--root", str(year), "--out", str(tmp_path / "inc"), "--difficult", "include"])
    assert pd.read_csv(tmp_path / "inc" / "train.csv", dtype=str)["Labels"].tolist() == ["9 15", "7", "13 15", "12"]


def test_voc_test_split_and_errors(tmp_path):
    year = write_voc(tmp_path, {"trainval": SMALL_VOC, "test": {"000001": [("dog", 0)], "000002": [("car", 0)]}})
    convert_voc(year, tmp_path / "out", split="test")
    assert (tmp_path / "out" / "test.csv").read_text() == "ImageID\n000001.jpg\n000002.jpg\n"
    assert (tmp_path / "out" / "test_labels.csv").read_text() == "ImageID,Labels\n000001.jpg,12\n000002.jpg,7\n"

    (tmp_path / "out" / "dataset.json").write_text('{"test.csv": ')
    with pytest.raises(ConvertError, match=r"out/dataset\.json: not valid JSON"):
        convert_voc(year, tmp_path / "out", split="trainval")
    assert not (tmp_path / "out" / "train.csv").exists()
    with pytest.raises(ConvertError, match=r"ImageSets/Main/val\.txt: no such file"):
        convert_voc(year, tmp_path / "out", split="val")
    xml = year / "Annotations" / "000007.xml"
    xml.write_text(voc_xml("000007.jpg", [("aeroplanes", 0)]))
    with pytest.raises(ConvertError, match=r"000007\.xml: <object> 1: unknown class 'aeroplanes'; VOC classes: aeroplane,"):
        convert_voc(year, tmp_path / "out")
    xml.write_text(voc_xml("000007.jpg", [("car", 0)]).replace("<name>car</name>", ""))
    with pytest.raises(ConvertError, match=r"000007\.xml: <object> 1 has no <name>"):
        convert_voc(year, tmp_path / "out")
    xml.write_text("<annotation><object><name>car</name></annotation>")
    with pytest.raises(ConvertError, match=r"000007\.xml: not valid XML \(mismatched tag: line 1"):
        convert_voc(year, tmp_path / "out")
    xml.unlink()
    with pytest.raises(ConvertError, match=r"000007\.xml: no such annotation file"):
        convert_voc(year, tmp_path / "out")


# ---------------------------------------------------------------- converted data through the pipeline


def labelled_images(count: int, classes: list, seed: int) -> list[list]:
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(classes, size=rng.integers(1, 3), replace=False).tolist()) for _ in range(count)]


WORDS = {1: "person", 3: "car", 18: "dog", 19: "horse"}


def coco_images(count: int, offset: int, seed: int) -> dict[int, tuple[list[int], list[str]]]:
    return {offset + i: (labels, [f"A photo of {' and '.join('a ' + WORDS[x] for x in labels)}.",
                                  f"Here: {', '.join(WORDS[x] for x in labels)}."])
            for i, labels in enumerate(labelled_images(count, list(WORDS), seed))}


def run_inference(data: Path, weights: Path, output: Path, *extra: str) -> dict:
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


def test_coco_with_every_caption_trains_and_predicts(tmp_path):
    train = write_coco(tmp_path / "coco", coco_images(24, 100, seed=1), "train2017")
    val = write_coco(tmp_path / "coco", coco_images(6, 900, seed=2), "val2017")
    data = tmp_path / "coco_all"
    main(coco_args(train, data, "--labels", "1-19", "--caption", "all"))
    main(coco_args(val, data, "--labels", "1-19", "--caption", "all", "--split", "test"))
    weights = tmp_path / "weights"
    train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS])
    train_caption_rnn.main(["--data", str(data), "--weights", str(weights), "--ensemble", "1", *TINY_CAPTION_ARGS])
    val_ids = pd.read_csv(weights / "val_probs_caption.csv", dtype=str)["ImageID"]
    assert val_ids.is_unique and val_ids.tolist() == pd.read_csv(weights / "val_probs_image.csv", dtype=str)["ImageID"].tolist()

    summary = run_inference(data, weights, tmp_path / "out", "--evaluate", "--eval-csv", str(data / "test_labels.csv"))
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert submission["ImageID"].tolist() == [f"{i:012d}.jpg" for i in range(900, 906)]
    assert summary["branches"] == ["image", "decoder", "caption"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_images"] == 6


def test_voc_without_captions_trains_and_predicts_with_the_image_branches(tmp_path):
    names = ["car", "dog", "horse", "person"]
    trainval = {f"{i:06d}": [(n, 0) for n in labels] for i, labels in enumerate(labelled_images(24, names, 3))}
    test = {f"{i:06d}": [(n, 0) for n in labels] for i, labels in enumerate(labelled_images(5, names, 4), 100)}
    year = write_voc(tmp_path, {"trainval": trainval, "test": test})
    data = tmp_path / "voc"
    convert_voc(year, data, split="trainval")
    convert_voc(year, data, split="test")
    weights = tmp_path / "weights"
    train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS])
    with pytest.raises(DataFormatError, match=r"voc/train\.csv:1: no Caption column"):
        train_caption_rnn.main(["--data", str(data), "--weights", str(weights), *TINY_CAPTION_ARGS])
    summary = run_inference(data, weights, tmp_path / "out", "--evaluate")
    assert summary["branches"] == ["image", "decoder"]
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert submission["ImageID"].tolist() == [f"{i:06d}.jpg" for i in range(100, 105)]
    for labels in submission["Labels"]:
        assert set(map(int, labels.split())) <= {7, 12, 13, 15}


def test_coco_captions_only_needs_no_images(tmp_path):
    train = write_coco(tmp_path / "coco", coco_images(24, 100, seed=1), "train2017")
    val = write_coco(tmp_path / "coco", coco_images(6, 900, seed=2), "val2017")
    data = tmp_path / "captions_only"
    report = main(["coco", "--instances", str(train["instances"]), "--captions", str(train["captions"]),
                   "--out", str(data), "--labels", "1-19"])
    assert report.image_folder is None and "no image folder (captions only)" in report.lines()[0]
    main(["coco", "--captions", str(val["captions"]), "--out", str(data), "--split", "test"])
    assert not (data / "data").exists()
    weights = tmp_path / "weights"
    train_caption_rnn.main(["--data", str(data), "--weights", str(weights), "--ensemble", "1", *TINY_CAPTION_ARGS])
    summary = run_inference(data, weights, tmp_path / "out", "--branches", "caption", "--evaluate")
    assert summary["branches"] == ["caption"]
    assert len(pd.read_csv(tmp_path / "out" / "submission.csv")) == 6
