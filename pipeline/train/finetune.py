"""Fine-tuning the image branch: the backbone from stage K onward, the image head and the
CNN-RNN decoder, trained jointly as in the CNN-RNN paper. One engine, two inputs:

- ``finetune`` (K = 0, the default on GPU): whole images, augmented (flip, light colour,
  cutout), decoded by loader workers and normalised on the device;
- ``partial`` (K = ``--train-from-stage``, for CPUs): the first K stages run once over every
  image and its mirror image, their output maps are cached on disk (``pipeline.features``),
  and the later stages train on the cache, each image seen plain or mirrored at random.

The recipe: AdamW with no decay on norms and biases and a higher learning rate for the new
head and decoder, square-root scaling with the global batch, warmup + cosine, EMA of the
weights with warm-up (the EMA is what is scored and kept), the decoder's loss weighted
against the head's, gradient clipping, autocast in ``--precision`` (fp16 with a gradient
scaler), channels_last. The checkpoints carry the whole fine-tuned backbone, so inference
rebuilds exactly this model; the validation probabilities for fusion are computed the way
inference computes them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.branches.image import (
    FINETUNE_RESOLUTION,
    ImageHeads,
    ImageTrainConfig,
    backbone_record,
    build_image_model,
    build_optimizer,
    image_splits,
    joint_loss,
    save_image_branch,
    training_image_ids,
    usable_rows,
    write_summary,
)
from pipeline.data.dataset import ID_COLUMN, LABELS_COLUMN
from pipeline.data.labelled import decodable, image_inputs, map_inputs
from pipeline.engine.distributed import DistContext, barrier, broadcast_state, gather_shards, wrap_model
from pipeline.engine.loop import EpochScore, ModelEma, TrainStep, epoch_loader, fit, train_one_epoch, warmup_cosine
from pipeline.engine.resume import ResumeState, fingerprint, finish_run, start_run
from pipeline.engine.runtime import autocast_context, grad_scaler, resolve_precision, seed_everything, training_precision
from pipeline.features import VIEWS, cached_features, cached_stage_maps
from pipeline.io import file_digest
from pipeline.metrics import tune_global_threshold
from pipeline.models.backbones import create_backbone, num_stages, split_backbone
from pipeline.models.decoder import LabelOrder
from pipeline.models.heads import FeatureNorm
from pipeline.models.image_model import ImageModel

log = logging.getLogger(__name__)


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return "finetuned-" + digest.hexdigest()[:16]


def finetune_image_branch(config: ImageTrainConfig, mode: str, device: torch.device,
                          context: DistContext = DistContext()) -> dict:
    """Train the backbone (from ``--train-from-stage`` in partial mode), head and decoder;
    write the same files as frozen mode.

    Under torchrun the model is wrapped in DistributedDataParallel (``--sync-bn`` for global
    batch-norm statistics). Each rank trains on its share of every global batch and scores
    its share of the validation split; the shares' probabilities are gathered so every rank
    keeps the same best epoch. Rank 0 alone writes files.
    """
    started = time.perf_counter()
    paths, labels, train, val = image_splits(config)
    backbone = create_backbone(config.backbone, config.backbone_weights, config.pretrained, config.resolution)
    if config.resolution is None:
        resolution = max(backbone.preprocessing["resolution"], FINETUNE_RESOLUTION)
        backbone.preprocessing = {**backbone.preprocessing, "resolution": resolution}
    # Frozen forward passes (stage maps, inference) and training may compute differently.
    precision, train_precision = resolve_precision(config.precision, device), training_precision(config.precision, device)
    all_ids = training_image_ids(train, val)
    stage = (config.train_from_stage or num_stages(backbone) - 1) if mode == "partial" else 0
    weights_dir, cache_dir = config.weights_dir, Path(config.weights_dir) / "cache"

    extract_start = time.perf_counter()
    if stage:
        front, trunk = split_backbone(backbone, stage)
        maps = cached_stage_maps(backbone, front, stage, paths, all_ids, cache_dir, device,
                                 config.batch_size, config.workers, VIEWS, "train.csv stage maps", context, precision)
        readable = maps.readable
    else:
        readable = decodable(paths, all_ids, config.workers, context)
    extract_seconds = time.perf_counter() - extract_start
    train_ok, val_ok = usable_rows(config, paths, all_ids, readable, len(train), context)
    y_train = labels.encode(train[LABELS_COLUMN][train_ok])
    y_val = labels.encode(val[LABELS_COLUMN][val_ok])
    if stage:
        inputs = map_inputs(maps, trunk, np.flatnonzero(train_ok), len(train) + np.flatnonzero(val_ok),
                            y_train, y_val, context, device, config.batch_size, config.seed, config.workers)
    else:
        inputs = image_inputs(backbone, paths, train[ID_COLUMN][train_ok].tolist(),
                              val[ID_COLUMN][val_ok].tolist(), y_train, y_val, device, config.workers)

    # Training starts from the seed, not from whatever the extraction drew (each loader it
    # starts takes a seed), so a cache hit and a cache miss train the same model.
    seed_everything(config.seed)
    feature_dim = 2 * backbone.feature_dim
    model = build_image_model(config, inputs.trunk, feature_dim, len(labels), device)
    order = LabelOrder.from_train(y_train, config.label_order)
    step_loss = joint_loss(config, inputs.prepare, order, device)

    pin = device.type == "cuda"
    loader = epoch_loader(inputs.train, config.batch_size, context, shuffle=True, seed=config.seed,
                          workers=inputs.workers, pin_memory=pin, drop_last=len(inputs.train) > config.batch_size,
                          sampler=inputs.sampler)
    val_shard = torch.utils.data.Subset(inputs.val, context.shard(len(inputs.val)).tolist())
    val_loader = DataLoader(val_shard, batch_size=context.local_batch_size(config.batch_size),
                            num_workers=inputs.workers, pin_memory=pin, persistent_workers=inputs.workers > 0)
    optimizer, lr = build_optimizer(config, model)
    scheduler = warmup_cosine(optimizer, config.finetune_epochs * len(loader), int(config.warmup_epochs * len(loader)))
    ema = ModelEma(model, config.ema_decay)
    scaler = grad_scaler(device, train_precision)
    step = wrap_model(TrainStep(model, step_loss), context, config.sync_bn)

    resume_dir = start_run(weights_dir, "image", config.resume, context)
    state = ResumeState(resume_dir, mode, fingerprint(dataclasses.asdict(config),
                        train_csv=file_digest(paths.train_csv)), config.resume, context)
    epochs_run = []  # a resumed run trains only the remaining epochs

    def train_epoch(epoch: int) -> float:
        epochs_run.append(epoch)
        return train_one_epoch(step, loader, optimizer, device, epoch, scheduler=scheduler,
                               autocast=functools.partial(autocast_context, device, train_precision),
                               grad_clip=config.grad_clip, ema=ema, scaler=scaler, context=context, name=mode)

    def score(epoch: int) -> EpochScore:
        probs = _predict_head(ema.module, val_loader, inputs.prepare, device, train_precision)
        probs = gather_shards(torch.from_numpy(probs), context, len(inputs.val)).numpy()
        threshold, f1 = tune_global_threshold(y_val, probs)
        return EpochScore(f1, message=f"val samples-F1 {f1:.4f} (threshold {threshold:.2f}, "
                                      f"EMA decay {ema.current_decay():.4f})")

    train_start, train_start_unix = time.perf_counter(), time.time()
    best = fit(mode, config.finetune_epochs, train_epoch, score, ema.module, state,
               {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema, "scaler": scaler},
               context=context)
    train_seconds = time.perf_counter() - train_start

    # The best EMA weights go into the model, whose trunk shares its tensors with the backbone.
    model.load_state_dict(ema.module.state_dict())
    broadcast_state(model, context)  # the ranks' batch-norm statistics differ; rank 0's are saved
    model.cpu().eval()
    backbone.module = backbone.module.cpu().eval()
    backbone.weights, backbone.weights_digest = "finetuned", _state_digest(backbone.module)
    views = VIEWS if config.flip_views else VIEWS[:1]
    record = backbone_record(backbone, views, precision, backbone.module.state_dict(), stage)
    identity = FeatureNorm(feature_dim)  # fine-tuned heads saw raw pooled features
    # Validation probabilities for fusion, computed exactly as inference computes them.
    val_ids = val[ID_COLUMN].tolist()
    features, val_readable = cached_features(backbone, paths, val_ids, cache_dir, device,
                                             config.batch_size, config.workers, views, "validation features",
                                             context, precision)
    heads = ImageHeads(model.head, identity, model.decoder, identity, config.beam_width)
    val_probs = heads.probabilities(features, val_readable, device)
    head_probs, decoder_probs = val_probs["image"], val_probs["decoder"]
    y_val_all = labels.encode(val[LABELS_COLUMN])
    final_f1 = tune_global_threshold(y_val_all[val_ok], head_probs[val_ok])[1]
    if context.is_main:
        save_image_branch(config, labels.ids, val_ids, record, backbone.preprocessing, identity,
                          model.head, model.decoder, order, head_probs, decoder_probs)
    summary = {
        "mode": mode,
        "trained_from_stage": stage,
        "processes": context.world_size,
        "precision": precision,
        "training_precision": train_precision,
        "lr": lr,
        "train_images": int(train_ok.sum()),
        "skipped_unreadable_images": int((~np.asarray(readable)).sum()),
        "val_images": len(val),
        "image_val_samples_f1": final_f1,
        "image_val_samples_f1_training": best["score"],
        "image_best_epoch": best["epoch"],
        "decoder_val_samples_f1_beam": tune_global_threshold(y_val_all[val_ok], decoder_probs[val_ok])[1],
        "extract_seconds": extract_seconds,
        "training_seconds": train_seconds,
        "training_window_unix": [train_start_unix, train_start_unix + train_seconds],
        "train_img_s": len(epochs_run) * len(loader) * config.batch_size / max(train_seconds, 1e-9)
        if epochs_run else None,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        summary["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    write_summary(config, summary, context)
    barrier(context)
    finish_run(resume_dir, context)
    return summary


@torch.inference_mode()
def _predict_head(model: ImageModel, loader: DataLoader, prepare: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, precision: str) -> np.ndarray:
    """Head probabilities (N, L) of the loader's inputs: what each epoch is scored by."""
    model.eval()
    parts = []
    for raw, _ in loader:
        with autocast_context(device, precision):
            features = model.features(prepare(raw.to(device, non_blocking=True)))
        parts.append(torch.sigmoid(model.head(features.float())).float().cpu())
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.head.num_labels), np.float32)
