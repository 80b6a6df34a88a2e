"""pipeline.tools.export: the image branch as one ONNX or OpenVINO model, run by onnxruntime and
OpenVINO on image files and checked against inference.py's image branch on the same files."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
import train_efficientnet
from pipeline.data.dataset import GivenFiles
from pipeline.data.images import ImageDataset
from pipeline.data.transforms import build_transform
from pipeline.engine.runtime import seed_everything
from pipeline.prediction import BranchPredictor, Inputs, load_branch_checkpoints
from pipeline.io import CheckpointError
from pipeline.tools import export
from pipeline.tools.export import ExportConfig, ExportError, export_image_branch, float16_rounded, image_only_thresholds
from tests.conftest import TINY_IMAGE_ARGS, make_tiny_dataset

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

# Max abs difference of the exported model's probabilities from inference.py's image branch.
# Both compute in float32 (the weights are trained with --precision fp32) and round the pooled
# features to float16 alike; what is left is float32 rounding in another order, which can move a
# feature across a float16 rounding boundary (measured here: up to 1e-5 with onnxruntime, 2e-7
# with OpenVINO, when inference runs its backbone in OpenVINO).
TOLERANCE = 1e-4
# inference.py --format json rounds every probability to 4 places.
JSON_ROUNDING = 5e-5
VAL_FRACTION = "0.25"  # TINY_IMAGE_ARGS's
NAMES = {"1": "person", "3": "car", "18": "dog", "19": "horse"}
# OpenVINO's CPU plugin computes in bf16 by default where the CPU has it; the pipeline runs fp32.
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """The image branch alone trained on the tiny dataset (fp32, with flip views), whose
    dataset.json names its labels; its weights as trained (views plain + flip) and a copy
    whose checkpoint asks for the plain view only."""
    root = tmp_path_factory.mktemp("export")
    data = make_tiny_dataset(root / "tiny", n_test=6)
    (data / "dataset.json").write_text(json.dumps({"train.csv": {"labels": NAMES}}))
    weights = root / "weights-flip"
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(torch.cuda, "is_available", lambda: False)  # module fixtures precede the per-test pin
        warnings.filterwarnings("ignore", "backbone test_efficientnet", UserWarning)
        train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS,
                                 "--precision", "fp32", "--flip-views"])
    plain = Path(shutil.copytree(weights, root / "weights-plain", ignore=shutil.ignore_patterns("cache")))
    checkpoint = torch.load(plain / "image.pt", weights_only=True)
    assert checkpoint["backbone"]["views"] == ["plain", "flip"]
    checkpoint["backbone"]["views"] = ["plain"]
    torch.save(checkpoint, plain / "image.pt")
    # Image files as a user has them: the test split's, and others of other sizes and modes.
    files = [data / "data" / name for name in pd.read_csv(data / "test.csv")["ImageID"]]
    for k, (size, mode) in enumerate([((50, 37), "RGB"), ((20, 64), "RGBA"), ((130, 96), "L")]):
        pixels = np.full((size[1], size[0], 3), 128, np.uint8)
        pixels[size[1] // 4:, size[0] // 5:size[0] // 2] = (220, 40, 40)
        pixels[:, 3 * size[0] // 5:] = (40, 40, 220)
        files.append(root / f"odd{k}.png")
        Image.fromarray(pixels).convert(mode).save(files[-1])
    return {"data": data, "weights": {"flip": weights, "plain": plain}, "files": [str(f) for f in files],
            "root": root}


@pytest.fixture(scope="module")
def reference(trained) -> dict:
    """Per views: inference.py --image FILES --branches image --format json (its records, run on a
    copy of the weights: it writes fusion-image.json) and the same probabilities unrounded."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        for views, weights in trained["weights"].items():
            copy = Path(shutil.copytree(weights, trained["root"] / f"inference-{views}"))
            result = inference.main(["--image", *trained["files"], "--branches", "image", "--format", "json",
                                     "--data", str(trained["data"]), "--weights", str(copy), "--val-fraction",
                                     VAL_FRACTION, "--workers", "0", "--output", str(copy / "out")])
            # What predict_images computes before rounding: seeded, no cache, no worker processes.
            seed_everything(0)
            paths = GivenFiles.of(trained["files"])
            predictor = BranchPredictor(load_branch_checkpoints(weights, ["image"]), paths, torch.device("cpu"), 64)
            frame = pd.DataFrame({"ImageID": paths.image_ids, "Caption": [""] * len(paths.files)})
            out[views] = {"records": result["predictions"],
                          "probs": predictor.probabilities(frame, Inputs(paths)).by_branch["image"],
                          "weights_copy": copy}
    return out


