"""The prediction core under the Python API (``pipeline.predictor``) and ``inference.py``
(``pipeline.inference``): which branches run and their checkpoints, the branch models rebuilt
and predicting, the fusion settings of a run, and fused predictions written a chunk at a time.

The models are built once; what a call reads (images, caches, worker processes) is an
argument of the call, and what it finds (the images it could not read) is part of its result.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from pipeline.branches.caption import predict_caption_probs
from pipeline.branches.image import (
    ImageHeads,
    backbone_identity,
    image_caption_vectors,
    rebuild_backbone,
    training_image_ids,
)
from pipeline.branches.stacker import StackerBranch, checked_stacker, stacker_front
from pipeline.checkpoint import BRANCHES, checkpoint_path, load_checkpoint, load_probabilities, probabilities_path
from pipeline.data.dataset import (
    CAPTION_COLUMN,
    ID_COLUMN,
    LABELS_COLUMN,
    DataFormatError,
    DatasetPaths,
    LabelSet,
    check_known_labels,
    group_by_image,
)
from pipeline.engine import timing
from pipeline.engine.distributed import DistContext, barrier
from pipeline.engine.frozen import FrontAndTail
from pipeline.engine.runtime import inference_precision, native_bf16
from pipeline.engine.runtimes import Probe, get_runtime, resolve_runtime
from pipeline.features import (
    CachedFeatures,
    ExtractionSettings,
    cached_features,
    extract_features,
    has_cached_features,
    recorded_calibration,
)
from pipeline.fusion import (
    FusionError,
    FusionSettings,
    check_weights,
    fusion_file,
    load_fusion,
    save_fusion,
    tune_fusion,
)
from pipeline.inference_config import InferenceConfig, parse_weights
from pipeline.io import CheckpointError, OptionError, atomic_text_writer, atomic_write_text, write_json
from pipeline.models.backbones import Backbone
from pipeline.models.stages import split_backbone

log = logging.getLogger(__name__)

# The branches on image.pt's and decoder.pt's backbone; the stacker runs the front of image.pt's own.
IMAGE_BRANCHES = ("image", "decoder")
# The branches that read each input: the stacker reads both.
IMAGE_READERS = (*IMAGE_BRANCHES, "stacker")
CAPTION_READERS = ("caption", "stacker")


# --- Which branches run, and their checkpoints -------------------------------------------------


def missing_inputs(paths: DatasetPaths, frames: dict[Path, pd.DataFrame]) -> dict[str, str]:
    """Why a branch cannot run on this dataset, by branch: a CSV without captions, no image folder."""
    reasons = {}
    without_captions = [str(path) for path, frame in frames.items() if CAPTION_COLUMN not in frame]
    if without_captions:
        reasons.update(dict.fromkeys(CAPTION_READERS, f"no {CAPTION_COLUMN} column in {', '.join(without_captions)}"))
    if not paths.images.is_dir():
        reasons.update(dict.fromkeys(IMAGE_READERS, f"the image folder {paths.images} does not exist"))
    return reasons


def choose_branches(weights_dir: Path, requested: list[str] | None, missing: dict[str, str]) -> list[str] | None:
    """The branches of a run: the requested ones, which must have their input, or else every
    branch with a checkpoint whose input this dataset has (None when no checkpoint exists)."""
    if requested is not None:
        for branch in requested:
            if branch in missing:
                raise OptionError(
                    f"--branches {','.join(requested)}: the {branch} branch cannot run: {missing[branch]}"
                )
        return requested
    present = [b for b in BRANCHES if checkpoint_path(weights_dir, b).is_file()]
    for branch in present:
        if branch in missing:
            log.warning("not using the %s branch: %s", branch, missing[branch])
    usable = [b for b in present if b not in missing]
    if present and not usable:
        raise ValueError(
            f"{weights_dir}: none of the trained branches {present} can run on this dataset: "
            + "; ".join(sorted(set(missing.values())))
        )
    return usable or None


def load_branch_checkpoints(weights_dir: Path, branches: list[str] | None) -> dict[str, dict]:
    """The checkpoints of the requested branches (or all present), checked against each other."""
    wanted = branches or [b for b in BRANCHES if checkpoint_path(weights_dir, b).is_file()]
    if not wanted:
        raise CheckpointError(
            f"{weights_dir}: no branch checkpoints (image.pt, decoder.pt, caption.pt); "
            "run train_efficientnet.py and/or train_caption_rnn.py first"
        )
    loaded = {b: load_checkpoint(checkpoint_path(weights_dir, b), branch=b) for b in wanted}
    if "stacker" in loaded:
        loaded["stacker"] = _stacker_with_image(weights_dir, loaded)
    first = wanted[0]
    for name, checkpoint in loaded.items():
        if checkpoint["label_ids"] != loaded[first]["label_ids"]:
            raise CheckpointError(
                f"{checkpoint_path(weights_dir, name)}: labels {checkpoint['label_ids']} differ from "
                f"{checkpoint_path(weights_dir, first)}: {loaded[first]['label_ids']}; retrain on the same data"
            )
    if (
        "image" in loaded
        and "decoder" in loaded
        and backbone_identity(loaded["image"]["backbone"]) != backbone_identity(loaded["decoder"]["backbone"])
    ):
        raise CheckpointError(f"{weights_dir}: image.pt and decoder.pt were trained on different backbones; retrain")
    return loaded


def _stacker_with_image(weights_dir: Path, loaded: dict[str, dict]) -> dict:
    """stacker.pt's checkpoint checked against image.pt, whose backbone's front it reads
    (``pipeline.branches.stacker.checked_stacker``), whether the image branch runs or not."""
    stacker_path, image_path = checkpoint_path(weights_dir, "stacker"), checkpoint_path(weights_dir, "image")
    if "image" not in loaded and not image_path.is_file():
        raise CheckpointError(
            f"{stacker_path}: reads the front of image.pt's backbone, and there is no {image_path}; "
            "train the image branch with --stacker-folds K"
        )
    image = loaded["image"] if "image" in loaded else load_checkpoint(image_path, branch="image")
    return checked_stacker(loaded["stacker"], image, stacker_path, image_path)


# --- The branch models, rebuilt once, predicting per call --------------------------------------


def inference_runtime(
    trained: str,
    requested: str | None,
    device: torch.device,
    source: str,
    probe: Probe | None = None,
    cache_dir: Path | None = None,
) -> str:
    """The runtime inference runs the backbone (``probe``) in: the one ``source`` was trained
    with, unless ``--runtime`` asks for another (said, since the features then differ a little
    from those the heads learned from) or it cannot run here (said, and ``auto`` chooses)."""
    if requested is not None:
        runtime = resolve_runtime(requested, device, probe, cache_dir)
        if runtime != trained:
            log.warning(
                "--runtime %s: %s was trained with features from %s; the features differ slightly",
                runtime,
                source,
                trained,
            )
        return runtime
    reason = get_runtime(trained).unavailable(device)
    if reason is None:
        return trained
    runtime = resolve_runtime("auto", device, probe, cache_dir)
    log.warning(
        "%s was trained with features from %s, but %s: running %s, whose features differ slightly",
        source,
        trained,
        reason,
        runtime,
    )
    return runtime


def backbone_precision(trained: str, device: torch.device, source: str) -> str:
    """The precision the backbone runs in here: the one ``source``'s features were computed in
    where ``device`` runs it natively, else fp32 (said, since the features then differ a little
    from those the heads learned from); see :func:`inference_precision`."""
    precision = inference_precision(device, trained, native_bf16(device))
    if precision != trained:
        log.warning(
            "%s's features were computed in %s, which this %s does not run natively: running %s, "
            "whose features differ slightly",
            source,
            trained,
            device.type.upper(),
            precision,
        )
    return precision


@dataclass(frozen=True)
class Inputs:
    """What one prediction call reads: the images (``paths``), the feature and caption caches
    (``cache_dir``; None computes everything afresh and caches nothing) and the number of
    worker processes that decode the images."""

    paths: DatasetPaths
    cache_dir: Path | None = None
    workers: int = 0


class BranchProbabilities(NamedTuple):
    """One call's probabilities (N_images, L) by branch, and the ImageIDs that could not be
    read: the image branches and the stacker give them NaN, and fusion uses the caption alone
    for them."""

    by_branch: dict[str, np.ndarray]
    unreadable: list[str]


class BranchPredictor:
    """The loaded branches rebuilt once (the backbone in its precision and runtime, the heads,
    the caption ensemble, the stacker and its front), then their probabilities for any frame of
    images and captions.

    ``calibration_paths``: the dataset an int8 backbone's calibration images are read from,
    should its quantised model have to be made anew; ``model_cache``: where converted models
    and the runtime choice are kept.
    """

    def __init__(
        self,
        checkpoints: dict[str, dict],
        calibration_paths: DatasetPaths,
        device: torch.device,
        batch_size: int,
        runtime: str | None = None,
        model_cache: Path | None = None,
    ) -> None:
        self.checkpoints, self.device, self.batch_size, self.model_cache = checkpoints, device, batch_size, model_cache
        image_branches = [b for b in IMAGE_BRANCHES if b in checkpoints]
        self.backbone, self.calibration = None, None
        if image_branches:
            record = checkpoints[image_branches[0]]["backbone"]
            self.backbone = rebuild_backbone(checkpoints[image_branches[0]], image_branches[0])
            self.views = record["views"]
            # Features are computed in the precision and runtime training computed them in,
            # where this device can.
            self.precision = backbone_precision(record["precision"], device, f"{image_branches[0]}.pt")
            # int8: the front quantised as training quantised it, the trained stages in float.
            self.calibration = (
                recorded_calibration(calibration_paths, record["calibration"], self.backbone.preprocessing)
                if "calibration" in record
                else None
            )
            if self.calibration is not None and record.get("trained_from_stage"):
                self.backbone.module = FrontAndTail(*split_backbone(self.backbone, record["trained_from_stage"]))
            probe = Probe(self.backbone.module, self.backbone.preprocessing, True, self.precision, self.calibration)
            self.runtime = inference_runtime(
                record.get("runtime", "torch"), runtime, device, f"{image_branches[0]}.pt", probe, self.model_cache
            )
        self.heads = ImageHeads.from_checkpoints(checkpoints)
        self.stacker = (
            self._stacker(checkpoints["stacker"], calibration_paths, runtime) if "stacker" in checkpoints else None
        )

    def _stacker(self, checkpoint: dict, calibration_paths: DatasetPaths, runtime: str | None) -> StackerBranch:
        """The stacker, its front run in the precision, runtime and int8 calibration its maps
        were computed in, where this device can (said where it cannot)."""
        record, front_record = checkpoint["stacker"], checkpoint["stacker"]["front"]
        backbone, front = stacker_front(checkpoint)
        precision = backbone_precision(front_record["precision"], self.device, "stacker.pt")
        calibration = (
            recorded_calibration(calibration_paths, checkpoint["backbone"]["calibration"], backbone.preprocessing)
            if "calibration" in front_record
            else None
        )
        probe = Probe(front, backbone.preprocessing, False, precision, calibration)
        chosen = inference_runtime(front_record["runtime"], runtime, self.device, "stacker.pt", probe, self.model_cache)
        return StackerBranch(
            checkpoint["state_dict"],
            backbone,
            front,
            checkpoint["backbone"]["trained_from_stage"],
            record["image_view"],
            record["caption_encoder"],
            precision,
            chosen,
            calibration,
        )

    def _image_backbone(self) -> Backbone:
        """The image branches' rebuilt backbone (None when only the caption branch is loaded)."""
        if self.backbone is None:
            raise RuntimeError("no image branch is loaded: there are no image features to compute")
        return self.backbone

    def features(
        self, inputs: Inputs, image_ids: list[str], description: str
    ) -> tuple[torch.Tensor | CachedFeatures, torch.Tensor]:
        """(features (N, D), readable (N,)) of the images, through the feature cache when there is one."""
        if inputs.cache_dir is None:
            # Float16 as the cache stores them, so a file gets the prediction batch inference gives it.
            return extract_features(
                self._image_backbone(),
                inputs.paths,
                image_ids,
                self.device,
                self.batch_size,
                inputs.workers,
                self.views,
                description,
                self.precision,
                runtime=self.runtime,
                model_cache=self.model_cache,
                attention=self.heads.attention,
                calibration=self.calibration,
            )
        return cached_features(
            self._image_backbone(),
            inputs.paths,
            image_ids,
            self._extraction(inputs, inputs.cache_dir),
            description=description,
            attention=self.heads.attention,
        )

    def has_cached(self, inputs: Inputs, image_ids: list[str]) -> bool:
        """True when the features of these images are in the cache (never without one)."""
        if inputs.cache_dir is None:
            return False
        return has_cached_features(
            self._image_backbone(),
            inputs.paths,
            image_ids,
            self._extraction(inputs, inputs.cache_dir),
            attention=self.heads.attention,
        )

    def _extraction(self, inputs: Inputs, cache_dir: Path) -> ExtractionSettings:
        """How this predictor's frozen passes run for one call, its stores kept in ``cache_dir``."""
        return ExtractionSettings(
            cache_dir=cache_dir,
            device=self.device,
            batch_size=self.batch_size,
            workers=inputs.workers,
            views=tuple(self.views),
            precision=self.precision,
            runtime=self.runtime,
            calibration=self.calibration,
        )

    def probabilities(
        self,
        frame: pd.DataFrame,
        inputs: Inputs,
        features: tuple[torch.Tensor | CachedFeatures, torch.Tensor, np.ndarray] | None = None,
        description: str = "features",
    ) -> BranchProbabilities:
        """Probabilities (N_images, L) of every loaded branch for the images of ``frame``.

        One row per image, in the order of ``group_by_image(frame).images``: the caption
        branch averages over the rows (captions) of an image. ``features``, when given, is
        (features, readable, rows): those images' features are rows ``rows`` of ``features``.
        """
        out: dict[str, np.ndarray] = {}
        unreadable: list[str] = []
        groups = group_by_image(frame)
        image_ids = groups.images[ID_COLUMN].tolist()
        # The caption branch needs no image, so it runs in a thread beside the image
        # branches: their extraction keeps the cores busy from its own processes and leaves
        # the main process waiting, and the caption branch's small batches leave cores idle
        # when run alone. While extraction processes hold every core, its text encoder runs on
        # one thread: several would spin at their barriers against the extraction for a core.
        # Features read from the cache leave the cores to it.
        extracting_on_cpu = (
            self.backbone is not None
            and features is None
            and self.device.type == "cpu"
            and not self.has_cached(inputs, image_ids)
        )
        caption_threads = 1 if extracting_on_cpu else torch.get_num_threads()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-branch") as pool:
            caption = (
                pool.submit(self._caption_probabilities, frame, inputs.cache_dir, caption_threads)
                if "caption" in self.checkpoints
                else None
            )
            if self.backbone is not None:
                if features is None:
                    values, readable = self.features(inputs, image_ids, description)
                    features = (values, readable, np.arange(len(image_ids)))
                values, readable, rows = features
                unreadable = [i for i, ok in zip(image_ids, readable.tolist(), strict=True) if not ok]
                # A decoder that reads captions gets each image's (blank where there is none).
                captions = (
                    None
                    if self.heads.caption_encoder is None or self.heads.decoder is None
                    else image_caption_vectors(frame, self.heads.caption_encoder, inputs.cache_dir)
                )
                with timing.timed("heads", len(rows)):
                    out.update(self.heads.probabilities(values, readable, self.device, rows=rows, captions=captions))
            if self.stacker is not None:
                # The whole branch, its own pass of the front included (which "frozen front" counts too).
                with timing.timed("stacker", len(image_ids)):
                    out["stacker"], stacker_readable = self.stacker.probabilities(
                        frame,
                        inputs.paths,
                        inputs.cache_dir,
                        self.device,
                        self.batch_size,
                        inputs.workers,
                        self.model_cache,
                        description,
                    )
                if self.backbone is None:
                    unreadable = [i for i, ok in zip(image_ids, stacker_readable.tolist(), strict=True) if not ok]
            if caption is not None:
                out["caption"] = groups.mean(caption.result())
        return BranchProbabilities(out, unreadable)

    def _caption_probabilities(self, frame: pd.DataFrame, cache_dir: Path | None, threads: int) -> np.ndarray:
        """The caption branch's probabilities (N_rows, L), with ``threads`` torch threads (a new
        thread starts with the default count, and the count can change the rounding)."""
        torch.set_num_threads(threads)
        captions = frame[CAPTION_COLUMN].fillna("").tolist() if CAPTION_COLUMN in frame else [""] * len(frame)
        with timing.timed("caption", len(captions)):
            return predict_caption_probs(self.checkpoints["caption"], captions, self.device, cache_dir=cache_dir)


