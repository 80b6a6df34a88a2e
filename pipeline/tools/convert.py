"""Convert COCO and Pascal VOC annotations to this project's dataset layout.

    python -m pipeline.tools.convert coco --instances instances_train2017.json \\
        --captions captions_train2017.json --images train2017 --out data/coco --labels 1-19
    python -m pipeline.tools.convert voc --root VOCdevkit/VOC2007 --split trainval --out data/voc2007

Each run writes OUT/train.csv (ImageID,Labels[,Caption]) or OUT/test.csv (ImageID[,Caption]),
symbolic links to (or with --copy, copies of) the images in OUT/data/, and records its inputs,
label names and choices under the CSV file's name in OUT/dataset.json. A test split whose
labels are known also gets OUT/test_labels.csv, for inference.py --evaluate --eval-csv.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.config import OneDefaultHelpFormatter
from pipeline.data.dataset import CAPTION_COLUMN, DATASET_INFO, ID_COLUMN, LABELS_COLUMN
from pipeline.io import atomic_write_text, write_json

CAPTION_MODES = ("first", "random", "all")
COCO_SPLITS = ("train", "test")
VOC_SPLITS = ("train", "val", "trainval", "test")
DIFFICULT_MODES = ("ignore", "include")
# The standard VOC class order; label id = position + 1.
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class ConvertError(ValueError):
    """Input that cannot be converted; the message names the file (and the key or element) at fault."""


@dataclass
class Record:
    """One image to write: its file name (the ImageID), its source file, labels and caption rows.

    ``labels`` is None when the source has no label information; ``captions`` is None when it
    has no captions at all, else the caption of each row to write (at least one).
    """

    image_id: str
    source: Path | None
    labels: list[int] | None
    captions: list[str] | None = None


@dataclass
class ConvertReport:
    """What a conversion wrote; ``lines()`` is the report printed on the command line."""

    dataset: str
    csv_path: Path
    rows: int
    images: int
    image_folder: Path | None
    image_mode: str
    label_names: dict[int, str]
    label_counts: dict[int, int]
    dropped_empty: int = 0
    kept_empty: int = 0
    without_caption: int | None = None
    extra_files: list[Path] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The human-readable report."""
        images = (
            f"{_images(self.images)} {self.image_mode} in {self.image_folder}"
            if self.image_folder
            else f"{_images(self.images)}, no image folder (captions only)"
        )
        lines = [f"{self.dataset}: wrote {self.csv_path}: {self.rows} rows, {images}"]
        if self.dropped_empty:
            lines.append(f"  {_images(self.dropped_empty)} without a chosen label dropped (--keep-empty keeps them)")
        if self.kept_empty:
            lines.append(f"  {_images(self.kept_empty)} without a chosen label kept with no labels (--keep-empty)")
        if self.without_caption:
            lines.append(f"  {_images(self.without_caption)} without a caption (empty Caption)")
        if self.label_counts:
            counts = ", ".join(f"{i} {self.label_names.get(i, '?')}: {n}" for i, n in sorted(self.label_counts.items()))
            lines.append(f"  images per label: {counts}")
        lines.extend(f"  wrote {path}" for path in self.extra_files)
        return lines


def _images(count: int) -> str:
    return f"{count} image" if count == 1 else f"{count} images"


def parse_label_selection(text: str, categories: dict[int, str], source: Path | str) -> list[int]:
    """``all``, or comma-separated category ids and ranges (``1-19``) -> sorted ids.

    A listed id must be a category of ``source``; a range takes the categories inside it
    (COCO's ids have gaps: 1-19 is the 18 categories of COMP5329).
    """
    if text.strip() == "all":
        return sorted(categories)
    valid = ", ".join(f"{i} {name}" for i, name in sorted(categories.items()))
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        low, dash, high = part.partition("-")
        try:
            bounds = (int(low), int(high) if dash else int(low))
        except ValueError:
            raise ConvertError(f"--labels {text!r}: {part!r} is not a category id or a range like 1-19") from None
        if dash:
            inside = [i for i in categories if bounds[0] <= i <= bounds[1]]
            if not inside:
                raise ConvertError(f"--labels {text!r}: no category of {source} in {part}; valid ids: {valid}")
            chosen.update(inside)
        elif bounds[0] not in categories:
            raise ConvertError(f"--labels {text!r}: {bounds[0]} is not a category id of {source}; valid ids: {valid}")
        else:
            chosen.add(bounds[0])
    return sorted(chosen)


