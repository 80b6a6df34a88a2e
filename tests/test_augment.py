"""The device-side training augmentation (pipeline/data/augment.py): its shapes and values, its
determinism, its mirror and scale jitter, its photometric operations against torchvision's, and
that a batch is augmented without a host sync."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.data.augment import OPERATIONS, BatchAugment, photometric

CPU = torch.device("cpu")


def random_images(batch: int = 8, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def identity(batch: int) -> dict[str, torch.Tensor]:
    """Every photometric parameter at its identity, one per image."""
    ones = torch.ones(batch)
    return {"posterize": 8 * ones, "solarize": 256 * ones, "autocontrast": torch.zeros(batch, dtype=torch.bool),
            "brightness": ones, "color": ones, "contrast": ones, "sharpness": ones}


@pytest.mark.parametrize("mode", ["trivial", "light"])
def test_an_augmented_batch_keeps_its_shape_and_pixel_range(mode):
    images = random_images()
    out = BatchAugment(mode, CPU, seed=1)(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
    assert not torch.equal(out, images.float())
    if mode == "light":  # resampled and rounded: whole pixel values, as a uint8 kernel leaves them
        assert torch.equal(out, out.round())


def test_the_same_seed_draws_the_same_augmentation_and_the_state_resumes_it():
    images = random_images()
    first, second = BatchAugment("trivial", CPU, seed=3), BatchAugment("trivial", CPU, seed=3)
    assert torch.equal(first(images), second(images))
    assert not torch.equal(BatchAugment("trivial", CPU, seed=4)(images), second(images))
    state = first.state_dict()
    expected = first(images)
    resumed = BatchAugment("trivial", CPU, seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(resumed(images), expected)


def test_none_hands_the_batch_over_unchanged():
    images = random_images()
    assert BatchAugment("none", CPU)(images) is images


def test_the_mirror_is_exact_and_drawn_per_image():
    images = random_images(batch=32)
    out = BatchAugment("light", CPU, scale_jitter=1.0, seed=0)(images)
    plain = [torch.equal(o, i.float()) for o, i in zip(out, images)]
    mirrored = [torch.equal(o, i.flip(-1).float()) for o, i in zip(out, images)]
    assert all(p != m for p, m in zip(plain, mirrored))  # each image exactly one of the two
    assert 8 <= sum(mirrored) <= 24


def test_the_scale_jitter_window_stays_inside_the_image_and_keeps_its_share():
    size = 32
    constant = torch.full((16, 3, size, size), 77, dtype=torch.uint8)
    assert torch.equal(BatchAugment("light", CPU, scale_jitter=0.7)(constant), constant.float())  # no padding
    ramp = (torch.arange(size, dtype=torch.uint8) * 8).expand(16, 3, size, size).contiguous()  # column * 8
    out = BatchAugment("light", CPU, scale_jitter=0.7, seed=2)(ramp)
    columns = (out[:, 0, 0].amax(dim=-1) - out[:, 0, 0].amin(dim=-1)) / 8  # columns the window spans - 1
    assert (columns >= 0.7 ** 0.5 * size - 2).all() and (columns <= size - 1).all()
    assert columns.min() < size - 2  # some windows are smaller than the image


def test_identity_parameters_leave_the_images_exactly_as_they_were():
    images = random_images().float()
    assert torch.equal(photometric(images, **identity(len(images))), images)


# torchvision's float kernels (images 0..1), which keep the fractions its uint8 kernels truncate;
# posterize exists for uint8 only, and is exact on whole pixel values.
@pytest.mark.parametrize("name, values, reference", [
    ("brightness", (0.3, 1.7), lambda image, v: TF.adjust_brightness(image / 255, v) * 255),
    ("color", (0.2, 1.8), lambda image, v: TF.adjust_saturation(image / 255, v) * 255),
    ("contrast", (0.4, 1.6), lambda image, v: TF.adjust_contrast(image / 255, v) * 255),
    ("sharpness", (0.1, 1.9), lambda image, v: TF.adjust_sharpness(image / 255, v) * 255),
    ("posterize", (4, 6), lambda image, v: TF.posterize(image.to(torch.uint8), int(v)).float()),
    ("solarize", (40.0, 200.0), lambda image, v: TF.solarize(image / 255, v / 255) * 255),
    ("autocontrast", (True, True), lambda image, v: TF.autocontrast(image / 255) * 255),
])
def test_each_photometric_operation_matches_torchvision(name, values, reference):
    # A narrow range, so that autocontrast has something to stretch and brightness something to clip.
    images = (random_images(batch=2, size=16) // 2 + 40).float()
    params = identity(2)
    params[name] = torch.tensor(values, dtype=params[name].dtype)
    out = photometric(images, **params)
    assert not torch.equal(out, images)
    for image, value, got in zip(images, values, out):
        torch.testing.assert_close(got, reference(image, value), atol=2e-3, rtol=0)


def test_flat_channels_and_black_images_stay_finite():
    for value in (0, 128, 255):
        images = torch.full((len(OPERATIONS) * 4, 3, 16, 16), value, dtype=torch.uint8)
        out = BatchAugment("trivial", CPU, seed=value)(images)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 255


def test_trivial_mode_gives_most_images_one_visible_operation():
    images = random_images(batch=64, size=16)
    plain = BatchAugment("light", CPU, seed=5)(images)  # the same draws of mirror and window
    trivial = BatchAugment("trivial", CPU, seed=5)(images)
    changed = (trivial - plain).abs().amax(dim=(1, 2, 3)) > 0
    # 1 in 13 draws identity; a weak draw of the others may change nothing at this size.
    assert 40 <= int(changed.sum()) < 64


class SyncCalled(AssertionError):
    pass


def test_augmenting_a_batch_never_reads_a_tensor_back_to_the_host(monkeypatch):
    """What would block the host on a GPU: reading a value (``.item()``, ``int(t)``, ``bool(t)``,
    ``.tolist()``, ``.cpu()``, ``.numpy()``) or building a tensor from host values."""
    augment = BatchAugment("trivial", CPU, seed=0)
    images = random_images()

    def refuse(*args, **kwargs):
        raise SyncCalled("a host sync inside the augmentation")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    monkeypatch.setattr(torch, "tensor", refuse)
    out = augment(images)
    monkeypatch.undo()
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_augmentation_makes_no_synchronising_call():
    device = torch.device("cuda")
    augment = BatchAugment("trivial", device, seed=0)
    images = random_images(batch=16, size=64).to(device)
    augment(images)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and bool(torch.isfinite(out).all())
