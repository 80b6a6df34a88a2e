"""The training loop pieces shared by every branch: one epoch, prediction, EMA.

Device and precision are decided by the caller once and passed in; nothing here calls
``.cuda()``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

# A step's loss from (model, batch); batches are tuples of tensors already on the device.
StepLoss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; names the epoch and step."""


class ModelEma:
    """Exponential moving average of a model's weights, evaluated instead of the raw weights."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.detach(), 1.0 - self.decay)
            else:
                ema_value.copy_(value)


def _to_device(batch: Iterable[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in batch)


def train_one_epoch(model: nn.Module, loader: Iterable, step_loss: StepLoss, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, scheduler=None, autocast=None,
                    grad_clip: float | None = None, ema: ModelEma | None = None,
                    progress: bool = True) -> float:
    """One pass over ``loader``; returns the mean loss. A non-finite loss stops training."""
    model.train()
    autocast = autocast or contextlib.nullcontext
    total, count = 0.0, 0
    for step, batch in enumerate(tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)):
        batch = _to_device(batch, device)
        with autocast():
            loss = step_loss(model, batch)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, step {step}: lower --lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        total += loss.item() * len(batch[0])
        count += len(batch[0])
    return total / max(count, 1)


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: Iterable, device: torch.device, autocast=None) -> np.ndarray:
    """Sigmoid of the model's logits for the first tensor of every batch: (N, L)."""
    model.eval()
    autocast = autocast or contextlib.nullcontext
    parts = []
    for batch in loader:
        inputs = batch[0].to(device, non_blocking=True)
        with autocast():
            parts.append(torch.sigmoid(model(inputs).float()).cpu())
    return torch.cat(parts).numpy()


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to zero, stepped once per batch."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
