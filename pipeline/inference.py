"""Inference: every branch's probabilities, their fusion, the submission and the evaluation report
(``--image`` files are predicted by ``pipeline.predictor``, built on these pieces)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
from pipeline.checkpoint import BRANCHES, checkpoint_path, load_checkpoint, load_probabilities, probabilities_path
from pipeline.inference_config import InferenceConfig, parse_branch_list, parse_weights
from pipeline.data.dataset import (
    CAPTION_COLUMN,
    DATASET_INFO,
    ID_COLUMN,
    LABELS_COLUMN,
    DataFormatError,
    DatasetPaths,
    LabelSet,
    check_known_labels,
    group_by_image,
    load_train_val,
    read_prediction_csv,
    recorded_labels,
)
from pipeline.engine import timing
from pipeline.engine.distributed import DistContext, barrier, distributed_session
from pipeline.engine.frozen import FrontAndTail
from pipeline.engine.runtimes import Probe, get_runtime, resolve_runtime
from pipeline.engine.runtime import (
    configure_backends,
    inference_precision,
    native_bf16,
    oom_hint,
    resolve_device,
    reuse_freed_memory,
    seed_everything,
)
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
from pipeline.io import CheckpointError, OptionError, atomic_text_writer, atomic_write_text, write_json
from pipeline.labels import label_names
from pipeline.models.backbones import split_backbone

log = logging.getLogger(__name__)

IMAGE_BRANCHES = ("image", "decoder")


def missing_inputs(paths: DatasetPaths, frames: dict[Path, pd.DataFrame]) -> dict[str, str]:
    """Why a branch cannot run on this dataset, by branch: a CSV without captions, no image folder."""
    reasons = {}
    without_captions = [str(path) for path, frame in frames.items() if CAPTION_COLUMN not in frame]
    if without_captions:
        reasons["caption"] = f"no {CAPTION_COLUMN} column in {', '.join(without_captions)}"
    if not paths.images.is_dir():
        for branch in IMAGE_BRANCHES:
            reasons[branch] = f"the image folder {paths.images} does not exist"
    return reasons


def choose_branches(weights_dir: Path, requested: list[str] | None, missing: dict[str, str]) -> list[str] | None:
    """The branches of a run: the requested ones, which must have their input, or else every
    branch with a checkpoint whose input this dataset has (None when no checkpoint exists)."""
    if requested is not None:
        for branch in requested:
            if branch in missing:
                raise OptionError(f"--branches {','.join(requested)}: the {branch} branch cannot run: {missing[branch]}")
        return requested
    present = [b for b in BRANCHES if checkpoint_path(weights_dir, b).is_file()]
    for branch in present:
        if branch in missing:
            log.warning("not using the %s branch: %s", branch, missing[branch])
    usable = [b for b in present if b not in missing]
    if present and not usable:
        raise ValueError(f"{weights_dir}: none of the trained branches {present} can run on this dataset: "
                         + "; ".join(sorted(set(missing.values()))))
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
    first = wanted[0]
    for name, checkpoint in loaded.items():
        if checkpoint["label_ids"] != loaded[first]["label_ids"]:
            raise CheckpointError(
                f"{checkpoint_path(weights_dir, name)}: labels {checkpoint['label_ids']} differ from "
                f"{checkpoint_path(weights_dir, first)}: {loaded[first]['label_ids']}; retrain on the same data"
            )
    if "image" in loaded and "decoder" in loaded and \
            backbone_identity(loaded["image"]["backbone"]) != backbone_identity(loaded["decoder"]["backbone"]):
        raise CheckpointError(f"{weights_dir}: image.pt and decoder.pt were trained on different backbones; retrain")
    return loaded


def inference_runtime(trained: str, requested: str | None, device: torch.device, source: str,
                      probe: Probe | None = None, cache_dir: Path | None = None) -> str:
    """The runtime inference runs the backbone (``probe``) in: the one ``source`` was trained
    with, unless ``--runtime`` asks for another (said, since the features then differ a little
    from those the heads learned from) or it cannot run here (said, and ``auto`` chooses)."""
    if requested is not None:
        runtime = resolve_runtime(requested, device, probe, cache_dir)
        if runtime != trained:
            log.warning("--runtime %s: %s was trained with features from %s; the features differ slightly",
                        runtime, source, trained)
        return runtime
    reason = get_runtime(trained).unavailable(device)
    if reason is None:
        return trained
    runtime = resolve_runtime("auto", device, probe, cache_dir)
    log.warning("%s was trained with features from %s, but %s: running %s, whose features differ slightly",
                source, trained, reason, runtime)
    return runtime


def backbone_precision(trained: str, device: torch.device, source: str) -> str:
    """The precision the backbone runs in here: the one ``source``'s features were computed in
    where ``device`` runs it natively, else fp32 (said, since the features then differ a little
    from those the heads learned from); see :func:`inference_precision`."""
    precision = inference_precision(device, trained, native_bf16(device))
    if precision != trained:
        log.warning("%s's features were computed in %s, which this %s does not run natively: running %s, "
                    "whose features differ slightly", source, trained, device.type.upper(), precision)
    return precision


class BranchPredictor:
    """Rebuilds the loaded branches and computes their probabilities for any frame of images/captions."""

    def __init__(self, checkpoints: dict[str, dict], paths: DatasetPaths, cache_dir: Path | None,
                 device: torch.device, batch_size: int, workers: int, runtime: str | None = None,
                 model_cache: Path | None = None) -> None:
        self.checkpoints = checkpoints
        self.paths, self.cache_dir, self.device = paths, cache_dir, device
        self.batch_size, self.workers = batch_size, workers
        self.model_cache = model_cache if model_cache is not None else cache_dir
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
            self.calibration = recorded_calibration(paths, record["calibration"], self.backbone.preprocessing) \
                if "calibration" in record else None
            if self.calibration is not None and record.get("trained_from_stage"):
                self.backbone.module = FrontAndTail(*split_backbone(self.backbone, record["trained_from_stage"]))
            probe = Probe(self.backbone.module, self.backbone.preprocessing, True, self.precision, self.calibration)
            self.runtime = inference_runtime(record.get("runtime", "torch"), runtime, device,
                                             f"{image_branches[0]}.pt", probe, self.model_cache)
        self.heads = ImageHeads.from_checkpoints(checkpoints)
        self.unreadable: list[str] = []

    def features(self, image_ids: list[str], description: str) -> tuple[torch.Tensor | CachedFeatures, torch.Tensor]:
        """(features (N, D), readable (N,)) of the images, through the feature cache when there is one."""
        if self.cache_dir is None:
            # Float16 as the cache stores them, so a file gets the prediction batch inference gives it.
            return extract_features(self.backbone, self.paths, image_ids, self.device, self.batch_size,
                                    self.workers, self.views, description, self.precision, runtime=self.runtime,
                                    model_cache=self.model_cache, attention=self.heads.attention,
                                    calibration=self.calibration)
        return cached_features(self.backbone, self.paths, image_ids,
                               ExtractionSettings(cache_dir=self.cache_dir, device=self.device,
                                                  batch_size=self.batch_size, workers=self.workers,
                                                  views=tuple(self.views), precision=self.precision,
                                                  runtime=self.runtime, calibration=self.calibration),
                               description=description, attention=self.heads.attention)

    def has_cached(self, image_ids: list[str]) -> bool:
        """True when the features of these images are in the cache."""
        return has_cached_features(self.backbone, self.paths, image_ids,
                                   ExtractionSettings(cache_dir=self.cache_dir, device=self.device,
                                                      views=tuple(self.views), precision=self.precision,
                                                      runtime=self.runtime, calibration=self.calibration),
                                   attention=self.heads.attention)

    def probabilities(self, frame: pd.DataFrame,
                      features: tuple[torch.Tensor | CachedFeatures, torch.Tensor, np.ndarray] | None = None,
                      description: str = "features") -> dict[str, np.ndarray]:
        """Probabilities (N_images, L) of every loaded branch for the images of ``frame``.

        One row per image, in the order of ``group_by_image(frame).images``: the caption
        branch averages over the rows (captions) of an image. ``features``, when given, is
        (features, readable, rows): those images' features are rows ``rows`` of ``features``.
        Images that cannot be read get NaN from the image branches (fusion then uses the
        caption alone for them) and are listed in ``self.unreadable``.
        """
        out: dict[str, np.ndarray] = {}
        groups = group_by_image(frame)
        image_ids = groups.images[ID_COLUMN].tolist()
        # The caption branch needs no image, so it runs in a thread beside the image
        # branches: their extraction keeps the cores busy from its own processes and leaves
        # the main process waiting, and the caption branch's small batches leave cores idle
        # when run alone.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-branch") as pool:
            caption = pool.submit(self._caption_probabilities, frame, torch.get_num_threads()) \
                if "caption" in self.checkpoints else None
            if self.backbone is not None:
                if features is None:
                    values, readable = self.features(image_ids, description)
                    features = (values, readable, np.arange(len(image_ids)))
                values, readable, rows = features
                self.unreadable = [i for i, ok in zip(image_ids, readable.tolist()) if not ok]
                # A decoder that reads captions gets each image's (blank where there is none).
                captions = None if self.heads.caption_encoder is None or self.heads.decoder is None else \
                    image_caption_vectors(frame, self.heads.caption_encoder, self.cache_dir)
                with timing.timed("heads", len(rows)):
                    out.update(self.heads.probabilities(values, readable, self.device, rows=rows, captions=captions))
            if caption is not None:
                out["caption"] = groups.mean(caption.result())
        return out

    def _caption_probabilities(self, frame: pd.DataFrame, threads: int) -> np.ndarray:
        """The caption branch's probabilities (N_rows, L), with ``threads`` torch threads (a new
        thread starts with the default count, and the count can change the rounding)."""
        torch.set_num_threads(threads)
        captions = frame[CAPTION_COLUMN].fillna("").tolist() if CAPTION_COLUMN in frame else [""] * len(frame)
        with timing.timed("caption", len(captions)):
            return predict_caption_probs(self.checkpoints["caption"], captions, self.device, cache_dir=self.cache_dir)


def validation_probabilities(weights_dir: Path, branches: list[str], val_ids: list[str],
                             label_ids: list[int]) -> dict[str, np.ndarray]:
    """The validation-split probabilities each training script saved, aligned on ``val_ids``.
    Rows the branch could not score (NaN, as ``--skip-bad-images`` leaves them) are kept, and
    said with their file: fusion tuning leaves them out."""
    out = {}
    for branch in branches:
        ids, _, probs = load_probabilities(probabilities_path(weights_dir, branch), label_ids)
        unscored = np.flatnonzero(np.isnan(probs).any(axis=1))
        if len(unscored):
            lines = ", ".join(str(k + 2) for k in unscored[:10]) + (", ..." if len(unscored) > 10 else "")
            log.warning("%s: %d of %d rows hold no probabilities (line(s) %s): images the %s branch could not "
                        "score, such as those --skip-bad-images left out; fusion is tuned without them",
                        probabilities_path(weights_dir, branch), len(unscored), len(ids), lines, branch)
        index = {image_id: i for i, image_id in enumerate(ids)}
        missing = [i for i in val_ids if i not in index]
        if missing:
            raise CheckpointError(
                f"{probabilities_path(weights_dir, branch)}: no probabilities for {len(missing)} validation "
                f"images (e.g. {missing[0]}); was it trained with the same --val-fraction and data?"
            )
        out[branch] = probs[[index[i] for i in val_ids]]
    return out


def resolve_fusion(config: InferenceConfig, branches: list[str], labels: LabelSet, weights_dir: Path,
                   validation: Callable[[], tuple[LabelSet, np.ndarray | None, dict[str, np.ndarray] | None]]
                   ) -> FusionSettings:
    """The fusion settings of a run, then the hand overrides.

    fusion.json if it fits the branches and labels, else the run's own file (``fusion_file``)
    if it fits, else tuned on ``validation()`` = (the dataset's labels, labels and probabilities
    by branch of the validation split). fusion.json, the file users edit, is written only by a
    run with every trained branch on the labels they were trained on (when it is missing, tuned
    for other branches or labels, or with ``--tune``); any other tune is saved to the run's own
    file, so an ablation never replaces the settings of the full run.
    """
    # The hand overrides are checked first, so a slip fails before a slow tune.
    weights = parse_weights(config.fusion_weights) if config.fusion_weights is not None else None
    if weights is not None:
        check_weights(weights, branches, f"--fusion-weights {config.fusion_weights!r}", "the loaded")
    main, own = weights_dir / "fusion.json", fusion_file(weights_dir, branches)
    trained = [b for b in BRANCHES if checkpoint_path(weights_dir, b).is_file()]
    every_branch = sorted(branches) == sorted(trained)
    settings, source = None, None
    if not config.tune:
        for path in (main, own):
            settings = _fitting_fusion(path, branches, labels, every_branch)
            if settings is not None:
                source = path
                break
    if settings is None:
        data_labels, y_val, val_probs = validation()
        if val_probs is None:
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
            why = (f"this run does not use every trained branch {trained}" if not every_branch else
                   "the dataset's labels are not the trained ones")
            kept = f"; {main} was left as it is ({why})" if main.is_file() else \
                f"; {main} is written only by a run with every trained branch on the labels they know ({why})"
        save_fusion(settings, target)
        source = f"{target}, tuned now"
        log.info("wrote %s for branches %s (method %s, validation samples-F1 %.4f)%s", target, branches,
                 settings.method, settings.val_samples_f1, kept)
    if weights is not None:
        settings.method, settings.weights, settings.stacker = "weighted", weights, None
    if config.threshold is not None:
        settings.threshold, settings.per_label_thresholds = config.threshold, {}
    # One line saying where each part came from: --fusion-weights replaces the file's weights.
    weights_from = (f"--fusion-weights {config.fusion_weights}" if weights is not None
                    else f"{source} (method {settings.method})")
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
    log.log(logging.INFO if expected else logging.WARNING,
            "%s was tuned for branches %s and labels %s; this run has branches %s and labels %s, so it is not used",
            path, settings.branches, settings.label_ids, branches, list(labels.ids))
    return None


def check_dataset_labels(train_csv: Path, data_labels: LabelSet, labels: LabelSet, weights_dir: Path) -> None:
    """Warn when the dataset's train.csv has other labels than the weights were trained on:
    predictions use the trained labels, which may not be this dataset's."""
    if data_labels == labels:
        return
    extra = sorted(set(data_labels.ids) - set(labels.ids))
    absent = sorted(set(labels.ids) - set(data_labels.ids))
    log.warning("%s has labels %s; the weights in %s were trained on labels %s (not trained: %s; not in %s: %s), "
                "so the predictions use the trained labels", train_csv, list(data_labels.ids), weights_dir,
                list(labels.ids), extra, train_csv.name, absent)


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


