"""Shared fixtures: a tiny dataset in the competition's layout, generated per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

# Tiny tensors run faster on one thread, and results stay identical run to run.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs only where CUDA is present (and then always runs)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (make gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def cpu_unless_marked_cuda(request, monkeypatch):
    """The suite runs on the CPU on every machine, so a GPU machine runs the same tests: ``--device
    auto`` (every script's default) resolves to the CPU here. Tests marked ``cuda`` see the GPU."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

WORDS = {1: "person", 3: "car", 18: "dog", 19: "horse"}
COLOURS = {1: (220, 40, 40), 3: (40, 200, 40), 18: (40, 40, 220), 19: (220, 220, 40)}


def make_tiny_dataset(root: Path, n_train: int = 48, n_test: int = 10, seed: int = 0) -> Path:
    """Images with coloured squares for 4 labels, captions naming most of them."""
    rng = np.random.default_rng(seed)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows, test_rows = [], []
    for i in range(n_train + n_test):
        labels = sorted(rng.choice(list(WORDS), size=rng.integers(1, 3), replace=False).tolist())
        image = np.full((32, 32, 3), 128, dtype=np.uint8)
        for k, label in enumerate(labels):
            x = 2 + 15 * k
            image[4:28, x:x + 12] = COLOURS[label]
        Image.fromarray(image).save(root / "data" / f"{i}.jpg")
        caption = "A photo of " + " and ".join(f"a {WORDS[label]}" for label in labels) + "."
        if i < n_train:
            rows.append({"ImageID": f"{i}.jpg", "Labels": " ".join(map(str, labels)), "Caption": caption})
        else:
            test_rows.append({"ImageID": f"{i}.jpg", "Caption": caption})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    pd.DataFrame(test_rows).to_csv(root / "test.csv", index=False)
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny")


# Options that keep the image branch tiny: a 100k-parameter timm test model at 32 px.
TINY_IMAGE_ARGS = [
    "--device", "cpu", "--mode", "frozen", "--backbone", "test_efficientnet", "--resolution", "32", "--workers", "0", "--batch-size", "16",
    "--epochs", "3", "--decoder-epochs", "2", "--head-hidden", "32", "--decoder-embed", "16",
    "--decoder-hidden", "32", "--val-fraction", "0.25",
]
