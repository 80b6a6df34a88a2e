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
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from pipeline.data.dataset import ID_COLUMN, LABELS_COLUMN, DatasetPaths, group_by_image, load_train_val, resolve_dataset
from pipeline.data.images import ImageDataset, ImageReadError
from pipeline.engine.distributed import DistContext, barrier, gather_shards, workers_per_process, wrap_model
from pipeline.engine.loop import (
    EpochScore,
    ModelEma,
    TrainStep,
    epoch_loader,
    fit,
    parameter_groups,
    scaled_lr,
    train_one_epoch,
    warmup_cosine,
)
from pipeline.features import VIEWS, StageMaps, cached_features, cached_stage_maps
from pipeline.branches.image import (
    FINETUNE_RESOLUTION,
    ImageTrainConfig,
    backbone_record,
    save_image_branch,
    training_image_ids,
    usable_rows,
    write_summary,
)
from pipeline.metrics import tune_global_threshold
from pipeline.models.backbones import Backbone, create_backbone, num_stages, split_backbone
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import FeatureNorm, ImageHead, get_loss
from pipeline.models.image_model import ImageModel
from pipeline.io import file_digest
from pipeline.engine.resume import ResumeState, finish_run, fingerprint, start_run
from pipeline.engine.runtime import (
    autocast_context,
    grad_scaler,
    resolve_precision,
    training_memory_format,
    training_precision,
)
from pipeline.data.transforms import build_transform, normalize_batch

log = logging.getLogger(__name__)


class _LabelledImages(Dataset):
    """(uint8 image (3, R, R), multi-hot target) pairs; an unreadable image stops training with its name."""

    def __init__(self, images: ImageDataset, targets: np.ndarray) -> None:
        self.images, self.targets = images, torch.from_numpy(targets)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _, readable = self.images[index]
        if not readable:
            raise ImageReadError.listing([self.images.files[index]])
        return image, self.targets[index]


class _LabelledMaps(Dataset):
    """(float16 stage map (C, h, w), multi-hot target) pairs from the stage-map cache.

    Index ``i + n * v`` is row ``rows[i]`` of view ``v`` (``RandomViewSampler`` picks ``v``),
    so the view choice lives in the sampler, in the main process, and loader workers need
    no per-epoch state. The memory maps are opened lazily, in the process that reads them.
    """

    def __init__(self, maps: StageMaps, rows: np.ndarray, targets: np.ndarray) -> None:
        self.maps, self.rows, self.targets = maps, rows, torch.from_numpy(targets)
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            self._arrays = [self.maps.array(view) for view in self.maps.views]
        view, i = divmod(index, len(self.rows))
        return torch.from_numpy(np.array(self._arrays[view][self.rows[i]])), self.targets[i]


class RandomViewSampler(Sampler[int]):
    """A ``DistributedSampler`` over rows whose every row comes as one of ``num_views`` views,
    drawn afresh each epoch from (seed, epoch, row): it yields ``row + num_rows * view``.

    The draw depends on the row, not on the rank, so 1 or N processes see the same views.
    """

    def __init__(self, rows: DistributedSampler, num_rows: int, num_views: int, seed: int) -> None:
        self.rows, self.num_rows, self.num_views, self.seed = rows, num_rows, num_views, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        views = torch.randint(self.num_views, (self.num_rows,), generator=generator).tolist()
        return (row + self.num_rows * views[row] for row in self.rows)


def _no_transform(image) -> torch.Tensor:
    return torch.zeros(3, 1, 1, dtype=torch.uint8)  # the shape ImageDataset gives an unreadable image at size 1


def decodable(paths: DatasetPaths, image_ids: list[str], workers: int, context: DistContext) -> np.ndarray:
    """(N,) bool: which images decode. Each rank decodes its share and the shares are gathered,
    so every bad file is found in one pass before training, not mid-epoch."""
    shard = context.shard(len(image_ids))
    images = ImageDataset(paths, [image_ids[i] for i in shard], _no_transform, 1, blank_dtype=torch.uint8)
    parts = [ok for _, _, ok in DataLoader(images, batch_size=256, num_workers=workers_per_process(workers))]
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    return gather_shards(local.to(torch.uint8), context, len(image_ids)).bool().numpy()


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return "finetuned-" + digest.hexdigest()[:16]


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


@dataclasses.dataclass
class TrainingInputs:
    """What the trunk trains on: datasets, how a batch becomes the trunk's input, the trunk."""

    train: Dataset
    val: Dataset
    sampler: Sampler | None
    prepare: Callable[[torch.Tensor], torch.Tensor]
    trunk: nn.Module
    workers: int