def split_probabilities(
    predictor: BranchPredictor, inputs: Inputs, train: pd.DataFrame, val: pd.DataFrame
) -> BranchProbabilities:
    """The probabilities of the validation split's images. Frozen mode's feature cache covers
    train + validation, and is read where it is complete; a fine-tuned backbone's training
    cached the validation images' features alone, which the usual path finds."""
    train_images, val_images = group_by_image(train).images, group_by_image(val).images
    features = None
    training_ids = training_image_ids(train_images, val_images)
    if predictor.backbone is not None and predictor.has_cached(inputs, training_ids):
        values, readable = predictor.features(inputs, training_ids, "train.csv features")
        features = (values, readable[len(train_images) :], np.arange(len(train_images), len(training_ids)))
    return predictor.probabilities(val, inputs, features=features)


# --- The fusion settings of a run ---------------------------------------------------------------


def validation_probabilities(
    weights_dir: Path, branches: list[str], val_ids: list[str], label_ids: list[int]
) -> dict[str, np.ndarray]:
    """The validation-split probabilities each training script saved, aligned on ``val_ids``.
    Rows the branch could not score (NaN, as ``--skip-bad-images`` leaves them) are kept, and
    said with their file: fusion tuning leaves them out."""
    out = {}
    for branch in branches:
        ids, _, probs = load_probabilities(probabilities_path(weights_dir, branch), label_ids)
        unscored = np.flatnonzero(np.isnan(probs).any(axis=1))
        if len(unscored):
            lines = ", ".join(str(k + 2) for k in unscored[:10]) + (", ..." if len(unscored) > 10 else "")
            log.warning(
                "%s: %d of %d rows hold no probabilities (line(s) %s): images the %s branch could not "
                "score, such as those --skip-bad-images left out; fusion is tuned without them",
                probabilities_path(weights_dir, branch),
                len(unscored),
                len(ids),
                lines,
                branch,
            )
        index = {image_id: i for i, image_id in enumerate(ids)}
        missing = [i for i in val_ids if i not in index]
        if missing:
            raise CheckpointError(
                f"{probabilities_path(weights_dir, branch)}: no probabilities for {len(missing)} validation "
                f"images (e.g. {missing[0]}); was it trained with the same --val-fraction and data?"
            )
        out[branch] = probs[[index[i] for i in val_ids]]
    return out


