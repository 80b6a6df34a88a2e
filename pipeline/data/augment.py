"""Training augmentation of a whole uint8 batch on the device it trains on.

Decoding and resizing stay in the loader workers; everything random happens here, after the
uint8 transfer, as a few batched kernels: a host with two cores per GPU then only decodes.

:class:`BatchAugment` gives each image a random mirror, a random scale jitter (a square window
of ``scale_jitter``..1 of the image's area, resized back to the full size) and, in ``trivial``
mode, one TrivialAugment operation (Müller & Hutter 2021) drawn from RandAugment's operation
space. The mirror, the window and the geometric operations (rotate, shear, translate) are one
affine map per image, so the whole batch is resampled once by ``F.affine_grid`` and
``F.grid_sample``; the photometric operations (:func:`photometric`) follow, each one run on the
whole batch with every image that did not draw it given the operation's identity parameter.

Every random number comes from a ``torch.Generator`` on the batch's device, so a step never
waits for the device (no ``.item()``, no host-built tensor per step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.choices import AUGMENTS

# TrivialAugment's operations over RandAugment's space, in draw order. Equalize is left out: its
# per-image histogram has no batched form without a host-side loop.
OPERATIONS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
)
# The strongest setting of each operation (RandAugment's, torchvision's ``RandAugment``), drawn
# uniformly from zero to it, with a random sign for the signed ones.
MAX_SHEAR = 0.3
MAX_ROTATE_DEGREES = 30.0
MAX_COLOR = 0.9  # brightness, colour, contrast and sharpness factors 1 +- 0.9
MAX_POSTERIZE_DROP = 4  # keep 8..4 bits
# A fifth of the image, not RandAugment's 150/331: a shift of nearly half the picture would take
# labelled objects near a border out of it, which a multi-label target cannot tell.
MAX_TRANSLATE = 0.2
GRAY = (0.2989, 0.587, 0.114)  # torchvision's (ITU-R 601-2 luma) weights


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=-3)
    return (r * GRAY[0] + g * GRAY[1] + b * GRAY[2]).unsqueeze(-3)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (images * ratio + other * (1.0 - ratio)).clamp_(0.0, 255.0)


def photometric(
    images: torch.Tensor,
    *,
    posterize: torch.Tensor,
    solarize: torch.Tensor,
    autocontrast: torch.Tensor,
    brightness: torch.Tensor,
    color: torch.Tensor,
    contrast: torch.Tensor,
    sharpness: torch.Tensor,
) -> torch.Tensor:
    """torchvision's (and PIL's) photometric operations with a parameter per image (each (B,)).

    ``images``: float (B, 3, H, W) holding whole pixel values 0..255. ``posterize``: bits kept
    (8: unchanged); ``solarize``: threshold from which values are inverted (256: unchanged);
    ``autocontrast``: bool, stretch each channel to 0..255; ``brightness``, ``color``
    (saturation), ``contrast``, ``sharpness``: blend factors (1: unchanged). Every identity
    parameter leaves an image exactly as it was, so an image given one operation gets that
    operation alone, whatever the order. Returns float values 0..255, unrounded.
    """

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(images.dtype).view(-1, 1, 1, 1)

    # Posterize first, while the values are still whole numbers: 8 bits is then exactly floor(x).
    step = torch.pow(2.0, 8.0 - per_image(posterize))
    out = torch.floor(images / step) * step
    out = torch.where(out >= per_image(solarize), 255.0 - out, out)
    low, high = out.amin(dim=(-2, -1), keepdim=True), out.amax(dim=(-2, -1), keepdim=True)  # (B, 3, 1, 1)
    flat = high == low  # torchvision leaves a flat channel as it is
    low = torch.where(flat, 0.0, low)
    scale = 255.0 / torch.where(flat, 255.0, high - low)
    out = torch.where(autocontrast.view(-1, 1, 1, 1), ((out - low) * scale).clamp_(0.0, 255.0), out)
    out = (out * per_image(brightness)).clamp_(0.0, 255.0)
    out = _blend(out, _grayscale(out), per_image(color))
    out = _blend(out, _grayscale(out).mean(dim=(-3, -2, -1), keepdim=True), per_image(contrast))
    # Sharpness blends with a 3x3 smoothing (1s around a 5, over 13) inside a one-pixel border
    # that stays as it is: the 3x3 sum is nine times the average pool.
    inner = out[..., 1:-1, 1:-1]
    smooth = (F.avg_pool2d(out, 3, stride=1) * 9.0 + inner * 4.0) / 13.0
    sharpened = out.clone()
    sharpened[..., 1:-1, 1:-1] = _blend(inner, smooth, per_image(sharpness))
    return sharpened


class BatchAugment:
    """The random training augmentation of a uint8 batch (B, 3, H, W), on its device.

    ``mode``: ``trivial`` (mirror, scale jitter and one TrivialAugment operation per image),
    ``light`` (mirror and scale jitter) or ``none`` (the batch unchanged). Returns float32
    pixel values 0..255 (or, with ``none``, the batch itself) for ``normalize_batch``. The
    generator's state is the ``state_dict``, so a resumed run draws what the uninterrupted
    one would have.
    """

    def __init__(self, mode: str, device: torch.device, scale_jitter: float = 0.7, seed: int = 0) -> None:
        if mode not in AUGMENTS:
            raise ValueError(f"--augment {mode!r}: valid values are {', '.join(AUGMENTS)}")
        if not 0.0 < scale_jitter <= 1.0:
            raise ValueError(f"--scale-jitter must be in (0, 1], got {scale_jitter}")
        self.mode, self.device, self.scale_jitter = mode, torch.device(device), scale_jitter
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return images
        # Resampling in bf16 or fp16 would round pixel values by more than one level.
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        device = images.device
        uniform = torch.rand(batch, 6, generator=self.generator, device=device)  # (B, 6)
        mirror = torch.where(uniform[:, 0] < 0.5, -1.0, 1.0)
        side = torch.sqrt(self.scale_jitter + (1.0 - self.scale_jitter) * uniform[:, 1])  # of the window
        # The window's centre, in normalised coordinates (-1..1), anywhere its samples stay within
        # the outermost pixel centres (beyond them the resampling would blend in the zero padding).
        reach = 1.0 - side
        centre_x = (2.0 * uniform[:, 2] - 1.0) * reach * (1.0 - 1.0 / width)
        centre_y = (2.0 * uniform[:, 3] - 1.0) * reach * (1.0 - 1.0 / height)
        magnitude = uniform[:, 4]
        signed = torch.where(uniform[:, 5] < 0.5, -magnitude, magnitude)
        if self.mode == "trivial":
            operation = torch.randint(len(OPERATIONS), (batch,), generator=self.generator, device=device)
        else:
            operation = torch.zeros(batch, dtype=torch.long, device=device)  # identity

        def drawn(name: str, value: torch.Tensor, identity: float) -> torch.Tensor:
            return torch.where(operation == OPERATIONS.index(name), value, identity)

        angle = drawn("rotate", signed * math.radians(MAX_ROTATE_DEGREES), 0.0)
        shear_x, shear_y = drawn("shear_x", signed * MAX_SHEAR, 0.0), drawn("shear_y", signed * MAX_SHEAR, 0.0)
        shift_x = drawn("translate_x", signed * (2.0 * MAX_TRANSLATE), 0.0)  # normalised units: 2 = the image
        shift_y = drawn("translate_y", signed * (2.0 * MAX_TRANSLATE), 0.0)

        # Where output pixel p (normalised) samples the input: geometry(window(mirror(p))). In
        # pixel units the geometry is rotation times shear; converting to normalised units scales
        # the off-diagonal terms by the aspect ratio.
        cos, sin = torch.cos(angle), torch.sin(angle)
        m00, m01 = cos - sin * shear_y, cos * shear_x - sin
        m10, m11 = sin + cos * shear_y, sin * shear_x + cos
        aspect = height / width
        theta = torch.stack(
            [
                side * mirror * m00,
                side * m01 * aspect,
                m00 * centre_x + m01 * aspect * centre_y + shift_x,
                side * mirror * m10 / aspect,
                side * m11,
                m10 / aspect * centre_x + m11 * centre_y + shift_y,
            ],
            dim=1,
        ).view(batch, 2, 3)
        grid = F.affine_grid(theta, [batch, 3, height, width], align_corners=False)
        # Rounded back to whole pixel values, as torchvision's uint8 kernels leave them.
        out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).round_()
        if self.mode != "trivial":
            return out
        factor = 1.0 + signed * MAX_COLOR
        return photometric(
            out,
            posterize=drawn("posterize", 8.0 - torch.round(magnitude * MAX_POSTERIZE_DROP), 8.0),
            solarize=drawn("solarize", 255.0 * (1.0 - magnitude), 256.0),
            autocontrast=operation == OPERATIONS.index("autocontrast"),
            brightness=drawn("brightness", factor, 1.0),
            color=drawn("color", factor, 1.0),
            contrast=drawn("contrast", factor, 1.0),
            sharpness=drawn("sharpness", factor, 1.0),
        )
