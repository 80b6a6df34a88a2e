"""The image head, its losses, and the end-to-end image model used when fine-tuning."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class FeatureNorm(nn.Module):
    """Standardise features with the training set's per-dimension mean and std (B, D) -> (B, D).

    Pooled max and average features have very different scales; standardising them lets one
    learning rate suit both. The statistics are buffers, so they travel in the checkpoint.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit_chunks(self, chunks: Iterable[torch.Tensor]) -> FeatureNorm:
        """Fit the mean and (unbiased) std to row chunks (B, D) of any precision, summed in
        float64, so a feature set is standardised without ever being held in float32 at once."""
        count = 0
        total: torch.Tensor | float = 0.0
        squares: torch.Tensor | float = 0.0
        for chunk in chunks:
            values = chunk.double()
            count, total, squares = count + len(values), total + values.sum(0), squares + values.square().sum(0)
        if not isinstance(total, torch.Tensor):
            raise ValueError("FeatureNorm.fit_chunks: no feature chunks to fit the mean and std to")
        mean = total / count
        variance = (squares - count * mean.square()) / max(count - 1, 1)
        self.mean.copy_(mean.float())
        self.std.copy_(variance.clamp(min=0).sqrt().float().clamp(min=1e-6))
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class ImageHead(nn.Module):
    """Pooled features (B, D) -> one logit per label (B, L); a small MLP, or linear with ``hidden=0``.

    ``in_dim`` (D) and ``num_labels`` (L) say what it maps.
    """

    def __init__(self, in_dim: int, num_labels: int, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        self.in_dim, self.num_labels = in_dim, num_labels
        if hidden:
            self.net = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(in_dim, hidden),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_labels),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_labels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # (B, L)


class ClassAttention(nn.Module):
    """Class-specific residual attention (CSRA; Zhu & Wu, ICCV 2021): a feature map (B, C, h, w)
    -> one logit per label (B, L).

    Per label ``l``, scores ``s_l = W_l x`` at every position (a 1x1 convolution without bias);
    the logit is ``mean(s_l) + lam * sum(softmax(temperature * s_l) * s_l)``: the average-pooled
    logit plus an attention-pooled one that a small object (a traffic light, a bench) dominates
    at the positions where it shows. The weights start at zero, so the logits start at zero: added
    to the image head's, training starts from the head alone (``ImageModel``). ``lam`` and
    ``temperature`` are buffers, so they travel in the state dict and its digest.
    """

    lam: torch.Tensor
    temperature: torch.Tensor

    def __init__(self, channels: int, num_labels: int, lam: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__()
        self.channels, self.num_labels = channels, num_labels
        self.weight = nn.Parameter(torch.zeros(num_labels, channels))  # (L, C)
        self.register_buffer("lam", torch.tensor(float(lam)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        positions = feature_map.flatten(2).to(self.weight.dtype)  # (B, C, hw)
        scores = torch.matmul(self.weight, positions)  # (B, L, hw)
        attention = torch.softmax(self.temperature * scores, dim=2)  # (B, L, hw)
        return scores.mean(dim=2) + self.lam * (attention * scores).sum(dim=2)  # (B, L)


# Each name builds its loss: (logits (B, L), targets (B, L)) -> scalar. ASL is the asymmetric
# loss (Ridnik et al. 2021) of timm: multi-label data has many more negatives than positives
# per image, and ASL keeps them from dominating the gradient by down-weighting easy negatives
# (gamma_neg) and shifting their probability down by ``clip``; summed over labels, averaged
# over the batch ("batchmean"), in float32 whatever the autocast dtype.
def _asymmetric_loss() -> nn.Module:
    from timm.loss import AsymmetricLossMultiLabel  # here: importing the heads needs no timm

    return AsymmetricLossMultiLabel(gamma_neg=4.0, gamma_pos=0.0, clip=0.05, reduction="batchmean")


LOSSES = {"bce": nn.BCEWithLogitsLoss, "asl": _asymmetric_loss}


def get_loss(name: str):
    """A new instance of the multi-label loss ``name``; an unknown name lists the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]()
