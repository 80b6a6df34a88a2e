"""Training the image branch: the image head and the CNN-RNN label decoder.

``frozen`` mode (the default on CPU): pooled backbone features are computed once and cached,
and both heads train on the cache in seconds. ``finetune`` mode (the default on GPU): the
backbone, the head and the decoder train end to end (see ``pipeline.finetune``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from pipeline.checkpoint import atomic_write_text, checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.config import TrainingConfig, option, save_config
from pipeline.data import ID_COLUMN, LABELS_COLUMN, ImageReadError, group_by_image, load_train_val, resolve_dataset
from pipeline.distributed import DistContext, barrier, distributed_session, wrap_model
from pipeline.engine import TrainStep, epoch_loader, predict_probs, train_one_epoch, warmup_cosine
from pipeline.features import VIEWS, cached_features
from pipeline.metrics import samples_f1, tune_global_threshold
from pipeline.models.backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import FeatureNorm, ImageHead, get_loss
from pipeline.resume import ResumeState, file_digest, finish_run, fingerprint, start_run
from pipeline.runtime import (
    PRECISIONS,
    cpu_threads,
    oom_hint,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
    seed_everything,
)

log = logging.getLogger(__name__)


@dataclass
class ImageTrainConfig(TrainingConfig):
    """Settings of ``train_efficientnet.py``."""

    backbone: str = option(DEFAULT_BACKBONE, "backbone: a timm model name or efficientnet-b0..b7 (efficientnet-pytorch)")
    backbone_weights: str | None = option(
        None, "local backbone weights file (state_dict); default: the bundled ImageNet weights for "
        "tf_efficientnet_lite0, random initialisation (with a warning) for other names")
    pretrained: bool = option(False, "take the backbone's pretrained weights from the model hub (needs internet)")
    resolution: int | None = option(None, "input size in pixels (default: the backbone's own, 224 for Lite0)")
    mode: str = option("auto", "frozen: heads on cached backbone features; finetune: end to end; "
                       "auto: frozen on CPU, finetune on GPU", choices=["auto", "frozen", "finetune"])
    skip_bad_images: bool = option(False, "leave out training rows whose image is missing or unreadable "
                                   "(their count is reported) instead of stopping with their list")
    precision: str = option(
        "auto", "arithmetic of the frozen backbone's forward pass (feature extraction here and in inference): "
        "auto = bf16 where the hardware computes it natively (CUDA; CPUs with AVX512-BF16 or AMX, where it is "
        "about 3x faster), else fp32", choices=list(PRECISIONS))
    flip_views: bool = option(False, "also extract mirrored images and average the two views' features "
                              "(frozen mode; doubles extraction time)")
    head_hidden: int = option(512, "hidden units of the image head's MLP (0: linear)")
    head_dropout: float = option(0.5, "dropout of the image head")
    loss: str = option("bce", "image head loss", choices=["bce", "asl"])
    epochs: int = option(12, "epochs of head training on cached features (the best epoch is kept)")
    lr: float = option(1e-3, "peak learning rate of the heads (AdamW, warmup + cosine)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    decoder_embed: int = option(128, "label embedding size of the CNN-RNN decoder")
    decoder_hidden: int = option(256, "LSTM hidden size of the CNN-RNN decoder")
    decoder_dropout: float = option(0.3, "dropout of the CNN-RNN decoder")
    decoder_epochs: int = option(8, "epochs of decoder training on cached features (the best epoch is kept)")
    label_order: str = option("frequent", "order of the label sequences the decoder learns",
                              choices=["frequent", "rare"])
    head_threads: int = option(1, "CPU threads while training the heads on cached features (0: torch's "
                               "default); one is robust when other processes share the cores")
    beam_width: int = option(3, "beam width of the decoder's beam search")
    finetune_epochs: int = option(10, "epochs of end-to-end fine-tuning (finetune mode)")
    finetune_lr: float = option(3e-4, "peak learning rate when fine-tuning")
    warmup_epochs: float = option(1.0, "linear warmup length, in epochs")
    ema_decay: float = option(0.999, "decay of the weights' exponential moving average (finetune mode)")
    grad_clip: float = option(1.0, "gradient norm clipping (finetune mode)")
    batch_size: int = option(64, "images per batch for feature extraction and fine-tuning (the global batch: "
                             "under torchrun each of N processes takes 1/N)")
    head_batch_size: int = option(256, "feature rows per batch when training the heads on cached features "
                                  "(the global batch)")


def _step_module(model: torch.nn.Module, step_loss, context: DistContext, device: torch.device) -> torch.nn.Module:
    return wrap_model(TrainStep(model, step_loss), context, device)


def fit_image_head(config: ImageTrainConfig, x_train: torch.Tensor, y_train: torch.Tensor,
                   x_val: torch.Tensor, y_val: np.ndarray, device: torch.device,
                   context: DistContext = DistContext(),
                   state: ResumeState | None = None) -> tuple[ImageHead, np.ndarray, dict]:
    """Train the head on cached features; keep the epoch with the best validation samples-F1.

    Every rank scores the whole (small) validation split, so all ranks pick the same epoch.
    """
    head = ImageHead(x_train.shape[1], y_train.shape[1], config.head_hidden, config.head_dropout).to(device)
    loss_fn = get_loss(config.loss)
    step = _step_module(head, lambda m, b: loss_fn(m(b[0]), b[1]), context, device)
    loader = epoch_loader(TensorDataset(x_train, y_train), config.head_batch_size, context, shuffle=True,
                          seed=config.seed, option="--head-batch-size")
    val_loader = DataLoader(TensorDataset(x_val), batch_size=1024)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.epochs * len(loader), len(loader))
    state = state or ResumeState.off()
    first, best = state.begin({"model": head, "optimizer": optimizer, "scheduler": scheduler}, {"f1": -1.0},
                              config.epochs)
    for epoch in tqdm(range(first, config.epochs + 1), desc="image head", unit="epoch", disable=not context.is_main):
        loss = train_one_epoch(step, loader, optimizer, device, epoch, scheduler=scheduler, progress=False,
                               context=context)
        probs = predict_probs(head, val_loader, device)
        threshold, f1 = tune_global_threshold(y_val, probs)
        log.info("image head epoch %d/%d  loss %.4f  val samples-F1 %.4f (threshold %.2f)",
                 epoch, config.epochs, loss, f1, threshold)
        if f1 > best["f1"]:
            best = {"f1": f1, "epoch": epoch, "threshold": threshold, "probs": probs,
                    "state": {k: v.detach().clone() for k, v in head.state_dict().items()}}
        state.end_epoch(epoch, best)
    head.load_state_dict(best.pop("state"))
    return head, best.pop("probs"), best


def fit_decoder(config: ImageTrainConfig, x_train: torch.Tensor, y_train: torch.Tensor,
                x_val: torch.Tensor, y_val: np.ndarray, device: torch.device,
                context: DistContext = DistContext(),
                state: ResumeState | None = None) -> tuple[LabelDecoder, LabelOrder, np.ndarray, dict]:
    """Train the CNN-RNN decoder on cached features with teacher forcing; score it by beam search."""
    order = LabelOrder.from_train(y_train.numpy(), config.label_order)
    decoder = LabelDecoder(x_train.shape[1], y_train.shape[1], config.decoder_embed, config.decoder_hidden,
                           config.decoder_dropout).to(device)
    rank = order.rank.to(device)
    step = _step_module(decoder, lambda m, b: m.loss(b[0], b[1], rank), context, device)
    loader = epoch_loader(TensorDataset(x_train, y_train), config.head_batch_size, context, shuffle=True,
                          seed=config.seed, option="--head-batch-size")
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = warmup_cosine(optimizer, config.decoder_epochs * len(loader), len(loader))
    x_val = x_val.to(device)
    state = state or ResumeState.off()
    first, best = state.begin({"model": decoder, "optimizer": optimizer, "scheduler": scheduler}, {"f1": -1.0},
                              config.decoder_epochs)
    for epoch in tqdm(range(first, config.decoder_epochs + 1), desc="label decoder", unit="epoch",
                      disable=not context.is_main):
        loss = train_one_epoch(step, loader, optimizer, device, epoch, scheduler=scheduler, progress=False,
                               context=context)
        # Greedy decoding is cheap enough to score every epoch; the decoder overfits the
        # label sequences after a few epochs, so the best epoch is kept.
        f1 = decoded_samples_f1(decoder, x_val, y_val, beam_width=1)
        log.info("decoder epoch %d/%d  loss %.4f  val samples-F1 (greedy) %.4f", epoch, config.decoder_epochs, loss, f1)
        if f1 > best["f1"]:
            best = {"f1": f1, "epoch": epoch, "state": {k: v.detach().clone() for k, v in decoder.state_dict().items()}}
        state.end_epoch(epoch, best)
    decoder.load_state_dict(best["state"])
    summary = {"best_epoch": best["epoch"]}
    for width in sorted({1, config.beam_width}):
        summary[f"val_samples_f1_beam{width}"] = decoded_samples_f1(decoder, x_val, y_val, width)
    probs = decoder.beam_search(x_val, beam_width=config.beam_width)[1].cpu().numpy()
    log.info("decoder val samples-F1: %s", summary)
    return decoder, order, probs, summary


def decoded_samples_f1(decoder: LabelDecoder, features: torch.Tensor, y_true: np.ndarray, beam_width: int) -> float:
    """Samples-F1 of the label sets the decoder's beam search emits."""
    sets, _ = decoder.beam_search(features, beam_width=beam_width)
    decoded = np.zeros_like(y_true)
    for i, labels in enumerate(sets):
        decoded[i, labels] = 1
    return samples_f1(y_true, decoded)


