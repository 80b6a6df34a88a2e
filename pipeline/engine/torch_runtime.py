"""The torch runtime: PyTorch eager mode with batch norm and the input normalisation folded
(:func:`pipeline.models.folding.fuse_for_inference`), channels_last; on a CPU one
single-threaded copy per loader worker, one worker per core."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from pipeline.engine.frozen import Calibration, FrozenForward, Runtime
from pipeline.engine.runtime import autocast_context, compute_dtype
from pipeline.models.folding import fuse_for_inference
from pipeline.models.image_model import pool_outputs


class TorchForward(FrozenForward):
    """A folded module on ``device`` in ``precision``: raw pixels in, pooled features or maps
    out (in the compute dtype, on the CPU)."""

    def __init__(self, model: nn.Module, pooled: bool, precision: str, device: torch.device) -> None:
        self.model, self.pooled, self.precision, self.device = model, pooled, precision, device

    @property
    def in_workers(self) -> bool:  # type: ignore[override]
        return self.device.type == "cpu"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        # The model takes raw pixel values, so the batch only changes type: the values
        # 0..255 are exact in every precision it can run in.
        batch = pixels.to(self.device, non_blocking=True).to(
            compute_dtype(self.precision), memory_format=torch.channels_last
        )
        with torch.inference_mode(), autocast_context(self.device, self.precision):
            result = self.model(batch)
            result = pool_outputs(result) if self.pooled else result
        return result.cpu()


class TorchRuntime(Runtime):
    name = "torch"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")

    def version(self) -> str | None:
        return torch.__version__

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def build(
        self,
        module: nn.Module,
        preprocessing: dict,
        pooled: bool,
        precision: str,
        device: torch.device,
        model_cache: Path | None,
        cores: int,
        calibration: Calibration | None = None,
    ) -> TorchForward:
        model = fuse_for_inference(module, preprocessing).to(device).to(memory_format=torch.channels_last)
        return TorchForward(model, pooled, precision, device)