def _validation_split(weights_dir: Path, branches: list[str], labels: LabelSet, data_labels: LabelSet,
                      val: pd.DataFrame) -> tuple[LabelSet, np.ndarray | None, dict[str, np.ndarray] | None]:
    """(the dataset's labels, labels, probabilities by branch) of the validation images, for tuning fusion."""
    if val.empty:
        return data_labels, None, None
    val_ids = group_by_image(val).images[ID_COLUMN].tolist()
    return (data_labels, split_labels(val, labels, data_labels, weights_dir),
            validation_probabilities(weights_dir, branches, val_ids, list(labels.ids)))


def _write_rows(handle, image_ids: list[str], predictions: np.ndarray, labels: LabelSet,
                label_text: Callable[[list[int]], str]) -> None:
    rows = [label_text(row) for row in labels.decode(predictions)]
    pd.DataFrame({ID_COLUMN: image_ids, LABELS_COLUMN: rows}).to_csv(handle, index=False, header=False)


def predict_in_chunks(predictor: BranchPredictor, frame: pd.DataFrame, settings: FusionSettings, labels: LabelSet,
                      submission: Path, chunk_size: int, description: str,
                      context: DistContext = DistContext(),
                      label_text: Callable[[list[int]], str] = lambda ids: " ".join(map(str, ids))) -> list[str]:
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
        chunk_ids = image_ids[starts[number]:starts[number] + chunk_size]
        chunk = frame.iloc[chunk_rows[number]] if len(starts) > 1 else frame
        name = description if len(starts) == 1 else f"{description} {number + 1}/{len(starts)}"
        probs = predictor.probabilities(chunk, description=name)
        try:
            with timing.timed("fusion", len(chunk_ids)):
                fused = settings.predict(probs)
            return chunk_ids, fused, predictor.unreadable
        except FusionError:
            _list_unreadable(predictor.unreadable, submission.parent)
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