def check_dataset_labels(train_csv: Path, data_labels: LabelSet, labels: LabelSet, weights_dir: Path) -> None:
    """Warn when the dataset's train.csv has other labels than the weights were trained on:
    predictions use the trained labels, which may not be this dataset's."""
    if data_labels == labels:
        return
    extra = sorted(set(data_labels.ids) - set(labels.ids))
    absent = sorted(set(labels.ids) - set(data_labels.ids))
    log.warning(
        "%s has labels %s; the weights in %s were trained on labels %s (not trained: %s; not in %s: %s), "
        "so the predictions use the trained labels",
        train_csv,
        list(data_labels.ids),
        weights_dir,
        list(labels.ids),
        extra,
        train_csv.name,
        absent,
    )


def split_labels(frame: pd.DataFrame, labels: LabelSet, data_labels: LabelSet, weights_dir: Path) -> np.ndarray:
    """Multi-hot labels (N_images, L) of a split of train.csv; a label the weights were not trained
    on is an error naming the file, the line and both label sets."""
    try:
        check_known_labels(frame, labels)
    except DataFormatError as err:
        raise DataFormatError(
            f"{err} (the weights in {weights_dir}); {frame.attrs['source']} has labels {list(data_labels.ids)}: "
            "the weights were trained on other data; retrain on this dataset, or give --weights-dir the weights "
            "trained on it"
        ) from None
    return labels.encode(group_by_image(frame).images[LABELS_COLUMN])


