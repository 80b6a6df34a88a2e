"""Training the image branch: the image head and the CNN-RNN label decoder, in one of three
modes, told once from splits to saved files.

Each mode contributes its input and how the heads learn on it; everything else is shared:

| mode | input (``pipeline.train.image_inputs``) | training (``pipeline.train.image_fit``) |
|---|---|---|
| ``frozen`` | pooled features of the frozen backbone, cached | head, then decoder |
| ``partial`` (CPU default) | the first stages' output maps, cached with their mirrors | last stages + heads, jointly |
| ``finetune`` (GPU default) | whole images, augmented | whole backbone + heads, jointly |

Every mode writes the same files (``image.pt``, ``decoder.pt``, their validation
probabilities, ``image_config.json``, ``image_summary.json`` with one set of keys); the
validation probabilities for fusion are computed the way inference computes them.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.branches.image import ImageHeads, training_image_ids
from pipeline.checkpoint import checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.config import save_config
from pipeline.data.augment import BatchAugment
from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, LABELS_COLUMN
from pipeline.engine import timing
from pipeline.engine.distributed import DistContext, barrier, distributed_session
from pipeline.engine.frozen import Calibration, FrontAndTail
from pipeline.engine.history import history_path, plot_histories, start_history
from pipeline.engine.resume import ResumeState, fingerprint, finish_run, start_run
from pipeline.engine.runtime import (
    configure_backends,
    cpu_threads,
    oom_hint,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
    seed_everything,
    training_precision,
)
from pipeline.engine.runtimes import Probe, resolve_runtime
from pipeline.features import VIEWS, ExtractionSettings, cached_features, cached_stage_maps, calibration_images
from pipeline.io import OptionError, file_digest, write_json
from pipeline.metrics import tune_global_threshold
from pipeline.models.backbones import Backbone, create_backbone, state_digest
from pipeline.models.heads import FeatureNorm
from pipeline.models.stages import BackboneSplitError, num_stages, split_backbone
from pipeline.text_features import TextEncoder
from pipeline.train.image_config import (
    FINETUNE_RESOLUTION,
    FROZEN,
    POOLED_FEATURES,
    STAGE_MAPS,
    ImageTrainConfig,
    Mode,
    idle_options,
    resolve_decoder_caption,
    resolve_mode,
    resolve_recipe,
    resolved_settings,
)
from pipeline.train.image_fit import FittedHeads, decoded_samples_f1, fit_frozen_heads, fit_jointly
from pipeline.train.image_inputs import (
    FeatureRows,
    decodable,
    image_inputs,
    image_splits,
    map_inputs,
    split_caption_vectors,
    usable_rows,
)

log = logging.getLogger(__name__)


def train_image_branch(config: ImageTrainConfig) -> dict:
    """Train the image head and the label decoder; write their checkpoints and validation
    probabilities. Returns the summary (``image_summary.json``).

    Under ``torchrun`` every process runs this; rank 0 alone writes files.
    """
    config.validate()
    seed_everything(config.seed)
    reuse_freed_memory()
    with oom_hint(config.batch_size), distributed_session(resolve_device(config.device)) as (context, device):
        logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING, format="%(message)s")
        configure_backends(device)
        mode = resolve_mode(config.mode, device)
        try:
            return _train(config, mode, device, context)
        except BackboneSplitError as err:
            if config.mode != "auto":
                raise
            log.warning("%s; training in frozen mode instead", err)
            return _train(config, FROZEN, device, context)


def _train(config: ImageTrainConfig, mode: Mode, device: torch.device, context: DistContext) -> dict:
    started = time.perf_counter()
    idle = idle_options(config, mode)
    if context.is_main:
        for message in idle:
            log.warning("warning: %s", message)
    if not mode.trains_backbone and config.csra_lambda:  # given: the default (None) is off in frozen mode
        raise OptionError(
            f"--csra-lambda {config.csra_lambda:g}: class attention needs the spatial map of a trained "
            f"backbone, which {mode.name} mode never sees (cached {mode.trains_on}); use --mode "
            "partial or finetune, or --csra-lambda 0"
        )
    timing.reset()
    paths, labels, train, val = image_splits(config)
    config = dataclasses.replace(config, decoder_caption=resolve_decoder_caption(config, CAPTION_COLUMN in train))
    weights_dir = Path(config.weights_dir)
    cache_dir = weights_dir / "cache"
    recipe = resolve_recipe(config, mode)
    backbone = create_backbone(
        config.backbone, config.backbone_weights, config.pretrained, config.resolution, recipe.drop_path
    )
    if mode.trains_backbone and config.resolution is None:
        resolution = max(backbone.preprocessing["resolution"], FINETUNE_RESOLUTION)
        backbone.preprocessing = {**backbone.preprocessing, "resolution": resolution}
    # Frozen forward passes (features, stage maps, inference) and training may compute differently.
    precision = resolve_precision(config.precision, device)
    train_precision = training_precision(config.precision, device) if mode.trains_backbone else precision
    # The frozen passes (features, stage maps, inference) in int8 where asked, calibrated on the training split.
    frozen_precision = "int8" if config.front_precision == "int8" and mode.has_frozen_front else precision
    calibration = (
        calibration_images(paths, train[ID_COLUMN].tolist(), backbone.preprocessing)
        if frozen_precision == "int8"
        else None
    )
    flip = config.flip_views if config.flip_views is not None else mode.trains_backbone
    views = VIEWS if flip else VIEWS[:1]
    stage = _first_trained_stage(mode, config, backbone)
    all_ids = training_image_ids(train, val)
    if stage:
        front, trunk = split_backbone(backbone, stage)
    # The runtime of the frozen forward passes, for what they run: the front's maps or pooled features.
    frozen = (
        Probe(front, backbone.preprocessing, False, frozen_precision, calibration)
        if stage
        else Probe(backbone.module, backbone.preprocessing, True, frozen_precision, calibration)
    )
    # Rank 0 resolves first (auto measures and keeps its choice); the other ranks then read that choice.
    runtime = config.runtime
    for turn in (True, False):
        if context.is_main == turn:
            runtime = resolve_runtime(config.runtime, device, frozen, cache_dir)
        barrier(context)
    extraction = ExtractionSettings(
        cache_dir=cache_dir,
        device=device,
        batch_size=config.batch_size,
        workers=config.workers,
        views=views,
        precision=frozen_precision,
        runtime=runtime,
        calibration=calibration,
    )

    # --decoder-caption: each image's caption vector, for the decoder (None: it reads none); a
    # dataset without captions is refused here, before any extraction (and after the
    # backbone is built: loading the text encoder draws from the random state).
    train_captions = val_captions = None
    if config.decoder_caption != "none":
        train_captions, val_captions = split_caption_vectors(config, paths, cache_dir)

    # The mode's input, and which images could be read.
    extract_start = time.perf_counter()
    if mode.trains_on == POOLED_FEATURES:
        features, features_readable = cached_features(
            backbone, paths, all_ids, extraction, description="train.csv features", context=context
        )
        readable = features_readable.numpy()
    elif stage:  # the maps of the stages before the first trained one
        # Both views, whatever --flip-views says: the mirror image is the maps' one augmentation.
        maps = cached_stage_maps(
            backbone,
            front,
            stage,
            paths,
            all_ids,
            dataclasses.replace(extraction, views=VIEWS),
            description="train.csv stage maps",
            context=context,
        )
        readable = maps.readable
    else:
        readable = decodable(paths, all_ids, config.workers, context)
    extract_seconds = time.perf_counter() - extract_start
    train_ok, val_ok = usable_rows(config, paths, all_ids, readable, len(train), context)
    train_rows, val_rows = np.flatnonzero(train_ok), len(train) + np.flatnonzero(val_ok)
    y_train = labels.encode(train[LABELS_COLUMN][train_ok])
    y_val = labels.encode(val[LABELS_COLUMN][val_ok])

    # Training starts from the seed, not from whatever the extraction drew (each loader it
    # starts takes a seed), so a cache hit and a cache miss train the same model.
    seed_everything(config.seed)
    resume_dir = start_run(weights_dir, "image", config.resume, context)
    history = start_history(history_path(weights_dir, "image"), config.resume, context, config.log, config.keep_best)
    inputs_digest = {"features": features.digest} if mode.trains_on == POOLED_FEATURES else {}
    digest = fingerprint(dataclasses.asdict(config), train_csv=file_digest(paths.train_csv), **inputs_digest)
    training_start, training_start_unix = time.perf_counter(), time.time()
    if not mode.trains_backbone:
        # Features stay float16 as cached; the heads see them standardised a batch at a time.
        # Small chunks: glibc keeps the freed heap (reuse_freed_memory), so the largest
        # temporary (a float64 chunk and its square) stays in the process for the rest of the run.
        norm = FeatureNorm(features.shape[1]).fit_chunks(
            features[train_rows[i : i + 1024]] for i in range(0, len(train_rows), 1024)
        )
        with cpu_threads(config.head_threads if device.type == "cpu" else 0):
            fitted = fit_frozen_heads(
                config,
                FeatureRows(
                    features, train_rows, torch.from_numpy(y_train), norm, captions=_rows_of(train_captions, train_ok)
                ),
                FeatureRows(features, val_rows, torch.from_numpy(y_val), norm, captions=_rows_of(val_captions, val_ok)),
                y_val,
                device,
                context,
                resume_dir,
                digest,
                history,
            )
    else:
        inputs = (
            map_inputs(
                maps,
                trunk,
                train_rows,
                val_rows,
                y_train,
                y_val,
                context,
                device,
                config.batch_size,
                config.seed,
                config.workers,
                _rows_of(train_captions, train_ok),
            )
            if stage
            else image_inputs(
                backbone,
                paths,
                train[ID_COLUMN][train_ok].tolist(),
                val[ID_COLUMN][val_ok].tolist(),
                y_train,
                y_val,
                device,
                config.workers,
                # Each rank draws its own images' augmentation.
                BatchAugment(recipe.augment, device, recipe.scale_jitter, seed=config.seed * 1009 + context.rank),
                _rows_of(train_captions, train_ok),
            )
        )
        fitted = fit_jointly(
            config,
            mode,
            inputs,
            backbone.pooled_dim,
            y_train,
            y_val,
            device,
            train_precision,
            context,
            ResumeState(resume_dir, mode.name, digest, config.resume, context),
            history,
        )
    training_seconds = time.perf_counter() - training_start
    # The trained top stage learns jointly with the heads (partial, finetune); frozen mode trains heads alone.
    timing.add(
        "trained top stage + heads (training)" if mode.trains_backbone else "heads (training)",
        fitted.epoch_seconds,
        fitted.images_seen,
    )

    # Validation probabilities for fusion, computed exactly as inference computes them
    # (NaN rows for unreadable images): a fine-tuned backbone's features are extracted anew.
    val_ids = val[ID_COLUMN].tolist()
    if not mode.trains_backbone:
        val_features, val_readable, rows = features, torch.from_numpy(val_ok), len(train) + np.arange(len(val))
        record = backbone_record(backbone, views, frozen_precision, runtime, calibration=calibration)
    else:
        backbone.module = backbone.module.cpu().eval()
        backbone.weights, backbone.weights_digest = "finetuned", "finetuned-" + state_digest(backbone.module)
        record = backbone_record(
            backbone, views, frozen_precision, runtime, backbone.module.state_dict(), stage, calibration
        )
        if calibration is not None and stage:  # int8 for the front only, the trained stages in float
            backbone.module = FrontAndTail(*split_backbone(backbone, stage))
        val_features, val_readable = cached_features(
            backbone,
            paths,
            val_ids,
            extraction,
            description="validation features",
            context=context,
            attention=fitted.attention,
        )
        rows = np.arange(len(val))
    heads = ImageHeads(fitted.head, fitted.norm, fitted.decoder, fitted.norm, config.beam_width, fitted.attention)
    with timing.timed("heads", len(rows)):
        val_probs = heads.probabilities(val_features, val_readable, device, rows=rows, captions=val_captions)
    readable_val = rows[val_readable.numpy()]
    decoder_rows = FeatureRows(
        val_features,
        readable_val,
        torch.from_numpy(y_val),
        fitted.norm,
        columns=fitted.decoder.feature_dim,
        captions=_rows_of(val_captions, val_readable.numpy()),
    )

    summary: dict[str, Any] = {  # image_summary.json
        "mode": mode.name,
        "trained_from_stage": stage,
        "processes": context.world_size,
        "precision": precision,
        "front_precision": frozen_precision,
        "runtime": runtime,
        "training_precision": train_precision,
        "lr": fitted.lr,
        "recipe": {**dataclasses.asdict(recipe), "ema_decay": fitted.ema_decay},
        "train_images": len(train_rows),
        "skipped_unreadable_images": int((~np.asarray(readable)).sum()),
        "val_images": len(val),
        "image_val_samples_f1": tune_global_threshold(y_val, val_probs["image"][val_readable.numpy()])[1],
        "image_val_samples_f1_in_training": fitted.image_score_in_training,
        "image_best_epoch": fitted.image_best_epoch,
        "decoder_best_epoch": fitted.decoder_best_epoch,
        "beam_width": config.beam_width,
        "decoder_val_samples_f1_greedy": decoded_samples_f1(fitted.decoder, decoder_rows, y_val, 1, device),
        "decoder_val_samples_f1_beam": decoded_samples_f1(
            fitted.decoder, decoder_rows, y_val, config.beam_width, device
        ),
        "extract_seconds": extract_seconds,
        "training_seconds": training_seconds,
        "training_window_unix": [training_start_unix, training_start_unix + training_seconds],
        # The training epochs' steps alone: validation, saving and extraction are outside them.
        "train_step_seconds": fitted.epoch_seconds,
        "train_epoch_windows_unix": [list(window) for window in fitted.epoch_windows],
        "train_img_s": fitted.images_seen / fitted.epoch_seconds if fitted.epoch_seconds else None,
        # Outside the epochs' clock: the first step, compiling the trunk and cuDNN's search.
        "warmup_step_seconds": fitted.warmup_step_seconds,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "options_without_effect": idle,
        "files": [str(path) for path in written_files(weights_dir)],
        "timing": timing.summary(),
    }
    if config.stacker_folds and mode.trains_on == STAGE_MAPS and context.is_main:
        from pipeline.train.stacker import train_stacker

        summary["stacker"] = train_stacker(
            config, maps, paths, labels.ids, (train_ok, y_train), (val_ok, y_val), val_ids, record["weights_digest"]
        )
        summary["files"] += summary["stacker"]["files"]
    if context.is_main:
        save_image_branch(
            config,
            labels.ids,
            val_ids,
            record,
            backbone.preprocessing,
            fitted,
            val_probs["image"],
            val_probs["decoder"],
        )
        resolved, requested = resolved_settings(config, mode, device, precision, train_precision, runtime)
        save_config(resolved, weights_dir / "image_config.json", requested)
        write_json(weights_dir / "image_summary.json", summary)
        plot_histories(weights_dir)
        tqdm.write(summary_line(summary, weights_dir))
    barrier(context)  # the other ranks return once the files exist
    finish_run(resume_dir, context)
    return summary


def _first_trained_stage(mode: Mode, config: ImageTrainConfig, backbone: Backbone) -> int | None:
    """The first stage of the backbone that trains: None where none does, 0 where all of it
    does, else ``--train-from-stage`` (default: the last stage) for a mode that trains on the
    cached maps of the stages before it."""
    if not mode.trains_backbone:
        return None
    if mode.trains_on != STAGE_MAPS:
        return 0
    return config.train_from_stage or num_stages(backbone) - 1


def written_files(weights_dir: Path) -> list[Path]:
    """What a run writes in --weights-dir (besides the plots and caches), listed in its summary."""
    return [
        checkpoint_path(weights_dir, "image"),
        checkpoint_path(weights_dir, "decoder"),
        probabilities_path(weights_dir, "image"),
        probabilities_path(weights_dir, "decoder"),
        weights_dir / "image_config.json",
        weights_dir / "image_summary.json",
        history_path(weights_dir, "image"),
    ]


def summary_line(summary: dict, weights_dir: Path) -> str:
    """What a person reads at the end of a run: the scores, the time, where the files went; the
    full record is ``image_summary.json``."""

    def score(value: float | None) -> str:  # None or NaN where there was no validation image to score
        return "n/a" if value is None or value != value else f"{value:.4f}"

    epochs = summary["recipe"]["epochs"]
    line = (
        f"image branch: validation samples-F1 {score(summary['image_val_samples_f1'])} (image head), "
        f"{score(summary['decoder_val_samples_f1_beam'])} (decoder, beam {summary['beam_width']}); "
        f"{summary['mode']} mode, {epochs} epoch{'s' if epochs != 1 else ''} (best {summary['image_best_epoch']}), "
        f"{summary['total_seconds'] / 60:.1f} min; wrote {weights_dir / 'image.pt'}, {weights_dir / 'decoder.pt'}; "
        f"every figure: {weights_dir / 'image_summary.json'}"
    )
    if summary["options_without_effect"]:
        line += f"; {len(summary['options_without_effect'])} option(s) had no effect (warned above)"
    return line


def _caption_encoder_record(config: ImageTrainConfig) -> dict:
    """The text encoder a caption-reading decoder was trained with, by name and weights digest
    (inference refuses another), or None for both."""
    encoder = resolve_decoder_caption(config, has_captions=True)  # resolved by now: the default is filled in
    if encoder == "none":
        return {"caption_encoder": None, "caption_encoder_digest": None}
    return {"caption_encoder": encoder, "caption_encoder_digest": TextEncoder(encoder).digest}


def _rows_of(captions: np.ndarray | None, kept: np.ndarray) -> np.ndarray | None:
    """The caption vectors of the ``kept`` (bool mask) images, or None without captions."""
    return None if captions is None else captions[np.asarray(kept, dtype=bool)]


def backbone_record(
    backbone: Backbone,
    views,
    precision: str,
    runtime: str,
    state_dict: dict | None = None,
    trained_from_stage: int | None = None,
    calibration: Calibration | None = None,
) -> dict:
    """What inference needs to rebuild the backbone, run it as training did (views, precision,
    runtime) and check it is the same one. A fine-tuned backbone's record carries its weights
    (``state_dict``), an int8 one its calibration images."""
    record = {
        "name": backbone.name,
        "weights": backbone.weights,
        "weights_digest": backbone.weights_digest,
        "feature_dim": backbone.feature_dim,
        "views": list(views),
        "pooling": "avg+max",
        "precision": precision,
        "runtime": runtime,
    }
    if state_dict is not None:
        record.update(state_dict=state_dict, trained_from_stage=trained_from_stage)
    if calibration is not None:  # int8: which images it was calibrated on, to quantise the same again
        record["calibration"] = {"digest": calibration.digest, "image_ids": list(calibration.image_ids)}
    return record


def save_image_branch(
    config: ImageTrainConfig,
    label_ids: tuple[int, ...],
    val_ids: list[str],
    backbone: dict,
    preprocessing: dict,
    fitted: FittedHeads,
    head_probs: np.ndarray,
    decoder_probs: np.ndarray,
) -> None:
    """Write image.pt, decoder.pt and their validation probabilities.

    Each checkpoint carries what is needed to rebuild its head: settings, label ids, the
    backbone record, preprocessing and the feature standardisation.
    """
    weights_dir = Path(config.weights_dir)
    settings = dataclasses.asdict(config)
    common = {"backbone": backbone, "preprocessing": preprocessing, "feature_norm": fitted.norm.state_dict()}
    feature_dim = fitted.head.in_dim
    attention = (
        None
        if fitted.attention is None
        else {"channels": fitted.attention.channels, "state_dict": fitted.attention.state_dict()}
    )
    save_checkpoint(
        checkpoint_path(weights_dir, "image"),
        branch="image",
        state_dict=fitted.head.state_dict(),
        config=settings,
        label_ids=label_ids,
        head={"in_dim": feature_dim, "hidden": config.head_hidden, "dropout": config.head_dropout},
        class_attention=attention,
        **common,
    )
    save_checkpoint(
        checkpoint_path(weights_dir, "decoder"),
        branch="decoder",
        state_dict=fitted.decoder.state_dict(),
        config=settings,
        label_ids=label_ids,
        label_order=fitted.order.to_list(),
        decoder={
            "feature_dim": feature_dim,
            "embed_dim": config.decoder_embed,
            "hidden_dim": config.decoder_hidden,
            "dropout": config.decoder_dropout,
            "beam_width": config.beam_width,
            "caption_dim": fitted.decoder.caption_dim,
            **_caption_encoder_record(config),
        },
        **common,
    )
    save_probabilities(probabilities_path(weights_dir, "image"), val_ids, label_ids, head_probs)
    save_probabilities(probabilities_path(weights_dir, "decoder"), val_ids, label_ids, decoder_probs)
