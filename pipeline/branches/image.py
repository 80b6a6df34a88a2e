"""The image branch: its settings, the model it builds and the loss it learns, the
checkpoints it writes, and how inference rebuilds it and predicts.

The branch trains in one of three modes (``--mode``, ``pipeline.train``): ``frozen`` (heads
on cached pooled features), ``partial`` and ``finetune`` (the backbone from a stage onward,
trained with the heads). All three write the same files: ``image.pt``, ``decoder.pt``,
their validation probabilities and ``image_config.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.checkpoint import checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.config import TrainingConfig, option, save_config, workers_option
from pipeline.data.dataset import ID_COLUMN, DatasetPaths, LabelSet, group_by_image, load_train_val
from pipeline.data.images import ImageReadError
from pipeline.engine.distributed import DistContext
from pipeline.engine.loop import parameter_groups, scaled_lr
from pipeline.engine.runtime import PRECISIONS, training_memory_format
from pipeline.features import CachedFeatures
from pipeline.io import CheckpointError, atomic_write_text, write_json
from pipeline.models.backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import LOSSES, FeatureNorm, ImageHead, get_loss
from pipeline.models.image_model import ImageModel

log = logging.getLogger(__name__)

MODES = ("auto", "frozen", "partial", "finetune")
# Fine-tuned stages learn to use the detail a larger input keeps (small objects: benches,
# traffic lights); frozen ImageNet features gain nothing from it (README, "Fine-tuning").
FINETUNE_RESOLUTION = 320


@dataclass
class ImageTrainConfig(TrainingConfig):
    """Settings of ``train_efficientnet.py``."""

    backbone: str = option(DEFAULT_BACKBONE, "backbone: a timm model name or efficientnet-b0..b7 (efficientnet-pytorch)", group="model")
    backbone_weights: str | None = option(
        None, "local backbone weights file (state_dict); default: the bundled ImageNet weights for "
        "tf_efficientnet_lite0, random initialisation (with a warning) for other names", group="model")
    pretrained: bool = option(False, "take the backbone's pretrained weights from the model hub (needs internet)", group="model")
    resolution: int | None = option(
        None, f"input size in pixels (default: the backbone's own, 224 for Lite0, in frozen mode; at least "
        f"{FINETUNE_RESOLUTION} when fine-tuning (README, \"Fine-tuning\"))", group="model")
    mode: str = option(
        "auto", "frozen: heads on cached pooled features of the frozen backbone (fastest); partial: the "
        "backbone's first --train-from-stage stages run once and are cached, the later stages train with the "
        "heads; finetune: the whole backbone trains with the heads on augmented images; auto: finetune on "
        "GPU, partial on CPU (frozen for backbones without stages to split)", choices=list(MODES), group="model")
    skip_bad_images: bool = option(False, "leave out training rows whose image is missing or unreadable "
                                   "(their count is reported) instead of stopping with their list", group="data")
    precision: str = option(
        "auto", "arithmetic of the backbone, in training and in feature extraction here and in inference: auto = "
        "bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp16 "
        "with a gradient scaler on a GPU and fp32 on a CPU", choices=list(PRECISIONS), group="run")
    flip_views: bool = option(False, "also extract mirrored images and average the two views' features, in "
                              "training and inference (frozen and partial modes; doubles inference time)", group="model")
    head_hidden: int = option(512, "hidden units of the image head's MLP (0: linear)", group="model")
    head_dropout: float = option(0.5, "dropout of the image head", group="model")
    loss: str = option("bce", "image head loss: binary cross-entropy or the asymmetric loss (ASL)",
                       choices=list(LOSSES), group="training")
    epochs: int = option(12, "epochs of head training on cached features (the best epoch is kept)", group="frozen")
    lr: float = option(1e-3, "peak learning rate of the heads on cached features (AdamW, warmup + cosine)", group="frozen")
    weight_decay: float = option(1e-4, "AdamW weight decay (never on norms and biases when fine-tuning)", group="training")
    decoder_embed: int = option(128, "label embedding size of the CNN-RNN decoder", group="decoder")
    decoder_hidden: int = option(256, "LSTM hidden size of the CNN-RNN decoder", group="decoder")
    decoder_dropout: float = option(0.3, "dropout of the CNN-RNN decoder", group="decoder")
    decoder_epochs: int = option(8, "epochs of decoder training on cached features (the best epoch is kept)", group="decoder")
    label_order: str = option("frequent", "order of the label sequences the decoder learns",
                              choices=["frequent", "rare"], group="decoder")
    head_threads: int = option(1, "CPU threads while training the heads on cached features (0: torch's "
                               "default); one is robust when other processes share the cores", group="frozen")
    beam_width: int = option(3, "beam width of the decoder's beam search", group="decoder")
    train_from_stage: int | None = option(
        None, "partial mode: the first stage that trains; the stages before it run once and their output maps "
        "are cached (default: the last stage, 6 of Lite0's 0..6)", group="finetune")
    finetune_epochs: int = option(10, "epochs of partial or end-to-end fine-tuning (the best epoch is kept)", group="finetune")
    finetune_lr: float = option(4e-4, "peak learning rate of the backbone when fine-tuning, for a global batch of "
                                "256; scaled by sqrt(--batch-size / 256)", group="finetune")
    head_lr_scale: float = option(5.0, "the new head and decoder learn this many times faster than the "
                                  "pretrained backbone when fine-tuning", group="finetune")
    decoder_loss_weight: float = option(0.1, "weight of the decoder's loss (summed over its label steps) "
                                        "against the head's when fine-tuning: both reach the backbone", group="finetune")
    warmup_epochs: float = option(1.0, "linear warmup length when fine-tuning, in epochs", group="finetune")
    ema_decay: float = option(0.9998, "decay of the weights' exponential moving average when fine-tuning "
                              "(with warm-up: min(decay, (1 + step) / (10 + step)))", group="finetune")
    grad_clip: float = option(1.0, "gradient norm clipping when fine-tuning (0: off)", group="finetune")
    sync_bn: bool = option(False, "under torchrun, batch norm uses the statistics of the whole global batch "
                           "(fine-tune modes)", group="finetune")
    batch_size: int = option(64, "images per batch for feature extraction and fine-tuning (the global batch: "
                             "under torchrun each of N processes takes 1/N)", group="run")
    workers: int = workers_option()
    head_batch_size: int = option(256, "feature rows per batch when training the heads on cached features "
                                  "(the global batch)", group="frozen")

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


def image_splits(config: ImageTrainConfig) -> tuple[DatasetPaths, LabelSet, pd.DataFrame, pd.DataFrame]:
    """(paths, labels, train images, validation images) of a training run, one row per image:
    rows that differ only by caption would repeat an image."""
    paths = DatasetPaths.resolve(config.data, config.images)
    labels, train, val = load_train_val(paths, config.val_fraction)
    train, val = group_by_image(train).images, group_by_image(val).images
    if val.empty:
        raise ValueError(f"--val-fraction {config.val_fraction}: the validation split is empty")
    return paths, labels, train, val


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
    listing = Path(config.weights_dir) / "skipped_images.txt"
    if context.is_main:
        atomic_write_text(listing, "".join(f"{path}\n" for path in bad))
    log.warning("--skip-bad-images: left out %d of %d rows whose image is missing or unreadable (listed in %s)",
                len(bad), len(ok), listing)
    if not ok[:num_train].any() or not ok[num_train:].any():
        raise ImageReadError.listing(bad, "\nno readable image is left in the training or validation split")
    return ok[:num_train], ok[num_train:]


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
    weights_dir = Path(config.weights_dir)
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
    write_json(Path(config.weights_dir) / "image_summary.json", summary)
    tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


def backbone_identity(record: dict) -> dict:
    """A backbone record without its weights: a fine-tuned backbone's tensors are named by
    their digest, which the record holds."""
    return {key: value for key, value in record.items() if key != "state_dict"}


def rebuild_backbone(checkpoint: dict, branch: str) -> Backbone:
    """The backbone an image-branch checkpoint was trained with: its fine-tuned weights, or the
    named pretrained weights, checked against the digest the checkpoint recorded."""
    record = checkpoint["backbone"]
    resolution = checkpoint["preprocessing"]["resolution"]
    if "state_dict" in record:  # fine-tuned: the checkpoint holds the backbone itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # initial weights are overwritten at once
            backbone = create_backbone(record["name"], resolution=resolution)
        backbone.module.load_state_dict(record["state_dict"])
        backbone.weights, backbone.weights_digest = record["weights"], record["weights_digest"]
        return backbone
    weights = None if record["weights"] in ("bundled", "random", "hub") else record["weights"]
    backbone = create_backbone(record["name"], weights, pretrained=record["weights"] == "hub", resolution=resolution)
    if backbone.weights_digest != record["weights_digest"]:
        raise CheckpointError(
            f"the backbone weights here ({backbone.weights_digest}) are not the ones {branch}.pt "
            f"was trained with ({record['weights_digest']})"
        )
    return backbone


@dataclass
class ImageHeads:
    """The trained heads on the pooled features: the image head and the label decoder (either
    may be absent), with the feature standardisation each was trained with."""

    head: ImageHead | None = None
    head_norm: FeatureNorm | None = None
    decoder: LabelDecoder | None = None
    decoder_norm: FeatureNorm | None = None
    beam_width: int = 1

    @classmethod
    def from_checkpoints(cls, checkpoints: dict[str, dict]) -> ImageHeads:
        """The heads of loaded ``image`` and ``decoder`` checkpoints (those present)."""
        heads = cls()
        if "image" in checkpoints:
            checkpoint, spec = checkpoints["image"], checkpoints["image"]["head"]
            heads.head = ImageHead(spec["in_dim"], len(checkpoint["label_ids"]), spec["hidden"], spec["dropout"])
            heads.head.load_state_dict(checkpoint["state_dict"])
            heads.head_norm = _feature_norm(checkpoint, spec["in_dim"])
        if "decoder" in checkpoints:
            checkpoint, spec = checkpoints["decoder"], checkpoints["decoder"]["decoder"]
            heads.decoder = LabelDecoder(spec["feature_dim"], len(checkpoint["label_ids"]), spec["embed_dim"],
                                         spec["hidden_dim"], spec["dropout"])
            heads.decoder.load_state_dict(checkpoint["state_dict"])
            heads.decoder_norm = _feature_norm(checkpoint, spec["feature_dim"])
            heads.beam_width = int(spec["beam_width"])
        return heads

    @torch.inference_mode()
    def probabilities(self, features: torch.Tensor | CachedFeatures, readable: torch.Tensor, device: torch.device,
                      rows: np.ndarray | None = None, chunk: int = 1024) -> dict[str, np.ndarray]:
        """``{"image": head probabilities, "decoder": beam-search label scores}`` (N, L) of the
        pooled features (rows ``rows`` of ``features``, default all), ``chunk`` rows at a time;
        rows of unreadable images are NaN (fusion then uses the caption)."""
        rows = np.arange(len(readable)) if rows is None else np.asarray(rows)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(rows), chunk):
            ok = readable[start:start + chunk]
            values = torch.where(ok[:, None], features[rows[start:start + chunk]].float(),
                                 torch.zeros(()))  # (B, D), finite for every row
            if self.head is not None:
                head = self.head.to(device).eval()
                parts.setdefault("image", []).append(
                    torch.sigmoid(head(self.head_norm(values).to(device))).float().cpu())
            if self.decoder is not None:
                decoder = self.decoder.to(device).eval()
                parts.setdefault("decoder", []).append(decoder.beam_search(
                    self.decoder_norm(values).to(device), beam_width=self.beam_width)[1].float().cpu())
        names = [name for name, present in (("image", self.head), ("decoder", self.decoder)) if present is not None]
        out = {name: torch.cat(parts[name]).numpy() if name in parts else np.zeros((0, self._num_labels()), np.float32)
               for name in names}
        for probs in out.values():
            probs[~readable.numpy()] = np.nan
        return out

    def _num_labels(self) -> int:
        return (self.head.num_labels if self.head is not None else self.decoder.num_labels)


def _feature_norm(checkpoint: dict, feature_dim: int) -> FeatureNorm:
    norm = FeatureNorm(feature_dim)
    norm.load_state_dict(checkpoint["feature_norm"])
    return norm


def build_image_model(config: ImageTrainConfig, trunk: nn.Module, feature_dim: int, num_labels: int,
                      device: torch.device) -> ImageModel:
    """The trunk with a new image head and label decoder, on ``device``, in the training layout."""
    return ImageModel(
        trunk,
        ImageHead(feature_dim, num_labels, config.head_hidden, config.head_dropout),
        LabelDecoder(feature_dim, num_labels, config.decoder_embed, config.decoder_hidden, config.decoder_dropout),
    ).to(device).to(memory_format=training_memory_format(device))


def joint_loss(config: ImageTrainConfig, prepare: Callable[[torch.Tensor], torch.Tensor], order: LabelOrder,
               device: torch.device) -> Callable[[ImageModel, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The training loss of a batch (inputs, targets): the head's ``--loss`` plus the decoder's
    sequence loss times ``--decoder-loss-weight``."""
    head_loss = get_loss(config.loss)
    rank = order.rank.to(device)

    def step_loss(m: ImageModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raw, targets = batch
        features = m.features(prepare(raw))  # (B, 2C), under autocast
        # Head and decoder in fp32: they cost little, and the decoder's LSTM would otherwise
        # run in reduced precision without a gradient scaler.
        with torch.autocast(device.type, enabled=False):
            features = features.float()
            return (head_loss(m.head(features), targets)
                    + config.decoder_loss_weight * m.decoder.loss(features, targets, rank))

    return step_loss


def build_optimizer(config: ImageTrainConfig, model: ImageModel) -> tuple[torch.optim.Optimizer, float]:
    """(AdamW over the trainable parameters, the backbone's learning rate for this global batch)."""
    lr = scaled_lr(config.finetune_lr, config.batch_size)
    groups = parameter_groups(model, lr, config.weight_decay, ("head", "decoder"), config.head_lr_scale)
    return torch.optim.AdamW(groups), lr
