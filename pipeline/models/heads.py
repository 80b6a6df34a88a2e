"""The image head, its losses, and the end-to-end image model used when fine-tuning."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F


class FeatureNorm(nn.Module):
    """Standardise features with the training set's per-dimension mean and std (B, D) -> (B, D).

    Pooled max and average features have very different scales; standardising them lets one
    learning rate suit both. The statistics are buffers, so they travel in the checkpoint.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> FeatureNorm:
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_(features.std(dim=0).clamp(min=1e-6))
        return self

    @torch.no_grad()
    def fit_chunks(self, chunks: Iterable[torch.Tensor]) -> FeatureNorm:
        """:meth:`fit` over row chunks (B, D) of any precision, summed in float64, so a
        feature set is standardised without ever being held in float32 at once."""
        count, total, squares = 0, 0.0, 0.0
        for chunk in chunks:
            values = chunk.double()
            count, total, squares = count + len(values), total + values.sum(0), squares + values.square().sum(0)
        mean = total / count
        variance = (squares - count * mean.square()) / max(count - 1, 1)
        self.mean.copy_(mean.float())
        self.std.copy_(variance.clamp(min=0).sqrt().float().clamp(min=1e-6))
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class ImageHead(nn.Module):
    """Pooled features (B, D) -> one logit per label (B, L); a small MLP, or linear with ``hidden=0``."""

    def __init__(self, in_dim: int, num_labels: int, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        if hidden:
            self.net = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(),
                nn.Dropout(dropout), nn.Linear(hidden, num_labels),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_labels))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)  # (B, L)


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al. 2021): easy negatives down-weighted and shifted.

    Multi-label data has many more negatives than positives per image; ASL keeps them from
    dominating the gradient.
    """
    probs = torch.sigmoid(logits)
    probs_neg = (probs - clip).clamp(min=0) if clip > 0 else probs  # shifted negatives
    loss_pos = targets * torch.log(probs.clamp(min=1e-8)) * (1 - probs) ** gamma_pos
    loss_neg = (1 - targets) * torch.log((1 - probs_neg).clamp(min=1e-8)) * probs_neg ** gamma_neg
    return -(loss_pos + loss_neg).sum(dim=1).mean()


LOSSES = {
    "bce": lambda logits, targets: F.binary_cross_entropy_with_logits(logits, targets),
    "asl": asymmetric_loss,
}


def get_loss(name: str):
    """The multi-label loss by name; an unknown name lists the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]
