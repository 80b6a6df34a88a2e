"""int8 for the frozen front (ONNX Runtime, and OpenVINO reading its quantised model): static quantisation (QDQ, per-channel weights, 7-bit
range), calibrated on the dataset's own training images, the stem and the trained tail left in
float; the maps it gives against float's, and the caches keyed by it."""

from __future__ import annotations

import onnx
import pytest
import torch

from pipeline.data.dataset import DatasetPaths
from pipeline.engine import onnx_runtime
from pipeline.engine.frozen import FrontAndTail
from pipeline.features import ExtractionSettings, cached_stage_maps, calibration_images, extract_features
from pipeline.models.backbones import create_backbone
from pipeline.models.stages import split_backbone
from tests.conftest import make_tiny_dataset

CPU = torch.device("cpu")
# int8 against float on the same images, cosine similarity per image: the front's maps (what
# partial mode quantises) within the 0.99; the whole backbone's pooled features (every
# stage but the stem quantised, errors compounding through a random-weight model) within 0.98.
MIN_COSINE = 0.99
MIN_COSINE_WHOLE_BACKBONE = 0.98


@pytest.fixture
def backbone():
    torch.manual_seed(0)  # the same random weights every run: the tolerance is checked on one model
    with pytest.warns(UserWarning):
        return create_backbone("test_efficientnet", resolution=32)


@pytest.fixture
def images(tmp_path):
    root = make_tiny_dataset(tmp_path / "tiny", n_train=12, n_test=0)
    return DatasetPaths.resolve(root), [f"{i}.jpg" for i in range(12)]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def test_calibration_images_are_a_fixed_spread_of_the_training_images(images):
    paths, ids = images
    first = calibration_images(paths, ids, {"resolution": 32, "interpolation": "bilinear",
                                            "mean": [0.5] * 3, "std": [0.5] * 3}, count=4)
    again = calibration_images(paths, list(reversed(ids)), {"resolution": 32, "interpolation": "bilinear",
                                                            "mean": [0.5] * 3, "std": [0.5] * 3}, count=4)
    assert first.digest == again.digest  # the order the ids come in does not matter
    (batch,) = list(first.batches())
    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8
    other = calibration_images(paths, ids[:6], {"resolution": 32, "interpolation": "bilinear",
                                                "mean": [0.5] * 3, "std": [0.5] * 3}, count=4)
    assert other.digest != first.digest


def test_int8_stage_maps_stay_within_tolerance_of_float_and_are_cached_apart(backbone, images, tmp_path):
    paths, ids = images
    calibration = calibration_images(paths, ids, backbone.preprocessing)
    front, _ = split_backbone(backbone, 2)
    maps = {precision: cached_stage_maps(backbone, front, 2, paths, ids, ExtractionSettings(
                cache_dir=tmp_path, device=CPU, batch_size=4, workers=0, runtime="onnxruntime", precision=precision,
                calibration=calibration if precision == "int8" else None))
            for precision in ("fp32", "int8")}
    plain = {p: torch.from_numpy(m.read("plain", list(range(len(ids))))) for p, m in maps.items()}
    assert plain["int8"].shape == plain["fp32"].shape
    assert not torch.equal(plain["int8"], plain["fp32"])  # quantised indeed
    assert _cosine(plain["int8"], plain["fp32"]).min() >= MIN_COSINE
    # Keyed by the precision: two stores, and the int8 one also by its calibration images.
    stores = sorted(tmp_path.glob("stagemaps-*"))
    assert len(stores) == 2
    assert any('"calibration"' in (store / "manifest.json").read_text() for store in stores)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_pooled_features_stay_within_tolerance_of_float(backbone, images, tmp_path, runtime):
    paths, ids = images
    calibration = calibration_images(paths, ids, backbone.preprocessing)
    float_features, _ = extract_features(backbone, paths, ids, CPU, batch_size=4, workers=0, runtime="torch",
                                         precision="fp32")
    int8_features, _ = extract_features(backbone, paths, ids, CPU, batch_size=4, workers=0, runtime=runtime,
                                        precision="int8", model_cache=tmp_path, calibration=calibration)
    assert _cosine(int8_features, float_features).min() >= MIN_COSINE_WHOLE_BACKBONE


