"""Device, precision and seeding, decided once per run and passed down."""

from __future__ import annotations

import contextlib
import ctypes
import random
import re
from collections.abc import Iterator
from pathlib import Path

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


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """True where bf16 arithmetic runs in hardware: CUDA GPUs that support it, and CPUs with
    AVX512-BF16 or AMX (read from /proc/cpuinfo; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively, else ``fp32``."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: valid values are {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def autocast_context(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast when ``precision`` is ``bf16``, nothing for ``fp32``.

    ``None`` is the training default: bf16 on GPU, fp32 on CPU (training on CPU is the
    fine-tune fallback; its precision was not tuned).
    """
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
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


def reuse_freed_memory() -> bool:
    """Keep large freed blocks in the process instead of handing them back to the OS (glibc).

    glibc serves large allocations with mmap and unmaps them when freed, so every forward
    pass of a CNN page-faults its activation buffers back in from zero pages. Raising the
    mmap and trim thresholds lets freed buffers be reused: measured on this 2-core machine,
    Lite0's forward went from 103 to 193 img/s in fp32 and from 197 to 309 img/s in bf16
    (page faults per 5 s: 1.9 million -> 7 thousand). The price is that the process keeps
    its peak memory. Returns False where there is no glibc (nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


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
