"""A smoke run of the throughput benchmark on tiny data (it measures; nothing here is timed)."""

from __future__ import annotations

import json

import pytest

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
    # Every runtime installed here in each precision it runs: fp32, bf16 where the CPU has it, int8.
    precisions = ["fp32", "bf16", "int8"] if written["instruction_set"] in ("amx", "avx512_bf16") else ["fp32", "int8"]
    assert list(written["forward"]) == ["torch", "openvino", "onnxruntime"]
    assert "int8" in written["forward"]["onnxruntime"] and "int8" not in written["forward"]["torch"]
    assert all(set(by) <= set(precisions) and "fp32" in by for by in written["forward"].values())
    precision = written["precision"]
    assert written["forward_img_s_by_runtime"] == {name: by[precision]["img_s"]
                                                   for name, by in written["forward"].items() if precision in by}
    assert written["backbone_forward_img_s"] == max(written["forward_img_s_by_runtime"].values())
    assert all(written[k] > 0 for k in ("backbone_forward_img_s", "pipeline_img_s", "train_finetune_img_s",
                                        "train_cached_head_img_s"))
    assert results["pipeline_over_forward"] == pytest.approx(written["pipeline_img_s"]
                                                             / written["backbone_forward_img_s"], abs=1e-3)
    # The bound: per view decode + the fastest runtime's single-core forward, then the caption, on one core each.
    single = {name: by[precision]["single_core_ms"] for name, by in written["forward"].items() if precision in by}
    assert written["bound_runtime"] == min(single, key=single.get)
    views = len(written["views"])
    per_image_ms = (views * (written["decode_resize_ms_per_img"] + min(single.values()))
                    + written["caption_branch_ms_per_img"])
    assert written["bound_img_s"] == pytest.approx(1000 * written["cores"] / per_image_ms, rel=1e-3)
    assert written["pipeline_over_bound"] == pytest.approx(written["pipeline_img_s"] / written["bound_img_s"], abs=1e-3)
    assert written["runtime"] == "openvino"
    assert written["pipeline_speedup_over_torch"] == pytest.approx(
        written["pipeline_img_s"] / written["pipeline_torch_img_s"], abs=1e-2)
    at_48 = written["at_48px"]
    assert at_48["resolution"] == 48 and list(at_48["forward"]) == ["torch", "openvino", "onnxruntime"]
    assert set(at_48["forward_img_s_by_runtime"]) == {name for name, by in at_48["forward"].items() if precision in by}
    assert at_48["pipeline_over_bound"] == pytest.approx(at_48["pipeline_img_s"] / at_48["bound_img_s"], abs=1e-3)
    # Where the time goes, stage by stage, on a named instruction set.
    timing = written["timing"]
    assert timing["instruction_set"] == written["instruction_set"] and timing["cpu"]
    assert set(timing["stages"]) == {"decode", "frozen front", "heads", "caption", "fusion"}
    assert all(entry["img_s"] > 0 and entry["images"] == 12 for entry in timing["stages"].values())
    # The benchmark works in a scratch folder: the shared weights are left as they were.
    assert sorted(p.relative_to(weights) for p in weights.rglob("*")) == before


def test_the_bound_is_one_over_the_serial_sum_of_the_stages_single_core_costs():
    # 2 cores; per image 0.5 ms decode + 4 ms forward on one core, 0.5 ms caption: 2000 / 5 = 400 img/s.
    assert bench.serial_bound(0.5, 4.0, 0.5, cores=2) == pytest.approx(400.0)
    # Two views (test-time flip): each image is decoded and run twice: 2 x (0.5 + 4) + 0.5 ms.
    assert bench.serial_bound(0.5, 4.0, 0.5, 2, views=2) == pytest.approx(2000 / 9.5, abs=0.01)
    assert bench.serial_bound(1.0, 9.0, None, 1) == pytest.approx(100.0)  # no caption branch


def test_no_schedule_of_the_stages_beats_the_bound():
    # However the stages share the cores, an image needs its core time: a pipeline running the
    # stages at their single-core rates on every core at once, with nothing idle, reaches the bound exactly.
    decode_ms, forward_ms, caption_ms, cores, views = 1.07, 30.0, 0.43, 2, 2
    core_ms_per_image = views * (decode_ms + forward_ms) + caption_ms
    perfect_pipeline = cores * 1000.0 / core_ms_per_image
    assert bench.serial_bound(decode_ms, forward_ms, caption_ms, cores, views) == pytest.approx(perfect_pipeline,
                                                                                                abs=0.01)


def test_the_gpu_bound_is_the_slower_of_the_device_and_the_decoding_cores():
    assert bench.gpu_bound(1000.0, decode_ms=4.0, caption_ms=1.0, cores=4) == pytest.approx(800.0)  # 4 cores, 5 ms
    assert bench.gpu_bound(500.0, 4.0, 1.0, 4) == pytest.approx(500.0)
    assert bench.gpu_bound(1000.0, 4.0, 1.0, 4, views=2) == pytest.approx(444.44, abs=0.01)
