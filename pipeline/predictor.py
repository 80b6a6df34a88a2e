"""The Python API: trained weights loaded once, then labels for images (paths or PIL images) with
their captions, or for a CSV of images; ``inference.py --image`` is built on it, so the two
give the same records. It stands on the prediction core (``pipeline.prediction``), as
``inference.py`` does.

    from pipeline import Predictor

    predictor = Predictor.from_weights("weights", device="cpu")
    records = predictor.predict(["photo.jpg"], captions=["a man riding a horse"])
"""

from __future__ import annotations

import glob
import json
import logging
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.data.dataset import (
    CAPTION_COLUMN,
    ID_COLUMN,
    DatasetPaths,
    GivenFiles,
    LabelSet,
    load_train_val,
    read_prediction_csv,
    recorded_labels,
)
from pipeline.data.images import ImageReadError, to_rgb
from pipeline.engine.runtime import configure_backends, oom_hint, resolve_device, reuse_freed_memory, seed_everything
from pipeline.fusion import FusionSettings
from pipeline.inference_config import InferenceConfig, parse_branch_list
from pipeline.io import OptionError, write_json
from pipeline.labels import label_name, label_names
from pipeline.prediction import (
    CAPTION_READERS,
    BranchPredictor,
    Inputs,
    ValidationSplit,
    check_dataset_labels,
    choose_branches,
    load_branch_checkpoints,
    missing_inputs,
    predict_in_chunks,
    resolve_fusion,
    submission_label_text,
    validation_split,
)

log = logging.getLogger(__name__)

# InferenceConfig fields that only the command line acts on: which files to predict, how to print
# them, where to write reports. The Predictor takes those as arguments of its methods.
COMMAND_LINE_ONLY = ("image", "caption", "format", "evaluate", "eval_csv", "test_csv", "output", "skip_bad_images")

ImageInput = str | Path | Image.Image


