"""``train_efficientnet.py --stacker-folds K``: the out-of-fold stacker (``pipeline/stacking.py``)
fitted beside the image branch in partial mode, from what that run has cached already: the
frozen front's stage maps (plain view, avg+max pooled) and the captions' MiniLM sentence
vectors (the text cache ``--decoder-caption minilm`` reads). It writes ``stacker.pt`` and
``val_probs_stacker.csv`` the way the other branches write theirs, and inference uses them as
the ``stacker`` branch (``pipeline.branches.stacker``; docs/recipe.md, "A stacker learned out of
fold").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import stacking
from pipeline.branches.image import image_caption_vectors
from pipeline.checkpoint import checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.data.dataset import CAPTION_COLUMN, DatasetPaths, load_train_val
from pipeline.features import StageMaps
from pipeline.io import OptionError
from pipeline.metrics import tune_global_threshold
from pipeline.text_features import TextEncoder
from pipeline.train.image_config import ImageTrainConfig

log = logging.getLogger(__name__)

# The text encoder whose sentence vectors the stacker's caption model reads (the measured one).
STACKER_ENCODER = "minilm"
# The stacker's image model reads the plain view's maps, as measured (bench/stacker_oof.py).
STACKER_VIEW = "plain"
# What of the stage-map cache's key names the images rather than the front that mapped them.
_IMAGE_KEYS = ("num_images", "images_digest", "views")


def check_stacker_captions(config: ImageTrainConfig, train: pd.DataFrame, train_csv: Path) -> None:
    """Refuse ``--stacker-folds`` before any work when train.csv has no captions to read."""
    if config.stacker_folds and CAPTION_COLUMN not in train:
        raise OptionError(
            f"--stacker-folds {config.stacker_folds}: {train_csv} has no {CAPTION_COLUMN} column, so "
            "the stacker's caption model has nothing to read; use --stacker-folds 0"
        )


def train_stacker(
    config: ImageTrainConfig,
    maps: StageMaps,
    paths: DatasetPaths,
    label_ids: tuple[int, ...],
    train_split: tuple[np.ndarray, np.ndarray],
    val_split: tuple[np.ndarray, np.ndarray],
    val_ids: list[str],
    image_weights_digest: str,
) -> dict:
    """Fit the stacker on the readable training images and score it on the validation split;
    write ``stacker.pt`` and ``val_probs_stacker.csv`` (NaN rows for unreadable images) and
    return its figures for ``image_summary.json``.

    ``maps`` holds the training then the validation images' maps; each split is (readable
    mask over its images, multi-hot labels of the readable ones); ``image_weights_digest`` is
    image.pt's backbone digest, whose first stages computed the maps.
    """
    started = time.perf_counter()
    (train_ok, y_train), (val_ok, y_val) = train_split, val_split
    if train_ok.sum() < config.stacker_folds:
        raise OptionError(
            f"--stacker-folds {config.stacker_folds}: only {int(train_ok.sum())} readable training "
            f"images to split; give at most {int(train_ok.sum())}, or 0"
        )
    weights_dir = Path(config.weights_dir)
    cache_dir = weights_dir / "cache"

    def read(rows: np.ndarray) -> np.ndarray:
        return maps.read(STACKER_VIEW, rows)

    image_train = stacking.pool_stage_maps(read, np.flatnonzero(train_ok))
    # An unreadable validation image's maps are NaN: zeros predict something, and its row is blanked below.
    image_val = np.nan_to_num(stacking.pool_stage_maps(read, len(train_ok) + np.arange(len(val_ok))))
    _, train_rows, val_rows = load_train_val(paths, config.val_fraction)  # every caption row, for their mean
    captions_train = image_caption_vectors(train_rows, STACKER_ENCODER, cache_dir)[train_ok]
    captions_val = image_caption_vectors(val_rows, STACKER_ENCODER, cache_dir)

    state = stacking.fit(image_train, captions_train, y_train, config.stacker_folds, config.seed)
    probs = stacking.predict(state, image_val, captions_val)
    probs[~val_ok] = np.nan
    score = tune_global_threshold(y_val, probs[val_ok])[1]

    front = {key: value for key, value in maps.store.key.items() if key not in _IMAGE_KEYS}
    files = [checkpoint_path(weights_dir, "stacker"), probabilities_path(weights_dir, "stacker")]
    save_checkpoint(
        files[0],
        branch="stacker",
        state_dict=state,
        config=dataclasses.asdict(config),
        label_ids=label_ids,
        stacker={
            "folds": config.stacker_folds,
            "seed": config.seed,
            # What the image model reads: this front's maps, pooled as pool_maps pools them.
            "image_view": STACKER_VIEW,
            "image_pooling": "avg+max",
            "front": front,
            "image_weights_digest": image_weights_digest,
            "caption_encoder": STACKER_ENCODER,
            "caption_encoder_digest": TextEncoder(STACKER_ENCODER).digest,
        },
    )
    save_probabilities(files[1], val_ids, label_ids, probs)
    seconds = time.perf_counter() - started
    log.info(
        "stacker (--stacker-folds %d): validation samples-F1 %.4f, %.1f min; wrote %s, %s",
        config.stacker_folds,
        score,
        seconds / 60,
        *files,
    )
    return {
        "folds": config.stacker_folds,
        "val_samples_f1": score,
        "seconds": seconds,
        "files": [str(path) for path in files],
    }
