"""Multi-process training under ``torchrun``: process group, DDP wrapping, sharding, reductions.

The training scripts run unchanged under ``torchrun --nproc_per_node N`` (and multi-node):
``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, :func:`distributed_session` joins the
process group (NCCL on GPUs, gloo on CPU) and everything else asks the returned
:class:`DistContext`. Without ``torchrun`` the context is a single process and every helper
here is a no-op, so the single-process path is the same code.

``--batch-size`` stays the *global* batch: each of N processes takes 1/N of every batch, so
a run gives the same result (up to float rounding) on 1 or N processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
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

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

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
    if world_size <= 1 or dist.is_initialized():
        yield (_current_context() if dist.is_initialized() else DistContext()), device
        return
    context = DistContext(rank=_env_int("RANK", 0), world_size=world_size, local_rank=_env_int("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(context.local_rank)
        device = torch.device("cuda", context.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    try:
        yield context, device
    finally:
        dist.destroy_process_group()


def _current_context() -> DistContext:
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0))


def wrap_model(module: nn.Module, context: DistContext, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes train, else unchanged."""
    if not context.enabled:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def barrier(context: DistContext) -> None:
    if context.enabled:
        dist.barrier()


def all_ranks_agree(flag: bool, context: DistContext, device: torch.device) -> bool:
    """True when ``flag`` is True on every rank (e.g. every rank found the feature cache).

    On several machines without a shared file system one rank may see a file another does
    not; deciding together keeps every rank on the same path through the collectives.
    """
    if not context.enabled:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def mean_across_ranks(total: float, count: int, context: DistContext) -> float:
    """``sum(total) / sum(count)`` over every rank (e.g. the epoch's mean loss)."""
    if not context.enabled:
        return total / max(count, 1)
    values = torch.tensor([total, float(count)], dtype=torch.float64)
    dist.all_reduce(values)
    return (values[0] / values[1].clamp(min=1)).item()


def gather_shards(local: torch.Tensor, context: DistContext, total: int) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (from :meth:`DistContext.shard`) in rank order.

    Shards differ in length by at most one row; they are padded to the same length for
    ``all_gather`` and cut back. The result has ``total`` rows on every rank.
    """
    if not context.enabled:
        return local
    sizes = [len(part) for part in np.array_split(np.arange(total), context.world_size)]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])