@pytest.fixture(scope="module")
def exported(trained):
    """``exported(format, views)``: export_image_branch's result with its model.json, made once per pair."""
    made: dict[tuple[str, str], dict] = {}

    def make(fmt: str, views: str) -> dict:
        if (fmt, views) not in made:
            config = ExportConfig(weights_dir=str(trained["weights"][views]), format=fmt,
                                  out=str(trained["root"] / f"{fmt}-{views}"), data=str(trained["data"]),
                                  val_fraction=float(VAL_FRACTION))
            result = export_image_branch(config)
            made[fmt, views] = {**result, "meta": json.loads(Path(result["metadata"]).read_text())}
        return made[fmt, views]

    return make


def pipeline_pixels(trained, views: str) -> np.ndarray:
    """uint8 (N, 3, R, R) of the files, decoded and squashed by the pipeline's own transform."""
    checkpoint = torch.load(Path(trained["weights"][views]) / "image.pt", weights_only=True)
    preprocessing = checkpoint["preprocessing"]
    paths = GivenFiles.of(trained["files"])
    images = ImageDataset(paths, paths.image_ids, build_transform(preprocessing, normalize=False),
                          preprocessing["resolution"], blank_dtype=torch.uint8)
    items = [images[k] for k in range(len(images))]
    assert all(readable for _, _, readable in items)
    return np.ascontiguousarray(torch.stack([image for image, _, _ in items]).numpy())


def check_matches_inference(probs: np.ndarray, reference: dict) -> None:
    assert probs.dtype == np.float32 and probs.shape == reference["probs"].shape
    assert np.abs(probs - reference["probs"]).max() <= TOLERANCE
    from_json = np.array([list(record["branches"]["image"].values()) for record in reference["records"]])
    assert np.abs(probs - from_json).max() <= TOLERANCE + JSON_ROUNDING


@pytest.mark.parametrize("views", ["flip", "plain"])
def test_onnx_model_gives_inference_probabilities(trained, reference, exported, views):
    ort = pytest.importorskip("onnxruntime")
    result = exported("onnx", views)
    session = ort.InferenceSession(result["model"][0], providers=["CPUExecutionProvider"])
    pixels = pipeline_pixels(trained, views)
    probs = session.run(["probabilities"], {"pixels": pixels})[0]
    check_matches_inference(probs, reference[views])
    # The batch axis is free: one image at a time gives the same rows.
    single = np.concatenate([session.run(None, {"pixels": pixels[k:k + 1]})[0] for k in range(2)])
    assert np.abs(single - probs[:2]).max() <= 1e-6


@pytest.mark.parametrize("views", ["flip", "plain"])
def test_openvino_model_gives_inference_probabilities(trained, reference, exported, views):
    ov = pytest.importorskip("openvino")
    result = exported("openvino", views)
    assert [Path(p).name for p in result["model"]] == ["model.xml", "model.bin"]
    compiled = ov.Core().compile_model(result["model"][0], "CPU", OPENVINO_F32)
    pixels = pipeline_pixels(trained, views)
    check_matches_inference(compiled({"pixels": pixels})[compiled.output("probabilities")], reference[views])
    single = compiled({"pixels": pixels[:1]})[compiled.output(0)]
    assert single.shape == (1, len(result["meta"]["label_ids"]))


