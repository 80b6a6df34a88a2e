"""Device, precision and seeding, decided once per run and passed down."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.choices import COMPILE_CHOICES, PRECISIONS
from pipeline.io import OptionError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise OptionError(f"--device {name!r}: valid values are auto, cpu, cuda")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """True where bf16 arithmetic runs in hardware: CUDA GPUs that support it, and CPUs with
    AVX512-BF16 or AMX (read from /proc/cpuinfo; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def _cpuinfo_field(name: str, text: str | None = None) -> str:
    """The first ``name : value`` line's value in /proc/cpuinfo ("" where there is none)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ""
    match = re.search(rf"^{name}\s*:\s*(.*)$", text, re.MULTILINE)
    return match.group(1).strip() if match else ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (from /proc/cpuinfo; the machine type where there is none)."""
    import platform

    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


# The instruction sets that decide which kernels are fast, newest first, by their cpuinfo flag.
INSTRUCTION_SETS = (
    ("amx", "amx_tile"),
    ("avx512_bf16", "avx512_bf16"),
    ("avx512_vnni", "avx512_vnni"),
    ("avx512", "avx512f"),
    ("avx2", "avx2"),
)


def instruction_set(cpuinfo: str | None = None) -> str:
    """The widest vector instruction set this CPU has, by its /proc/cpuinfo flags: ``amx``,
    ``avx512_bf16``, ``avx512_vnni``, ``avx512``, ``avx2``, else the machine type."""
    import platform

    flags = set(_cpuinfo_field("flags", cpuinfo).split())
    return next((name for name, flag in INSTRUCTION_SETS if flag in flags), platform.machine())


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the device computes it natively, else ``fp16`` on a GPU
    (trained with a gradient scaler) and ``fp32`` on a CPU."""
    if name not in PRECISIONS:
        raise OptionError(f"--precision {name!r}: valid values are {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type != "cuda":
        raise OptionError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if name == "auto":
        if native_bf16(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "fp32"
    return name


def training_precision(name: str, device: torch.device) -> str:
    """The precision training computes in: ``resolve_precision``, except that ``auto`` trains
    in fp32 on a CPU, where bf16 backward passes are slower than fp32 ones (docs/recipe.md,
    "The default recipe on CPU, and why"); the frozen forward passes there still use bf16."""
    if name == "auto" and device.type == "cpu":
        return "fp32"
    return resolve_precision(name, device)


def inference_precision(device: torch.device, trained: str, native: bool) -> str:
    """The precision inference runs the backbone in on ``device``, for a checkpoint whose
    features were computed in ``trained``; ``native`` says whether ``device`` computes bf16 in
    hardware (:func:`native_bf16`).

    A reduced precision is kept only where this device runs it natively: emulated bf16 autocast
    is slower than fp32, and fp16 never runs on a CPU (its CPU kernels are few and slow), so
    those run in fp32, which is closer to either than the other reduced format.
    """
    if trained == "int8":  # the frozen front quantised: its runtime runs it on any CPU
        return "int8"
    if trained == "fp16":
        return "fp16" if device.type == "cuda" else "fp32"
    if trained == "bf16":
        return "bf16" if native else "fp32"
    return "fp32"


# --compile auto compiles only a run of at least this many training steps: compiling the
# trunk costs 45-120 s on a GPU and saves a few milliseconds a step, so a shorter run (a check
# on a subset, a test) finishes sooner uncompiled (docs/speed.md, "Compiling the trunk").
COMPILE_MIN_STEPS = 3000


def resolve_compile(name: str, device: torch.device, steps: int | None = None) -> bool:
    """``--compile``: ``auto`` -> on on a GPU for a run of at least ``COMPILE_MIN_STEPS``
    training ``steps`` (``None``: a run long enough), where the compiled trunk's fused kernels
    pay back the compilation, and off on a CPU, where compiling takes minutes of the few cores;
    ``on`` and ``off`` as said."""
    if name not in COMPILE_CHOICES:
        raise OptionError(f"--compile {name!r}: valid values are {', '.join(COMPILE_CHOICES)}")
    if name == "auto":
        return device.type == "cuda" and (steps is None or steps >= COMPILE_MIN_STEPS)
    return name == "on"


class _CompiledOrEager:
    """``forward`` through ``torch.compile``; if compiling, or the first compiled call, raises,
    a warning names the error and every call from then on runs ``forward`` eagerly.

    AOTAutograd lowers the backward graph only at the first ``backward()``, after the forward
    has succeeded: :meth:`prove` runs a whole first step (forward and backward) under the same
    guard. Errors after the first call (or after a proven step) are the model's own and are raised."""

    def __init__(self, forward: Callable[..., Any], name: str) -> None:
        self.forward, self.name, self.proven, self.step_proven = forward, name, False, False
        self.compiled: Callable[..., Any] | None = None
        try:
            self.compiled = torch.compile(forward)
        except Exception as err:  # noqa: BLE001 - any failure to compile leaves eager, which works
            self._give_up(err)

    def _give_up(self, err: BaseException) -> None:
        log.warning(
            "--compile: torch.compile of the %s failed (%s: %s); training continues uncompiled",
            self.name,
            type(err).__name__,
            str(err).strip().splitlines()[0] if str(err).strip() else "",
        )
        self.compiled = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is not None and not self.proven:
            try:
                out = self.compiled(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - compilation runs inside the first call
                self._give_up(err)
            else:
                self.proven = True
                return out
        if self.compiled is not None:
            return self.compiled(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def prove(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` (a forward and backward through this forward); if it raises while the
        compiled forward is not yet proven by a whole step, give up compiling and run it again
        eagerly. ``step`` must be safe to run twice (no optimizer step inside)."""
        if self.compiled is None or self.step_proven:
            return step()
        try:
            out = step()
        except Exception as err:
            if self.compiled is None:
                raise  # the forward already fell back: the eager step's own error
            self._give_up(err)
            return step()
        self.step_proven = True
        return out


def _run(step: Callable[[], Any]) -> Any:
    return step()


@contextlib.contextmanager
def compiled_forward(module: nn.Module, enabled: bool, name: str) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Inside the block, ``module``'s forward runs compiled (when ``enabled``), falling back to
    eager as :class:`_CompiledOrEager` says; afterwards it is the plain forward again. Yields
    the guard of a first whole step (:meth:`_CompiledOrEager.prove`; disabled: it just runs it).

    Only the forward is replaced, not the module: its ``state_dict`` keys, and so checkpoints
    and the EMA copy, stay those of the uncompiled module (a wrapping ``OptimizedModule``
    would prefix them with ``_orig_mod.``), and what runs the module after training (feature
    extraction, export, OpenVINO's conversion) sees a plain module.
    """
    if not enabled:
        yield _run
        return
    previous = vars(module).get("forward")
    module.forward = guard = _CompiledOrEager(module.forward, name)
    try:
        yield guard.prove
    finally:
        del module.forward
        if previous is not None:
            module.forward = previous


def training_memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on a GPU, where tensor-core convolutions want it; the default layout on a
    CPU, where training's backward convolutions run faster in it."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype convolutions compute in at ``precision`` (``fp32``, ``bf16`` or ``fp16``)."""
    return _COMPUTE_DTYPES[precision]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (``bf16`` or ``fp16``); nothing for ``fp32``."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=compute_dtype(precision))
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (whose small range underflows gradients;
    bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def configure_backends(device: torch.device) -> None:
    """Fast CUDA kernels: cuDNN picks the best convolution algorithm for the fixed input
    size, and fp32 matrix products use TF32 tensor cores. No-op on CPU."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


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
    mmap and trim thresholds lets freed buffers be reused, which speeds the CPU forward pass
    up markedly (docs/speed.md, "What makes the CPU forward passes fast"). The price is that the
    process keeps its peak memory. Returns False where there is no glibc (nothing changes).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so the same command gives the same result.

    NumPy takes 32 bits: a seed derived from ``--seed`` 4294967295 (the caption ensemble's
    ``seed + member``) wraps around there, as a valid ``--seed`` never does."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Limit torch's CPU threads for a block (0 keeps torch's default), restoring the caller's setting.

    Small models (heads on cached features, the caption RNN) gain little from a second
    thread on an idle machine, and when another process holds a core the threads' spinning
    and synchronisation make an epoch many times slower.
    """
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