class Predictor:
    """The trained branches of a weights folder and their tuned fusion, ready to predict.

    The checkpoints are read once; each set of branches (with captions: every trained branch;
    without: the image branches) rebuilds its models and resolves its fusion settings once,
    on first use, exactly as ``inference.py`` does.
    """

    def __init__(self, config: InferenceConfig, device: torch.device) -> None:
        config.validate()
        configure_backends(device)  # cuDNN autotuning and TF32 on a GPU, as inference.py sets them
        self.config, self.device = config, device
        self.weights_dir = Path(config.weights_dir)
        self.requested = parse_branch_list(config.branches)
        # dataset.json's names of the labels (completed per label set by ``label_names``) and how
        # its train.csv writes labels, which a submission repeats.
        self.recorded, self.separator = recorded_labels(config.data)
        self._prepared: dict[tuple[str, ...], tuple[BranchPredictor, FusionSettings, LabelSet]] = {}

    @classmethod
    def from_weights(cls, weights_dir: str | Path = "weights", device: str = "auto", **options) -> Predictor:
        """A predictor over ``weights_dir`` on ``device`` (auto, cpu or cuda). ``options`` are
        ``inference.py``'s, by field name (``data``, ``branches``, ``fusion_weights``,
        ``threshold``, ``runtime``, ``batch_size``, ...); ``data`` is the dataset whose
        ``dataset.json`` names the labels and, when fusion.json is missing, whose validation
        split tunes it."""
        given = sorted(set(options) & set(COMMAND_LINE_ONLY))
        if given:
            raise TypeError(
                f"Predictor.from_weights: {', '.join(given)} are inference.py options; "
                "pass the images to predict() or predict_csv() instead"
            )
        config = InferenceConfig(weights_dir=str(weights_dir), device=device, **options)
        return cls(config, resolve_device(device))

    def _branches(self, missing: dict[str, str]) -> tuple[str, ...]:
        """The branches of a call: as ``inference.py`` chooses them for inputs lacking ``missing``."""
        branches = choose_branches(self.weights_dir, self.requested, missing)
        # None: no checkpoint at all, which loading says with the scripts to run.
        return tuple(branches or load_branch_checkpoints(self.weights_dir, None))

    def _prepare(self, branches: tuple[str, ...]) -> tuple[BranchPredictor, FusionSettings, LabelSet]:
        """The branch models, fusion settings and labels of ``branches``, built on first use."""
        if branches not in self._prepared:
            config = self.config
            checkpoints = load_branch_checkpoints(self.weights_dir, list(branches))
            labels = LabelSet(tuple(checkpoints[branches[0]]["label_ids"]))

            def validation() -> ValidationSplit:
                paths = DatasetPaths.resolve(config.data, config.images)
                data_labels, _, val = load_train_val(paths, config.val_fraction)
                check_dataset_labels(paths.train_csv, data_labels, labels, self.weights_dir)
                return validation_split(self.weights_dir, list(branches), labels, data_labels, val)

            settings = resolve_fusion(config, list(branches), labels, self.weights_dir, validation)
            # The models are built here, once; which files and cache a call reads are its arguments.
            # A backbone without stored or pretrained weights starts from the seed, as in the
            # scripts, so every set of branches sees the same one; the caller's state is kept.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                predictor = BranchPredictor(
                    checkpoints,
                    GivenFiles.of([]),
                    self.device,
                    config.batch_size,
                    config.runtime,
                    model_cache=self.weights_dir / "cache",
                )
            self._prepared[branches] = (predictor, settings, labels)
        return self._prepared[branches]

    def predict(self, images: ImageInput | Sequence[ImageInput], captions: Sequence[str] | None = None) -> list[dict]:
        """One record per image, in order: its predicted labels with names, every branch's and
        the fused probability of each label, and the thresholds (the records ``inference.py
        --image --format json`` prints). ``captions``: one per image, or None to predict from
        the image branches alone (a decoder trained with ``--decoder-caption`` then reads each
        caption as ""; the stacker, which reads captions too, is left out). A missing or
        unreadable file is predicted from its caption (without captions it is an error listing
        the files).

        A PIL image is predicted from its pixels, converted to 8-bit RGB as a file of its mode
        is (``pipeline.data.images.to_rgb``: CMYK, 16- and 32-bit integer, float, transparency);
        a file is decoded as batch inference decodes it (a large JPEG at reduced scale), so the
        two can differ slightly.
        """
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        records, unreadable = self.predict_readable(images, captions)
        if unreadable and captions is None:
            raise ImageReadError.listing(unreadable, "\ngive a caption per image to predict them from their captions")
        return records

    def predict_readable(
        self, images: Sequence[ImageInput], captions: Sequence[str] | None = None
    ) -> tuple[list[dict], list[Path]]:
        """(records, the files that are missing or unreadable): as :meth:`predict`, except that
        an unreadable file without a caption gets no record instead of failing the call."""
        images = list(images)
        if captions is not None and (isinstance(captions, str) or len(captions) != len(images)):
            count = 1 if isinstance(captions, str) else len(captions)
            raise OptionError(
                f"captions: {count} caption(s) for {len(images)} image(s); give a list with "
                "one caption per image, in the same order"
            )
        captions = list(captions) if captions is not None else None
        branches = self._branches({} if captions is not None else dict.fromkeys(CAPTION_READERS, "no captions given"))
        predictor, settings, labels = self._prepare(branches)
        with tempfile.TemporaryDirectory(prefix="predictor-") as folder:
            # An image in memory goes through the same decoding as a file: saved losslessly first.
            files = []
            for k, image in enumerate(images):
                if isinstance(image, Image.Image):
                    files.append(Path(folder) / f"{k}.png")
                    # In 8-bit RGB first, as a file of its mode is decoded (CMYK, float and 32-bit
                    # greyscale have no PNG form); RGB passes through unchanged.
                    to_rgb(image).save(files[-1], format="PNG")
                else:
                    files.append(Path(image))
            paths = GivenFiles.of(files)
            frame = pd.DataFrame({ID_COLUMN: paths.image_ids, CAPTION_COLUMN: captions or [""] * len(files)})
            # A few files decode faster in this process than worker processes start.
            inputs = Inputs(paths, None, self.config.workers if len(files) > self.config.batch_size else 0)
            probs, unread_ids = predictor.probabilities(frame, inputs, description="images") if files else ({}, [])
        unreadable = {int(image_id) for image_id in unread_ids}
        # Without a caption an unreadable image has nothing to be predicted from.
        kept = [k for k in range(len(images)) if captions is not None or k not in unreadable]
        if not kept:
            return [], [files[k] for k in sorted(unreadable)]
        probs = {b: p[kept] for b, p in probs.items()}
        fused = settings.probabilities(probs)
        predicted = settings.predict(probs)
        thresholds = {str(i): round(float(th), 4) for i, th in zip(labels.ids, settings.thresholds(), strict=True)}
        names = self.label_names(labels)
        records = []
        for row, k in enumerate(kept):
            image = images[k]
            records.append(
                {
                    "image": None if isinstance(image, Image.Image) else str(image),
                    "caption": captions[k] if captions is not None else None,
                    "image_readable": k not in unreadable,
                    "labels": [
                        {"id": i, "name": label_name(i, names)} for i in labels.decode(predicted[row : row + 1])[0]
                    ],
                    "fused": {str(i): round(float(p), 4) for i, p in zip(labels.ids, fused[row], strict=True)},
                    "branches": {
                        b: {
                            str(i): None if np.isnan(p) else round(float(p), 4)
                            for i, p in zip(labels.ids, probs[b][row], strict=True)
                        }
                        for b in branches
                    },
                    "thresholds": dict(thresholds),
                }
            )
        return records, [files[k] for k in sorted(unreadable)]

    def label_names(self, labels: LabelSet) -> dict[str, str]:
        """The name of each of ``labels`` (``pipeline.labels.label_names``): what the dataset's
        ``dataset.json`` records, else the competition's COCO names or the ids."""
        return label_names(labels.ids, self.recorded)

    def predict_csv(
        self, csv: str | Path, images_dir: str | Path, submission: str | Path | None = None
    ) -> pd.DataFrame:
        """The submission (ImageID, Labels: one row per image, in the CSV's order) for the images
        of ``csv`` (ImageID and, for the caption branch, Caption) in ``images_dir``, predicted a
        chunk at a time as ``inference.py`` predicts test.csv, through the feature cache in the
        weights folder. Also written to ``submission`` when given."""
        csv = Path(csv)
        frame = read_prediction_csv(csv, captions=False)
        paths = DatasetPaths(root=csv.parent, images=Path(images_dir))
        branches = self._branches(missing_inputs(paths, {csv: frame}))
        predictor, settings, labels = self._prepare(branches)
        inputs = Inputs(paths, self.weights_dir / "cache", self.config.workers)
        with tempfile.TemporaryDirectory(prefix="predictor-") as folder:
            target = Path(submission) if submission is not None else Path(folder) / "submission.csv"
            unreadable = predict_in_chunks(
                predictor,
                frame,
                inputs,
                settings,
                labels,
                target,
                self.config.chunk_size,
                f"{csv.name} features",
                label_text=submission_label_text(self.label_names(labels), self.separator),
            )
            result = pd.read_csv(target, dtype=str, keep_default_na=False)
        if unreadable:
            log.warning(
                "%d images of %s could not be read; their rows use the caption branch alone (e.g. %s)",
                len(unreadable),
                csv,
                unreadable[0],
            )
        return result