def _list_unreadable(image_ids: list[str], output_dir: Path) -> None:
    listing = output_dir / "unreadable_images.txt"
    atomic_write_text(listing, "\n".join(image_ids) + "\n")
    log.warning("%d test images could not be read; their rows use the caption branch alone (listed in %s)",
                len(image_ids), listing)


def run_inference(config: InferenceConfig) -> dict:
    """Predict test.csv (or ``--test-csv``) with the fused branches; optionally evaluate.
    Returns a summary. (``--image`` runs ``pipeline.predictor.predict_files`` instead.)"""
    config.validate()
    reuse_freed_memory()
    with oom_hint(config.batch_size):
        with distributed_session(resolve_device(config.device)) as (context, device):
            return _run_inference(config, device, context)


def _run_inference(config: InferenceConfig, device: torch.device, context: DistContext) -> dict:
    """Predict the test CSV; under torchrun every process predicts its share of the chunks
    and rank 0 writes the submission and evaluates."""
    logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING, format="%(message)s")
    configure_backends(device)
    started, started_at = time.perf_counter(), time.time()
    timing.reset()
    seed_everything(config.seed)
    paths = DatasetPaths.resolve(config.data, config.images)
    weights_dir, output_dir = Path(config.weights_dir), Path(config.output)
    # Every input file is read before any slow step, so a broken one fails at once; which
    # columns they have decides the branches that can run.
    data_labels, train, val = load_train_val(paths, config.val_fraction)
    recorded, separator = recorded_labels(config.data)
    test_csv = Path(config.test_csv) if config.test_csv else paths.test_csv
    # --evaluate needs no test set: without DATA/test.csv it scores the validation split alone.
    test = None if config.evaluate and not config.test_csv and not test_csv.is_file() else \
        read_prediction_csv(test_csv, captions=False)
    frames = {paths.train_csv: train, **({test_csv: test} if test is not None else {})}
    eval_frame = None
    if config.evaluate and config.eval_csv:
        eval_frame = read_prediction_csv(config.eval_csv, captions=False, label_names=recorded,
                                         label_separator=separator)
        if LABELS_COLUMN not in eval_frame:
            raise DataFormatError(f"--eval-csv {config.eval_csv}:1: needs a {LABELS_COLUMN} column")
        frames[Path(config.eval_csv)] = eval_frame
    branches = choose_branches(weights_dir, parse_branch_list(config.branches), missing_inputs(paths, frames))
    checkpoints = load_branch_checkpoints(weights_dir, branches)
    branches = list(checkpoints)
    labels = LabelSet(tuple(checkpoints[branches[0]]["label_ids"]))
    if context.is_main:
        check_dataset_labels(paths.train_csv, data_labels, labels, weights_dir)
    predictor = BranchPredictor(checkpoints, paths, weights_dir / "cache", device, config.batch_size, config.workers,
                                config.runtime)

    # Every per-image output has one row per image, also when a file has one row per caption.
    train_images, val_images = group_by_image(train).images, group_by_image(val).images
    # Rank 0 tunes (or reads) the fusion settings first; the others then read what it wrote.
    settings = None
    for turn in (True, False):
        if context.is_main == turn:
            settings = resolve_fusion(config if turn else dataclasses.replace(config, tune=False), branches, labels,
                                      weights_dir, lambda: _validation_split(weights_dir, branches, labels,
                                                                             data_labels, val))
        barrier(context)

    names = label_names(labels.ids, recorded)
    summary = {"branches": branches, "fusion_method": settings.method, "submission": None, "rows": 0,
               "fusion_val_samples_f1": settings.val_samples_f1, "unreadable_images": 0}
    unreadable: list[str] = []
    if test is not None:
        submission = output_dir / "submission.csv"
        unreadable = predict_in_chunks(predictor, test, settings, labels, submission, config.chunk_size,
                                       f"{test_csv.name} features", context,
                                       label_text=submission_label_text(names, separator))
        summary.update(submission=str(submission), rows=len(group_by_image(test).images),
                       unreadable_images=len(unreadable))
    if not context.is_main:
        return {"rank": context.rank, "rows": summary["rows"]}
    if test is None:
        log.info("no %s: evaluating only (validation metrics and the report page), no submission", test_csv)
    else:
        if unreadable:
            _list_unreadable(unreadable, output_dir)
        if recorded:
            write_submission_info(output_dir, names, separator)
        log.info("wrote %s: %d rows for the %d images (%d rows) of %s",
                 submission, summary["rows"], summary["rows"], len(test), test_csv)

    if config.evaluate:
        from pipeline.report import evaluation_report

        if eval_frame is not None:
            check_known_labels(eval_frame, labels)  # the model's labels are known only now
            y_true = labels.encode(group_by_image(eval_frame).images[LABELS_COLUMN])
            probs = predictor.probabilities(eval_frame, description="evaluation features")
            source = str(config.eval_csv)
        else:
            features = None
            training_ids = training_image_ids(train_images, val_images)
            if predictor.backbone is not None and predictor.has_cached(training_ids):
                # Frozen mode's feature cache covers train + validation: reuse it. (A fine-tuned
                # backbone's training wrote the validation images' features alone, which the
                # usual path below finds.)
                values, readable = predictor.features(training_ids, "train.csv features")
                features = (values, readable[len(train_images):], np.arange(len(train_images), len(training_ids)))
            y_true, source = split_labels(val, labels, data_labels, weights_dir), "validation split"
            probs = predictor.probabilities(val, features=features)
        report = evaluation_report(y_true, probs, settings, list(labels.ids), output_dir, source, names)
        summary["metrics"] = {name: m["samples_f1"] for name, m in report.items()}
        summary["evaluated_on"] = source
        if config.report:
            from pipeline.report_page import write_report_page

            rerun = ["python", "inference.py", "--data", str(config.data), "--weights-dir", str(config.weights_dir),
                     *(["--branches", config.branches] if config.branches else [])]
            write_report_page(output_dir / "report.html", y_true, probs, settings, list(labels.ids), report,
                              group_by_image(eval_frame if eval_frame is not None else val).images, paths,
                              source=source, weights_dir=weights_dir, command=rerun,
                              plots=[output_dir / "per_label_f1.png", output_dir / "f1_vs_threshold.png"],
                              label_names=names)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["timing"] = timing.summary()
    summary_file = output_dir / "inference_summary.json"
    # The files this run wrote, not those an earlier run left in the folder.
    summary["files"] = [str(path) for path in sorted(output_dir.iterdir())
                        if path.is_file() and path.stat().st_mtime >= started_at] + [str(summary_file)]
    write_json(summary_file, summary)
    log.info(summary_line(summary, output_dir))
    return summary


