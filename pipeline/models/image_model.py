"""The end-to-end image model: a backbone trunk, avg+max pooling, the image head and the
label decoder, trained together when fine-tuning (``--mode finetune`` or ``partial``)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.backbones import NormalizeInput
from pipeline.models.decoder import LabelDecoder
from pipeline.models.heads import ImageHead


def pool_features(feature_map: torch.Tensor) -> torch.Tensor:
    """Average and max pooling concatenated: (B, C, h, w) -> (B, 2C).

    Max pooling keeps the evidence of small objects that the average washes out, which
    matters when an image holds several labels.
    """
    return torch.cat([feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3))], dim=1)


class ImageModel(nn.Module):
    """Trunk + avg/max pooling + image head + label decoder.

    The trunk is the whole backbone (input: images) or its trained tail (input: the frozen
    front's stage maps); either way it maps (B, C_in, H, W) to a feature map (B, C, h, w).
    """

    def __init__(self, trunk: nn.Module, head: ImageHead, decoder: LabelDecoder) -> None:
        super().__init__()
        self.trunk, self.head, self.decoder = trunk, head, decoder

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return pool_features(self.trunk(inputs))  # (B, 2C)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(inputs))  # (B, L)


class RawPixelGraph(nn.Module):
    """A frozen forward pass as one graph, for runtimes that compile it and for export: uint8
    pixels (B, 3, R, R) -> normalised -> ``module`` -> avg+max pooled features (B, 2C), or
    ``module``'s maps (B, C, h, w) when not ``pooled``."""

    def __init__(self, module: nn.Module, preprocessing: dict, pooled: bool) -> None:
        super().__init__()
        self.normalize, self.module, self.pooled = NormalizeInput(preprocessing), module, pooled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.module(self.normalize(pixels))  # (B, C, h, w)
        return pool_features(maps) if self.pooled else maps
