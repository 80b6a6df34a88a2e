"""End-to-end fine-tuning of the image branch (the default on GPU).

The backbone, the image head and the CNN-RNN decoder train jointly, as in the CNN-RNN paper:
augmentation, AdamW, warmup + cosine schedule, EMA of the weights, bf16 autocast on GPU,
channels_last and gradient clipping. The checkpoints carry the fine-tuned backbone weights,
so inference rebuilds exactly this model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from pipeline.data import (
    ID_COLUMN,
    LABELS_COLUMN,
    ImageDataset,
    ImageReadError,
    group_by_image,
    load_train_val,
    resolve_dataset,
)
from pipeline.distributed import DistContext, barrier, gather_shards, wrap_model
from pipeline.engine import ModelEma, TrainStep, epoch_loader, train_one_epoch, warmup_cosine
from pipeline.features import pool_features
from pipeline.metrics import tune_global_threshold
from pipeline.models.backbones import create_backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import FeatureNorm, ImageHead
from pipeline.resume import ResumeState, file_digest, finish_run, fingerprint, start_run
from pipeline.runtime import autocast_context, resolve_precision
from pipeline.transforms import build_transform

log = logging.getLogger(__name__)


class ImageModel(nn.Module):
    """Backbone + avg/max pooling + image head + label decoder, trained together."""

    def __init__(self, backbone: nn.Module, head: ImageHead, decoder: LabelDecoder) -> None:
        super().__init__()
        self.backbone, self.head, self.decoder = backbone, head, decoder

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return pool_features(self.backbone(images))  # (B, 2C)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, L)


class _LabelledImages(torch.utils.data.Dataset):
    """(image, multi-hot target) pairs; an unreadable image stops training with its name."""

    def __init__(self, images: ImageDataset, targets: np.ndarray) -> None:
        self.images, self.targets = images, torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _, readable = self.images[index]
        if not readable:
            raise ImageReadError.listing([self.images.files[index]])
        return image, self.targets[index]


def _no_transform(image) -> torch.Tensor:
    return torch.zeros(3, 1, 1)  # the shape ImageDataset gives an unreadable image at size 1


def _readable_rows(config, paths, frame: pd.DataFrame, which: str) -> pd.DataFrame:
    """The rows of ``frame`` whose image decodes; the others stop training with their list,
    or are left out (and counted) with ``--skip-bad-images``. One decoding pass up front
    finds every bad file at once instead of failing mid-epoch."""
    images = ImageDataset(paths, frame[ID_COLUMN].tolist(), _no_transform, 1)
    readable = torch.cat([ok for _, _, ok in DataLoader(images, batch_size=256, num_workers=config.workers)]) \
        if len(images) else torch.zeros(0, dtype=torch.bool)
    if readable.all():
        return frame
    bad = [images.files[i] for i in torch.nonzero(~readable).flatten().tolist()]
    if not config.skip_bad_images:
        raise ImageReadError.listing(bad, f"\nfix or remove these rows of train.csv ({which} split), "
                                          "or pass --skip-bad-images")
    log.warning("--skip-bad-images: left out %d of %d %s rows whose image is missing or unreadable",
                len(bad), len(frame), which)
    return frame[readable.numpy()].reset_index(drop=True)


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return "finetuned-" + digest.hexdigest()[:16]


def finetune_image_branch(config, device: torch.device, context: DistContext = DistContext()) -> dict:
    """Fine-tune backbone, head and decoder end to end; write the same files as frozen mode.

    Under torchrun the model is wrapped in DistributedDataParallel (BatchNorm statistics stay
    per process, as in torchvision's references without ``--sync-bn``). Each rank trains on
    its share of every global batch and scores its share of the validation split; the
    shares' probabilities are gathered so every rank keeps the same best epoch. Rank 0 alone
    writes files.
    """
    from pipeline.train_image import backbone_record, expand_rows, save_image_branch

    started = time.perf_counter()
    paths = resolve_dataset(config.data, config.images)
    labels, train, val = load_train_val(paths, config.val_fraction)
    # One row per image: rows that differ only by caption would repeat an image's features.
    train, val = group_by_image(train).images, group_by_image(val).images
    backbone = create_backbone(config.backbone, config.backbone_weights, config.pretrained, config.resolution)
    all_val_ids = val[ID_COLUMN].tolist()
    train = _readable_rows(config, paths, train, "training")
    val = _readable_rows(config, paths, val, "validation")
    val_ok = np.isin(all_val_ids, val[ID_COLUMN].tolist())
    y_train, y_val = labels.encode(train[LABELS_COLUMN]), labels.encode(val[LABELS_COLUMN])
    size = backbone.preprocessing["resolution"]
    feature_dim = 2 * backbone.feature_dim
    model = ImageModel(
        backbone.module,
        ImageHead(feature_dim, len(labels), config.head_hidden, config.head_dropout),
        LabelDecoder(feature_dim, len(labels), config.decoder_embed, config.decoder_hidden, config.decoder_dropout),
    ).to(device).to(memory_format=torch.channels_last)
    order = LabelOrder.from_train(y_train, config.label_order)
    rank = order.rank.to(device)

    train_set = _LabelledImages(ImageDataset(paths, train[ID_COLUMN].tolist(),
                                             build_transform(backbone.preprocessing, train=True), size), y_train)
    val_set = _LabelledImages(ImageDataset(paths, val[ID_COLUMN].tolist(),
                                           build_transform(backbone.preprocessing), size), y_val)
    loader = epoch_loader(train_set, config.batch_size, context, shuffle=True, seed=config.seed,
                          workers=config.workers, pin_memory=device.type == "cuda",
                          drop_last=len(train_set) > config.batch_size)
    val_shard = torch.utils.data.Subset(val_set, context.shard(len(val_set)).tolist())
    val_loader = DataLoader(val_shard, batch_size=context.local_batch_size(config.batch_size),
                            num_workers=config.workers, pin_memory=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.finetune_lr, weight_decay=config.weight_decay)
    steps = config.finetune_epochs * len(loader)
    scheduler = warmup_cosine(optimizer, steps, int(config.warmup_epochs * len(loader)))
    ema = ModelEma(model, config.ema_decay)
    autocast = lambda: autocast_context(device)  # noqa: E731 - a fresh context per step

    def step_loss(m: ImageModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, targets = batch
        features = m.features(images.contiguous(memory_format=torch.channels_last))
        return F.binary_cross_entropy_with_logits(m.head(features).float(), targets) + m.decoder.loss(features.float(), targets, rank)

    step = wrap_model(TrainStep(model, step_loss), context, device)
    resume_dir = start_run(config.weights, "image", config.resume, context)
    state = ResumeState(resume_dir, "finetune", fingerprint(dataclasses.asdict(config),
                        train_csv=file_digest(paths.train_csv)), config.resume, context)
    first, best = state.begin({"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema.module},
                              {"f1": -1.0}, config.finetune_epochs)
    for epoch in range(first, config.finetune_epochs + 1):
        loss = train_one_epoch(step, loader, optimizer, device, epoch, scheduler=scheduler,
                               autocast=autocast, grad_clip=config.grad_clip, ema=ema, context=context)
        head_probs, decoder_probs = (
            gather_shards(torch.from_numpy(part).to(device), context, len(val_set)).cpu().numpy()
            for part in _predict(ema.module, val_loader, device, config.beam_width)
        )
        threshold, f1 = tune_global_threshold(y_val, head_probs)
        log.info("fine-tune epoch %d/%d  loss %.4f  val samples-F1 %.4f", epoch, config.finetune_epochs, loss, f1)
        if f1 > best["f1"]:
            best = {"f1": f1, "epoch": epoch, "head_probs": head_probs, "decoder_probs": decoder_probs,
                    "state": {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}}
        state.end_epoch(epoch, best)
    ema.module.load_state_dict(best["state"])
    final = ema.module.cpu()

    backbone.module = final.backbone
    backbone.weights, backbone.weights_digest = "finetuned", _state_digest(final.backbone)
    record = {**backbone_record(backbone, ["plain"], resolve_precision(config.precision, device)),
              "state_dict": final.backbone.state_dict()}
    identity = FeatureNorm(feature_dim)  # fine-tuned heads saw raw pooled features
    if context.is_main:
        # Validation rows without a readable image get NaN: fusion then uses the caption for them.
        save_image_branch(config, labels.ids, all_val_ids, record, backbone.preprocessing, identity,
                          final.head, final.decoder, order, expand_rows(best["head_probs"], val_ok),
                          expand_rows(best["decoder_probs"], val_ok))
    barrier(context)
    finish_run(resume_dir, context)
    return {"mode": "finetune", "image_val_samples_f1": best["f1"], "image_best_epoch": best["epoch"],
            "total_seconds": time.perf_counter() - started}


@torch.inference_mode()
def _predict(model: ImageModel, loader: DataLoader, device: torch.device, beam_width: int) -> tuple[np.ndarray, np.ndarray]:
    model.eval().to(device)
    head_parts, decoder_parts = [], []
    for images, _ in loader:
        with autocast_context(device):
            features = model.features(images.to(device).contiguous(memory_format=torch.channels_last)).float()
        head_parts.append(torch.sigmoid(model.head(features)).cpu())
        decoder_parts.append(model.decoder.beam_search(features, beam_width=beam_width)[1].cpu())
    return torch.cat(head_parts).numpy(), torch.cat(decoder_parts).numpy()
