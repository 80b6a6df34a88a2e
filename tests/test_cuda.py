"""Tests that need a GPU. Where CUDA is present they always run (the rest of the suite stays
on the CPU); elsewhere they are reported as skipped, and `make gpu-check` runs them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import inference
import train_efficientnet
from tests.conftest import TINY_IMAGE_ARGS
from tests.test_distributed import _torchrun

pytestmark = [pytest.mark.cuda, pytest.mark.filterwarnings("ignore::UserWarning")]
# Later options win over --device cpu. The decoder reads no caption: the GPU check's machine has no
# transformers to build the stand-in text encoder with (bench/gpu_check.py).
ON_GPU = [*TINY_IMAGE_ARGS, "--device", "cuda", "--workers", "2", "--decoder-caption", "none"]


@pytest.mark.parametrize("precision", ["auto", "fp16", "fp32"])
def test_fine_tuning_on_the_gpu_then_inference(tiny_dataset, tmp_path, precision):
    weights = tmp_path / "w"
    summary = train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(weights), *ON_GPU,
                                       "--mode", "finetune", "--finetune-epochs", "2", "--precision", precision])
    assert summary["training_precision"] == ("bf16" if precision == "auto" and torch.cuda.is_bf16_supported()
                                              else "fp16" if precision in ("auto", "fp16") else "fp32")
    assert summary["peak_gpu_memory_mb"] > 0
    result = inference.main(["--data", str(tiny_dataset), "--weights", str(weights), "--output", str(tmp_path / "o"),
                             "--device", "cuda", "--val-fraction", "0.25", "--evaluate"])
    assert result["rows"] == len(pd.read_csv(tiny_dataset / "test.csv"))


def test_one_process_nccl_torchrun_fine_tunes(tiny_dataset, tmp_path):
    """torchrun with one process still forms an NCCL group, so DDP and every collective run."""
    weights = tmp_path / "w"
    _torchrun("train_efficientnet.py", ["--data", str(tiny_dataset), "--weights", str(weights), *ON_GPU,
                                        "--mode", "finetune", "--finetune-epochs", "1"], processes=1,
              stand_in_encoder=False)
    assert json.loads((weights / "image_summary.json").read_text())["processes"] == 1
    assert (weights / "image.pt").is_file()