def summary_line(summary: dict, output_dir: Path) -> str:
    """What a person reads at the end of a run: the scores, the time, where the files went; the
    full record is ``inference_summary.json``."""
    metrics = summary.get("metrics")
    if metrics:
        branches = ", ".join(f"{name} {score:.4f}" for name, score in metrics.items() if name != "fused")
        scores = f"samples-F1 fused {metrics['fused']:.4f} ({branches}) on the {summary['evaluated_on']}"
    elif summary["fusion_val_samples_f1"] is not None:
        scores = f"fusion's validation samples-F1 {summary['fusion_val_samples_f1']:.4f}"
    else:
        scores = "fusion set by hand (no validation score)"
    report = output_dir / "report.html"
    page = f", {report}" if str(report) in summary["files"] else ""
    return (f"inference: {scores}; {summary['rows']} test rows, {summary['seconds'] / 60:.1f} min; wrote "
            f"{summary['submission']}{page}; every figure: {output_dir / 'inference_summary.json'}")


def recorded_label_names(data: str | Path) -> dict[str, str]:
    """The label names ``dataset.json`` records for the dataset's train.csv ({} without one);
    ``pipeline.labels.label_names`` names the labels it lacks."""
    return recorded_labels(data)[0]


def submission_label_text(names: dict[str, str], separator: str | None) -> Callable[[list[int]], str]:
    """How a submission row writes its labels: as train.csv wrote them, so a dataset of names
    gets its ``names`` (``pipeline.labels.label_names``) joined by its separator, and the
    competition's ids stay ids."""
    if separator is None:
        return lambda ids: " ".join(str(i) for i in ids)
    return lambda ids: separator.join(names[str(i)] for i in ids)


def write_submission_info(output_dir: Path, names: dict[str, str], separator: str | None) -> None:
    """OUTPUT/dataset.json: the names of the submission's labels by id (and the separator when
    its Labels are names), so submission.csv reads back, and is read by a person, with the
    names of the training data."""
    entry = {"labels": names, **({"label_separator": separator} if separator is not None else {})}
    write_json(output_dir / DATASET_INFO, {"submission.csv": entry})