def train_image_branch(config: ImageTrainConfig) -> dict:
    """Train the image head and the label decoder; write their checkpoints and validation probabilities.

    Under ``torchrun`` every process runs this; rank 0 alone writes files.
    """
    seed_everything(config.seed)
    reuse_freed_memory()
    with oom_hint(config.batch_size), distributed_session(resolve_device(config.device)) as (context, device):
        logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING, format="%(message)s")
        mode = config.mode if config.mode != "auto" else ("finetune" if device.type == "cuda" else "frozen")
        if mode == "finetune":
            from pipeline.finetune import finetune_image_branch

            return finetune_image_branch(config, device, context)
        return _train_frozen(config, device, context)


def _train_frozen(config: ImageTrainConfig, device: torch.device, context: DistContext) -> dict:
    started = time.perf_counter()
    paths = resolve_dataset(config.data, config.images)
    labels, train, val = load_train_val(paths, config.val_fraction)
    # One row per image: rows that differ only by caption would repeat an image's features.
    train, val = group_by_image(train).images, group_by_image(val).images
    if val.empty:
        raise ValueError(f"--val-fraction {config.val_fraction}: the validation split is empty")
    weights_dir = Path(config.weights)
    backbone = create_backbone(config.backbone, config.backbone_weights, config.pretrained, config.resolution)
    views = VIEWS if config.flip_views else VIEWS[:1]
    precision = resolve_precision(config.precision, device)

    extract_start = time.perf_counter()
    all_ids = training_image_ids(train, val)
    features, readable = cached_features(backbone, paths, all_ids, weights_dir / "cache", device,
                                         config.batch_size, config.workers, views, description="train.csv features",
                                         context=context, precision=precision)
    extract_seconds = time.perf_counter() - extract_start
    train_ok, val_ok = _usable_rows(config, paths, all_ids, readable, len(train), weights_dir, context)
    train = train[train_ok].reset_index(drop=True)
    norm = FeatureNorm(features.shape[1]).fit(features[: len(train_ok)][train_ok])
    x_train, x_val = norm(features[: len(train_ok)][train_ok]), norm(features[len(train_ok):][val_ok])
    y_train = torch.from_numpy(labels.encode(train[LABELS_COLUMN]))
    y_val = labels.encode(val[LABELS_COLUMN][val_ok])

    resume_dir = start_run(weights_dir, "image", config.resume, context)
    digest = fingerprint(dataclasses.asdict(config), train_csv=file_digest(paths.train_csv),
                         features=hashlib.sha256(features.numpy().tobytes()).hexdigest())
    heads_start = time.perf_counter()
    with cpu_threads(config.head_threads if device.type == "cpu" else 0):
        head, head_probs, head_summary = fit_image_head(
            config, x_train, y_train, x_val, y_val, device, context,
            ResumeState(resume_dir, "image_head", digest, config.resume, context))
        decoder, order, decoder_probs, decoder_summary = fit_decoder(
            config, x_train, y_train, x_val, y_val, device, context,
            ResumeState(resume_dir, "decoder", digest, config.resume, context))
    heads_seconds = time.perf_counter() - heads_start
    # Validation rows without a readable image get NaN: fusion then uses the caption for them.
    head_probs, decoder_probs = (expand_rows(probs, val_ok) for probs in (head_probs, decoder_probs))

    summary = {
        "mode": "frozen",
        "processes": context.world_size,
        "train_images": len(train),
        "skipped_unreadable_images": int((~readable).sum()),
        "val_images": len(val),
        "image_val_samples_f1": head_summary["f1"],
        "image_best_epoch": head_summary["epoch"],
        **{f"decoder_{k}": v for k, v in decoder_summary.items()},
        "feature_seconds": extract_seconds,
        "head_training_seconds": heads_seconds,
        "total_seconds": time.perf_counter() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if context.is_main:
        save_image_branch(config, labels.ids, val[ID_COLUMN].tolist(), backbone_record(backbone, views, precision),
                          backbone.preprocessing, norm, head, decoder, order, head_probs, decoder_probs)
        atomic_write_text(weights_dir / "image_summary.json", json.dumps(summary, indent=2) + "\n")
        tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    barrier(context)  # the other ranks return once the files exist
    finish_run(resume_dir, context)
    return summary


def _usable_rows(config: ImageTrainConfig, paths, image_ids: list[str], readable: torch.Tensor, num_train: int,
                 weights_dir: Path, context: DistContext) -> tuple[np.ndarray, np.ndarray]:
    """(train mask, validation mask) of the rows whose image could be read.

    Unreadable images stop training with their list, unless ``--skip-bad-images``: then
    they are left out of training and scoring, listed in WEIGHTS/skipped_images.txt, and
    their count is reported.
    """
    ok = readable.numpy()
    if ok.all():
        return ok[:num_train], ok[num_train:]
    bad = [paths.image_path(image_ids[i]) for i in np.flatnonzero(~ok)]
    if not config.skip_bad_images:
        raise ImageReadError.listing(bad, "\nfix or remove these rows of train.csv, or pass --skip-bad-images")
    listing = weights_dir / "skipped_images.txt"
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


def training_image_ids(train: pd.DataFrame, val: pd.DataFrame) -> list[str]:
    """The image list of the training feature cache: train split then validation split.

    One cache covers both, and inference asks for the same list when it evaluates on the
    validation split, so it reuses the cache instead of extracting again.
    """
    return train[ID_COLUMN].tolist() + val[ID_COLUMN].tolist()


def backbone_record(backbone: Backbone, views, precision: str) -> dict:
    """What inference needs to rebuild the frozen backbone, run it as training did and check it is the same one."""
    return {"name": backbone.name, "weights": backbone.weights, "weights_digest": backbone.weights_digest,
            "feature_dim": backbone.feature_dim, "views": list(views), "pooling": "avg+max",
            "precision": precision}
