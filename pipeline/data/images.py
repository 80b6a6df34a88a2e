"""Image decoding: any file Pillow reads becomes a bounded 8-bit RGB image, or a clear failure.

Decoding lives apart from the CSV reading in ``dataset.py``: training, feature extraction
and inference all read images through :class:`ImageDataset`.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.data.dataset import DatasetPaths

# Part of every feature-cache key (pipeline.features.cache_key): raised whenever decoding
# gives a file other pixels, so that features and stage maps cached from the old pixels are
# rebuilt rather than read. 2: EXIF orientation applied.
DECODE_VERSION = 2


def image_file_stat(path: Path) -> os.stat_result | None:
    """The status of ``path`` (a symlink followed) when it is a regular file, else None.

    Only a regular file can be an image: opening a FIFO blocks until something writes to it
    (a loader worker would wait forever), and a device, socket or directory holds no image.
    A name the file system refuses (longer than its limit, ENAMETOOLONG) or cannot reach is
    None as well, like a missing file, so the caller lists it among the unreadable images.
    """
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None
    return status if stat.S_ISREG(status.st_mode) else None


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of an image in any mode Pillow reads.

    ``convert("RGB")`` alone clips 16- and 32-bit greyscale at 255 (a white image) and drops
    transparency, leaving whatever colour hides under it; both are handled here.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        # Integer greyscale is taken as 16-bit (0..65535, as PNG stores it): 65535 / 257 = 255.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        # Float images have no fixed range: stretch their own minimum..maximum to 0..255.
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return Image.fromarray(np.rint(scaled).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Composite over neutral grey: transparent areas become featureless instead of
        # showing the arbitrary colour stored under alpha 0.
        background = Image.new("RGBA", image.size, (128, 128, 128, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def shrink(image: Image.Image, size: int) -> Image.Image:
    """Reduce an image much larger than ``size`` by an integer box filter, so that its short side
    stays at least ``2 * size``: the resize that follows then works on a bounded tensor."""
    factor = min(image.size) // (2 * size)
    return image.reduce(factor) if min(image.size) > 4 * size and factor >= 2 else image


class ImageDataset(torch.utils.data.Dataset):
    """Decoded, transformed images of a list of ImageIDs: item ``i`` is ``(tensor, i, readable)``.

    A missing or undecodable file, or one that is not a regular file (``image_file_stat``),
    yields a blank tensor with ``readable`` False instead of stopping the loader, so the
    caller decides: training lists the bad files and stops, inference falls back to the
    branches that need no image. So does an image over Pillow's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, 89.5 million pixels): decoding it could take gigabytes in
    every loader worker. An EXIF orientation is applied, so a phone photo is seen upright, as
    any viewer shows it, not as its sensor stored it. Any mode becomes 8-bit RGB
    (``to_rgb``), and a large image is reduced before the transform (``shrink``), so memory
    stays bounded.
    """

    def __init__(
        self, paths: DatasetPaths, image_ids: list[str], transform, size: int, blank_dtype: torch.dtype = torch.float32
    ) -> None:
        self.files = [paths.image_path(image_id) for image_id in image_ids]
        self.transform = transform
        self.size = size
        self.blank_dtype = blank_dtype  # the transform's output type (uint8 before normalisation)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        path = self.files[index]
        if image_file_stat(path) is None:
            return self._unreadable(index)
        try:
            with warnings.catch_warnings():
                # Pillow only warns between 1x and 2x its limit; refuse those too.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the
                    # output size: a large photo decodes several times faster, in less memory.
                    # The request is square, so the scale it picks is the same whichever way
                    # the photo is turned by the transpose that follows.
                    image.draft("RGB", (self.size, self.size))
                    ImageOps.exif_transpose(image, in_place=True)
                    rgb = shrink(to_rgb(image), self.size)
        except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
            return self._unreadable(index)
        return self.transform(rgb), index, True

    def _unreadable(self, index: int) -> tuple[torch.Tensor, int, bool]:
        return torch.zeros(3, self.size, self.size, dtype=self.blank_dtype), index, False


class ImageReadError(OSError):
    """Image files that are missing or cannot be decoded; the message lists them."""

    @classmethod
    def listing(cls, files: list[Path], hint: str = "") -> ImageReadError:
        shown = "\n  ".join(str(f) for f in files[:20])
        more = f"\n  ... and {len(files) - 20} more" if len(files) > 20 else ""
        return cls(f"{len(files)} image file(s) missing or unreadable:\n  {shown}{more}{hint}")
