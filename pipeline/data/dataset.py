"""Reading the dataset files, the label set and the shared train/validation split.

The original COMP5329 CSV files are not valid CSV (see ``read_csv``); everything that
reads a dataset goes through this module so every script sees the same rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.choices import DEMO_DATA
from pipeline.io import OptionError, write_json

ID_COLUMN = "ImageID"
LABELS_COLUMN = "Labels"
CAPTION_COLUMN = "Caption"
KNOWN_COLUMNS = (ID_COLUMN, LABELS_COLUMN, CAPTION_COLUMN)
# What pipeline.tools.convert records about the CSV files it writes, keyed by file name.
DATASET_INFO = "dataset.json"
# The default --data: the synthetic demo dataset written by ``python -m pipeline.tools.demo``.
# A Labels field of names is split on this when any field of the file holds it (names may then
# contain spaces, as in NIH ChestX-ray's "Effusion|No Finding"), else on whitespace.
NAME_SEPARATOR_BAR = "|"
# A label with fewer training images than this is warned about (see ``_check_training_labels``).
RARE_LABEL_IMAGES = 5

log = logging.getLogger(__name__)

# A line that opens a record even when the previous record left open a quote that is not
# valid CSV: an image file name followed by a comma (the competition's ids are `<digits>.jpg`;
# any image name works).
_RECORD_START = re.compile(r'^[^",\s]+\.(?:jpe?g|png),', re.IGNORECASE)


class DataFormatError(ValueError):
    """A dataset file that cannot be read; the message names the file and line."""


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        # utf-8-sig drops a byte-order mark written by spreadsheet programs.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}:{line}: byte 0x{raw[err.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _split_records(lines: list[str], width: int) -> list[tuple[int, str]]:
    """Group physical lines into records: (first line number, record text).

    A line with an odd number of double quotes opens a quoted field that goes on over the
    next lines (a quoted caption with a newline inside, as in images 1014, 2259 and 6751).
    Where those lines up to the one that closes it form one valid CSV record of ``width``
    fields, that is the record, whatever its lines look like: valid quoting is honoured.
    Otherwise the quote is taken for an unescaped one and the record stops early, before
    the first line that looks like the start of a record (``<name>.jpg,``), so one stray
    quote cannot swallow the rows after it.
    """
    records: list[tuple[int, str]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.strip() == "":
            index += 1  # blank lines (a trailing newline) carry no record
            continue
        end = index + 1
        if line.count('"') % 2 == 1:
            end = _quoted_end(lines, index, width) or _open_end(lines, index)
        records.append((index + 2, "\n".join(lines[index:end])))
        index = end
    return records


def _quoted_end(lines: list[str], start: int, width: int) -> int | None:
    """The end (exclusive) of the record opened on ``lines[start]`` when its quoted field is
    well formed CSV; None when it is not (the competition's unescaped inner quotes)."""
    end, open_quote = _close_quote(lines, start, stop_at_record_start=False)
    if open_quote:
        return None
    try:
        rows = list(csv.reader(io.StringIO("\n".join(lines[start:end])), strict=True))
    except csv.Error:
        return None
    return end if len(rows) == 1 and len(rows[0]) == width else None


def _open_end(lines: list[str], start: int) -> int:
    """The end (exclusive) of a record whose quotes are not valid CSV: it goes on while its
    quotes are unbalanced, up to the next line that looks like the start of a record."""
    return _close_quote(lines, start, stop_at_record_start=True)[0]


def _close_quote(lines: list[str], start: int, stop_at_record_start: bool) -> tuple[int, bool]:
    """(end, still open) of the quote opened on ``lines[start]``: it closes on the next line with
    an odd number of quotes, since inner quotes of a valid field come in pairs (""). Each
    search stops there, so a file costs one pass."""
    end, open_quote = start + 1, True
    while end < len(lines) and open_quote and not (stop_at_record_start and _RECORD_START.match(lines[end])):
        open_quote = (lines[end].count('"') % 2 == 1) != open_quote
        end += 1
    return end, open_quote


def _parse_record(text: str, header: list[str]) -> list[str] | None:
    """Fields of one record, or None when it cannot be read.

    Valid CSV is parsed strictly by the csv module. The originals also hold captions
    with unescaped inner quotes (9084: ``"A street sign labeled "Seltzer Way," ..."``);
    when the caption is the last column, everything after the other fields is the caption,
    with its enclosing quotes removed and nothing else touched (so a trailing ``/`` stays).
    """
    try:
        rows = list(csv.reader(io.StringIO(text), strict=True))
    except csv.Error:
        rows = []
    if len(rows) == 1 and len(rows[0]) == len(header):
        return rows[0]
    if header[-1] != CAPTION_COLUMN:
        return None
    parts = text.split(",", len(header) - 1)
    if len(parts) != len(header) or any('"' in part for part in parts[:-1]):
        return None
    caption = parts[-1]
    if len(caption) >= 2 and caption.startswith('"') and caption.endswith('"'):
        caption = caption[1:-1]
    return [*parts[:-1], caption]


def _parse_labels(field: str, path: Path, line: int, allow_empty: bool = False) -> list[int]:
    tokens = field.split()
    if not tokens and allow_empty:
        return []
    if not tokens:
        raise _empty_labels(path, line)
    # isdigit() alone accepts non-ASCII digits such as '٣', which int() would quietly read.
    bad = [token for token in tokens if not _is_label_id(token)]
    if bad:
        raise DataFormatError(
            f"{path}:{line}: Labels {field!r} must be non-negative integer label ids separated by "
            f"spaces, e.g. '1 3 19', as the file's first rows hold ({bad[0]!r} is not)"
        )
    return [int(token) for token in tokens]


def _empty_labels(path: Path, line: int) -> DataFormatError:
    # Every image of this task has at least one label (a submission row needs one too),
    # so an empty field is a mistake in the file, not "no labels" -- unless the converter
    # recorded that it kept label-less images on purpose (--keep-empty).
    return DataFormatError(
        f"{path}:{line}: empty Labels field; every image needs at least one label "
        f'(unless {DATASET_INFO} beside the file records "empty_images": "kept")'
    )


def _is_label_id(token: str) -> bool:
    return token.isascii() and token.isdigit()


def _split_names(field: str, separator: str) -> list[str]:
    """The label names of a Labels field: split on ``|`` (names keep their inner spaces), or on
    whitespace; an empty field has none."""
    if separator == NAME_SEPARATOR_BAR:
        return [] if not field.strip() else [name.strip() for name in field.split(NAME_SEPARATOR_BAR)]
    return field.split()


@dataclass(frozen=True)
class _LabelForm:
    """How a file writes its labels: ids, or names with the separator and the id of each name."""

    separator: str | None  # None: label ids
    ids_by_name: dict[str, int]


def _label_form(
    fields: list[tuple[int, str]], path: Path, info: dict, names: dict[str, str] | None, separator: str | None
) -> _LabelForm:
    """Ids or names, decided by the file's first non-empty Labels field, so a file of the
    competition's ids reads exactly as before. Names are split on the ``"label_separator"`` of
    ``dataset.json`` beside the file, else on ``separator`` (the training data's, for an
    evaluation file), else on ``|`` when any field holds one and on whitespace when none does.
    Each name's id is the one ``names`` (the training data's) or ``dataset.json`` beside the
    file gives it, else the names sorted and numbered from 1."""
    first = next((field for _, field in fields if field.strip()), "")
    if not first or all(_is_label_id(token) for token in first.split()):
        return _LabelForm(None, {})
    separator = (
        _declared_separator(info, path)
        or separator
        or (NAME_SEPARATOR_BAR if any(NAME_SEPARATOR_BAR in field for _, field in fields) else " ")
    )
    declared = names if names else info.get("labels")
    if declared:
        ids_by_name: dict[str, int] = {}
        for label_id, name in sorted(declared.items(), key=lambda item: int(item[0])):
            if name in ids_by_name:
                raise DataFormatError(
                    f"{path.parent / DATASET_INFO}: the name {name!r} is given to label ids "
                    f"{ids_by_name[name]} and {label_id}; each label needs its own name"
                )
            ids_by_name[name] = int(label_id)
        return _LabelForm(separator, ids_by_name)
    found = {name for _, field in fields for name in _split_names(field, separator) if name and not _is_label_id(name)}
    return _LabelForm(separator, {name: k for k, name in enumerate(sorted(found), start=1)})


def _declared_separator(info: dict, csv_path: Path) -> str | None:
    """The ``"label_separator"`` of a CSV file's ``dataset.json`` entry: ``" "`` or ``"|"`` when its
    Labels are names, None when it records none."""
    separator = info.get("label_separator")
    if separator not in (None, " ", NAME_SEPARATOR_BAR):
        raise DataFormatError(
            f'{csv_path.parent / DATASET_INFO}: "label_separator" of {csv_path.name!r} must be '
            f'" " or "{NAME_SEPARATOR_BAR}", got {separator!r}'
        )
    return separator


def _parse_names(field: str, form: _LabelForm, path: Path, line: int, allow_empty: bool) -> list[int]:
    """The label ids of a Labels field of names; an empty name, a label id among names or a
    name the mapping does not know is an error naming the line."""
    if form.separator is None:
        raise ValueError(f"{path}:{line}: a file of label ids has no label names to parse (a bug: ids read as names)")
    names = _split_names(field, form.separator)
    if not names and allow_empty:
        return []
    if not names:
        raise _empty_labels(path, line)
    for name in names:
        if not name:
            raise DataFormatError(
                f"{path}:{line}: Labels {field!r} has an empty name between two {NAME_SEPARATOR_BAR!r}"
            )
        if _is_label_id(name):
            raise DataFormatError(
                f"{path}:{line}: Labels {field!r} mixes a label id ({name!r}) into a file of label names; "
                "a file holds either ids or names (a name cannot be a number)"
            )
        if name not in form.ids_by_name:
            raise DataFormatError(
                f"{path}:{line}: label {name!r} is not one of the names {DATASET_INFO} declares: "
                f"{sorted(form.ids_by_name)}"
            )
    return [form.ids_by_name[name] for name in names]


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, the file system of ``folder`` allows."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no such limit reported
        limit = -1
    return limit if limit > 0 else 255  # 255: the limit of every common file system


def _declared_label_ids(info: dict, csv_path: Path) -> set[int] | None:
    """The label ids a CSV file's ``dataset.json`` entry ``info`` declares (the keys of its
    ``"labels"`` names, as the converters write them), or None where it declares none."""
    names = info.get("labels")
    if names is None:
        return None
    if not isinstance(names, dict) or not all(isinstance(k, str) and k.isascii() and k.isdigit() for k in names):
        raise DataFormatError(
            f'{csv_path.parent / DATASET_INFO}: "labels" of {csv_path.name!r} must map label ids to names, '
            'e.g. {"1": "person", "3": "car"}'
        )
    for key, name in names.items():
        if not isinstance(name, str):
            raise DataFormatError(
                f'{csv_path.parent / DATASET_INFO}: "labels" of {csv_path.name!r}: label '
                f"{key} is named {json.dumps(name)}; a label name is a string"
            )
    return {int(key) for key in names}


def is_plain_file_name(name: str) -> bool:
    """True when ``name`` can only mean a file directly inside the image folder."""
    return bool(name) and not ({"\x00", "/", "\\"} & set(name)) and name not in {".", ".."}


def read_csv(
    path: str | Path,
    *,
    require: Sequence[str] = (),
    allow_duplicate_ids: bool | None = None,
    label_names: dict[str, str] | None = None,
    label_separator: str | None = None,
) -> pd.DataFrame:
    """Read a dataset CSV: ``ImageID``, ``Labels`` (list of int, absent in a test file), ``Caption``.

    Labels are label ids (``1 3 19``) or label names (``cat dog``, or ``traffic light|dog``):
    names become ids through ``label_names`` ({id: name}, the training data's, split on its
    ``label_separator``), else the ``"labels"`` of ``dataset.json`` beside the file, else the
    names sorted and numbered from 1; ``attrs["label_names"]`` and ``attrs["label_separator"]``
    then say how (see ``_label_form``).

    Reads the original competition files exactly (unescaped inner quotes, captions ending
    in ``/``, captions spanning lines) as well as clean CSV written by pandas, with the
    columns in any order. No record is ever dropped: a record that cannot be read, a column
    of ``require`` that is missing, an ImageID that is empty, a path or longer than a file
    name can be, an empty or non-integer Labels field, a label id other than those
    ``dataset.json`` beside the file declares, or an ImageID that repeats an earlier row
    raises ``DataFormatError`` naming the file and line. Repeated ImageIDs (one row per caption of
    an image, see ``group_by_image``) are accepted when ``allow_duplicate_ids`` is True or,
    by default, when ``dataset.json`` beside the file declares them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    info = dataset_info(path)
    if allow_duplicate_ids is None:
        allow_duplicate_ids = bool(info.get("repeated_ids", False))
    allow_empty_labels = info.get("empty_images") == "kept"
    declared = _declared_label_ids(info, path)
    # The images sit beside the CSV file (DIR/data) or in --images, on the same file system
    # as a rule; an ImageID over its limit could never be opened.
    name_max = _name_max(path.parent)
    lines = _decode(path).split("\n")
    header = next(csv.reader([lines[0]])) if lines and lines[0].strip() else []
    header = [name.strip() for name in header]
    if ID_COLUMN not in header:
        raise DataFormatError(
            f"{path}:1: header {lines[0]!r} has no {ID_COLUMN} column (expected {','.join(KNOWN_COLUMNS)})"
        )
    unknown = [name for name in header if name not in KNOWN_COLUMNS]
    if unknown:
        raise DataFormatError(f"{path}:1: unknown column(s) {unknown}; expected {list(KNOWN_COLUMNS)}")
    if len(set(header)) != len(header):
        raise DataFormatError(f"{path}:1: repeated column name in header {header}")
    missing = [name for name in require if name not in header]
    if missing:
        raise DataFormatError(
            f"{path}:1: header {lines[0]!r} has no {' or '.join(missing)} column; this file needs "
            f"{','.join(name for name in KNOWN_COLUMNS if name in header or name in missing)}"
        )

    records = _split_records(lines[1:], len(header))
    if records:
        start, text = records[-1]
        body = text.rstrip("\n")
        swallowed = body.count("\n")
        if body.count('"') % 2 == 1 and swallowed:
            # The record swallowed every line after it: reading it would silently lose rows.
            raise DataFormatError(
                f"{path}:{start}: the quote opened in this record is never closed, so it runs over "
                f"the {swallowed} line(s) after it to the end of the file"
            )
        records[-1] = (start, body)

    # A record's fields by column; _line and Labels (list[int]) are added below.
    rows: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    for line, text in records:
        fields = _parse_record(text, header)
        if fields is None:
            raise DataFormatError(f"{path}:{line}: cannot read this record as {','.join(header)}: {text[:80]!r}")
        row: dict[str, Any] = dict(zip(header, fields, strict=True))
        image_id = row[ID_COLUMN]
        if not is_plain_file_name(image_id):
            # Refused here, before any image is opened, so no file outside the image folder is read.
            raise DataFormatError(
                f"{path}:{line}: ImageID {image_id!r} is not a plain file name inside the image folder"
            )
        size = len(os.fsencode(image_id))
        if size > name_max:
            raise DataFormatError(
                f"{path}:{line}: ImageID {image_id[:40]!r}... is {size} bytes long; a file name can be at most "
                f"{name_max} bytes here"
            )
        if image_id in first_line and not allow_duplicate_ids:
            raise DataFormatError(
                f"{path}:{line}: ImageID {image_id!r} repeats line {first_line[image_id]}; each image needs "
                f"exactly one row (a file with one row per caption must say so in {DATASET_INFO} beside it, "
                "as python -m pipeline.tools.convert coco --caption all writes)"
            )
        first_line.setdefault(image_id, line)
        row["_line"] = line
        rows.append(row)

    form = _LabelForm(None, {})
    if LABELS_COLUMN in header:
        label_fields = [(row["_line"], row[LABELS_COLUMN]) for row in rows]
        form = _label_form(label_fields, path, info, label_names, label_separator)
        for row in rows:
            line = row["_line"]
            if form.separator is not None:
                row[LABELS_COLUMN] = _parse_names(row[LABELS_COLUMN], form, path, line, allow_empty_labels)
                continue
            row[LABELS_COLUMN] = _parse_labels(row[LABELS_COLUMN], path, line, allow_empty_labels)
            if declared is None:
                continue
            unknown = [label for label in row[LABELS_COLUMN] if label not in declared]
            if unknown:
                raise DataFormatError(
                    f"{path}:{line}: label id {unknown[0]} is not one of the label ids {DATASET_INFO} beside the "
                    f"file declares: {sorted(declared)}"
                )

    columns = [name for name in KNOWN_COLUMNS if name in header]
    frame = pd.DataFrame(rows, columns=[*columns, "_line"])
    frame.attrs["source"] = str(path)
    if form.separator is not None:
        frame.attrs["label_names"] = {str(i): name for name, i in sorted(form.ids_by_name.items(), key=lambda x: x[1])}
        frame.attrs["label_separator"] = form.separator
    frame.attrs["lines"] = frame.pop("_line").tolist()
    return frame.reset_index(drop=True)


def record_label_names(csv_path: Path, frame: pd.DataFrame) -> None:
    """Write the label names of a CSV file of names, with their ids and separator, into the
    ``dataset.json`` beside it (its other entries and keys kept) unless it records them already:
    inference, the report and the export name the labels from there, and an evaluation file
    of names maps them to the same ids. A folder that cannot be written is warned about: this
    run still reads the names, the later ones show the ids."""
    if "label_names" not in frame.attrs:
        return
    info_path = csv_path.parent / DATASET_INFO
    entry = dataset_info(csv_path)
    wanted = {"labels": frame.attrs["label_names"], "label_separator": frame.attrs["label_separator"]}
    if all(entry.get(key) == value for key, value in wanted.items()):
        return
    whole = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    whole[csv_path.name] = {**entry, **wanted}
    try:
        write_json(info_path, whole)
    except OSError as err:
        log.warning(
            "%s: cannot record the label names of %s (%s); later runs will show label ids",
            info_path,
            csv_path.name,
            err.strerror or err,
        )
        return
    log.info("%s: recorded the %d label names of %s and their ids", info_path, len(wanted["labels"]), csv_path.name)


def recorded_labels(data: str | Path) -> tuple[dict[str, str], str | None]:
    """(label names by id, the separator of names or None for ids) that ``dataset.json`` records
    for the dataset's train.csv (({}, None) without one)."""
    train_csv = Path(data) / "train.csv"
    if not train_csv.is_file():
        return {}, None
    entry = dataset_info(train_csv)
    _declared_label_ids(entry, train_csv)  # a malformed "labels" is an error naming the file
    names = entry.get("labels", {})
    return {str(k): str(v) for k, v in names.items()}, _declared_separator(entry, train_csv)


def dataset_info(csv_path: str | Path) -> dict:
    """What ``pipeline.tools.convert`` recorded about a CSV file in the ``dataset.json`` beside it ({} if none)."""
    csv_path = Path(csv_path)
    info_path = csv_path.parent / DATASET_INFO
    if not info_path.is_file():
        return {}
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataFormatError(f"{info_path}: not valid JSON ({err})") from None
    entry = info.get(csv_path.name, {}) if isinstance(info, dict) else None
    if not isinstance(entry, dict):
        raise DataFormatError(f"{info_path}: the entry of {csv_path.name!r} must be a JSON object")
    _declared_label_ids(entry, csv_path)  # its "labels" checked for every reader, names included
    return entry


@dataclass(frozen=True)
class ImageGroups:
    """The rows of a frame grouped by image; several rows of one ImageID are its captions.

    Image models and every per-image output (validation probabilities, the submission) use
    ``images``; the caption branch reads every row and averages its rows with ``mean``.
    """

    images: pd.DataFrame  # one row per image, in order of first appearance (that row's fields)
    row_image: np.ndarray  # (N_rows,) the row of ``images`` each row of the frame belongs to

    def mean(self, values: np.ndarray) -> np.ndarray:
        """Per-image means (N_images, L) of per-row values (N_rows, L)."""
        sums = np.zeros((len(self.images), values.shape[1]), dtype=np.float64)
        np.add.at(sums, self.row_image, values)
        counts = np.bincount(self.row_image, minlength=len(self.images))
        return (sums / np.maximum(counts, 1)[:, None]).astype(values.dtype)


def group_by_image(frame: pd.DataFrame) -> ImageGroups:
    """Group the rows of a frame by ImageID; the rows of one image must agree on their Labels."""
    codes, _ = pd.factorize(frame[ID_COLUMN])  # codes number the images in order of first appearance
    _, first = np.unique(codes, return_index=True)
    images = frame.iloc[first].reset_index(drop=True)
    if LABELS_COLUMN in frame and len(images) < len(frame):
        first_labels = images[LABELS_COLUMN].tolist()
        for image, labels, image_id in zip(codes, frame[LABELS_COLUMN], frame[ID_COLUMN], strict=True):
            if sorted(labels) != sorted(first_labels[image]):
                raise DataFormatError(
                    f"{frame.attrs.get('source', 'dataset')}: the rows of ImageID {image_id!r} disagree on "
                    f"Labels ({first_labels[image]} and {labels}); every caption row of an image has its labels"
                )
    return ImageGroups(images=images, row_image=codes.astype(np.int64))


@dataclass(frozen=True)
class LabelSet:
    """The ordered label ids of a run; column ``j`` of every probability matrix is ``ids[j]``."""

    ids: tuple[int, ...]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> LabelSet:
        """The sorted set of label ids seen in a training frame."""
        ids = sorted({label for labels in frame[LABELS_COLUMN] for label in labels})
        if not ids:
            raise DataFormatError(f"{frame.attrs.get('source', 'training data')}: no labels found")
        return cls(tuple(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def encode(self, label_lists: list[list[int]] | pd.Series) -> np.ndarray:
        """Multi-hot matrix (N, L) of 0/1 for lists of label ids; unknown ids are an error."""
        index = {label: j for j, label in enumerate(self.ids)}
        matrix = np.zeros((len(label_lists), len(self.ids)), dtype=np.float32)
        for i, labels in enumerate(label_lists):
            for label in labels:
                if label not in index:
                    raise ValueError(f"label id {label} is not one of the trained labels {list(self.ids)}")
                matrix[i, index[label]] = 1.0
        return matrix

    def decode(self, multi_hot: np.ndarray) -> list[list[int]]:
        """Label ids of each row of a 0/1 matrix (N, L)."""
        return [[self.ids[j] for j in np.flatnonzero(row)] for row in multi_hot]


def validation_mask(image_ids: pd.Series | list[str], val_fraction: float = 0.15) -> np.ndarray:
    """True for the images in the shared validation split.

    The split is a stable hash of the ImageID, so it is the same for every script, every
    run and every machine, and an image's side does not depend on which other rows exist.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise OptionError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    buckets = np.array(
        [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") for i in image_ids],
        dtype=np.uint64,
    )
    return (buckets / np.float64(2**64)) < val_fraction


def split_train_val(frame: pd.DataFrame, val_fraction: float = 0.15) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The shared (train, validation) split of a labelled frame; each side keeps the file
    lines of its own rows (``attrs["lines"]``) where the frame has them."""
    is_val = validation_mask(frame[ID_COLUMN], val_fraction)
    sides = []
    for mask in (~is_val, is_val):
        side = frame[mask].reset_index(drop=True)
        # pandas hands every subset the whole frame's attrs; a side's lines are its own rows'.
        side.attrs = {**frame.attrs}
        if "lines" in frame.attrs:
            side.attrs["lines"] = [line for line, keep in zip(frame.attrs["lines"], mask, strict=True) if keep]
        sides.append(side)
    return sides[0], sides[1]


@dataclass(frozen=True)
class DatasetPaths:
    """Where a dataset's files are: ``root/train.csv``, ``root/test.csv``, images in ``root/data``."""

    root: Path
    images: Path

    @classmethod
    def resolve(cls, data: str | Path, images: str | Path | None = None) -> DatasetPaths:
        root = Path(data)
        try:
            is_dir = root.is_dir()
        except OSError as err:  # a name longer than the file system allows (ENAMETOOLONG), no permission
            raise OSError(f"--data {root}: {err.strerror}") from None
        if not is_dir:
            hint = " (generate the demo dataset with: make demo-data)" if root == DEMO_DATA else ""
            raise FileNotFoundError(f"--data {root}: no such directory{hint}")
        return cls(root=root, images=Path(images) if images else root / "data")

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def test_csv(self) -> Path:
        return self.root / "test.csv"

    def image_path(self, image_id: str) -> Path:
        """The file of an image; an ImageID that would leave the image folder is refused."""
        if not is_plain_file_name(str(image_id)):
            raise ValueError(f"ImageID {image_id!r} is not a plain file name inside {self.images}")
        return self.images / str(image_id)


@dataclass(frozen=True)
class GivenFiles(DatasetPaths):
    """Image files named on the command line rather than listed in a CSV: ImageID ``"k"`` is
    the ``k``-th file, wherever it is (a CSV's ImageIDs must stay inside the image folder)."""

    files: tuple[Path, ...] = ()

    @classmethod
    def of(cls, files: Sequence[str | Path]) -> GivenFiles:
        return cls(root=Path("."), images=Path("."), files=tuple(Path(f) for f in files))

    @property
    def image_ids(self) -> list[str]:
        return [str(k) for k in range(len(self.files))]

    def image_path(self, image_id: str) -> Path:
        return self.files[int(image_id)]


def load_train_val(
    paths: DatasetPaths, val_fraction: float, *, allow_duplicate_ids: bool | None = None
) -> tuple[LabelSet, pd.DataFrame, pd.DataFrame]:
    """The label set and the shared (train, validation) split of ``train.csv``.

    The frames hold every row: several rows of one image (one per caption) when
    ``dataset.json`` declares them (or ``allow_duplicate_ids``); the split hashes the
    ImageID, so all rows of an image land on the same side; ``group_by_image`` gives one
    row per image. The Caption column is optional (an images-only dataset). Labels given by
    name are recorded in ``dataset.json`` (``record_label_names``). A training
    split with fewer than two distinct labels is refused, and a label with fewer than
    ``RARE_LABEL_IMAGES`` training images is warned about, before any work is done.
    """
    frame = read_csv(paths.train_csv, require=(LABELS_COLUMN,), allow_duplicate_ids=allow_duplicate_ids)
    if frame.empty:
        raise DataFormatError(f"{paths.train_csv}: no training rows")
    record_label_names(paths.train_csv, frame)
    train, val = split_train_val(frame, val_fraction)
    if train.empty:
        raise DataFormatError(f"{paths.train_csv}: the training split is empty (--val-fraction {val_fraction})")
    labels = LabelSet.from_frame(frame)
    _check_training_labels(paths.train_csv, labels, train, val)
    return labels, train, val


def _label_lines(frame: pd.DataFrame) -> dict[int, list[int]]:
    """The file lines of the images holding each label, one line per image (its first row)."""
    lines: dict[int, list[int]] = {}
    seen: set[str] = set()
    for image_id, row_labels, line in zip(frame[ID_COLUMN], frame[LABELS_COLUMN], frame.attrs["lines"], strict=True):
        if image_id not in seen:  # further rows of an image are its other captions
            seen.add(image_id)
            for label in row_labels:
                lines.setdefault(label, []).append(line)
    return lines


def _some_lines(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:RARE_LABEL_IMAGES]))
    return f"line{'s' if len(lines) > 1 else ''} {shown}{', ...' if len(lines) > RARE_LABEL_IMAGES else ''}"


def _check_training_labels(path: Path, labels: LabelSet, train: pd.DataFrame, val: pd.DataFrame) -> None:
    """Refuse a training split with fewer than two distinct labels (a multi-label model and its
    scores need two), naming the file; warn, with the label's lines, about every label with
    fewer than ``RARE_LABEL_IMAGES`` training images: often a mistyped id (``1 12``, ``99``)."""
    in_train, in_val = _label_lines(train), _label_lines(val)
    if len(in_train) < 2:
        held = "no label" if not in_train else f"only label {next(iter(in_train))}"
        elsewhere = sorted(set(in_val) - set(in_train))
        also = f" ({', '.join(map(str, elsewhere))} only in the validation split)" if elsewhere else ""
        raise DataFormatError(
            f"{path}: the training split holds {held}{also}; a multi-label model needs at least two distinct "
            "label ids among its training images"
        )
    for label in labels.ids:
        count = len(in_train.get(label, []))
        if count == 0:
            log.warning(
                "%s: label %d is only in the validation split (%s): the model cannot learn it",
                path,
                label,
                _some_lines(in_val[label]),
            )
        elif count < RARE_LABEL_IMAGES:
            log.warning(
                "%s: label %d has only %d training image%s (%s); a label this rare is barely learned: "
                "check the id is not a mistake",
                path,
                label,
                count,
                "s" if count > 1 else "",
                _some_lines(in_train[label]),
            )


def read_prediction_csv(
    path: str | Path,
    *,
    captions: bool,
    labels: LabelSet | None = None,
    label_names: dict[str, str] | None = None,
    label_separator: str | None = None,
) -> pd.DataFrame:
    """A CSV of images to predict: ``test.csv``, or a labelled evaluation CSV when ``labels`` is given.

    Beyond ``read_csv``'s checks: at least one row (an empty submission is of no use), one row
    per ImageID (a submission has one row per image), a Caption column when the caption
    branch is used, and with ``labels`` a Labels column whose every id is one the model was
    trained on (another id is an error naming it, the file and the line). Labels given by name
    take the ids of ``label_names``, split on ``label_separator`` (the training data's, see ``read_csv``).
    """
    path = Path(path)
    require = ((CAPTION_COLUMN,) if captions else ()) + ((LABELS_COLUMN,) if labels is not None else ())
    frame = read_csv(path, require=require, label_names=label_names, label_separator=label_separator)
    if frame.empty:
        raise DataFormatError(f"{path}: no rows after the header; nothing to predict")
    if labels is not None:
        check_known_labels(frame, labels)
    return frame


def check_known_labels(frame: pd.DataFrame, labels: LabelSet) -> None:
    """Every label id of a labelled frame is one the model knows; else an error naming file and line."""
    known = set(labels.ids)
    for line, row_labels in zip(frame.attrs["lines"], frame[LABELS_COLUMN], strict=True):
        unknown = [label for label in row_labels if label not in known]
        if unknown:
            raise DataFormatError(
                f"{frame.attrs['source']}:{line}: label id {unknown[0]} is not one of the labels the model "
                f"was trained on {list(labels.ids)}"
            )