ValidationSplit = tuple[LabelSet, np.ndarray | None, dict[str, np.ndarray] | None]


def validation_split(
    weights_dir: Path, branches: list[str], labels: LabelSet, data_labels: LabelSet, val: pd.DataFrame
) -> ValidationSplit:
    """(the dataset's labels, labels, probabilities by branch) of the validation images, for tuning fusion."""
    if val.empty:
        return data_labels, None, None
    val_ids = group_by_image(val).images[ID_COLUMN].tolist()
    return (
        data_labels,
        split_labels(val, labels, data_labels, weights_dir),
        validation_probabilities(weights_dir, branches, val_ids, list(labels.ids)),
    )


def resolve_fusion(
    config: InferenceConfig,
    branches: list[str],
    labels: LabelSet,
    weights_dir: Path,
    validation: Callable[[], ValidationSplit],
    context: DistContext = DistContext(),
) -> FusionSettings:
    """The fusion settings of a run, then the hand overrides.

    fusion.json if it fits the branches and labels, else the run's own file (``fusion_file``)
    if it fits, else tuned on ``validation()`` (:func:`validation_split`). fusion.json, the
    file users edit, is written only by a run with every trained branch on the labels they
    were trained on (when it is missing, tuned for other branches or labels, or with
    ``--tune``); any other tune is saved to the run's own file, so an ablation never replaces
    the settings of the full run. Under torchrun rank 0 resolves them first (tuning and writing
    where needed) and the other ranks then read what it wrote.
    """
    if context.is_main:
        settings = _resolve_fusion(config, branches, labels, weights_dir, validation)
        barrier(context)
    else:
        barrier(context)  # rank 0 first: what it tunes and writes, the others read
        settings = _resolve_fusion(replace(config, tune=False), branches, labels, weights_dir, validation)
    barrier(context)
    return settings


