"""The OpenVINO runtime: computing what torch computes, compiled once, kept on disk, part of
the cache key and of the checkpoint."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.data.dataset import DatasetPaths
from pipeline.engine import openvino_runtime
from pipeline.engine.openvino_runtime import OpenVinoRuntime
from pipeline.features import ExtractionSettings, cached_features, cached_stage_maps, extract_features
from pipeline.models.stages import split_backbone
from pipeline.prediction import inference_runtime
from tests.conftest import make_tiny_dataset

pytest.importorskip("openvino")

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def tiny_images(tmp_path):
    """The image folder of a 6-image tiny dataset, and its ids."""
    root = make_tiny_dataset(tmp_path / "tiny", n_train=6, n_test=0)
    return DatasetPaths.resolve(root), [f"{i}.jpg" for i in range(6)]


def test_openvino_features_and_stage_maps_match_torch(backbone, tiny_images, tmp_path):
    paths, ids = tiny_images
    (paths.images / ids[1]).write_bytes(b"not a jpeg")  # unreadable: NaN, and never run
    by_runtime = {runtime: extract_features(backbone, paths, ids, CPU, batch_size=4, workers=0, runtime=runtime,
                                            model_cache=tmp_path / runtime)
                  for runtime in ("torch", "openvino")}
    (torch_features, torch_ok), (ov_features, ov_ok) = by_runtime.values()
    assert torch.equal(torch_ok, ov_ok) and ov_ok.tolist() == [True, False, True, True, True, True]
    assert ov_features[1].isnan().all()
    # Both round to the cache's float16; fp32 arithmetic differs in the last bits before that.
    assert torch.allclose(ov_features[ov_ok].float(), torch_features[ov_ok].float(), rtol=2e-3, atol=2e-3)

    front, _ = split_backbone(backbone, 2)
    maps = {runtime: cached_stage_maps(backbone, front, 2, paths, ids, ExtractionSettings(
                cache_dir=tmp_path / f"maps-{runtime}", device=CPU, batch_size=4, workers=0, runtime=runtime))
            for runtime in ("torch", "openvino")}
    plain = {runtime: torch.from_numpy(m.read("plain", list(range(len(ids))))).float() for runtime, m in maps.items()}
    assert plain["openvino"].shape == plain["torch"].shape and plain["openvino"][1].isnan().all()
    assert torch.allclose(plain["openvino"][ov_ok], plain["torch"][ov_ok], rtol=2e-3, atol=2e-3)


def test_a_model_compiles_once_per_process_and_converts_once_per_cache(backbone, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_runtime, "_COMPILED", {})
    runtime = OpenVinoRuntime()
    first = runtime.build(backbone.module, backbone.preprocessing, True, "fp32", CPU, tmp_path, 1)
    assert runtime.build(backbone.module, backbone.preprocessing, True, "fp32", CPU, tmp_path, 1) is first
    (saved,) = (tmp_path / "openvino").glob("*.xml")
    assert saved.with_suffix(".bin").is_file()

    # A new process (an empty memory) reads the converted model instead of converting again.
    monkeypatch.setattr(openvino_runtime, "_COMPILED", {})
    monkeypatch.setattr(openvino_runtime, "convert", lambda *args: pytest.fail("converted again"))
    again = runtime.build(backbone.module, backbone.preprocessing, True, "fp32", CPU, tmp_path, 1)
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert torch.equal(again(pixels), first(pixels))
    assert again(pixels).shape == (3, backbone.pooled_dim)


def test_loader_workers_run_their_own_copies_and_a_spawned_worker_gets_the_model(backbone, tiny_images, tmp_path,
                                                                               monkeypatch):
    paths, ids = tiny_images
    in_main = extract_features(backbone, paths, ids, CPU, batch_size=2, workers=0, runtime="openvino",
                               model_cache=tmp_path)
    monkeypatch.setattr(openvino_runtime, "_COMPILED", {})
    in_workers = extract_features(backbone, paths, ids, CPU, batch_size=2, workers=2, runtime="openvino",
                                  model_cache=tmp_path)
    # Each worker compiled its own copy (one stream): this process compiled none.
    (forward,) = openvino_runtime._COMPILED.values()
    assert os.getpid() not in forward._compiled
    # One stream or two, the same kernels up to float16 rounding of the cache.
    assert torch.allclose(in_workers[0].float(), in_main[0].float(), rtol=1e-3, atol=1e-3)
    assert torch.equal(in_workers[1], in_main[1])

    # A worker started by spawning gets the model pickled, and computes what the original does.
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    spawned = pickle.loads(pickle.dumps(forward))
    assert torch.equal(spawned(pixels), forward(pixels))


def test_the_runtime_is_part_of_the_feature_cache_key(backbone, tiny_images, tmp_path):
    paths, ids = tiny_images
    for runtime in ("torch", "openvino"):
        cached_features(backbone, paths, ids, ExtractionSettings(cache_dir=tmp_path, device=CPU, batch_size=4, workers=0,
                                                                  runtime=runtime))
    assert len(list(tmp_path.glob("features-*"))) == 2


def test_inference_runs_the_trained_runtime_and_says_when_it_cannot(monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    assert inference_runtime("openvino", None, CPU, "image.pt") == "openvino"
    assert inference_runtime("torch", None, CPU, "image.pt") == "torch"
    assert caplog.records == []
    assert inference_runtime("openvino", "torch", CPU, "image.pt") == "torch"
    assert "image.pt was trained with features from openvino" in caplog.text
    caplog.clear()
    monkeypatch.setattr(openvino_runtime, "openvino_version", lambda: None)
    assert inference_runtime("openvino", None, CPU, "decoder.pt") == "torch"
    assert "the openvino package is not installed (pip install -r requirements.txt): running torch" in caplog.text


def test_training_records_its_runtime_and_inference_follows_it(trained_branches, tmp_path):
    import inference

    data, trained = trained_branches
    weights = tmp_path / "weights"
    shutil.copytree(trained, weights)
    checkpoint = torch.load(weights / "image.pt", weights_only=True)
    assert checkpoint["backbone"]["runtime"] == "openvino"
    inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"),
                    "--device", "cpu", "--workers", "0"])
    stores = [p.name for p in (weights / "cache").glob("features-*")]
    keys = [(weights / "cache" / name / "manifest.json").read_text() for name in stores]
    assert keys and all('"runtime": "openvino"' in key for key in keys)


def test_importing_and_converting_send_no_telemetry(tmp_path):
    """OpenVINO posts usage events from processes forked off a thread, on import and on each
    conversion: the package's import and conversion decline them, so none is started. Run in a
    fresh process: the import's event is sent once per process."""
    probe = """
import multiprocessing, torch
started = []
multiprocessing.Process.start = lambda self: started.append(self)
from pipeline.engine.openvino_runtime import convert_model, import_openvino
import_openvino()
convert_model(torch.nn.Conv2d(3, 4, 3).eval(), example_input=torch.zeros(1, 3, 8, 8))
import openvino_telemetry
print(len(started), openvino_telemetry.Telemetry().consent)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path), "PYTHONWARNINGS": "ignore"},
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "False"]
