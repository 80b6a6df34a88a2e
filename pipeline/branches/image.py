"""What every way of training the image branch shares: its settings, which rows can be used,
and the checkpoints it writes.

The image branch trains in one of three modes (``--mode``): ``frozen`` (heads on cached
pooled features, ``pipeline.train.image``), ``partial`` and ``finetune`` (the backbone from
a stage onward, trained with the heads, ``pipeline.train.finetune``). All three write the same
files: ``image.pt``, ``decoder.pt``, their validation probabilities and ``image_config.json``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.checkpoint import checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.io import atomic_write_text, write_json
from pipeline.config import TrainingConfig, option, save_config
from pipeline.data.dataset import ID_COLUMN, DatasetPaths
from pipeline.data.images import ImageReadError
from pipeline.engine.distributed import DistContext
from pipeline.models.backbones import DEFAULT_BACKBONE, Backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import LOSSES, FeatureNorm, ImageHead
from pipeline.engine.runtime import PRECISIONS

log = logging.getLogger(__name__)

MODES = ("auto", "frozen", "partial", "finetune")
# Fine-tuned stages learn to use the detail a larger input keeps (small objects: benches,
# traffic lights); frozen ImageNet features gain nothing from it (README, "Fine-tuning").
FINETUNE_RESOLUTION = 320


@dataclass
class ImageTrainConfig(TrainingConfig):
    """Settings of ``train_efficientnet.py``."""

    backbone: str = option(DEFAULT_BACKBONE, "backbone: a timm model name or efficientnet-b0..b7 (efficientnet-pytorch)")
    backbone_weights: str | None = option(
        None, "local backbone weights file (state_dict); default: the bundled ImageNet weights for "
        "tf_efficientnet_lite0, random initialisation (with a warning) for other names")
    pretrained: bool = option(False, "take the backbone's pretrained weights from the model hub (needs internet)")
    resolution: int | None = option(
        None, f"input size in pixels (default: the backbone's own, 224 for Lite0, in frozen mode; at least "
        f"{FINETUNE_RESOLUTION} when fine-tuning (README, \"Fine-tuning\"))")
    mode: str = option(
        "auto", "frozen: heads on cached pooled features of the frozen backbone (fastest); partial: the "
        "backbone's first --train-from-stage stages run once and are cached, the later stages train with the "
        "heads; finetune: the whole backbone trains with the heads on augmented images; auto: finetune on "
        "GPU, partial on CPU (frozen for backbones without stages to split)", choices=list(MODES))
    skip_bad_images: bool = option(False, "leave out training rows whose image is missing or unreadable "
                                   "(their count is reported) instead of stopping with their list")
    precision: str = option(
        "auto", "arithmetic of the backbone, in training and in feature extraction here and in inference: auto = "
        "bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp16 "
        "with a gradient scaler on a GPU and fp32 on a CPU", choices=list(PRECISIONS))
    flip_views: bool = option(False, "also extract mirrored images and average the two views' features, in "
                              "training and inference (frozen and partial modes; doubles inference time)")
    head_hidden: int = option(512, "hidden units of the image head's MLP (0: linear)")
    head_dropout: float = option(0.5, "dropout of the image head")
    loss: str = option("bce", "image head loss: binary cross-entropy or the asymmetric loss (ASL)",
                       choices=list(LOSSES))
    epochs: int = option(12, "epochs of head training on cached features (the best epoch is kept)")
    lr: float = option(1e-3, "peak learning rate of the heads on cached features (AdamW, warmup + cosine)")
    weight_decay: float = option(1e-4, "AdamW weight decay (never on norms and biases when fine-tuning)")
    decoder_embed: int = option(128, "label embedding size of the CNN-RNN decoder")
    decoder_hidden: int = option(256, "LSTM hidden size of the CNN-RNN decoder")
    decoder_dropout: float = option(0.3, "dropout of the CNN-RNN decoder")
    decoder_epochs: int = option(8, "epochs of decoder training on cached features (the best epoch is kept)")
    label_order: str = option("frequent", "order of the label sequences the decoder learns",
                              choices=["frequent", "rare"])
    head_threads: int = option(1, "CPU threads while training the heads on cached features (0: torch's "
                               "default); one is robust when other processes share the cores")
    beam_width: int = option(3, "beam width of the decoder's beam search")
    train_from_stage: int | None = option(
        None, "partial mode: the first stage that trains; the stages before it run once and their output maps "
        "are cached (default: the last stage, 6 of Lite0's 0..6)")
    finetune_epochs: int = option(10, "epochs of partial or end-to-end fine-tuning (the best epoch is kept)")
    finetune_lr: float = option(4e-4, "peak learning rate of the backbone when fine-tuning, for a global batch of "
                                "256; scaled by sqrt(--batch-size / 256)")
    head_lr_scale: float = option(5.0, "the new head and decoder learn this many times faster than the "
                                  "pretrained backbone when fine-tuning")
    decoder_loss_weight: float = option(0.1, "weight of the decoder's loss (summed over its label steps) "
                                        "against the head's when fine-tuning: both reach the backbone")
    warmup_epochs: float = option(1.0, "linear warmup length when fine-tuning, in epochs")
    ema_decay: float = option(0.9998, "decay of the weights' exponential moving average when fine-tuning "
                              "(with warm-up: min(decay, (1 + step) / (10 + step)))")
    grad_clip: float = option(1.0, "gradient norm clipping when fine-tuning (0: off)")
    sync_bn: bool = option(False, "under torchrun, batch norm uses the statistics of the whole global batch "
                           "(fine-tune modes)")
    batch_size: int = option(64, "images per batch for feature extraction and fine-tuning (the global batch: "
                             "under torchrun each of N processes takes 1/N)")
    head_batch_size: int = option(256, "feature rows per batch when training the heads on cached features "
                                  "(the global batch)")

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.decoder_epochs >= 1, f"--decoder-epochs must be >= 1, got {self.decoder_epochs}"),
            (self.finetune_epochs >= 1, f"--finetune-epochs must be >= 1, got {self.finetune_epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.head_batch_size >= 1, f"--head-batch-size must be >= 1, got {self.head_batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.finetune_lr > 0, f"--finetune-lr must be > 0, got {self.finetune_lr}"),
            (self.head_lr_scale > 0, f"--head-lr-scale must be > 0, got {self.head_lr_scale}"),
            (self.decoder_loss_weight >= 0, f"--decoder-loss-weight must be >= 0, got {self.decoder_loss_weight}"),
            (0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1), got {self.ema_decay}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.beam_width >= 1, f"--beam-width must be >= 1, got {self.beam_width}"),
            (self.head_hidden >= 0, f"--head-hidden must be >= 0, got {self.head_hidden}"),
            (0.0 <= self.head_dropout < 1.0, f"--head-dropout must be in [0, 1), got {self.head_dropout}"),
            (0.0 <= self.decoder_dropout < 1.0, f"--decoder-dropout must be in [0, 1), got {self.decoder_dropout}"),
            (self.resolution is None or self.resolution >= 8, f"--resolution must be >= 8, got {self.resolution}"),
            (self.train_from_stage is None or self.train_from_stage >= 1,
             f"--train-from-stage must be >= 1 (0 is --mode finetune), got {self.train_from_stage}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto`` -> ``finetune`` on a GPU, ``partial`` on a CPU (which falls back to ``frozen``
    for a backbone that cannot be split into stages)."""
    if mode == "auto":
        return "finetune" if device.type == "cuda" else "partial"
    return mode


