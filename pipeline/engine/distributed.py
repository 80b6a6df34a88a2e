"""Multi-process training under ``torchrun``: process group, DDP wrapping, sharding, reductions.

The training scripts run unchanged under ``torchrun --nproc_per_node N`` (and multi-node):
``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, :func:`distributed_session` joins the
process group (NCCL on GPUs, gloo on CPU) and everything else asks the returned
:class:`DistContext`. Without ``torchrun`` the context is a single process and every helper
here is a no-op, so the single-process path is the same code.

``--batch-size`` stays the *global* batch: each of N processes takes 1/N of every batch, so
a run gives the same result (up to float rounding) on 1 or N processes.

Every collective in the package goes through this module and puts its tensors on
``context.device``: NCCL only accepts CUDA tensors, gloo accepts CPU ones, so a helper that
built its tensor on the CPU would work under gloo and crash under NCCL.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Where this rank computes, and where every tensor handed to a collective must live.
    device: torch.device = torch.device("cpu")
    # In a process group (launched by torchrun, even as its only process): DDP and the
    # collectives run, so a one-GPU torchrun exercises the NCCL path.
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, caches, logs and summaries."""
        return self.rank == 0

    def shard(self, count: int) -> np.ndarray:
        """This rank's contiguous slice of ``range(count)``; slices in rank order cover it exactly."""
        return np.array_split(np.arange(count), self.world_size)[self.rank]

    def local_batch_size(self, global_batch: int, option: str = "--batch-size") -> int:
        """This rank's share of a global batch; the batch must split evenly."""
        if global_batch % self.world_size:
            raise ValueError(
                f"{option} {global_batch} is the global batch and must be divisible by the "
                f"{self.world_size} processes torchrun started"
            )
        return global_batch // self.world_size


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the process group when launched by torchrun; yield (context, this rank's device).

    On GPUs each process takes ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo. The group is
    left on exit, even after an error, so a failing rank does not leave the others hanging
    past the timeout.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    launched = "TORCHELASTIC_RUN_ID" in os.environ or world_size > 1  # torchrun sets both
    if device.type == "cuda" and (launched or dist.is_initialized()):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if dist.is_initialized():
        yield DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, distributed=True), device
        return
    if not launched:
        yield DistContext(device=device), device
        return
    context = DistContext(_env_int("RANK", 0), world_size, local_rank, device, distributed=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=datetime.timedelta(minutes=30), device_id=device if device.type == "cuda" else None
    )
    try:
        yield context, device
    finally:
        dist.destroy_process_group()


def local_world_size() -> int:
    """Processes torchrun started on this machine (1 without torchrun): they share its cores."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def workers_per_process(workers: int) -> int:
    """This process's share of ``workers`` loader processes (``--workers`` counts for the
    machine, whose torchrun processes share its cores); 0 stays 0."""
    return max(1, workers // local_world_size()) if workers > 0 else 0


# A probe step's loss from a module: one forward and backward on a probe batch.
Probe = Callable[[nn.Module], torch.Tensor]


def resolve_sync_bn(option: bool | None, device: torch.device, global_batch: int, world_size: int) -> bool:
    """``--sync-bn`` as given, or for None (auto): on when several processes train on GPUs and each
    one's share of the batch is under 32 images, where per-process batch-norm statistics get noisy."""
    if option is not None:
        return option
    return device.type == "cuda" and world_size > 1 and global_batch // world_size < 32


