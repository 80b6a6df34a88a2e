"""What an image file is to the decoder: only a regular file (a symlink to one included) is
ever opened, in every path that decodes images."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
from pipeline.data.dataset import DatasetPaths, GivenFiles
from pipeline.data.images import ImageDataset
from pipeline.engine.distributed import DistContext
from pipeline.features import cached_features
from pipeline.models.backbones import create_backbone
from pipeline.train.image_inputs import decodable

RED, BLUE = (220, 30, 30), (30, 30, 220)
# A name over the 255-byte limit of the usual file systems (ext4, xfs, btrfs, tmpfs).
TOO_LONG = "x" * 300 + ".jpg"


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: any turn or mirror of it shows."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2], pixels[:, width // 2:] = RED, BLUE
    return Image.fromarray(pixels)


class Capture:
    """Stands in for the transform and keeps what the decoder hands it."""

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.seen.append(image.copy())
        return torch.zeros(3, 1, 1)


@pytest.fixture
def backbone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return create_backbone("test_efficientnet", resolution=32)


class Hung(Exception):
    """Not an OSError: the decoder takes those for an unreadable file, and would hide this one."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail, instead of hanging the suite, when the block is still running after ``seconds``
    (a FIFO opened for reading blocks until a writer comes, which none will)."""
    def expire(signum, frame):
        raise Hung(f"still running after {seconds} s: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _socket(path: Path) -> None:
    # A Unix socket's address is limited to about 100 bytes: bind a short relative name.
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path.name)
        server.close()  # the socket file stays
    finally:
        os.chdir(cwd)


# (case, maker of what lies at the path): none of them is a regular file.
NOT_REGULAR: list[tuple[str, Callable[[Path], None]]] = [
    ("fifo", os.mkfifo),
    ("directory", os.mkdir),
    ("character device (a symlink to /dev/null)", lambda p: p.symlink_to("/dev/null")),
    ("socket", _socket),
    ("symlink to a fifo", lambda p: (os.mkfifo(p.with_suffix(".fifo")), p.symlink_to(p.with_suffix(".fifo")))),
    ("dangling symlink", lambda p: p.symlink_to(p.with_suffix(".gone"))),
]


@pytest.mark.parametrize("case, make", NOT_REGULAR, ids=[c[0] for c in NOT_REGULAR])
def test_only_regular_files_are_opened(tmp_path, monkeypatch, case, make):
    halves(20, 10).save(tmp_path / "real.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    make(tmp_path / "odd.jpg")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *a, **k: opened.append(Path(path).name) or real_open(path, *a, **k))
    capture = Capture()
    files = GivenFiles.of([tmp_path / "odd.jpg", tmp_path / "link.png", tmp_path / TOO_LONG])
    dataset = ImageDataset(files, files.image_ids, capture, 16)
    with deadline(10):
        flags = [dataset[k][2] for k in range(len(dataset))]
    assert flags == [False, True, False] and opened == ["link.png"]
    assert np.array_equal(np.asarray(capture.seen[0]), np.asarray(halves(20, 10)))  # the symlink's target


def test_a_fifo_or_an_overlong_name_is_an_unreadable_image_in_loader_workers(backbone, tmp_path):
    """The cache key, the training check and feature extraction, with a loader worker."""
    halves(20, 10).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    paths = DatasetPaths(root=tmp_path, images=tmp_path)
    ids = ["ok.png", "pipe.jpg", TOO_LONG, "ok.png"]
    with deadline(30):
        assert decodable(paths, ids, workers=1, context=DistContext()).tolist() == [True, False, False, True]
        features, readable = cached_features(backbone, paths, ids, tmp_path / "cache", torch.device("cpu"),
                                             batch_size=4, workers=1)
    assert readable.tolist() == [True, False, False, True]
    assert features[1:3].isnan().all() and not features[[0, 3]].isnan().any()


def test_inference_lists_a_fifo_and_still_writes_the_submission(trained_branches, tmp_path):
    data, weights = trained_branches
    data = Path(shutil.copytree(data, tmp_path / "data"))
    weights = Path(shutil.copytree(weights, tmp_path / "weights"))
    test = pd.read_csv(data / "test.csv", dtype=str)
    fifo, folder = test["ImageID"].iloc[2], test["ImageID"].iloc[5]
    for image_id in (fifo, folder):
        (data / "data" / image_id).unlink()
    os.mkfifo(data / "data" / fifo)
    (data / "data" / folder).mkdir()
    with deadline(60):
        summary = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"),
                                  "--workers", "1", "--val-fraction", "0.25"])
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str, keep_default_na=False)
    assert submission["ImageID"].tolist() == test["ImageID"].tolist() and all(submission["Labels"])
    assert (tmp_path / "out" / "unreadable_images.txt").read_text().split() == [fifo, folder]
    assert summary["unreadable_images"] == 2


