"""The one image transform factory used by training, feature extraction and inference.

Preprocessing is a plain dict stored in every image checkpoint and in the feature-cache key,
so inference resizes and normalises exactly as training did.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as T

_INTERPOLATIONS = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def make_preprocessing(resolution: int, mean: tuple[float, ...], std: tuple[float, ...],
                       interpolation: str = "bicubic") -> dict:
    """A JSON-serialisable description of how images become tensors."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: valid values are {', '.join(_INTERPOLATIONS)}")
    return {
        "resolution": int(resolution),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
        # Whole image squeezed to a square: multi-label objects sit near the borders too,
        # so a centre crop would cut some of them away.
        "resize": "squash",
    }


def build_transform(preprocessing: dict, train: bool = False, flip: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, R, R).

    ``train`` adds light augmentation for fine-tuning; ``flip`` mirrors every image (the
    second view of flip test-time augmentation).
    """
    size = preprocessing["resolution"]
    interpolation = _INTERPOLATIONS[preprocessing["interpolation"]]
    steps: list = [T.ToImage()]
    if train:
        steps += [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interpolation, antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.2, 0.2, 0.2),
        ]
    else:
        steps.append(T.Resize((size, size), interpolation=interpolation, antialias=True))
        if flip:
            steps.append(T.RandomHorizontalFlip(p=1.0))
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(preprocessing["mean"], preprocessing["std"])]
    return T.Compose(steps)
