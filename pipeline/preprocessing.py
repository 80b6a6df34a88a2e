"""How images become a backbone's input: the preprocessing description and its pixel affine.

A preprocessing is a plain JSON-serialisable dict (resolution, mean, std, interpolation,
resize), stored in every image checkpoint and in the feature-cache key. The backbones make it,
the data transforms resize and normalise by it, and the folded models take its normalisation
into their first convolution; it sits below all three so that none imports another for it.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resize filters a preprocessing may name (the transforms map them to torchvision's).
INTERPOLATIONS = ("bilinear", "bicubic")


def make_preprocessing(
    resolution: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bicubic"
) -> dict:
    """A JSON-serialisable description of how images become tensors."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: valid values are {', '.join(INTERPOLATIONS)}")
    return {
        "resolution": int(resolution),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": interpolation,
        # Whole image squeezed to a square: multi-label objects sit near the borders too,
        # so a centre crop would cut some of them away.
        "resize": "squash",
    }


def pixel_affine(preprocessing: dict, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1): ``pixels * scale + shift`` is the normalised image
    ``(pixels / 255 - mean) / std`` of raw pixel values 0..255, as one multiply-add."""
    mean = torch.tensor(preprocessing["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std