def _resolve_fusion(
    config: InferenceConfig,
    branches: list[str],
    labels: LabelSet,
    weights_dir: Path,
    validation: Callable[[], ValidationSplit],
) -> FusionSettings:
    """:func:`resolve_fusion` in one process."""
    # The hand overrides are checked first, so a slip fails before a slow tune.
    weights = parse_weights(config.fusion_weights) if config.fusion_weights is not None else None
    if weights is not None:
        check_weights(weights, branches, f"--fusion-weights {config.fusion_weights!r}", "the loaded")
    main, own = weights_dir / "fusion.json", fusion_file(weights_dir, branches)
    trained = [b for b in BRANCHES if checkpoint_path(weights_dir, b).is_file()]
    every_branch = sorted(branches) == sorted(trained)
    settings: FusionSettings | None = None
    source: Path | str | None = None
    if not config.tune:
        for path in (main, own):
            settings = _fitting_fusion(path, branches, labels, every_branch)
            if settings is not None:
                source = path
                break
    if settings is None:
        data_labels, y_val, val_probs = validation()
        if y_val is None or val_probs is None:
            raise FusionError(f"{main}: missing; the validation split is empty, so fusion cannot be tuned")
        log.info("tuning fusion weights and thresholds on %d validation images", len(y_val))
        settings = tune_fusion(y_val, val_probs, list(labels.ids), seed=config.seed)
        settings.tuned_on["val_fraction"] = config.val_fraction
        if every_branch and data_labels == labels:
            # Here fusion.json is missing, asked to be re-tuned, or tuned for other branches or
            # labels than these weights have: settings no run of these weights can use.
            target, kept = main, ""
        else:
            target = own
            why = (
                f"this run does not use every trained branch {trained}"
                if not every_branch
                else "the dataset's labels are not the trained ones"
            )
            kept = (
                f"; {main} was left as it is ({why})"
                if main.is_file()
                else f"; {main} is written only by a run with every trained branch on the labels they know ({why})"
            )
        save_fusion(settings, target)
        source = f"{target}, tuned now"
        log.info(
            "wrote %s for branches %s (method %s, validation samples-F1 %.4f)%s",
            target,
            branches,
            settings.method,
            settings.val_samples_f1,
            kept,
        )
    if weights is not None:
        settings.method, settings.weights, settings.stacker = "weighted", weights, None
    if config.threshold is not None:
        settings.threshold, settings.per_label_thresholds = config.threshold, {}
    # One line saying where each part came from: --fusion-weights replaces the file's weights.
    weights_from = (
        f"--fusion-weights {config.fusion_weights}" if weights is not None else f"{source} (method {settings.method})"
    )
    threshold_from = f"--threshold {config.threshold}" if config.threshold is not None else source
    log.info("fusion weights from %s; thresholds from %s", weights_from, threshold_from)
    return settings


