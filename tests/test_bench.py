"""A smoke run of the throughput benchmark on tiny data (it measures; nothing here is timed)."""

from __future__ import annotations

import json

import pytest

import train_caption_rnn
import train_efficientnet
from pipeline.tools import bench
from tests.conftest import TINY_IMAGE_ARGS


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
def test_bench_writes_every_figure(tiny_dataset, tmp_path):
    weights, out = tmp_path / "w", tmp_path / "out"
    train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(weights), *TINY_IMAGE_ARGS])
    train_caption_rnn.main(["--data", str(tiny_dataset), "--weights", str(weights), "--ensemble", "1",
                            "--epochs", "1", "--val-fraction", "0.25"])
    results = bench.main(["--data", str(tiny_dataset), "--weights", str(weights), "--output", str(out),
                          "--num-images", "12", "--forward-seconds", "0.2", "--repeats", "1", "--workers", "1",
                          "--batch-size", "4", "--finetune-batches", "1", "--finetune-batch-size", "4",
                          "--head-rows", "64", "--no-compare"])
    written = json.loads((out / "bench.json").read_text())
    for key in ("backbone_forward_img_s", "pipeline_img_s", "train_finetune_img_s", "train_cached_head_img_s",
                "peak_rss_mb", "device", "threads", "batch_size", "resolution", "precision"):
        assert key in written, key
    assert written["images_timed"] == 12 and written["resolution"] == 32
    assert written["backbone_forward_img_s"] == max(written["backbone_forward_layouts_img_s"].values())
    assert all(written[k] > 0 for k in ("backbone_forward_img_s", "pipeline_img_s", "train_finetune_img_s",
                                        "train_cached_head_img_s"))
    assert results["pipeline_over_forward"] == pytest.approx(written["pipeline_img_s"]
                                                             / written["backbone_forward_img_s"], abs=1e-3)