def image_inputs(config: ImageTrainConfig, backbone: Backbone, paths: DatasetPaths, train_ids: list[str],
                 val_ids: list[str], y_train: np.ndarray, y_val: np.ndarray, device: torch.device) -> TrainingInputs:
    preprocessing, size = backbone.preprocessing, backbone.preprocessing["resolution"]
    train_set = _LabelledImages(ImageDataset(paths, train_ids, build_transform(preprocessing, train=True,
                                                                               normalize=False), size), y_train)
    val_set = _LabelledImages(ImageDataset(paths, val_ids, build_transform(preprocessing, normalize=False), size),
                              y_val)

    layout = training_memory_format(device)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return normalize_batch(images, preprocessing).contiguous(memory_format=layout)

    return TrainingInputs(train_set, val_set, None, prepare, backbone.module, workers_per_process(config.workers))


def _map_inputs(config: ImageTrainConfig, maps: StageMaps, trunk: nn.Module, train_rows: np.ndarray,
                val_rows: np.ndarray, y_train: np.ndarray, y_val: np.ndarray, context: DistContext,
                device: torch.device) -> TrainingInputs:
    train_set = _LabelledMaps(maps, train_rows, y_train)
    sampler = RandomViewSampler(DistributedSampler(range(len(train_rows)), num_replicas=context.world_size,
                                                   rank=context.rank, shuffle=True, seed=config.seed,
                                                   drop_last=len(train_rows) > config.batch_size),
                                len(train_rows), len(maps.views), config.seed)
    val_set = _LabelledMaps(maps, val_rows, y_val)  # indices below len(val_rows): the plain view
    # Reading rows of a memory map is a copy; on a CPU, worker processes would only take
    # cores from the training arithmetic.
    workers = workers_per_process(config.workers) if device.type == "cuda" else 0
    layout = training_memory_format(device)

    def prepare(maps_batch: torch.Tensor) -> torch.Tensor:
        return maps_batch.float().contiguous(memory_format=layout)

    return TrainingInputs(train_set, val_set, sampler, prepare, trunk, workers)


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
    paths = resolve_dataset(config.data, config.images)
    labels, train, val = load_train_val(paths, config.val_fraction)
    # One row per image: rows that differ only by caption would repeat an image.
    train, val = group_by_image(train).images, group_by_image(val).images
    if val.empty:
        raise ValueError(f"--val-fraction {config.val_fraction}: the validation split is empty")
    backbone = create_backbone(config.backbone, config.backbone_weights, config.pretrained, config.resolution)
    if config.resolution is None:
        resolution = max(backbone.preprocessing["resolution"], FINETUNE_RESOLUTION)
        backbone.preprocessing = {**backbone.preprocessing, "resolution": resolution}
    # Frozen forward passes (stage maps, inference) and training may compute differently.
    precision, train_precision = resolve_precision(config.precision, device), training_precision(config.precision, device)
    all_ids = training_image_ids(train, val)
    stage = (config.train_from_stage or num_stages(backbone) - 1) if mode == "partial" else 0
    weights_dir, cache_dir = config.weights, Path(config.weights) / "cache"

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
        inputs = _map_inputs(config, maps, trunk, np.flatnonzero(train_ok), len(train) + np.flatnonzero(val_ok),
                             y_train, y_val, context, device)
    else:
        inputs = image_inputs(config, backbone, paths, train[ID_COLUMN][train_ok].tolist(),
                              val[ID_COLUMN][val_ok].tolist(), y_train, y_val, device)

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
    head_probs, decoder_probs = _heads_on_features(model, features, val_readable, config.beam_width, device)
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
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.head.net[-1].out_features), np.float32)


@torch.inference_mode()
def _heads_on_features(model: ImageModel, features: torch.Tensor, readable: torch.Tensor, beam_width: int,
                       device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(head, decoder) probabilities of pooled features; NaN rows for unreadable images."""
    head, decoder = model.head.to(device).eval(), model.decoder.to(device).eval()
    values = torch.where(readable[:, None], features, torch.zeros(())).to(device)
    head_probs = torch.sigmoid(head(values)).cpu().numpy()
    decoder_probs = decoder.beam_search(values, beam_width=beam_width)[1].cpu().numpy()
    for probs in (head_probs, decoder_probs):
        probs[~readable.numpy()] = np.nan
    return head_probs, decoder_probs