def _fitting_fusion(path: Path, branches: list[str], labels: LabelSet, every_branch: bool) -> FusionSettings | None:
    """The settings in ``path`` (checked as they load) when they were tuned for these branches and
    labels; None when the file is missing or tuned for others (said when that is news)."""
    if not path.is_file():
        return None
    settings = load_fusion(path)
    if sorted(settings.branches) == sorted(branches) and settings.label_ids == list(labels.ids):
        return settings
    # fusion.json is tuned for every branch, so an ablation expects it not to fit: said quietly.
    expected = not every_branch and path.name == "fusion.json" and settings.label_ids == list(labels.ids)
    log.log(
        logging.INFO if expected else logging.WARNING,
        "%s was tuned for branches %s and labels %s; this run has branches %s and labels %s, so it is not used",
        path,
        settings.branches,
        settings.label_ids,
        branches,
        list(labels.ids),
    )
    return None


# --- Fused predictions, a chunk at a time, into a submission ------------------------------------


def submission_label_text(names: dict[str, str], separator: str | None) -> Callable[[list[int]], str]:
    """How a submission row writes its labels: as train.csv wrote them, so a dataset of names
    gets its ``names`` (``pipeline.labels.label_names``) joined by its separator, and the
    competition's ids stay ids."""
    if separator is None:
        return lambda ids: " ".join(str(i) for i in ids)
    return lambda ids: separator.join(names[str(i)] for i in ids)