def _quantised_convolutions(model: onnx.ModelProto) -> dict[str, bool]:
    """Each convolution's name and whether its weights come through a DequantizeLinear (int8)."""
    produced_by = {output: node for node in model.graph.node for output in node.output}
    return {node.name: getattr(produced_by.get(node.input[1]), "op_type", None) == "DequantizeLinear"
            for node in model.graph.node if node.op_type == "Conv"}


def test_int8_keeps_the_stem_and_the_trained_tail_in_float(backbone, images, tmp_path, monkeypatch):
    paths, ids = images
    calibration = calibration_images(paths, ids, backbone.preprocessing)
    front, tail = split_backbone(backbone, 2)
    monkeypatch.setattr(onnx_runtime, "_SESSIONS", {})
    onnx_runtime.OnnxRuntime().build(FrontAndTail(front, tail).eval(), backbone.preprocessing, True, "int8", CPU,
                                     tmp_path, 1, calibration)
    (path,) = (tmp_path / "onnxruntime").glob("*.onnx")
    quantised = _quantised_convolutions(onnx.load(str(path)))
    names = list(quantised)
    assert not quantised[names[0]], "the stem stays in float"
    in_tail = [name for name in names if name.startswith("/graph/module/module.1/")]
    in_front = [name for name in names[1:] if name.startswith("/graph/module/module.0/")]
    assert in_tail and in_front
    assert not any(quantised[name] for name in in_tail), "the trained tail stays in float"
    assert all(quantised[name] for name in in_front), "the rest of the front is int8"


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
def test_partial_mode_trains_on_int8_maps_and_inference_runs_the_same_front(tmp_path):
    import inference
    import train_efficientnet
    from tests.conftest import TINY_IMAGE_ARGS

    data = make_tiny_dataset(tmp_path / "tiny", n_train=24, n_test=4)
    weights = tmp_path / "weights"
    summary = train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS,
                                       "--mode", "partial", "--front-precision", "int8"])
    # auto chooses among the runtimes that run int8, here by the suite's fixed table: OpenVINO.
    assert summary["front_precision"] == "int8" and summary["runtime"] == "openvino"
    record = torch.load(weights / "image.pt", weights_only=True)["backbone"]
    assert record["precision"] == "int8" and len(record["calibration"]["image_ids"]) > 0
    stores = list((weights / "cache").glob("stagemaps-*"))
    assert stores and all('"precision": "int8"' in (s / "manifest.json").read_text() for s in stores)
    models = sorted((weights / "cache" / "openvino").glob("*.xml"))
    assert len(models) == 2  # the front (stage maps), and the front with the trained stages (validation)
    # Inference reads the quantised whole backbone (front int8, trained stages float) training kept.
    inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"),
                    "--device", "cpu", "--workers", "0", "--val-fraction", "0.25"])
    assert sorted((weights / "cache" / "openvino").glob("*.xml")) == models
    assert (tmp_path / "out" / "submission.csv").is_file()


def test_int8_is_refused_where_there_is_no_frozen_front(tmp_path):
    import train_efficientnet

    from pipeline.io import OptionError

    with pytest.raises(OptionError, match="--front-precision int8 quantises the frozen front; --mode finetune"):
        train_efficientnet.main(["--data", str(tmp_path), "--mode", "finetune", "--front-precision", "int8"])


def test_without_its_calibration_images_an_int8_model_cannot_be_quantised_again(tmp_path):
    from pipeline.features import recorded_calibration
    from pipeline.io import CheckpointError

    paths = DatasetPaths.resolve(make_tiny_dataset(tmp_path / "tiny", n_train=2, n_test=0))
    calibration = recorded_calibration(paths, {"digest": "d", "image_ids": ["gone.jpg"]},
                                       {"resolution": 32, "interpolation": "bilinear", "mean": [0.5] * 3,
                                        "std": [0.5] * 3})
    assert calibration.digest == "d" and calibration.image_ids == ("gone.jpg",)
    with pytest.raises(CheckpointError, match="none of its 1 calibration images \\(e.g. gone.jpg\\) can be read"):
        list(calibration.batches())
