"""Folding a backbone for inference: batch norm into the convolutions, the input normalisation
into the stem, so the folded module takes raw pixel values (0..255).

The folded stem's outputs along the border, where the convolution reads its zero padding, get a
fixed correction (:class:`RawPixelStem`). The folding works on any module by registration order
and is checked against the unfolded one, so a backbone family needs nothing here.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import torch
from torch import nn

from pipeline.preprocessing import pixel_affine


def _conv_bn_pairs(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent, conv name, batch-norm name) for every Conv2d registered just before a BatchNorm2d."""
    pairs = []
    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            pairs.append((module, conv_name, bn_name))
    for _, child in children:
        pairs.extend(_conv_bn_pairs(child))
    return pairs


class NormalizeInput(nn.Module):
    """Raw pixel values (0..255) -> the normalised image a backbone was trained on (``pixel_affine``)."""

    scale: torch.Tensor  # buffers (1, 3, 1, 1), registered in __init__
    shift: torch.Tensor

    def __init__(self, preprocessing: dict) -> None:
        super().__init__()
        scale, shift = pixel_affine(preprocessing)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, pixels.float(), self.scale)


class RawPixelStem(nn.Module):
    """A backbone's first convolution, fed raw pixel values (0..255) instead of normalised ones.

    Normalisation is ``x * scale + shift`` per channel (``pixel_affine``). The scale folds into
    the weights and the shift into the bias exactly, except where the convolution reads its zero
    padding (a normalised zero is a raw ``255 mean``), so the outputs along the border get a fixed
    correction, found once per input size by convolving a constant image. A batch then needs
    no normalisation pass of its own: the uint8 images only change type.
    """

    def __init__(self, conv: nn.Conv2d, preprocessing: dict) -> None:
        super().__init__()
        self.reference = NormalizeInput(preprocessing), copy.deepcopy(conv)  # a tuple: not a submodule
        self.conv = copy.deepcopy(conv)
        scale, shift = pixel_affine(preprocessing)
        with torch.no_grad():
            # A convolution W of x * scale + shift is one of weights W * scale on x, plus the bias
            # sum(W * shift) per output channel (away from the padding).
            offset = (self.conv.weight * shift).sum(dim=(1, 2, 3))  # (C_out,)
            self.conv.weight.mul_(scale)
            if self.conv.bias is None:
                self.conv.bias = nn.Parameter(offset)
            else:
                self.conv.bias.add_(offset)
        self._borders: dict[tuple, list[tuple[tuple[slice, slice], torch.Tensor]]] = {}

    @torch.no_grad()
    def border_corrections(self, height: int, width: int) -> list[tuple[tuple[slice, slice], torch.Tensor]]:
        """((rows, cols), correction (C_out, h, w)) of the border regions of a ``height`` x
        ``width`` input whose outputs differ from the original convolution's."""
        device = self.conv.weight.device
        key = (height, width, str(device))
        if key not in self._borders:
            normalize, original = (part.to(device) for part in self.reference)
            blank = torch.zeros(1, 3, height, width, device=device)
            # In float32 even when first called under autocast: in bf16 the two convolutions'
            # rounding differs by more than the threshold below, everywhere, and the whole map
            # would count as border, adding rounding noise to every image.
            with torch.autocast(device.type, enabled=False):
                difference = (original(normalize(blank)) - self.conv(blank))[0]  # (C_out, h, w)
            significant = difference.abs().amax(dim=0) > 1e-4 * max(float(difference.abs().max()), 1e-12)
            h, w = significant.shape
            # The border's depth on each side, read along the middle column and row.
            rows, cols = significant[:, w // 2].tolist(), significant[h // 2, :].tolist()
            top, left = _run_length(rows), _run_length(cols)
            bottom, right = min(_run_length(rows[::-1]), h - top), min(_run_length(cols[::-1]), w - left)
            regions = [
                (slice(0, top), slice(0, w)),
                (slice(h - bottom, h), slice(0, w)),
                (slice(top, h - bottom), slice(0, left)),
                (slice(top, h - bottom), slice(w - right, w)),
            ]
            covered = torch.zeros_like(significant)
            for region in regions:
                covered[region] = True
            if (significant & ~covered).any():
                raise ValueError("the stem's output differs away from the border; its input cannot be folded")
            self._borders[key] = [
                (region, difference[:, region[0], region[1]].contiguous())
                for region in regions
                if region[0].stop > region[0].start and region[1].stop > region[1].start
            ]
        return self._borders[key]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.conv(pixels)  # (B, C_out, h, w)
        for (rows, cols), correction in self.border_corrections(*pixels.shape[-2:]):
            out[:, :, rows, cols] += correction.to(out.dtype)
        return out


def _run_length(flags: list[bool]) -> int:
    """How many leading ``flags`` are True."""
    return sum(1 for _ in itertools.takewhile(bool, flags))


def _first_rgb_conv(module: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, name) of the first registered convolution that reads 3 channels: the stem."""
    for path, child in module.named_modules():
        if path and isinstance(child, nn.Conv2d) and child.in_channels == 3 and child.groups == 1:
            parent, _, name = path.rpartition(".")
            return module.get_submodule(parent), name
    return None


@torch.no_grad()
def fuse_for_inference(module: nn.Module, preprocessing: dict) -> nn.Module:
    """A copy of ``module`` in eval mode for inference: each batch norm folded into the
    convolution before it, and the input normalisation of ``preprocessing`` folded into the
    stem, so **the copy takes raw pixel values** (0..255, in the dtype it will run in).

    Inference with frozen statistics makes ``BN(conv(x))`` one convolution with adjusted
    weights; on CPU this cuts a third or more of the backbone's time. timm's BatchNormAct2d
    keeps its activation. The folded stem (:class:`RawPixelStem`) saves a pass over every
    batch. Pairing is by registration order, so the result is checked against the original
    on a random batch; if they disagree, the original runs unfused behind a normalisation.
    """
    from timm.layers import BatchNormAct2d
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    original = module.eval()
    fused = copy.deepcopy(original)
    for parent, conv_name, bn_name in _conv_bn_pairs(fused):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity())
    found = _first_rgb_conv(fused)
    stem = None
    if found is None:
        fused = nn.Sequential(NormalizeInput(preprocessing), fused)
    else:
        stem = RawPixelStem(getattr(*found), preprocessing)
        setattr(*found, stem)
    unfused = nn.Sequential(NormalizeInput(preprocessing), original)
    # The pairing does not depend on the image size, so a small probe checks it at a fraction of the cost.
    resolution = preprocessing["resolution"]
    size = min(resolution, 64)
    pixels = 255 * torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected = unfused(pixels)
    try:
        got = fused(pixels)
        if stem is not None:
            stem.border_corrections(resolution, resolution)  # found once here, not in every worker
    except ValueError:
        got = None
    if got is None or not torch.allclose(expected, got, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
        warnings.warn(
            "folding batch norm and normalisation changed this backbone's output; running it unfused", stacklevel=2
        )
        return unfused
    return fused
