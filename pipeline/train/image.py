"""Training the image branch: the image head and the CNN-RNN label decoder.

``train_image_branch`` picks the mode. ``frozen`` is here: pooled backbone features are
computed once and cached, and both heads train on the cache in seconds. ``partial`` (the
default on CPU) and ``finetune`` (on GPU) train the backbone too (``pipeline.train.finetune``).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.branches.image import (
    ImageHeads,
    ImageTrainConfig,
    backbone_record,
    image_splits,
    resolve_mode,
    save_image_branch,
    training_image_ids,
    usable_rows,
    write_summary,
)
from pipeline.data.dataset import ID_COLUMN, LABELS_COLUMN
from pipeline.data.labelled import FeatureRows
from pipeline.engine.distributed import DistContext, barrier, distributed_session, wrap_model
from pipeline.engine.loop import EpochScore, TrainStep, epoch_loader, fit, predict_probs, train_one_epoch, warmup_cosine
from pipeline.engine.resume import ResumeState, fingerprint, finish_run, start_run
from pipeline.engine.runtime import (
    configure_backends,
    cpu_threads,
    oom_hint,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
    seed_everything,
)
from pipeline.features import VIEWS, cached_features
from pipeline.io import file_digest
from pipeline.metrics import samples_f1, tune_global_threshold
from pipeline.models.backbones import BackboneSplitError, create_backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import FeatureNorm, ImageHead, get_loss
from pipeline.train.finetune import finetune_image_branch

log = logging.getLogger(__name__)


def _fit_on_features(config: ImageTrainConfig, name: str, module: torch.nn.Module, step_loss, train: FeatureRows,
                     epochs: int, score, device: torch.device, context: DistContext,
                     state: ResumeState | None) -> dict:
    """Train ``module`` on cached features with AdamW and warmup + cosine for ``epochs``,
    keeping the epoch ``score`` rates best (the image head's and the decoder's recipe)."""
    step = wrap_model(TrainStep(module, step_loss), context)
    loader = epoch_loader(train, config.head_batch_size, context, shuffle=True, seed=config.seed,
                          option="--head-batch-size")
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, epochs * len(loader), len(loader))

    def train_epoch(epoch: int) -> float:
        return train_one_epoch(step, loader, optimizer, device, epoch, scheduler=scheduler, progress=False,
                               context=context)

    return fit(name, epochs, train_epoch, score, module, state or ResumeState.off(),
               {"model": module, "optimizer": optimizer, "scheduler": scheduler}, context=context, epoch_bar=True)


def fit_image_head(config: ImageTrainConfig, train: FeatureRows, val: FeatureRows, y_val: np.ndarray,
                   device: torch.device,
                   context: DistContext = DistContext(),
                   state: ResumeState | None = None) -> tuple[ImageHead, dict]:
    """Train the head on cached features; keep the epoch with the best validation samples-F1.

    Every rank scores the whole (small) validation split, so all ranks pick the same epoch.
    Returns (head, {"epoch", "score", "threshold"}).
    """
    head = ImageHead(train.dim, y_val.shape[1], config.head_hidden, config.head_dropout).to(device)
    loss_fn = get_loss(config.loss)
    val_loader = DataLoader(val, batch_size=1024)

    def score(epoch: int) -> EpochScore:
        probs = predict_probs(head, val_loader, device)
        threshold, f1 = tune_global_threshold(y_val, probs)
        return EpochScore(f1, {"threshold": threshold},
                          f"val samples-F1 {f1:.4f} (threshold {threshold:.2f})")

    best = _fit_on_features(config, "image head", head, lambda m, b: loss_fn(m(b[0]), b[1]), train, config.epochs,
                            score, device, context, state)
    return head, best


def fit_decoder(config: ImageTrainConfig, train: FeatureRows, val: FeatureRows, y_val: np.ndarray,
                device: torch.device,
                context: DistContext = DistContext(),
                state: ResumeState | None = None) -> tuple[LabelDecoder, LabelOrder, dict]:
    """Train the CNN-RNN decoder on cached features with teacher forcing; score it by beam search."""
    order = LabelOrder.from_train(train.targets.numpy(), config.label_order)
    decoder = LabelDecoder(train.dim, y_val.shape[1], config.decoder_embed, config.decoder_hidden,
                           config.decoder_dropout).to(device)
    rank = order.rank.to(device)

    def score(epoch: int) -> EpochScore:
        # Greedy decoding is cheap enough to score every epoch; the decoder overfits the
        # label sequences after a few epochs, so the best epoch is kept.
        f1 = decoded_samples_f1(decoder, val, y_val, beam_width=1, device=device)
        return EpochScore(f1, message=f"val samples-F1 (greedy) {f1:.4f}")

    best = _fit_on_features(config, "label decoder", decoder, lambda m, b: m.loss(b[0], b[1], rank), train,
                            config.decoder_epochs, score, device, context, state)
    summary = {"best_epoch": best["epoch"]}
    for width in sorted({1, config.beam_width}):
        summary[f"val_samples_f1_beam{width}"] = decoded_samples_f1(decoder, val, y_val, width, device)
    log.info("decoder val samples-F1: %s", summary)
    return decoder, order, summary


def decoded_samples_f1(decoder: LabelDecoder, rows: FeatureRows, y_true: np.ndarray, beam_width: int,
                       device: torch.device) -> float:
    """Samples-F1 of the label sets the decoder's beam search emits, a chunk of rows at a time."""
    decoded = np.zeros_like(y_true)
    done = 0
    for features, _ in rows.chunks():
        sets, _ = decoder.beam_search(features.to(device), beam_width=beam_width)
        for i, labels in enumerate(sets):
            decoded[done + i, labels] = 1
        done += len(sets)
    return samples_f1(y_true, decoded)


