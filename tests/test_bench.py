"""A smoke run of the throughput benchmark on tiny data (it measures; nothing here is timed)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.tools import bench


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
def test_bench_writes_every_figure(trained_branches, tmp_path):
    data, weights = trained_branches
    before = sorted(p.relative_to(weights) for p in weights.rglob("*"))
    out = tmp_path / "out"
    results = bench.main(["--data", str(data), "--weights", str(weights), "--output", str(out),
                          "--num-images", "12", "--forward-seconds", "0.2", "--repeats", "1", "--workers", "1",
                          "--batch-size", "4", "--finetune-batches", "1", "--finetune-batch-size", "4",
                          "--head-rows", "64", "--no-compare", "--also-resolution", "48"])
    written = json.loads((out / "bench.json").read_text())
    for key in ("backbone_forward_img_s", "pipeline_img_s", "train_finetune_img_s", "train_cached_head_img_s",
                "peak_rss_mb", "threads", "precision"):
        assert key in written, key
    # The suite pins --device auto to the CPU (conftest).
    assert written["device"] == "cpu" and written["batch_size"] == 4 and written["workers"] == 1
    assert sorted(written["branches"]) == ["caption", "decoder", "image"]
    assert written["images_timed"] == 12 and written["resolution"] == 32
    assert written["backbone_forward_img_s"] == max(written["backbone_forward_layouts_img_s"].values())
    assert all(written[k] > 0 for k in ("backbone_forward_img_s", "pipeline_img_s", "train_finetune_img_s",
                                        "train_cached_head_img_s"))
    assert results["pipeline_over_forward"] == pytest.approx(written["pipeline_img_s"]
                                                             / written["backbone_forward_img_s"], abs=1e-3)
    # The bound charges each image its decode and forward share per view, and its caption, on one core.
    views = len(written["views"])
    per_image_ms = (views * written["decode_resize_ms_per_img"] + written["caption_branch_ms_per_img"]
                    + views * 1000 * written["cores"] / written["backbone_forward_img_s"])
    assert written["bound_img_s"] == pytest.approx(1000 * written["cores"] / per_image_ms, rel=1e-3)
    assert written["bound_img_s"] < written["backbone_forward_img_s"]
    assert written["pipeline_over_bound"] == pytest.approx(written["pipeline_img_s"] / written["bound_img_s"], abs=1e-3)
    # Every runtime installed here, its best layout, and the pipeline in the chosen runtime and in torch.
    assert written["runtime"] == "openvino"
    assert sorted(written["forward_img_s_by_runtime"]) == ["onnxruntime", "openvino", "torch"]
    assert written["forward_img_s_by_runtime"]["openvino"] == max(
        v for k, v in written["backbone_forward_layouts_img_s"].items() if k.startswith("openvino_"))
    assert written["pipeline_speedup_over_torch"] == pytest.approx(
        written["pipeline_img_s"] / written["pipeline_torch_img_s"], abs=1e-2)
    at_48 = written["at_48px"]
    assert at_48["resolution"] == 48 and set(at_48["forward_img_s_by_runtime"]) == {"onnxruntime", "openvino", "torch"}
    assert at_48["pipeline_over_bound"] == pytest.approx(at_48["pipeline_img_s"] / at_48["bound_img_s"], abs=1e-3)
    # The benchmark works in a scratch folder: the shared weights are left as they were.
    assert sorted(p.relative_to(weights) for p in weights.rglob("*")) == before


def test_the_gpu_bound_is_the_slower_of_the_device_and_the_decoding_cores():
    gpu = bench.physical_bound(1000.0, decode_ms=4.0, caption_ms=1.0, cores=4, device=torch.device("cuda"))
    assert gpu == pytest.approx(800.0)  # 4 cores at 5 ms an image
    assert bench.physical_bound(500.0, 4.0, 1.0, 4, torch.device("cuda")) == pytest.approx(500.0)
    # On CPU the same cores run the forward: 2 cores, 4 ms forward share + 1 ms = 400 img/s.
    assert bench.physical_bound(500.0, 0.5, 0.5, 2, torch.device("cpu")) == pytest.approx(400.0)
    # Two views (test-time flip): each image is decoded and run twice: 2 x (0.5 + 4) + 0.5 ms.
    assert bench.physical_bound(500.0, 0.5, 0.5, 2, torch.device("cpu"), views=2) == pytest.approx(2000 / 9.5, abs=0.01)
    assert bench.physical_bound(1000.0, 4.0, 1.0, 4, torch.device("cuda"), views=2) == pytest.approx(444.44, abs=0.01)