def training_image_ids(train: pd.DataFrame, val: pd.DataFrame) -> list[str]:
    """The image list of the training caches: train split then validation split.

    One cache covers both, and inference asks for the same list when it evaluates on the
    validation split, so it reuses the cache instead of extracting again.
    """
    return train[ID_COLUMN].tolist() + val[ID_COLUMN].tolist()


def usable_rows(config: ImageTrainConfig, paths: DatasetPaths, image_ids: list[str], readable: np.ndarray,
                num_train: int, context: DistContext) -> tuple[np.ndarray, np.ndarray]:
    """(train mask, validation mask) of the rows of ``image_ids`` (train then validation)
    whose image could be read.

    Unreadable images stop training with their list, unless ``--skip-bad-images``: then
    they are left out of training and scoring, listed in WEIGHTS/skipped_images.txt, and
    their count is reported.
    """
    ok = np.asarray(readable, dtype=bool)
    if ok.all():
        return ok[:num_train], ok[num_train:]
    bad = [paths.image_path(image_ids[i]) for i in np.flatnonzero(~ok)]
    if not config.skip_bad_images:
        raise ImageReadError.listing(bad, "\nfix or remove these rows of train.csv, or pass --skip-bad-images")
    listing = Path(config.weights) / "skipped_images.txt"
    if context.is_main:
        atomic_write_text(listing, "".join(f"{path}\n" for path in bad))
    log.warning("--skip-bad-images: left out %d of %d rows whose image is missing or unreadable (listed in %s)",
                len(bad), len(ok), listing)
    if not ok[:num_train].any() or not ok[num_train:].any():
        raise ImageReadError.listing(bad, "\nno readable image is left in the training or validation split")
    return ok[:num_train], ok[num_train:]


