"""How the image head and the CNN-RNN label decoder learn, in each mode.

- :func:`fit_frozen_heads` (``frozen``): the head, then the decoder, each on the cached
  pooled features of the frozen backbone, standardised with the training rows' statistics.
- :func:`fit_jointly` (``partial`` and ``finetune``): the backbone from a stage onward, the
  head and the decoder, trained together as in the CNN-RNN paper. AdamW (fused on CUDA) with
  no decay on norms and biases, layer-wise learning-rate decay over the backbone's stages and
  a higher learning rate for the new head and decoder, square-root scaling with the global
  batch, warmup + cosine, EMA of the weights with warm-up and a decay from the run's length
  (the EMA is what is scored and kept), the batch augmented on the device, the decoder's loss
  weighted against the head's, gradient clipping, autocast in the training precision (fp16
  with a gradient scaler), channels_last.

Both return a :class:`FittedHeads`; ``pipeline.train.image`` does the rest of the run.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.engine.distributed import (
    DistContext,
    broadcast_state,
    gather_shards,
    resolve_sync_bn,
    revert_sync_batchnorm,
    wrap_model,
)
from pipeline.engine.history import EpochHistory
from pipeline.engine.loop import (
    EpochScore,
    ModelEma,
    TrainStep,
    epoch_loader,
    first_batch,
    fit,
    parameter_groups,
    predict_probs,
    scaled_lr,
    train_one_epoch,
    validation_batches,
    warm_up,
    warmup_cosine,
)
from pipeline.engine.resume import ResumeState
from pipeline.engine.runtime import (
    autocast_context,
    compiled_forward,
    grad_scaler,
    resolve_compile,
    training_memory_format,
)
from pipeline.metrics import samples_f1, tune_global_threshold
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.models.heads import ClassAttention, FeatureNorm, ImageHead, get_loss
from pipeline.models.image_model import ImageModel
from pipeline.models.stages import parameter_stages
from pipeline.train.image_config import (
    FROZEN,
    ImageTrainConfig,
    Mode,
    Recipe,
    ema_decay,
    joint_csra_lambda,
    resolve_recipe,
)
from pipeline.train.image_inputs import FeatureRows, LabelledImages, LabelledMaps, TrainingInputs


@dataclass
class FittedHeads:
    """What a mode's training leaves: the head and decoder at their best epoch, the feature
    standardisation they expect, and how the training went."""

    head: ImageHead
    decoder: LabelDecoder
    order: LabelOrder
    norm: FeatureNorm
    image_best_epoch: int
    image_score_in_training: float | None
    decoder_best_epoch: int
    lr: float
    images_seen: int = 0
    epoch_seconds: float = 0.0
    epoch_windows: tuple[tuple[float, float], ...] = ()
    ema_decay: float | None = None  # jointly trained modes: the EMA's decay after its warm-up
    attention: ClassAttention | None = None  # --csra-lambda: the head's class attention on the map
    warmup_step_seconds: float = 0.0  # jointly trained modes: the first step, compilation included


class _EpochClock:
    """Wraps a ``train_epoch`` to count the images it trains on and the seconds it takes,
    validation and saving left out; ``windows`` holds each epoch's (start, end) in unix time,
    so a GPU sampler outside the process can tell the training steps from the rest."""

    def __init__(self, train_epoch: Callable[[int], float], images_per_epoch: int) -> None:
        self.train_epoch, self.images_per_epoch = train_epoch, images_per_epoch
        self.images, self.seconds = 0, 0.0
        self.windows: list[tuple[float, float]] = []

    def __call__(self, epoch: int) -> float:
        started, started_unix = time.perf_counter(), time.time()
        loss = self.train_epoch(epoch)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self.windows.append((started_unix, started_unix + seconds))
        self.images += self.images_per_epoch
        return loss


def decoded_samples_f1(
    decoder: LabelDecoder, rows: FeatureRows, y_true: np.ndarray, beam_width: int, device: torch.device
) -> float:
    """Samples-F1 of the label sets the decoder's beam search emits, a chunk of rows at a time
    (with their caption vectors, for a decoder that reads them)."""
    decoder = decoder.to(device).eval()
    decoded = np.zeros_like(y_true)
    done = 0
    for features, _, *captions in rows.chunks():
        read = captions[0].to(device) if captions else None
        sets, _ = decoder.beam_search(features.to(device), beam_width=beam_width, captions=read)
        for i, labels in enumerate(sets):
            decoded[done + i, labels] = 1
        done += len(sets)
    return samples_f1(y_true, decoded)


# ---------------------------------------------------------------- frozen: heads on cached features


def _fit_on_features(
    config: ImageTrainConfig,
    name: str,
    module: nn.Module,
    step_loss,
    train: FeatureRows,
    epochs: int,
    score: Callable[[int], EpochScore],
    device: torch.device,
    context: DistContext,
    state: ResumeState,
    clock: list[_EpochClock],
    history: EpochHistory,
) -> dict:
    """Train ``module`` on cached features with AdamW and warmup + cosine for ``epochs``,
    keeping the epoch ``score`` rates best (the image head's and the decoder's recipe)."""
    step = wrap_model(TrainStep(module, step_loss), context)
    loader = epoch_loader(
        train, config.head_batch_size, context, shuffle=True, seed=config.seed, option="--head-batch-size"
    )
    optimizer = torch.optim.AdamW(
        module.parameters(),
        lr=config.lr,
        weight_decay=resolve_recipe(config, FROZEN).weight_decay,
        fused=fused_adamw(device),
    )
    scheduler = warmup_cosine(optimizer, epochs * len(loader), len(loader))
    train_epoch = _EpochClock(
        lambda epoch: train_one_epoch(
            step, loader, optimizer, device, epoch, scheduler=scheduler, progress=False, context=context
        ),
        len(train),
    )
    clock.append(train_epoch)
    return fit(
        name,
        epochs,
        train_epoch,
        score,
        module,
        state,
        {"model": module, "optimizer": optimizer, "scheduler": scheduler},
        context=context,
        epoch_bar=True,
        history=history,
    )


def fit_frozen_heads(
    config: ImageTrainConfig,
    train: FeatureRows,
    val: FeatureRows,
    y_val: np.ndarray,
    device: torch.device,
    context: DistContext,
    resume_dir: Path | None,
    digest: str,
    history: EpochHistory,
) -> FittedHeads:
    """The image head, then the label decoder, on cached features; each keeps its best epoch
    (``history`` gets their rows as stages ``head`` and ``decoder``).

    Every rank scores the whole (small) validation split, so all ranks pick the same epoch.
    """
    clocks: list[_EpochClock] = []
    head = ImageHead(train.dim, y_val.shape[1], config.head_hidden, config.head_dropout).to(device)
    loss_fn = get_loss(config.loss)
    val_loader = DataLoader(val, batch_size=1024)

    def score_head(epoch: int) -> EpochScore:
        threshold, f1 = tune_global_threshold(y_val, predict_probs(head, val_loader, device))
        return EpochScore(f1, {"threshold": threshold}, f"val samples-F1 {f1:.4f} (threshold {threshold:.2f})")

    head_best = _fit_on_features(
        config,
        "image head",
        head,
        lambda m, b: loss_fn(m(b[0]), b[1]),
        train,
        config.epochs,
        score_head,
        device,
        context,
        ResumeState(resume_dir, "image_head", digest, config.resume, context),
        clocks,
        history.for_stage("head"),
    )

    # A str of the option's choices (label_rank checks it): typing it Order is image_config.py's.
    order = LabelOrder.from_train(train.targets.numpy(), config.label_order)  # type: ignore[arg-type]
    decoder = LabelDecoder(
        train.dim,
        y_val.shape[1],
        config.decoder_embed,
        config.decoder_hidden,
        config.decoder_dropout,
        caption_dim=train.caption_dim,
    ).to(device)
    rank = order.rank.to(device)

    def score_decoder(epoch: int) -> EpochScore:
        # Greedy decoding is cheap enough to score every epoch; the decoder overfits the
        # label sequences after a few epochs, so the best epoch is kept.
        f1 = decoded_samples_f1(decoder, val, y_val, beam_width=1, device=device)
        return EpochScore(f1, message=f"val samples-F1 (greedy) {f1:.4f}")

    decoder_best = _fit_on_features(
        config,
        "label decoder",
        decoder,
        lambda m, b: m.loss(b[0], b[1], rank, *b[2:]),
        train,
        config.decoder_epochs,
        score_decoder,
        device,
        context,
        ResumeState(resume_dir, "decoder", digest, config.resume, context),
        clocks,
        history.for_stage("decoder"),
    )
    return FittedHeads(
        head,
        decoder,
        order,
        train.norm,
        head_best["epoch"],
        head_best["score"],
        decoder_best["epoch"],
        config.lr,
        sum(c.images for c in clocks),
        sum(c.seconds for c in clocks),
        tuple(window for c in clocks for window in c.windows),
    )


# ---------------------------------------------------------------- partial and finetune: jointly


def build_image_model(
    config: ImageTrainConfig,
    trunk: nn.Module,
    feature_dim: int,
    num_labels: int,
    device: torch.device,
    caption_dim: int = 0,
) -> ImageModel:
    """The trunk with a new image head and label decoder (and with ``--csra-lambda`` the head's
    class attention on the trunk's map), on ``device``, in the training layout. ``caption_dim``:
    the size of the caption vectors a decoder that reads captions takes (0: it reads none)."""
    csra_lambda = joint_csra_lambda(config)  # joint training always has the trunk's map
    attention = (
        ClassAttention(feature_dim // 2, num_labels, csra_lambda, config.csra_temperature) if csra_lambda > 0 else None
    )
    return (
        ImageModel(
            trunk,
            ImageHead(feature_dim, num_labels, config.head_hidden, config.head_dropout),
            LabelDecoder(
                feature_dim,
                num_labels,
                config.decoder_embed,
                config.decoder_hidden,
                config.decoder_dropout,
                caption_dim=caption_dim,
            ),
            attention,
        )
        .to(device)
        .to(memory_format=training_memory_format(device))
    )


def joint_loss(
    config: ImageTrainConfig, prepare: Callable[[torch.Tensor], torch.Tensor], order: LabelOrder, device: torch.device
) -> Callable[[ImageModel, tuple[torch.Tensor, ...]], torch.Tensor]:
    """The training loss of a batch (inputs, targets[, caption vectors]): the head's ``--loss``
    plus the decoder's sequence loss times ``--decoder-loss-weight``."""
    head_loss = get_loss(config.loss)
    rank = order.rank.to(device)

    def step_loss(m: ImageModel, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        raw, targets, *captions = batch
        maps, features = m.encode(prepare(raw))  # (B, C, h, w), (B, 2C), under autocast
        # Head and decoder in fp32: they cost little, and the decoder's LSTM would otherwise
        # run in reduced precision without a gradient scaler.
        with torch.autocast(device.type, enabled=False):
            features = features.float()
            return head_loss(
                m.head_logits(maps.float(), features), targets
            ) + config.decoder_loss_weight * m.decoder.loss(features, targets, rank, *captions)

    return step_loss


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW runs fused (one kernel for every parameter's update): on CUDA, where the
    per-tensor launches of the default would cost more than a small model's arithmetic; the
    CPU's fused AdamW has no such gain."""
    return device.type == "cuda"


def build_optimizer(
    config: ImageTrainConfig, model: ImageModel, device: torch.device, recipe: Recipe
) -> tuple[torch.optim.Optimizer, float]:
    """(AdamW over the trainable parameters, the backbone's learning rate for this global batch).

    The trunk's stages learn at ``recipe.layer_decay ** (stages above them)`` of that rate, the
    top stage at the full rate."""
    lr = scaled_lr(config.finetune_lr, config.batch_size)
    stages = [stage for stage in parameter_stages(model.trunk) if stage]
    scales = [(stage, recipe.layer_decay ** (len(stages) - 1 - depth)) for depth, stage in enumerate(stages)]
    groups = parameter_groups(
        model, lr, recipe.weight_decay, ("head", "decoder", "attention"), config.head_lr_scale, scales
    )
    return torch.optim.AdamW(groups, fused=fused_adamw(device)), lr


@torch.inference_mode()
def _head_probabilities(
    model: ImageModel,
    batches: Iterable,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    precision: str,
) -> torch.Tensor:
    """Head probabilities (N, L), on ``device``, of the batches' inputs: what each epoch is
    scored by. No host sync: the caller reads them back once."""
    model.eval()
    parts = []
    for raw, *_ in batches:
        with autocast_context(device, precision):
            maps, features = model.encode(prepare(raw.to(device, non_blocking=True)))  # (B, C, h, w), (B, 2C)
        with torch.autocast(device.type, enabled=False):
            parts.append(torch.sigmoid(model.head_logits(maps.float(), features.float())))
    return torch.cat(parts) if parts else torch.zeros((0, model.head.num_labels), device=device)


def _probe(train: LabelledImages | LabelledMaps, device: torch.device) -> Callable[[nn.Module], torch.Tensor]:
    """A probe step for :func:`wrap_model`: the training step's loss on the first two training rows."""

    def probe(step: nn.Module) -> torch.Tensor:
        batch = torch.utils.data.default_collate([train[i] for i in range(min(2, len(train)))])
        return step(*(t.to(device) for t in batch))

    return probe


def fit_jointly(
    config: ImageTrainConfig,
    mode: Mode,
    inputs: TrainingInputs,
    feature_dim: int,
    y_train: np.ndarray,
    y_val: np.ndarray,
    device: torch.device,
    train_precision: str,
    context: DistContext,
    state: ResumeState,
    history: EpochHistory,
) -> FittedHeads:
    """Train the trunk, head and decoder together; keep the EMA weights of the best epoch
    (``history`` gets its rows as stage ``joint``).

    Under torchrun the model is wrapped in DistributedDataParallel after a probe step that
    freezes what the loss never reaches (``--sync-bn``, auto by default, for global batch-norm
    statistics, reverted to plain batch norm before the model is kept). Each rank trains on its
    share of every global batch and scores its share of the validation split; the shares'
    probabilities are gathered so every rank keeps the same best epoch, and rank 0's final
    weights are given to every rank.
    """
    recipe = resolve_recipe(config, mode)
    model = build_image_model(config, inputs.trunk, feature_dim, y_val.shape[1], device, inputs.caption_dim)
    # A str of the option's choices (label_rank checks it): typing it Order is image_config.py's.
    order = LabelOrder.from_train(y_train, config.label_order)  # type: ignore[arg-type]
    augment = inputs.augment

    def prepare_train(raw: torch.Tensor) -> torch.Tensor:
        return inputs.prepare(augment(raw) if augment is not None else raw)

    step_loss = joint_loss(config, prepare_train, order, device)

    pin = device.type == "cuda"
    loader = epoch_loader(
        inputs.train,
        config.batch_size,
        context,
        shuffle=True,
        seed=config.seed,
        workers=inputs.workers,
        pin_memory=pin,
        drop_last=len(inputs.train) > config.batch_size,
        sampler=inputs.sampler,
        collate=inputs.collate,
    )
    val_shard = torch.utils.data.Subset(inputs.val, context.shard(len(inputs.val)).tolist())
    # Decoded once and kept on the device where the split fits (ResidentBatches).
    val_batches = validation_batches(
        val_shard, context.local_batch_size(config.batch_size), device, inputs.workers, inputs.collate, pin
    )
    optimizer, lr = build_optimizer(config, model, device, recipe)
    epochs = recipe.epochs
    scheduler = warmup_cosine(optimizer, epochs * len(loader), int(config.warmup_epochs * len(loader)))
    ema = ModelEma(model, ema_decay(config, epochs * len(loader)))
    scaler = grad_scaler(device, train_precision)
    sync_bn = resolve_sync_bn(config.sync_bn, device, config.batch_size, context.world_size)
    step = wrap_model(TrainStep(model, step_loss), context, sync_bn, probe=_probe(inputs.train, device))

    autocast = functools.partial(autocast_context, device, train_precision)
    train_epoch = _EpochClock(
        lambda epoch: train_one_epoch(
            step,
            loader,
            optimizer,
            device,
            epoch,
            scheduler=scheduler,
            autocast=autocast,
            grad_clip=config.grad_clip,
            ema=ema,
            scaler=scaler,
            context=context,
            name=mode.name,
        ),
        len(loader) * config.batch_size,
    )

    def score(epoch: int) -> EpochScore:
        shard = _head_probabilities(ema.module, val_batches, inputs.prepare, device, train_precision)
        probs = gather_shards(shard, context, len(inputs.val)).cpu().numpy()
        threshold, f1 = tune_global_threshold(y_val, probs)
        return EpochScore(
            f1, message=f"val samples-F1 {f1:.4f} (threshold {threshold:.2f}, EMA decay {ema.current_decay():.4f})"
        )

    resumable = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "ema": ema, "scaler": scaler}
    if augment is not None:
        resumable["augment"] = augment  # its generator, so a resumed run draws the same augmentation
    # Only the training steps run the trunk compiled: the EMA copy that is scored and saved,
    # and the checkpoints, hold the plain modules. The warm-up step compiles (forward and
    # backward, under the fallback's guard) before the first epoch's clock starts.
    compile_trunk = resolve_compile(config.compile, device, steps=epochs * len(loader))
    with compiled_forward(model.trunk, compile_trunk, f"{mode.name} trunk") as guard:
        warmup_start = time.perf_counter()
        warm_up(step, first_batch(loader), device, autocast, guard, keep=[augment] if augment is not None else ())
        warmup_seconds = time.perf_counter() - warmup_start
        best = fit(
            mode.name,
            epochs,
            train_epoch,
            score,
            ema.module,
            state,
            resumable,
            context=context,
            history=history.for_stage("joint"),
        )
    # The best EMA weights go into the model, whose trunk shares its tensors with the backbone.
    model.load_state_dict(ema.module.state_dict())
    revert_sync_batchnorm(model)  # the trunk is the backbone that is saved and extracts features
    broadcast_state(model, context)  # the ranks' batch-norm statistics differ; rank 0's are saved
    model.cpu().eval()
    identity = FeatureNorm(feature_dim)  # jointly trained heads see raw pooled features
    return FittedHeads(
        model.head,
        model.decoder,
        order,
        identity,
        best["epoch"],
        best["score"],
        best["epoch"],
        lr,
        train_epoch.images,
        train_epoch.seconds,
        tuple(train_epoch.windows),
        ema.decay,
        model.attention,
        warmup_seconds,
    )