def train_image_branch(config: ImageTrainConfig) -> dict:
    """Train the image head and the label decoder; write their checkpoints and validation probabilities.

    Under ``torchrun`` every process runs this; rank 0 alone writes files.
    """
    config.validate()
    seed_everything(config.seed)
    reuse_freed_memory()
    with oom_hint(config.batch_size), distributed_session(resolve_device(config.device)) as (context, device):
        logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING, format="%(message)s")
        configure_backends(device)
        mode = resolve_mode(config.mode, device)
        if mode in ("partial", "finetune"):
            try:
                return finetune_image_branch(config, mode, device, context)
            except BackboneSplitError as err:
                if config.mode != "auto":
                    raise
                log.warning("%s; training in frozen mode instead", err)
        return _train_frozen(config, device, context)


def _train_frozen(config: ImageTrainConfig, device: torch.device, context: DistContext) -> dict:
    started = time.perf_counter()
    paths, labels, train, val = image_splits(config)
    weights_dir = Path(config.weights_dir)
    backbone = create_backbone(config.backbone, config.backbone_weights, config.pretrained, config.resolution)
    views = VIEWS if config.flip_views else VIEWS[:1]
    precision = resolve_precision(config.precision, device)

    extract_start = time.perf_counter()
    all_ids = training_image_ids(train, val)
    features, readable = cached_features(backbone, paths, all_ids, weights_dir / "cache", device,
                                         config.batch_size, config.workers, views, description="train.csv features",
                                         context=context, precision=precision)
    extract_seconds = time.perf_counter() - extract_start
    train_ok, val_ok = usable_rows(config, paths, all_ids, readable.numpy(), len(train), context)
    train = train[train_ok].reset_index(drop=True)
    # Features stay float16 as cached; the heads see them standardised a batch at a time.
    train_rows, val_rows = np.flatnonzero(train_ok), len(train_ok) + np.flatnonzero(val_ok)
    # Small chunks: glibc keeps the freed heap (reuse_freed_memory), so the largest temporary
    # (a float64 chunk and its square) stays in the process for the rest of the run.
    norm = FeatureNorm(features.shape[1]).fit_chunks(features[train_rows[i:i + 1024]]
                                                     for i in range(0, len(train_rows), 1024))
    y_train = torch.from_numpy(labels.encode(train[LABELS_COLUMN]))
    y_val = labels.encode(val[LABELS_COLUMN][val_ok])
    x_train = FeatureRows(features, train_rows, y_train, norm)
    x_val = FeatureRows(features, val_rows, torch.from_numpy(y_val), norm)

    seed_everything(config.seed)  # as in fine-tuning: the same model whether the cache was hit or not
    resume_dir = start_run(weights_dir, "image", config.resume, context)
    digest = fingerprint(dataclasses.asdict(config), train_csv=file_digest(paths.train_csv),
                         features=features.digest)
    heads_start = time.perf_counter()
    with cpu_threads(config.head_threads if device.type == "cpu" else 0):
        head, head_summary = fit_image_head(
            config, x_train, x_val, y_val, device, context,
            ResumeState(resume_dir, "image_head", digest, config.resume, context))
        decoder, order, decoder_summary = fit_decoder(
            config, x_train, x_val, y_val, device, context,
            ResumeState(resume_dir, "decoder", digest, config.resume, context))
    heads_seconds = time.perf_counter() - heads_start
    # Validation probabilities for fusion, as inference computes them (NaN rows for unreadable images).
    val_probs = ImageHeads(head, norm, decoder, norm, config.beam_width).probabilities(
        features, torch.from_numpy(val_ok), device, rows=len(train_ok) + np.arange(len(val_ok)))

    summary = {
        "mode": "frozen",
        "processes": context.world_size,
        "train_images": len(train),
        "skipped_unreadable_images": int((~readable).sum()),
        "val_images": len(val),
        "image_val_samples_f1": head_summary["score"],
        "image_best_epoch": head_summary["epoch"],
        **{f"decoder_{k}": v for k, v in decoder_summary.items()},
        "feature_seconds": extract_seconds,
        "head_training_seconds": heads_seconds,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if context.is_main:
        save_image_branch(config, labels.ids, val[ID_COLUMN].tolist(), backbone_record(backbone, views, precision),
                          backbone.preprocessing, norm, head, decoder, order, val_probs["image"], val_probs["decoder"])
    write_summary(config, summary, context)
    barrier(context)  # the other ranks return once the files exist
    finish_run(resume_dir, context)
    return summary