def expand_rows(probs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, L) probabilities of the ``rows`` mask placed in an (N, L) matrix of NaN."""
    full = np.full((len(rows), probs.shape[1]), np.nan, dtype=np.float32)
    full[rows] = probs
    return full


def backbone_record(backbone: Backbone, views, precision: str, state_dict: dict | None = None,
                    trained_from_stage: int | None = None) -> dict:
    """What inference needs to rebuild the backbone, run it as training did and check it is
    the same one. A fine-tuned backbone's record carries its weights (``state_dict``)."""
    record = {"name": backbone.name, "weights": backbone.weights, "weights_digest": backbone.weights_digest,
              "feature_dim": backbone.feature_dim, "views": list(views), "pooling": "avg+max",
              "precision": precision}
    if state_dict is not None:
        record.update(state_dict=state_dict, trained_from_stage=trained_from_stage)
    return record


def save_image_branch(config: ImageTrainConfig, label_ids: tuple[int, ...], val_ids: list[str], backbone: dict,
                      preprocessing: dict, norm: FeatureNorm, head: ImageHead, decoder: LabelDecoder,
                      order: LabelOrder, head_probs: np.ndarray, decoder_probs: np.ndarray) -> None:
    """Write image.pt, decoder.pt, their validation probabilities and image_config.json.

    Each checkpoint carries what is needed to rebuild its head: settings, label ids, the
    backbone record, preprocessing and the feature standardisation.
    """
    weights_dir = Path(config.weights)
    common = {"config": dataclasses.asdict(config), "label_ids": label_ids, "backbone": backbone,
              "preprocessing": preprocessing, "feature_norm": norm.state_dict()}
    feature_dim = norm.mean.shape[0]
    save_checkpoint(checkpoint_path(weights_dir, "image"), branch="image", state_dict=head.state_dict(),
                    head={"in_dim": feature_dim, "hidden": config.head_hidden, "dropout": config.head_dropout},
                    **common)
    save_checkpoint(checkpoint_path(weights_dir, "decoder"), branch="decoder", state_dict=decoder.state_dict(),
                    label_order=order.to_list(),
                    decoder={"feature_dim": feature_dim, "embed_dim": config.decoder_embed,
                             "hidden_dim": config.decoder_hidden, "dropout": config.decoder_dropout,
                             "beam_width": config.beam_width},
                    **common)
    save_probabilities(probabilities_path(weights_dir, "image"), val_ids, label_ids, head_probs)
    save_probabilities(probabilities_path(weights_dir, "decoder"), val_ids, label_ids, decoder_probs)
    save_config(config, weights_dir / "image_config.json")


def write_summary(config: ImageTrainConfig, summary: dict, context: DistContext) -> None:
    """WEIGHTS/image_summary.json and one line on the console (rank 0)."""
    if not context.is_main:
        return
    write_json(Path(config.weights) / "image_summary.json", summary)
    tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
