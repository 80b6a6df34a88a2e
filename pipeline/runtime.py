"""Device, precision and seeding, decided once per run and passed down."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: valid values are auto, cpu, cuda")
    return torch.device(name)


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU; nothing on CPU, where fp32 is both faster and exact here."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# torch >= 2.5 has torch.OutOfMemoryError, of which torch.cuda.OutOfMemoryError is an alias.
_OUT_OF_MEMORY: tuple[type[BaseException], ...] = tuple(
    {torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)}
)


@contextlib.contextmanager
def oom_hint(batch_size: int) -> Iterator[None]:
    """Re-raise a GPU out-of-memory error inside the block with the option that fixes it.

    The error keeps its type (callers catching out-of-memory still do); its message suggests
    half the ``--batch-size``, or other options when the batch is already a single image.
    """
    try:
        yield
    except _OUT_OF_MEMORY as err:
        if batch_size > 1:
            hint = f"try --batch-size {batch_size // 2}"
        else:
            hint = "--batch-size is already 1: try a smaller --resolution, or --device cpu"
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise type(err)(f"out of GPU memory at --batch-size {batch_size}; {hint} ({detail})") from err


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same command gives the same result."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Limit torch's CPU threads for a block (0 keeps torch's default), restoring the caller's setting.

    Small models (heads on cached features, the caption RNN) gain little from a second
    thread on an idle machine, and when another process holds a core the threads' spinning
    and synchronisation made an epoch 10-40x slower here (5 s -> 50 s for the decoder).
    """
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
