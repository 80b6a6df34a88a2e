"""The training loop every branch shares: :func:`train_one_epoch` runs one epoch and
:func:`fit` runs the epochs, keeping the best one, stopping early and saving the resume
state. The image head, the label decoder, partial and end-to-end fine-tuning and every
caption model train through these two functions.

Device and precision are decided by the caller once and passed in; nothing here calls
``.cuda()``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from pipeline.engine.distributed import DistContext, broadcast_flags, mean_across_ranks, unwrap
from pipeline.engine.history import EpochHistory
from pipeline.engine.resume import ResumeState

ModelT = TypeVar("ModelT", bound=nn.Module)
# A step's loss from (model, batch): the step's own model class; batches are tuples of tensors
# already on the device, each loss reading its own layout (inputs, targets[, captions]).
StepLoss = Callable[[ModelT, Any], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; names the epoch and step."""


class ModelEma(nn.Module, Generic[ModelT]):
    """An exponential moving average of a model's weights (``module``), timm's ModelEmaV3
    with this project's warm-up, updated with one fused op on tensor lists built once.

    V3's warm-up with ``warmup_gamma=9, warmup_power=1`` gives the ``n``-th update the decay
    ``1 - (1 + (n - 1) / 9) ** -1 = (n - 1) / (n + 8)``, capped at ``decay``: the first
    update copies the model, and from there the decay is the ``(1 + t) / (10 + t)`` this
    loop used before, one update later (0.9174 against 0.9182 at update 100, 0.9823 at 500,
    0.9955 at 2,000). The average follows the trained weights closely early on instead of
    holding on to the random initial head (at a fixed 0.999, 82% of the initial weights
    remain after 200 updates). V3's default warm-up (gamma 1, power 2/3) would be at 0.954
    already at update 100. Each update is one ``torch._foreach_lerp_`` over the float
    tensors (weights and batch-norm statistics; integer buffers are copied), with no host
    sync, over lists of the tensors themselves made at the first update: timm's V3 builds
    both models' ``state_dict()`` again at every update, milliseconds of host work a step.
    ``tests/test_finetune.py`` checks it equals V3. The update count travels in
    ``state_dict`` (as extra state), so a resumed run continues the warm-up where it stopped.
    Without ``warmup`` every update uses ``decay``.
    """

    WARMUP_GAMMA, WARMUP_POWER = 9.0, 1.0

    def __init__(self, model: ModelT, decay: float = 0.9998, warmup: bool = True) -> None:
        super().__init__()
        self.module: ModelT = copy.deepcopy(model).eval()
        self.decay, self.use_warmup = decay, warmup
        self.updates = 0
        for param in self.module.parameters():
            param.requires_grad_(False)
        # (the model averaged, EMA floats, model floats, EMA integers, model integers)
        self._lists: tuple[nn.Module, list, list, list, list] | None = None

    def get_decay(self, update: int | None = None) -> float:
        """The decay of the ``update``-th update (1-based; None: ``decay``), as V3 computes it."""
        if update is None:
            return self.decay
        steps = update - 1
        if steps <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        return max(min(1.0 - (1.0 + steps / self.WARMUP_GAMMA) ** -self.WARMUP_POWER, self.decay), 0.0)

    def current_decay(self) -> float:
        """The decay of the latest update (of the first one, before any)."""
        return self.get_decay(max(self.updates, 1) if self.use_warmup else None)

    def _tensor_lists(self, model: nn.Module) -> tuple[nn.Module, list, list, list, list]:
        # keep_vars: the parameters and buffers themselves, not detached views of their
        # storage at this moment, so the lists stay valid if a tensor's data is replaced.
        ema_state, model_state = self.module.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        if list(ema_state) != list(model_state):
            raise ValueError("ModelEma.update: the model's tensors are not those the average was made of")
        floats = [(ema_state[k], model_state[k]) for k in ema_state if ema_state[k].is_floating_point()]
        others = [(ema_state[k], model_state[k]) for k in ema_state if not ema_state[k].is_floating_point()]
        return (model, [e for e, _ in floats], [m for _, m in floats], [e for e, _ in others], [m for _, m in others])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        if self._lists is None or self._lists[0] is not model:
            self._lists = self._tensor_lists(model)
        _, ema_floats, model_floats, ema_others, model_others = self._lists
        decay = self.get_decay(self.updates if self.use_warmup else None)
        torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
        if ema_others:
            torch._foreach_copy_(ema_others, model_others)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def get_extra_state(self) -> dict:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict) -> None:
        self.updates = int(state["updates"])


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    new_modules: tuple[str, ...] = (),
    new_lr_scale: float = 1.0,
    lr_scales: Sequence[tuple[Sequence[nn.Parameter], float]] = (),
) -> list[dict]:
    """AdamW parameter groups: timm's ``param_groups_weight_decay`` (no weight decay on norms
    and biases, the one-dimensional tensors, whose decay only fights the normalisation), each
    split by learning rate: ``new_lr_scale`` times ``lr`` for the freshly initialised
    submodules named in ``new_modules`` (the head and decoder learn from scratch while the
    pretrained backbone only adapts); for the rest, ``scale`` times ``lr`` for the parameters
    of each ``(parameters, scale)`` of ``lr_scales`` (layer-wise decay: a backbone stage's
    scale), ``lr`` for any other. Each group records its ``lr_scale`` (timm's key), so the
    schedule's base rate can be read back from any group. Groups come in order of first appearance."""
    from timm.optim import param_groups_weight_decay  # here: importing the loop needs no timm

    new = {id(param) for name, param in model.named_parameters() if name.split(".", 1)[0] in new_modules}
    scale_of = {id(param): scale for params, scale in lr_scales for param in params}
    groups: dict[tuple[float, float], dict] = {}
    for is_new in (False, True):
        for group in param_groups_weight_decay(model, weight_decay):
            for param in group["params"]:
                if (id(param) in new) != is_new:
                    continue
                scale = new_lr_scale if is_new else scale_of.get(id(param), 1.0)
                key = (scale, group["weight_decay"])
                if key not in groups:
                    groups[key] = {**group, "params": [], "lr": lr * scale, "lr_scale": scale}
                groups[key]["params"].append(param)
    return list(groups.values())


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """The learning rate for ``global_batch`` from one given for ``reference_batch``: square-root
    scaling, timm's rule for adaptive optimisers such as AdamW."""
    return base_lr * math.sqrt(global_batch / reference_batch)


