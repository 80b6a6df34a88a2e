"""The end-to-end image model: a backbone trunk, avg+max pooling, the image head and the
label decoder, trained together when fine-tuning (``--mode finetune`` or ``partial``)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.decoder import LabelDecoder
from pipeline.models.folding import NormalizeInput
from pipeline.models.heads import ClassAttention, ImageHead


def pool_features(feature_map: torch.Tensor) -> torch.Tensor:
    """Average and max pooling concatenated: (B, C, h, w) -> (B, 2C).

    Max pooling keeps the evidence of small objects that the average washes out, which
    matters when an image holds several labels.
    """
    return torch.cat([feature_map.mean(dim=(2, 3)), feature_map.amax(dim=(2, 3))], dim=1)


def pool_outputs(outputs: torch.Tensor) -> torch.Tensor:
    """A module's outputs as extraction keeps them: a map (B, C, h, w) avg+max pooled (B, 2C);
    rows a module pooled itself (:class:`AttentionPooled`: (B, 2C + L)) as they are."""
    return pool_features(outputs) if outputs.ndim == 4 else outputs


class AttentionPooled(nn.Module):
    """A backbone whose output is pooled inside: avg+max pooled features with the class
    attention's logits appended, images -> (B, 2C + L).

    Extraction keeps one row per image; a class attention needs the spatial map, which is not
    kept, so its logits are computed beside the pooling and kept in the same row.
    """

    def __init__(self, backbone: nn.Module, attention: ClassAttention) -> None:
        super().__init__()
        self.backbone, self.attention = backbone, attention

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(images)  # (B, C, h, w)
        pooled = pool_features(maps)  # (B, 2C)
        return torch.cat([pooled, self.attention(maps).to(pooled.dtype)], dim=1)  # (B, 2C + L)


class ImageModel(nn.Module):
    """Trunk + avg/max pooling + image head (+ class attention on the map) + label decoder.

    The trunk is the whole backbone (input: images) or its trained tail (input: the frozen
    front's stage maps); either way it maps (B, C_in, H, W) to a feature map (B, C, h, w).
    With ``attention`` (CSRA), its logits on the map are added to the head's (a residual: the
    attention starts at zero, so training starts from the head alone).
    """

    def __init__(
        self, trunk: nn.Module, head: ImageHead, decoder: LabelDecoder, attention: ClassAttention | None = None
    ) -> None:
        super().__init__()
        self.trunk, self.head, self.decoder, self.attention = trunk, head, decoder, attention

    def encode(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature map (B, C, h, w), avg+max pooled features (B, 2C))."""
        maps = self.trunk(inputs)
        return maps, pool_features(maps)

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode(inputs)[1]  # (B, 2C)

    def head_logits(self, maps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The image head's logits (B, L) of pooled ``features``, plus the class attention's
        of ``maps`` when there is one."""
        logits = self.head(features)
        return logits if self.attention is None else logits + self.attention(maps)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head_logits(*self.encode(inputs))  # (B, L)


class RawPixelGraph(nn.Module):
    """A frozen forward pass as one graph, for runtimes that compile it and for export: uint8
    pixels (B, 3, R, R) -> normalised -> ``module`` -> avg+max pooled features (B, 2C), or
    ``module``'s maps (B, C, h, w) when not ``pooled``."""

    def __init__(self, module: nn.Module, preprocessing: dict, pooled: bool) -> None:
        super().__init__()
        self.normalize, self.module, self.pooled = NormalizeInput(preprocessing), module, pooled

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = self.module(self.normalize(pixels))  # (B, C, h, w), or rows the module pooled itself
        return pool_outputs(maps) if self.pooled else maps