def _check_image_name(name: object, where: str) -> str:
    """An ImageID must be a plain file name: it is both a CSV key and a file in OUT/data."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in {".", ".."}:
        raise ConvertError(f"{where}: file name {name!r} is not a plain file name")
    return name


# ---------------------------------------------------------------- COCO


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: no such file ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise ConvertError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, dict):
        raise ConvertError(
            f"{path}: expected a JSON object with 'images' and 'annotations', got a {type(data).__name__}"
        )
    return data


def _entries(data: dict, path: Path, key: str, fields: dict[str, type]) -> list[dict]:
    """``data[key]``: a list of objects, each with ``fields`` of the given JSON types."""
    if key not in data:
        raise ConvertError(f"{path}: no {key!r} key")
    entries = data[key]
    if not isinstance(entries, list):
        raise ConvertError(f"{path}: {key!r} must be a list, got a {type(entries).__name__}")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConvertError(f"{path}: {key}[{index}] must be an object")
        for name, kind in fields.items():
            # bool is an int in Python but never a COCO id.
            if name not in entry or not isinstance(entry[name], kind) or isinstance(entry[name], bool):
                found = "missing" if name not in entry else f"{entry[name]!r}"
                raise ConvertError(f"{path}: {key}[{index}].{name} is {found}; expected {_TYPE_NAMES[kind]}")
    return entries


_TYPE_NAMES = {int: "an integer", str: "a string"}


def _clean_caption(text: str) -> str:
    # COCO captions carry stray newlines and double spaces; one line per row keeps the CSV simple.
    return " ".join(text.split())


def _choose_captions(captions: list[str], mode: str, seed: int, image_id: int) -> list[str]:
    """The caption rows of one image: the first (lowest annotation id), a seeded choice, or all."""
    if mode == "all":
        return captions
    if mode == "first":
        return captions[:1]
    # A string seed hashes the same in every process: the choice depends on (seed, image) only.
    return [random.Random(f"{seed}:{image_id}").choice(captions)]


def convert_coco(
    out: str | Path,
    instances: str | Path | None = None,
    captions: str | Path | None = None,
    images: str | Path | None = None,
    split: str = "train",
    labels: str = "all",
    caption: str = "first",
    keep_empty: bool = False,
    copy: bool = False,
    seed: int = 0,
) -> ConvertReport:
    """Convert COCO ``instances_*.json`` and/or ``captions_*.json`` to OUT/train.csv or OUT/test.csv.

    Labels are COCO category ids (``labels`` selects a subset, see ``parse_label_selection``);
    an image's label set is every chosen category with an annotation in it (crowd regions
    included). ``caption`` picks one caption an image (``first``: lowest annotation id,
    ``random``: seeded by ``seed`` and the image id) or writes one row per caption (``all``).
    """
    if split not in COCO_SPLITS:
        raise ConvertError(f"--split {split!r}: valid: {', '.join(COCO_SPLITS)}")
    if caption not in CAPTION_MODES:
        raise ConvertError(f"--caption {caption!r}: valid: {', '.join(CAPTION_MODES)}")
    if instances is None and captions is None:
        raise ConvertError("give --instances (labels) and/or --captions")
    instances = Path(instances) if instances else None
    captions = Path(captions) if captions else None
    inst_data = _load_json(instances, "COCO instances file") if instances else None
    cap_data = _load_json(captions, "COCO captions file") if captions else None

    # The images are listed by the instances file, else by the captions file.
    if instances is not None and inst_data is not None:
        image_data, image_source = inst_data, instances
    elif captions is not None and cap_data is not None:
        image_data, image_source = cap_data, captions
    else:  # both given as empty paths
        raise ConvertError("give --instances (labels) and/or --captions")
    image_entries = _entries(image_data, image_source, "images", {"id": int, "file_name": str})
    file_names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for index, entry in enumerate(image_entries):
        where = f"{image_source}: images[{index}]"
        name = _check_image_name(entry["file_name"], where)
        if entry["id"] in file_names:
            raise ConvertError(f"{where}: image id {entry['id']} appears twice")
        if name in seen:
            raise ConvertError(f"{where}: file name {name!r} is also images[{seen[name]}]")
        file_names[entry["id"]], seen[name] = name, index

    label_sets: dict[int, set[int]] | None = None
    categories: dict[int, str] = {}
    chosen: list[int] = []
    # The COCO test files (image_info_test*.json) list images and categories but no annotations.
    if instances is not None and inst_data is not None and ("annotations" in inst_data or "categories" in inst_data):
        for entry in _entries(inst_data, instances, "categories", {"id": int, "name": str}):
            categories[entry["id"]] = entry["name"]
        chosen = parse_label_selection(labels, categories, instances)
        if "annotations" in inst_data:
            label_sets = {image_id: set() for image_id in file_names}
            for index, ann in enumerate(
                _entries(inst_data, instances, "annotations", {"image_id": int, "category_id": int})
            ):
                if ann["image_id"] not in label_sets:
                    raise ConvertError(
                        f"{instances}: annotations[{index}].image_id {ann['image_id']!r} is not in its images"
                    )
                if ann["category_id"] not in categories:
                    raise ConvertError(
                        f"{instances}: annotations[{index}].category_id {ann['category_id']} is not in its categories"
                    )
                label_sets[ann["image_id"]].add(ann["category_id"])
    elif labels.strip() != "all":
        raise ConvertError(
            "--labels chooses among the categories of --instances: "
            + (f"{instances} has no 'categories'" if instances else "give --instances")
        )
    if split == "train" and label_sets is None:
        raise ConvertError(
            "--split train needs labels: " + (f"{instances} has no 'annotations'" if instances else "give --instances")
        )

    caption_lists: dict[int, list[tuple[int, str]]] | None = None
    if captions is not None and cap_data is not None:
        caption_lists = defaultdict(list)
        for index, ann in enumerate(
            _entries(cap_data, captions, "annotations", {"image_id": int, "id": int, "caption": str})
        ):
            if ann["image_id"] not in file_names:
                raise ConvertError(
                    f"{captions}: annotations[{index}].image_id {ann['image_id']!r} is not an image of "
                    f"{image_source} (are both files of the same split?)"
                )
            caption_lists[ann["image_id"]].append((ann["id"], _clean_caption(ann["caption"])))

    chosen_set = set(chosen)
    records = []
    for image_id, name in file_names.items():
        record = Record(
            image_id=name,
            source=Path(images) / name if images else None,
            labels=None if label_sets is None else sorted(label_sets[image_id] & chosen_set),
        )
        if caption_lists is not None:
            texts = [text for _, text in sorted(caption_lists.get(image_id, []))]
            record.captions = _choose_captions(texts, caption, seed, image_id) if texts else [""]
        records.append(record)

    csv_name = "train.csv" if split == "train" else "test.csv"
    info = {
        "source": "coco",
        "instances": str(instances) if instances else None,
        "captions": str(captions) if captions else None,
        "images": str(images) if images else None,
        "caption": caption if captions else None,
        "seed": seed if caption == "random" else None,
    }
    return write_dataset(
        Path(out),
        csv_name,
        records,
        {i: categories[i] for i in chosen},
        info,
        keep_empty=keep_empty,
        copy=copy,
        dataset="coco",
    )


# ---------------------------------------------------------------- Pascal VOC


def _voc_labels(xml_path: Path, difficult: str) -> tuple[str | None, list[int]]:
    """(the <filename>, sorted label ids) of one VOC annotation file."""
    if not xml_path.is_file():
        raise ConvertError(f"{xml_path}: no such annotation file")
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ConvertError(f"{xml_path}: not valid XML ({err})") from None
    if root.tag != "annotation":
        raise ConvertError(f"{xml_path}: root element <{root.tag}>, expected <annotation>")
    ids = set()
    # Direct <object> children only, and their own <name>: VOC2012 person objects hold <part>
    # elements (head, hand, foot) with a <name> of their own.
    for index, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ConvertError(f"{xml_path}: <object> {index} has no <name>")
        if name not in VOC_CLASSES:
            raise ConvertError(
                f"{xml_path}: <object> {index}: unknown class {name!r}; VOC classes: {', '.join(VOC_CLASSES)}"
            )
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise ConvertError(f"{xml_path}: <object> {index} ({name}): <difficult> is {flag!r}, expected 0 or 1")
        if flag == "0" or difficult == "include":
            ids.add(VOC_CLASSES.index(name) + 1)
    filename = root.findtext("filename")
    return (filename.strip() if filename else None), sorted(ids)


def convert_voc(
    root: str | Path,
    out: str | Path,
    split: str = "trainval",
    difficult: str = "ignore",
    keep_empty: bool = False,
    copy: bool = False,
) -> ConvertReport:
    """Convert a VOC year folder (``VOCdevkit/VOC2007``) split to OUT/train.csv, or OUT/test.csv for ``test``.

    Reads ``ImageSets/Main/<split>.txt`` and ``Annotations/<id>.xml``; label ids are 1..20 in
    the standard class order (``VOC_CLASSES``). Objects marked ``difficult`` are ignored, as in
    the VOC evaluation, unless ``difficult="include"``. VOC has no captions.
    """
    if split not in VOC_SPLITS:
        raise ConvertError(f"--split {split!r}: valid: {', '.join(VOC_SPLITS)}")
    if difficult not in DIFFICULT_MODES:
        raise ConvertError(f"--difficult {difficult!r}: valid: {', '.join(DIFFICULT_MODES)}")
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise ConvertError(f"{listing}: no such file (is --root a VOC year folder such as VOCdevkit/VOC2007?)")
    ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        repeated = next(i for i, n in Counter(ids).items() if n > 1)
        raise ConvertError(f"{listing}: image {repeated} is listed twice")
    records = []
    for voc_id in ids:
        xml_path = root / "Annotations" / f"{voc_id}.xml"
        filename, labels = _voc_labels(xml_path, difficult)
        name = _check_image_name(filename or f"{voc_id}.jpg", f"{xml_path}: <filename>")
        records.append(Record(image_id=name, source=root / "JPEGImages" / name, labels=labels))
    csv_name = "test.csv" if split == "test" else "train.csv"
    info = {"source": "voc", "root": str(root), "split": split, "difficult": difficult}
    names = {i + 1: name for i, name in enumerate(VOC_CLASSES)}
    return write_dataset(Path(out), csv_name, records, names, info, keep_empty=keep_empty, copy=copy, dataset="voc")


# ---------------------------------------------------------------- writing


def _place_image(source: Path, target: Path, copy: bool) -> None:
    """Link (or copy) one image; the same image left there by a previous conversion is kept.

    A different image under the same name (another split or folder with the same file
    names) is an error rather than silently replacing the image another CSV file uses.
    """
    if target.is_symlink() or target.exists():
        if not copy and target.is_symlink() and Path(os.readlink(target)) == source:
            return
        if target.exists() and not filecmp.cmp(source, target, shallow=False):
            raise ConvertError(
                f"{target} already exists and is a different image than {source}: another "
                "conversion wrote an image of the same name here; use another --out"
            )
        if target.is_file() and not target.is_symlink():
            return  # an identical copy
        # A dangling link or a link to an identical file; unlinking first also keeps a copy
        # from writing through the link.
        target.unlink()
    if copy:
        shutil.copy2(source, target)
    else:
        target.symlink_to(source)


def _read_info(out: Path) -> dict:
    """OUT/dataset.json as left by earlier conversions (train and test are converted separately)."""
    path = out / DATASET_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path}: not valid JSON ({err}); remove it or fix it") from None
    if not isinstance(info, dict):
        raise ConvertError(f"{path}: expected a JSON object keyed by CSV file name")
    return info


def write_dataset(
    out: Path,
    csv_name: str,
    records: Sequence[Record],
    label_names: dict[int, str],
    info: dict,
    keep_empty: bool = False,
    copy: bool = False,
    dataset: str = "",
) -> ConvertReport:
    """Write the CSV file, the images and dataset.json for converted records; return the report.

    A record with labels but none chosen is dropped unless ``keep_empty``. A test file gets
    no Labels column; when its labels are known they also go to ``test_labels.csv``.
    """
    labelled = [r for r in records if r.labels is not None]
    empty = [r for r in labelled if not r.labels]
    kept = [r for r in records if keep_empty or r.labels is None or r.labels]
    with_images = [(r, r.source) for r in kept if r.source is not None]
    missing = [source for _, source in with_images if not source.is_file()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:10])
        more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConvertError(f"{len(missing)} image file(s) named in the annotations are missing:\n  {shown}{more}")

    has_captions = any(r.captions is not None for r in kept)
    rows = []
    for record in kept:
        labels = " ".join(str(i) for i in record.labels) if record.labels is not None else None
        if has_captions and record.captions is None:
            raise ConvertError(f"{record.image_id}: no captions, while other images of the file have them")
        for text in (record.captions or []) if has_captions else [None]:
            rows.append({ID_COLUMN: record.image_id, LABELS_COLUMN: labels, CAPTION_COLUMN: text})
    columns = [
        ID_COLUMN,
        *([LABELS_COLUMN] if csv_name == "train.csv" else []),
        *([CAPTION_COLUMN] if has_captions else []),
    ]
    frame = pd.DataFrame(rows, columns=[ID_COLUMN, LABELS_COLUMN, CAPTION_COLUMN])
    # Read before writing anything: the CSV files are only usable with their dataset.json entries.
    info_path, info_file = out / DATASET_INFO, _read_info(out)
    out.mkdir(parents=True, exist_ok=True)
    # Images first: a name clash stops the run before any CSV file points at the wrong image.
    image_folder = None
    if with_images:
        image_folder = out / "data"
        image_folder.mkdir(exist_ok=True)
        for record, source in with_images:
            _place_image(source.resolve(), image_folder / record.image_id, copy)

    files = {csv_name: columns}
    if csv_name == "test.csv" and labelled:
        files["test_labels.csv"] = [ID_COLUMN, LABELS_COLUMN] + ([CAPTION_COLUMN] if has_captions else [])
    for name, file_columns in files.items():
        atomic_write_text(out / name, frame[file_columns].to_csv(index=False))

    repeated = len(rows) > len(kept)
    entry = {
        **info,
        "labels": {str(i): name for i, name in sorted(label_names.items())},
        "empty_images": "kept" if keep_empty else "dropped",
        "repeated_ids": repeated,
        "rows": len(rows),
        "image_count": len(kept),
    }
    info_file.update({name: entry for name in files})
    write_json(info_path, info_file, sort_keys=True)
    found = Counter(label for r in kept if r.labels for label in r.labels)
    # Zero counts stay in the report: a chosen label without images is worth noticing.
    counts = {label: found.get(label, 0) for label in sorted(set(label_names) | set(found))}
    return ConvertReport(
        dataset=dataset,
        csv_path=out / csv_name,
        rows=len(rows),
        images=len(kept),
        image_folder=image_folder,
        image_mode="copied" if copy else "linked",
        label_names=label_names,
        label_counts=counts,
        dropped_empty=0 if keep_empty else len(empty),
        kept_empty=len(empty) if keep_empty else 0,
        without_caption=sum(1 for r in kept if r.captions == [""]) if has_captions else None,
        extra_files=[out / name for name in files if name != csv_name] + [info_path],
    )


# ---------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    """The ``coco`` and ``voc`` subcommands."""
    formatter = OneDefaultHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.tools.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    coco = commands.add_parser(
        "coco",
        formatter_class=formatter,
        allow_abbrev=False,
        help="COCO 2014/2017 instances and captions files",
        description="Convert COCO instances_*.json (labels) and captions_*.json to "
        "OUT/train.csv (--split train) or OUT/test.csv (--split test).",
    )
    coco.add_argument("--instances", help="instances_*.json (labels: category ids); required for --split train")
    coco.add_argument("--captions", help="captions_*.json; without it the dataset has no Caption column")
    coco.add_argument(
        "--images",
        help="the images folder (e.g. train2017/); without it no OUT/data is written (a captions-only dataset)",
    )
    coco.add_argument("--out", required=True, help="dataset folder to write")
    coco.add_argument(
        "--split",
        default="train",
        choices=COCO_SPLITS,
        help="train: OUT/train.csv with Labels; test: OUT/test.csv without (and OUT/test_labels.csv "
        "when --instances has annotations)",
    )
    coco.add_argument(
        "--labels",
        default="all",
        help="category ids to keep: 'all', or ids and ranges such as 1,3,18 or 1-19 (COMP5329's 18)",
    )
    coco.add_argument(
        "--caption",
        default="first",
        choices=CAPTION_MODES,
        help="first: the caption with the lowest annotation id; random: one chosen with --seed; "
        "all: one row per caption (dataset.json declares the repeated ImageIDs)",
    )
    coco.add_argument("--seed", type=int, default=0, help="seed of --caption random")
    coco.add_argument(
        "--keep-empty", action="store_true", help="keep images with none of the chosen labels (with an empty label set)"
    )
    coco.add_argument("--copy", action="store_true", help="copy the images instead of linking them")

    voc = commands.add_parser(
        "voc",
        formatter_class=formatter,
        allow_abbrev=False,
        help="Pascal VOC (2007, 2012) classification",
        description="Convert a Pascal VOC split to OUT/train.csv (OUT/test.csv for --split "
        "test). Label ids 1..20 follow the standard class order: "
        + ", ".join(f"{i + 1} {n}" for i, n in enumerate(VOC_CLASSES))
        + ".",
    )
    voc.add_argument("--root", required=True, help="a VOC year folder, e.g. VOCdevkit/VOC2007")
    voc.add_argument("--split", default="trainval", choices=VOC_SPLITS, help="ImageSets/Main/<split>.txt")
    voc.add_argument("--out", required=True, help="dataset folder to write")
    voc.add_argument(
        "--difficult",
        default="ignore",
        choices=DIFFICULT_MODES,
        help="objects marked difficult: ignore (as the VOC evaluation does) or include them as labels",
    )
    voc.add_argument(
        "--keep-empty",
        action="store_true",
        help="keep images with no label (all their objects difficult) with an empty label set",
    )
    voc.add_argument("--copy", action="store_true", help="copy the images instead of linking them")
    return parser


def main(argv: list[str] | None = None) -> ConvertReport:
    """Run a conversion from command-line arguments and print its report."""
    args = get_args_parser().parse_args(argv)
    if args.command == "coco":
        report = convert_coco(
            args.out,
            instances=args.instances,
            captions=args.captions,
            images=args.images,
            split=args.split,
            labels=args.labels,
            caption=args.caption,
            keep_empty=args.keep_empty,
            copy=args.copy,
            seed=args.seed,
        )
    else:
        report = convert_voc(
            args.root, args.out, split=args.split, difficult=args.difficult, keep_empty=args.keep_empty, copy=args.copy
        )
    print("\n".join(report.lines()))
    return report


if __name__ == "__main__":
    try:
        main()
    except (ConvertError, OSError) as err:
        sys.exit(f"error: {err}")