def _to_device(
    batch: Iterable[torch.Tensor], device: torch.device, host_inputs: tuple[int, ...] = ()
) -> tuple[torch.Tensor, ...]:
    return tuple(t if i in host_inputs else t.to(device, non_blocking=True) for i, t in enumerate(batch))


class TrainStep(nn.Module, Generic[ModelT]):
    """A model and its loss in one ``forward(*batch) -> loss``.

    DistributedDataParallel synchronises gradients of what runs inside its ``forward``; a
    loss that calls a model method other than ``forward`` (the decoder's teacher-forced
    ``loss``) is only synchronised when the whole step runs inside this wrapper.
    ``host_inputs`` are the batch positions :func:`train_one_epoch` leaves on the CPU (a
    caption batch's lengths, which ``pack_padded_sequence`` reads there).
    """

    def __init__(self, model: ModelT, step_loss: StepLoss[ModelT], host_inputs: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.model = model
        self.step_loss = step_loss
        self.host_inputs = host_inputs

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.step_loss(self.model, batch)


def epoch_loader(
    dataset: Dataset,
    global_batch: int,
    context: DistContext,
    shuffle: bool,
    seed: int,
    workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    option: str = "--batch-size",
    sampler: Sampler | None = None,
    collate: Callable[[list], Any] | None = None,
) -> DataLoader:
    """Batches of this rank's share of ``dataset``, reshuffled each epoch by :func:`train_one_epoch`.

    The sampler draws one permutation per epoch from ``seed`` and gives rank ``r`` every
    ``N``-th index from ``r``, so the union of the ranks' ``k``-th batches is the ``k``-th
    batch a single process draws: the same global batches on 1 or N processes. Worker
    processes persist across epochs (starting them again every epoch costs seconds of
    GPU idle time) and keep batches prefetched. ``collate`` makes a batch of items (default:
    torch's ``default_collate``).
    """
    if sampler is None:
        sampler = DistributedSampler(
            dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return DataLoader(
        dataset,
        batch_size=context.local_batch_size(global_batch, option),
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def validation_workers(train_workers: int) -> int:
    """Loader workers for a validation pass: the training loader's count, at most 2.

    A validation pass runs once an epoch over a small split (or once in all, when
    :func:`validation_batches` keeps it on the device); a few workers keep its batches
    ready, while as many workers as training, kept alive between passes, would hold their
    memory and dataset copies through every training step in between.
    """
    return max(0, min(train_workers, 2))


# Validation batches are kept on the device when the split takes at most this much memory there.
RESIDENT_MAX_BYTES = 2 * 2**30


class ResidentBatches:
    """The batches of a validation split, read once and kept on the device: each later pass
    slices them there, with no decoding, no transfer and no host sync, where a loader would
    decode every image again each epoch with the GPU idle meanwhile. Made by
    :func:`validation_batches`; iterates like a loader (a tuple of tensors per batch)."""

    def __init__(self, tensors: list[torch.Tensor], batch_size: int) -> None:
        self.tensors, self.batch_size = tensors, batch_size
        self.rows = len(tensors[0]) if tensors else 0

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, self.rows, self.batch_size):
            yield tuple(t[start : start + self.batch_size] for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def validation_batches(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    collate: Callable[[list], Any] | None = None,
    pin_memory: bool = False,
    max_bytes: int = RESIDENT_MAX_BYTES,
) -> ResidentBatches | DataLoader:
    """Batches of ``dataset`` for a validation pass every epoch: :class:`ResidentBatches`
    when the whole split fits in ``max_bytes`` (judged by its first batch), filled by one pass
    of a loader with ``workers``; else a loader whose workers persist between passes."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"validation batches need a dataset with a length; {type(dataset).__name__} has none")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=validation_workers(workers),
        collate_fn=collate,
        pin_memory=pin_memory,
    )
    batches = iter(loader)
    first = next(batches, None)
    if first is None:
        return ResidentBatches([], batch_size)
    per_row = sum(t[:1].numel() * t.element_size() for t in first)
    if per_row * len(dataset) > max_bytes:
        workers = validation_workers(workers)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=workers > 0,
        )
    # Each tensor's rows keep the batch's layout (channels_last images stay so).
    kept = [
        torch.empty_strided((len(dataset), *t.shape[1:]), t.stride(), dtype=t.dtype, device=device)
        if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
        else torch.empty((len(dataset), *t.shape[1:]), dtype=t.dtype, device=device)
        for t in first
    ]
    done = 0
    for batch in (first, *batches):
        for target, part in zip(kept, batch, strict=True):
            target[done : done + len(part)].copy_(part, non_blocking=True)
        done += len(batch[0])
    return ResidentBatches(kept, batch_size)


def warm_up(
    step: nn.Module,
    batch: Sequence[torch.Tensor],
    device: torch.device,
    autocast=None,
    guard: Callable[[Callable[[], Any]], Any] | None = None,
    keep: Sequence[Any] = (),
) -> None:
    """One forward and backward of ``batch`` through ``step`` (a :class:`TrainStep`) before the
    clock of the first epoch starts, inside ``guard`` (the compile fallback's, so a failure in
    the lazily compiled backward falls back to eager): the compilation, cuDNN's algorithm
    search and the first allocations happen here, and every epoch's time is steady state.

    Training then goes on as if it had not run: no optimizer step, the gradients cleared, the
    model's buffers (batch-norm statistics), the random generators and the ``state_dict`` of
    each of ``keep`` (the augmentation's generator) restored."""
    model = unwrap(step).get_submodule("model")
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    kept = [(stateful, copy.deepcopy(stateful.state_dict())) for stateful in keep]
    autocast = autocast or contextlib.nullcontext
    host_inputs = getattr(unwrap(step), "host_inputs", ())
    batch = _to_device(batch, device, host_inputs)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []

    def forward_backward() -> None:
        step.train()
        with autocast():
            loss = step(*batch)
        loss.backward()
        step.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=cuda):
        (guard or (lambda run: run()))(forward_backward)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)
    for stateful, state in kept:
        stateful.load_state_dict(state)


def first_batch(loader: DataLoader) -> tuple[torch.Tensor, ...]:
    """The first ``loader.batch_size`` items of its dataset (all, if fewer), as the loader's
    collate makes a batch: the shape every training batch has (drop_last keeps them full)."""
    dataset = loader.dataset
    if loader.batch_size is None or not isinstance(dataset, Sized):
        raise TypeError("first_batch needs a loader with a batch_size over a dataset with a length")
    indices = list(range(min(loader.batch_size, len(dataset))))
    items = dataset.__getitems__(indices) if hasattr(dataset, "__getitems__") else [dataset[i] for i in indices]
    return tuple(loader.collate_fn(items))


def _check_finite(first_bad: torch.Tensor, epoch: int, bad_loss: torch.Tensor, name: str) -> None:
    """Raise if a step's loss was NaN or infinite (one host sync, done every few steps)."""
    step = int(first_bad.item())
    if step >= 0:
        prefix = f"{name}: " if name else ""
        raise NonFiniteLossError(
            f"{prefix}loss is {bad_loss.item()} at epoch {epoch}, step {step}: "
            "lower the learning rate or check the data"
        )


def train_one_epoch(
    step: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    scheduler=None,
    autocast=None,
    grad_clip: float | None = None,
    ema: ModelEma | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: bool = True,
    context: DistContext = DistContext(),
    sync_every: int = 50,
    name: str = "",
) -> float:
    """One pass over ``loader`` with ``step(*batch) -> loss`` (a :class:`TrainStep`, maybe in DDP).

    Returns the mean loss over every rank's samples. A non-finite loss stops training
    with an error naming the epoch and step. The loss is summed on the device and read
    back once every ``sync_every`` steps (for the check and the progress bar), so the
    host never waits for the GPU in between. Every step goes through ``scaler``, a
    ``torch.amp.GradScaler`` enabled for fp16 (:func:`~pipeline.engine.runtime.grad_scaler`);
    disabled, or None, it passes the loss and the step through unchanged. ``name`` labels
    the progress bar and the error.
    """
    step.train()
    if scaler is None:
        scaler = torch.amp.GradScaler(device.type, enabled=False)
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if set_epoch is not None:  # a sampler that shuffles anew each epoch (DistributedSampler)
        set_epoch(epoch)
    autocast = autocast or contextlib.nullcontext
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    # Index of the first non-finite step (-1: none yet) and that loss, kept on the device.
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)
    host_inputs = getattr(unwrap(step), "host_inputs", ())
    bar = tqdm(loader, desc=f"{name} epoch {epoch}".strip(), leave=False, disable=not (progress and context.is_main))
    for index, batch in enumerate(bar):
        batch = _to_device(batch, device, host_inputs)
        with autocast():
            loss = step(*batch)
        new_bad = (first_bad < 0) & ~torch.isfinite(loss.detach())
        first_bad.masked_fill_(new_bad, index)
        bad_loss = torch.where(new_bad, loss.detach().float(), bad_loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(step.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(unwrap(step).get_submodule("model"))
        total += loss.detach().double() * len(batch[0])
        count += len(batch[0])
        if (index + 1) % sync_every == 0:
            _check_finite(first_bad, epoch, bad_loss, name)
            bar.set_postfix(loss=f"{(total / count).item():.4f}", refresh=False)
    _check_finite(first_bad, epoch, bad_loss, name)
    return mean_across_ranks(total, count, context)


@torch.inference_mode()
def predict_probs(model: nn.Module, loader: Iterable, device: torch.device) -> np.ndarray:
    """Sigmoid of the model's logits for the first tensor of every batch: (N, L)."""
    model.eval()
    parts = [torch.sigmoid(model(batch[0].to(device, non_blocking=True)).float()).cpu() for batch in loader]
    return torch.cat(parts).numpy()


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to zero, stepped once per update: the one schedule of
    every branch, torch's ``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``.

    Update ``i`` (from 0) runs at ``(i + 1) / warmup_steps`` of each group's learning rate
    during the warm-up, reaching it at update ``warmup_steps - 1``; then at
    ``(1 + cos(pi * k / (total_steps - warmup_steps))) / 2`` at ``k`` updates after the
    warm-up: half at half-way, zero after ``total_steps``. ``warmup_steps`` 0 is the
    cosine alone.
    """
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=max(warmup_steps - 1, 1)
    )
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


@dataclass
class EpochScore:
    """One epoch's validation score (higher is better) and what to keep if it is the best.

    ``value`` None means there is nothing to score on (no validation split): the last
    epoch is kept.
    """

    value: float | None
    kept: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def fit(
    name: str,
    epochs: int,
    train_epoch: Callable[[int], float],
    score: Callable[[int], EpochScore],
    scored: nn.Module,
    resume: ResumeState,
    resumable: dict[str, Any],
    patience: int | None = None,
    context: DistContext = DistContext(),
    epoch_bar: bool = False,
    history: EpochHistory | None = None,
) -> dict[str, Any]:
    """Train for ``epochs`` epochs and keep the best: the one shared epoch loop of every branch.

    Each epoch runs ``train_epoch(epoch) -> mean loss``, then ``score(epoch)``; the weights
    of ``scored`` (the model, or its EMA) at the best score are kept and loaded back into
    ``scored`` at the end. ``patience`` stops after that many epochs without a better
    score. After every epoch the ``resumable`` states (model, optimizer, scheduler, ...)
    and the best so far are saved through ``resume``, so ``--resume`` continues an
    interrupted run with the result of an uninterrupted one. ``history`` gets a row per
    epoch: the loss, the score, the schedule's base learning rate at the epoch's first update
    (a group's rate over its ``lr_scale``), and the epoch's seconds.

    Returns ``{"epoch": best epoch, "score": its value, **its kept values}``. Whether an
    epoch is the best and whether to stop are rank 0's decisions, broadcast to every rank, so
    all keep the same epoch and stop together.
    """
    first, best = resume.begin(resumable, None, epochs)
    if history is not None:
        history.begin(first)
    optimizer = resumable.get("optimizer")
    say = tqdm.write if context.is_main else (lambda _: None)
    epoch_range = range(first, epochs + 1)
    with resume.writing_behind():  # each epoch's state is written while the next one trains
        for epoch in tqdm(epoch_range, desc=name, unit="epoch", disable=not (epoch_bar and context.is_main)):
            started = time.perf_counter()
            group = optimizer.param_groups[0] if optimizer is not None else None
            lr = group["lr"] / group.get("lr_scale", 1.0) if group is not None else None  # the base rate
            loss = train_epoch(epoch)
            result = score(epoch)
            if history is not None:
                history.record(epoch, loss, result.value, lr, time.perf_counter() - started)
                history.keep_if_among_best(epoch, result.value, scored)
            improved = best is None or result.value is None or result.value > best["score"]
            stop = patience is not None and not improved and epoch - best["epoch"] >= patience
            # Rank 0 decides: scores that differ in the last bit between ranks must not split them.
            improved, stop = broadcast_flags([improved, stop], context)
            if improved:
                best = {
                    "epoch": epoch,
                    "score": result.value,
                    **result.kept,
                    "state": {k: v.detach().cpu().clone() for k, v in scored.state_dict().items()},
                }
            say(
                f"{name} epoch {epoch}/{epochs}: loss {loss:.4f}"
                + (f", {result.message}" if result.message else "")
                + (" (best)" if improved and result.value is not None else "")
            )
            resume.end_epoch(epoch, best, finished=stop)
            if stop:
                say(f"{name}: no better validation score for {patience} epochs; stopping")
                break
    best = dict(best)
    scored.load_state_dict(best.pop("state"))
    return best
