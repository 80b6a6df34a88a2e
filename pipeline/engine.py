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
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from pipeline.distributed import DistContext, mean_across_ranks, unwrap

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


class TrainStep(nn.Module):
    """A model and its loss in one ``forward(*batch) -> loss``.

    DistributedDataParallel synchronises gradients of what runs inside its ``forward``; a
    loss that calls a model method other than ``forward`` (the decoder's teacher-forced
    ``loss``) is only synchronised when the whole step runs inside this wrapper.
    """

    def __init__(self, model: nn.Module, step_loss: StepLoss) -> None:
        super().__init__()
        self.model = model
        self.step_loss = step_loss

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.step_loss(self.model, batch)


def epoch_loader(dataset: Dataset, global_batch: int, context: DistContext, shuffle: bool, seed: int,
                 workers: int = 0, pin_memory: bool = False, drop_last: bool = False,
                 option: str = "--batch-size") -> DataLoader:
    """Batches of this rank's share of ``dataset``, reshuffled each epoch by :func:`train_one_epoch`.

    The sampler draws one permutation per epoch from ``seed`` and gives rank ``r`` every
    ``N``-th index from ``r``, so the union of the ranks' ``k``-th batches is the ``k``-th
    batch a single process draws: the same global batches on 1 or N processes.
    """
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=context.local_batch_size(global_batch, option), sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, drop_last=drop_last,
                      persistent_workers=False)


def train_one_epoch(step: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device,
                    epoch: int, scheduler=None, autocast=None, grad_clip: float | None = None,
                    ema: ModelEma | None = None, progress: bool = True,
                    context: DistContext = DistContext()) -> float:
    """One pass over ``loader`` with ``step(*batch) -> loss`` (a :class:`TrainStep`, maybe in DDP).

    Returns the mean loss over every rank's samples. A non-finite loss stops training
    with an error naming the epoch and step.
    """
    step.train()
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    autocast = autocast or contextlib.nullcontext
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not (progress and context.is_main))
    for index, batch in enumerate(bar):
        batch = _to_device(batch, device)
        with autocast():
            loss = step(*batch)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch}, step {index}: lower --lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(step.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(unwrap(step).model)
        total += loss.item() * len(batch[0])
        count += len(batch[0])
    return mean_across_ranks(total, count, context)


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
