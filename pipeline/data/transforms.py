"""The one image transform factory used by training, feature extraction and inference.

Preprocessing is a plain dict (``pipeline.preprocessing.make_preprocessing``) stored in
every image checkpoint and in the feature-cache key, so inference resizes and normalises
exactly as training did.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from pipeline.preprocessing import pixel_affine

_INTERPOLATIONS = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def build_transform(
    preprocessing: dict, flip: bool = False, normalize: bool = True
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, R, R), or with ``normalize=False`` the resized
    uint8 tensor, to be normalised a batch at a time by :func:`normalize_batch`.

    The whole image is squashed to the square, for training as for evaluation: a multi-label
    target describes the whole image, and a crop can cut a labelled object out. Training's
    random augmentation runs on the device, a batch at a time
    (:class:`pipeline.data.augment.BatchAugment`), so loader workers only decode and resize.
    ``flip`` mirrors every image (the second view of flip test-time augmentation).
    """
    size = preprocessing["resolution"]
    interpolation = _INTERPOLATIONS[preprocessing["interpolation"]]
    steps: list = [T.ToImage(), T.Resize((size, size), interpolation=interpolation, antialias=True)]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=1.0))
    if normalize:
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(preprocessing["mean"], preprocessing["std"])]
    return T.Compose(steps)


def normalize_batch(images: torch.Tensor, preprocessing: dict) -> torch.Tensor:
    """uint8 images (B, 3, R, R) -> normalised float32, as ``build_transform`` would have made them.

    One fused pass over a whole batch costs a fraction of normalising image by image, and a
    uint8 batch is a quarter of the bytes to move between processes or to the GPU.
    """
    scale, shift = _device_affine(tuple(preprocessing["mean"]), tuple(preprocessing["std"]), images.device)
    return torch.addcmul(shift, images.float(), scale)


@functools.lru_cache(maxsize=16)
def _device_affine(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (constants, device): torch.tensor(list, device=cuda) is a host-to-device
    # copy that would otherwise run in every training step.
    return pixel_affine({"mean": list(mean), "std": list(std)}, device)


def stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 images (3, R, R) -> a batch (B, 3, R, R) laid out channels_last.

    Decoded and resized images already lie channel-last in memory (as Pillow and the uint8
    resize make them), so stacking them that way is a plain copy, and the batch can go to a
    channels_last model with a type change only; ``torch.stack`` would transpose every image.
    """
    return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
