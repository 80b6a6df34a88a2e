"""Per-step constants are built once, not copied to the device in every step."""

import torch

from pipeline.data import transforms
from pipeline.data.transforms import normalize_batch

PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_normalize_batch_reuses_its_constants_and_matches_reference():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    first = normalize_batch(images, PRE)
    calls = transforms._device_affine.cache_info().hits
    second = normalize_batch(images, PRE)
    assert transforms._device_affine.cache_info().hits == calls + 1
    expected = (images.float() / 255 - torch.tensor(PRE["mean"]).view(1, 3, 1, 1)) / torch.tensor(PRE["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    # Reference value: pixel 255 in the red channel normalises to (1 - 0.485) / 0.229.
    assert abs(first[0, 0, 0, 2].item() - 2.2489) < 1e-3