def image_files(arguments: Sequence[str]) -> list[Path]:
    """The files ``--image`` names, in order: a file as given (a missing one is reported when it
    is read), a folder as the image files in it (by the extensions Pillow opens), a glob pattern
    (``photos/*.jpg``) as the files it matches; a folder's and a pattern's files in sorted order.
    A folder without image files or a pattern matching no file is an error naming it."""
    Image.init()  # registers every format Pillow opens, with its extensions
    openable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        try:
            status = os.stat(path)
        except (OSError, ValueError):  # missing, a name too long, a NUL byte: read (and reported) as a file
            status = None
        if status is not None and stat.S_ISDIR(status.st_mode):
            found = sorted(f for f in path.iterdir() if f.suffix.lower() in openable and f.is_file())
            if not found:
                raise OptionError(
                    f"--image {argument}: the folder holds no image file "
                    f"({', '.join(sorted(openable & {'.jpg', '.jpeg', '.png', '.webp'}))}, ...)"
                )
            files += found
        elif status is None and glob.has_magic(argument):
            found = sorted(Path(f) for f in glob.glob(argument) if Path(f).is_file())
            if not found:
                raise OptionError(f"--image {argument!r}: no file matches this pattern")
            files += found
        else:
            files.append(path)
    return files


def predict_files(config: InferenceConfig) -> dict:
    """``inference.py --image``: labels of the files (folders and glob patterns expanded, see
    ``image_files``) with their ``--caption``, from the trained branches and the tuned fusion;
    printed as a table or JSON and written to OUTPUT/predictions.json.

    A file that is missing or cannot be read as an image is an error naming it, unless
    ``--skip-bad-images``: then it is predicted from its caption, or without one left out,
    and named in a warning.
    """
    config.validate()
    reuse_freed_memory()
    with oom_hint(config.batch_size):
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        if not config.image:
            raise OptionError("--image: no files given")
        files, captions = image_files(config.image), config.caption
        if captions is not None and len(captions) != len(files):
            expanded = (
                "" if len(files) == len(config.image) else f" (--image {' '.join(config.image)} is {len(files)} files)"
            )
            raise OptionError(
                f"--caption: {len(captions)} caption(s) for {len(files)} --image file(s){expanded}; "
                "give one caption per image, in the same order"
            )
        seed_everything(config.seed)
        predictor = Predictor(config, resolve_device(config.device))
        records, unreadable = predictor.predict_readable(files, captions)
    if unreadable and not config.skip_bad_images:
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        shown = ", ".join(str(f) for f in unreadable[:5]) + more
        raise ImageReadError(
            f"--image: {shown}: missing or not a readable image; --skip-bad-images predicts the "
            "other files (an image with a --caption from its caption)"
        )
    if unreadable:
        fate = "predicted from the caption alone" if captions is not None else "left out (no caption to predict from)"
        log.warning(
            "%d --image file(s) missing or unreadable, %s: %s",
            len(unreadable),
            fate,
            ", ".join(str(f) for f in unreadable),
        )
    output = Path(config.output) / "predictions.json"
    write_json(output, records)
    names = label_names([int(i) for i in records[0]["fused"]], predictor.recorded) if records else {}
    print(json.dumps(records, indent=2) if config.format == "json" else format_predictions(records, names))
    branches = list(records[0]["branches"]) if records else []
    return {
        "predictions": records,
        "output": str(output),
        "branches": branches,
        "unreadable_images": [str(f) for f in unreadable],
    }