def predict_in_chunks(
    predictor: BranchPredictor,
    frame: pd.DataFrame,
    inputs: Inputs,
    settings: FusionSettings,
    labels: LabelSet,
    submission: Path,
    chunk_size: int,
    description: str,
    context: DistContext = DistContext(),
    label_text: Callable[[list[int]], str] = lambda ids: " ".join(map(str, ids)),
) -> list[str]:
    """Fused predictions of ``frame``'s images, ``chunk_size`` images at a time, streamed into
    ``submission`` in the frame's image order (the file appears when every chunk is done), each
    row's labels written by ``label_text`` (ids by default; see ``submission_label_text``).
    Returns the ImageIDs that could not be read (their rows use the caption alone).

    Each chunk's features are cached under their own key, so a rerun after an interruption
    reads the finished chunks back instead of extracting them again. Under torchrun rank
    ``r`` predicts chunks ``r, r + N, ...`` into part files beside ``submission`` and rank 0
    joins them in order (the ranks must share the output folder); the file is the one a
    single process writes.
    """
    image_ids = group_by_image(frame).images[ID_COLUMN].tolist()
    starts = list(range(0, len(image_ids), chunk_size))
    # Each row's chunk, found once: the rows of an image go with it, in frame order.
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    chunk_rows = frame.groupby(frame[ID_COLUMN].map(position).to_numpy() // chunk_size, sort=True).indices

    def predict(number: int) -> tuple[list[str], np.ndarray, list[str]]:
        chunk_ids = image_ids[starts[number] : starts[number] + chunk_size]
        chunk = frame.iloc[chunk_rows[number]] if len(starts) > 1 else frame
        name = description if len(starts) == 1 else f"{description} {number + 1}/{len(starts)}"
        probs, unreadable = predictor.probabilities(chunk, inputs, description=name)
        try:
            with timing.timed("fusion", len(chunk_ids)):
                fused = settings.predict(probs)
            return chunk_ids, fused, unreadable
        except FusionError:
            list_unreadable(unreadable, submission.parent)
            raise

    if not context.distributed:
        unreadable: list[str] = []
        with atomic_text_writer(submission) as handle:
            handle.write(f"{ID_COLUMN},{LABELS_COLUMN}\n")
            for number in range(len(starts)):
                chunk_ids, predictions, missing = predict(number)
                unreadable += missing
                _write_rows(handle, chunk_ids, predictions, labels, label_text)
        return unreadable

    parts = submission.parent / f".{submission.name}.parts"
    if context.is_main:
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
    barrier(context)
    for number in range(context.rank, len(starts), context.world_size):
        chunk_ids, predictions, missing = predict(number)
        with atomic_text_writer(parts / f"{number:06d}.csv") as handle:
            _write_rows(handle, chunk_ids, predictions, labels, label_text)
        write_json(parts / f"{number:06d}.unreadable.json", missing)
    barrier(context)
    unreadable = []
    if context.is_main:
        with atomic_text_writer(submission) as handle:
            handle.write(f"{ID_COLUMN},{LABELS_COLUMN}\n")
            for number in range(len(starts)):
                handle.write((parts / f"{number:06d}.csv").read_text(encoding="utf-8"))
                unreadable += json.loads((parts / f"{number:06d}.unreadable.json").read_text())
        shutil.rmtree(parts)
    barrier(context)
    return unreadable


def _write_rows(
    handle, image_ids: list[str], predictions: np.ndarray, labels: LabelSet, label_text: Callable[[list[int]], str]
) -> None:
    rows = [label_text(row) for row in labels.decode(predictions)]
    pd.DataFrame({ID_COLUMN: image_ids, LABELS_COLUMN: rows}).to_csv(handle, index=False, header=False)


def list_unreadable(image_ids: list[str], output_dir: Path) -> None:
    """OUTPUT/unreadable_images.txt: the test images that could not be read, and a warning."""
    listing = output_dir / "unreadable_images.txt"
    atomic_write_text(listing, "\n".join(image_ids) + "\n")
    log.warning(
        "%d test images could not be read; their rows use the caption branch alone (listed in %s)",
        len(image_ids),
        listing,
    )