def test_model_json_describes_the_model(trained, reference, exported):
    pytest.importorskip("onnxruntime")
    result = exported("onnx", "flip")
    meta, out = result["meta"], Path(result["out"])
    checkpoint = torch.load(Path(trained["weights"]["flip"]) / "image.pt", weights_only=True)
    resolution, labels = checkpoint["preprocessing"]["resolution"], checkpoint["label_ids"]
    assert meta["format"] == "onnx" and meta["files"] == ["model.onnx"] and (out / "model.onnx").is_file()
    assert meta["resolution"] == resolution == 32
    assert meta["input"] == {"name": "pixels", "dtype": "uint8", "layout": "NCHW", "shape": ["N", 3, 32, 32],
                             "channels": "RGB", "range": "0..255"}
    assert meta["output"]["name"] == "probabilities" and meta["output"]["dtype"] == "float32"
    assert meta["output"]["shape"] == ["N", len(labels)]
    assert meta["label_ids"] == labels and meta["label_names"] == [NAMES[str(i)] for i in labels]
    preprocessing = meta["preprocessing"]
    assert {k: preprocessing[k] for k in checkpoint["preprocessing"]} == checkpoint["preprocessing"]
    assert preprocessing["views"] == ["plain", "flip"] and "mirror" in preprocessing["flip_averaging"]
    assert "folded" in preprocessing["input_pixels"] and "squash" in preprocessing["resize_how"]
    assert meta["opset"] >= 17 and meta["check"]["max_abs_difference_vs_torch"] <= 1e-5
    # No fusion.json in these weights: thresholds tuned for the image branch alone on the validation
    # split, as inference.py --branches image tunes them (the thresholds its records carry).
    assert len(meta["thresholds"]) == len(labels)
    assert "validation split" in meta["thresholds_source"]
    tuned = list(reference["flip"]["records"][0]["thresholds"].values())
    assert meta["thresholds"] == pytest.approx(tuned, abs=1e-4)
    readme = (out / "README.md").read_text()
    assert "import onnxruntime" in readme and "model.onnx" in readme and "(N, 3, 32, 32)" in readme
    # A phone photo upright, as the pipeline decodes it.
    assert "ImageOps.exif_transpose(Image.open(" in readme and "exif_transpose" in preprocessing["orientation"]
    plain = exported("onnx", "plain")["meta"]["preprocessing"]
    assert plain["views"] == ["plain"] and "flip_averaging" not in plain


def test_thresholds_say_where_they_came_from(trained, reference):
    labels = torch.load(Path(trained["weights"]["flip"]) / "image.pt", weights_only=True)["label_ids"]
    # fusion-image.json tuned by inference.py --branches image: its thresholds, as they are.
    copy = reference["flip"]["weights_copy"]
    fused = json.loads((copy / "fusion-image.json").read_text())
    assert fused["branches"] == ["image"]
    thresholds, source = image_only_thresholds(ExportConfig(weights_dir=str(copy), data="absent"), labels)
    expected = [fused["per_label_thresholds"].get(str(i), fused["threshold"]) for i in labels]
    assert thresholds == pytest.approx(expected, abs=1e-4) and "fusion-image.json" in source
    # Neither fusion.json nor a dataset: 0.5, and why.
    thresholds, source = image_only_thresholds(
        ExportConfig(weights_dir=str(trained["weights"]["flip"]), data=str(trained["root"] / "absent")), labels)
    assert thresholds == [0.5] * len(labels) and source.startswith("0.5") and "absent" in source


def test_a_weights_folder_without_image_pt_is_a_clear_error(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(CheckpointError, match=r"image\.pt: no image-branch checkpoint.*train_efficientnet\.py"):
        export.main(["--weights-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_missing_runtime_package_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_installed", lambda module: module != "openvino")
    with pytest.raises(ExportError, match="needs the openvino package.*pip install openvino"):
        export.main(["--weights-dir", str(tmp_path), "--format", "openvino", "--out", str(tmp_path / "out")])


def test_help_and_an_unknown_format(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert all(option in help_text for option in ("--weights-dir", "--format", "--out", "--data"))
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--format", "tflite"])
    assert exit_info.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err


def test_float16_rounding_in_float32_arithmetic_is_the_cast():
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-9, 5, (20000,), generator=generator)
    exponents = torch.randint(-24, 16, (5000,), generator=generator)
    significands = torch.randint(1024, 2048, (5000,), generator=generator)
    ties = (significands + 0.5) * 2.0 ** (exponents - 10.0)  # halfway between two float16 values
    values = torch.cat([torch.randn(20000, generator=generator) * scales, ties, -ties, torch.tensor(
        [0.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14, 65504.0, 65519.9, 65520.0, -70000.0])])
    assert torch.equal(float16_rounded(values), values.half().float())