def format_predictions(records: list[dict], names: dict[str, str]) -> str:
    """A readable table per image: every label's probability from each branch and fused, the
    predicted labels starred."""
    blocks = []
    for k, record in enumerate(records):
        branches, label_ids = list(record["branches"]), [int(i) for i in record["fused"]]
        chosen = {label["id"] for label in record["labels"]}
        image = record["image"] if record["image"] is not None else f"image {k + 1}"
        title = image + ("" if record["image_readable"] else "  (missing or unreadable: predicted from the caption)")
        lines = [title]
        if record["caption"] is not None:
            lines.append(f"  caption: {record['caption']!r}")
        lines.append(
            "  labels:  "
            + ", ".join(
                f"{label['id']} {label['name']}" if label["name"] != str(label["id"]) else label["name"]
                for label in record["labels"]
            )
        )
        width = max(len(label_name(i, names)) for i in label_ids)
        lines.append(
            f"  {'id':>3}  {'label':<{width}}  " + "  ".join(f"{b:>7}" for b in [*branches, "fused"]) + "  threshold"
        )
        for i in label_ids:
            cells = [record["branches"][b][str(i)] for b in branches] + [record["fused"][str(i)]]
            row = "  ".join("      -" if p is None else f"{p:7.3f}" for p in cells)
            star = "  *" if i in chosen else ""
            lines.append(f"  {i:>3}  {label_name(i, names):<{width}}  {row}  {record['thresholds'][str(i)]:9.2f}{star}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