def unused_parameters(module: nn.Module, probe: Probe, steps: int = 2) -> tuple[list[str], list[str]]:
    """(never, sometimes): names of the trainable parameters of ``module`` that got no gradient in
    any of ``steps`` probe steps, and in some but not all of them.

    The steps run on a copy with the random generators forked, so neither the module (batch-norm
    statistics, gradients) nor the random draws of the training that follows change.
    """
    probed = copy.deepcopy(module).train()
    trainable = [(name, param) for name, param in probed.named_parameters() if param.requires_grad]
    missed = {name: 0 for name, _ in trainable}
    devices = sorted({p.device.index or 0 for _, p in trainable if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        for _ in range(steps):
            probed.zero_grad(set_to_none=True)
            probe(probed).float().sum().backward()
            for name, param in trainable:
                missed[name] += param.grad is None
    never = [name for name, count in missed.items() if count == steps]
    sometimes = [name for name, count in missed.items() if 0 < count < steps]
    return never, sometimes


def wrap_model(
    module: nn.Module, context: DistContext, sync_batch_norm: bool = False, probe: Probe | None = None
) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes train, else unchanged.

    DDP expects a gradient for every trainable parameter in every step and fails at the second
    iteration when one gets none. With ``probe`` (a step's loss from the module) the parameters
    that no probe step reaches are frozen first: the head modules timm keeps in a
    ``num_classes=0`` backbone that ``forward_features`` never runs (MobileNetV3's
    ``conv_head``, ConvNeXt's ``head.norm``). ``find_unused_parameters``, which costs a traversal
    of the autograd graph every step, is turned on only when some parameter is reached in some
    probe steps and not others. ``sync_batch_norm`` (``--sync-bn``, see :func:`resolve_sync_bn`)
    makes batch norm use the statistics of the global batch; :func:`revert_sync_batchnorm`
    undoes it before the model is saved.
    """
    if not context.distributed:
        return module
    find_unused = False
    if probe is not None:
        never, sometimes = unused_parameters(module, probe)
        parameters = dict(module.named_parameters())
        for name in never:
            parameters[name].requires_grad_(False)
        find_unused = bool(sometimes)
    if sync_batch_norm:
        if context.device.type != "cuda":
            raise ValueError("--sync-bn: synchronised batch norm runs on GPUs only; leave it off on CPU")
        from timm.layers import convert_sync_batchnorm

        module = convert_sync_batchnorm(module)
    # No device_ids: with them DDP would copy every input to the GPU, the lengths that
    # train_one_epoch leaves on the CPU included; the loop already moves the batch, and a
    # single-device module trains the same without them.
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every SyncBatchNorm replaced, in place, by the plain batch norm it was
    converted from (timm's SyncBatchNormAct by BatchNormAct2d), sharing its affine parameters
    and running statistics.

    Conversion replaces the layers inside the model that was wrapped, so without this the saved
    backbone would carry SyncBatchNorm, which inference neither folds into the convolutions nor
    runs outside a process group. Returns the module itself (or the replacement, when ``module``
    is a SyncBatchNorm).
    """
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct

    if isinstance(module, nn.SyncBatchNorm):
        plain: nn.BatchNorm2d
        if isinstance(module, SyncBatchNormAct):
            # timm annotates momentum float; the nn.BatchNorm2d it goes to takes None too (a cumulative average).
            with_act = BatchNormAct2d(
                module.num_features,
                module.eps,
                module.momentum,  # type: ignore[arg-type]
                module.affine,
                module.track_running_stats,
            )
            # timm's conversion set act and drop on the SyncBatchNormAct as plain attributes.
            with_act.act, with_act.drop = module.get_submodule("act"), module.get_submodule("drop")
            plain = with_act
        else:
            plain = nn.BatchNorm2d(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
        if module.affine:
            plain.weight, plain.bias = module.weight, module.bias
        if module.track_running_stats:
            plain.running_mean, plain.running_var = module.running_mean, module.running_var
            plain.num_batches_tracked = module.num_batches_tracked
        if hasattr(module, "qconfig"):
            plain.qconfig = module.qconfig
        return plain.train(module.training)
    for name, child in module.named_children():
        reverted = revert_sync_batchnorm(child)
        if reverted is not child:
            setattr(module, name, reverted)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@torch.no_grad()
def broadcast_state(module: nn.Module, context: DistContext) -> None:
    """Give every rank rank 0's parameters and buffers.

    After training, batch-norm statistics (and an EMA of them) can differ between ranks: each
    rank's last forward updates its own. Rank 0's are the ones saved, so every rank continues
    with those, and computes what the saved model computes.
    """
    if not context.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        moved = tensor.data.to(context.device)
        dist.broadcast(moved, src=0)
        tensor.data.copy_(moved)


def barrier(context: DistContext) -> None:
    """Wait for every rank (a no-op in one process)."""
    if context.distributed:
        dist.barrier(device_ids=[context.device.index] if context.device.type == "cuda" else None)


def all_ranks_agree(flag: bool, context: DistContext) -> bool:
    """True when ``flag`` is True on every rank (e.g. every rank found the feature cache).

    On several machines without a shared file system one rank may see a file another does
    not; deciding together keeps every rank on the same path through the collectives.
    """
    if not context.distributed:
        return flag
    value = torch.tensor([int(flag)], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_flags(flags: Sequence[bool], context: DistContext) -> list[bool]:
    """Rank 0's ``flags`` on every rank (e.g. "this epoch is the best", "stop now").

    Decisions taken from floats each rank computed (validation scores gathered in another
    order, reduced in another order) can differ in the last bit; a rank that stopped alone
    would leave the others waiting in the next collective. Rank 0 decides, every rank follows.
    """
    if not context.distributed:
        return [bool(flag) for flag in flags]
    values = torch.tensor([int(flag) for flag in flags], dtype=torch.uint8, device=context.device)
    dist.broadcast(values, src=0)
    return [bool(value) for value in values.tolist()]


def gather_to_main(value: object, context: DistContext) -> list[object] | None:
    """Every rank's ``value`` (a picklable object), in rank order, on rank 0; None on the others."""
    if not context.distributed:
        return [value]
    gathered: list[object] | None = [None] * context.world_size if context.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def mean_across_ranks(total: float | torch.Tensor, count: int, context: DistContext) -> float:
    """``sum(total) / sum(count)`` over every rank (e.g. the epoch's mean loss).

    ``total`` may be a tensor still on the device (a loss summed without host syncs).
    """
    values = torch.stack(
        [
            torch.as_tensor(total, dtype=torch.float64, device=context.device).reshape(()),
            torch.tensor(float(count), dtype=torch.float64, device=context.device),
        ]
    )
    if context.distributed:
        dist.all_reduce(values)
    return (values[0] / values[1].clamp(min=1)).item()


def gather_shards(local: torch.Tensor, context: DistContext, total: int) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (from :meth:`DistContext.shard`) in rank order.

    Shards differ in length by at most one row; they are padded to the same length for
    ``all_gather`` and cut back. The result has ``total`` rows on every rank, on the device
    ``local`` came from (the collective itself runs on ``context.device``).
    """
    if not context.distributed:
        return local
    sizes = [len(part) for part in np.array_split(np.arange(total), context.world_size)]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=context.device)
    padded[: len(local)] = local.to(context.device)
    parts = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(local.device)
