"""What an image file is to the decoder: a photo turned as its EXIF orientation says, and only
a regular file (a symlink to one included) ever opened, in every path that decodes images."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
import pipeline.features as features_module
from pipeline.data.dataset import DatasetPaths, GivenFiles
from pipeline.data.images import ImageDataset
from pipeline.engine.distributed import DistContext
from pipeline.features import ExtractionSettings, cache_key, cached_features, cached_stage_maps
from pipeline.models.stages import split_backbone
from pipeline.train.image_inputs import decodable
from tests.conftest import count_extracted_rows

RED, BLUE = (220, 30, 30), (30, 30, 220)
ORIENTATION = 0x0112  # the EXIF tag
# How a camera stores an upright photo under each tag: tag 6 says "turn 90 degrees clockwise
# to show", so the stored pixels are the upright ones turned 90 degrees anticlockwise; 8 the
# other way. np.rot90 turns the stored pixels back (k=1 is anticlockwise).
STORED = {6: (Image.Transpose.ROTATE_90, -1), 8: (Image.Transpose.ROTATE_270, 1)}
# A name over the 255-byte limit of the usual file systems (ext4, xfs, btrfs, tmpfs).
TOO_LONG = "x" * 300 + ".jpg"


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: any turn or mirror of it shows."""
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2], pixels[:, width // 2:] = RED, BLUE
    return Image.fromarray(pixels)


def tagged_jpeg(path: Path, upright: Image.Image, orientation: int) -> np.ndarray:
    """Write ``upright`` as a phone does (stored pixels turned, and the tag saying how to turn
    them back); returns the upright pixels the file holds: its stored pixels, decoded and turned by hand."""
    turn, k = STORED[orientation]
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    upright.transpose(turn).save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as image:  # Pillow itself never applies the tag
        return np.ascontiguousarray(np.rot90(np.asarray(image.convert("RGB")), k=k))


class Capture:
    """Stands in for the transform and keeps what the decoder hands it."""

    def __init__(self) -> None:
        self.seen: list[Image.Image] = []

    def __call__(self, image: Image.Image) -> torch.Tensor:
        self.seen.append(image.copy())
        return torch.zeros(3, 1, 1)


def side_means(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Mean colour of the left and the right quarter."""
    pixels = np.asarray(image, dtype=np.float64)
    quarter = pixels.shape[1] // 4
    return pixels[:, :quarter].reshape(-1, 3).mean(0), pixels[:, -quarter:].reshape(-1, 3).mean(0)


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_tagged_jpeg_is_decoded_upright(tmp_path, orientation):
    upright = tagged_jpeg(tmp_path / "photo.jpg", halves(48, 32), orientation)
    capture = Capture()
    # Size 32: no reduced-scale decoding of a 32 x 48 file, so the pixels are the file's own.
    _, _, readable = ImageDataset(GivenFiles.of([tmp_path / "photo.jpg"]), ["0"], capture, 32)[0]
    (image,) = capture.seen
    assert readable and image.size == (48, 32)
    assert np.array_equal(np.asarray(image), upright)
    left, right = side_means(image)
    np.testing.assert_allclose(left, RED, atol=4)
    np.testing.assert_allclose(right, BLUE, atol=4)


def test_a_large_tagged_jpeg_is_decoded_at_reduced_scale_and_upright(tmp_path):
    """1600 x 800 upright, stored 800 x 1600: libjpeg decodes 1/8 (100 x 200), the turn makes it
    200 x 100, and the box filter (short side 100 // 32 = 3) leaves ceil(200 / 3) x ceil(100 / 3)."""
    tagged_jpeg(tmp_path / "photo.jpg", halves(1600, 800), 6)
    capture = Capture()
    _, _, readable = ImageDataset(GivenFiles.of([tmp_path / "photo.jpg"]), ["0"], capture, 16)[0]
    (image,) = capture.seen
    assert readable and image.size == (67, 34)
    left, right = side_means(image)
    np.testing.assert_allclose(left, RED, atol=4)
    np.testing.assert_allclose(right, BLUE, atol=4)


def test_features_and_stage_maps_see_the_upright_photo_and_their_caches_follow_the_decoder(
        backbone, tmp_path, monkeypatch):
    paths = DatasetPaths(root=tmp_path, images=tmp_path)
    references = {}
    for orientation in (6, 8):
        upright = tagged_jpeg(tmp_path / f"tag{orientation}.jpg", halves(48, 32), orientation)
        Image.fromarray(upright).save(tmp_path / f"upright{orientation}.png")
        references[orientation] = upright
    with Image.open(tmp_path / "tag6.jpg") as stored:
        stored.save(tmp_path / "sideways.png")  # the stored pixels, no tag
    ids = ["tag6.jpg", "upright6.png", "tag8.jpg", "upright8.png", "sideways.png"]
    settings = ExtractionSettings(cache_dir=tmp_path / "cache", device=torch.device("cpu"), batch_size=8, workers=0)

    features, readable = cached_features(backbone, paths, ids, settings)
    assert readable.all()
    assert torch.equal(features[0], features[1]) and torch.equal(features[2], features[3])
    assert not torch.equal(features[0], features[4])
    front, _ = split_backbone(backbone, 2)
    maps = cached_stage_maps(backbone, front, 2, paths, ids, settings)
    plain = maps.read("plain", list(range(len(ids))))
    assert np.array_equal(plain[0], plain[1]) and np.array_equal(plain[2], plain[3])
    assert not np.array_equal(plain[0], plain[4])

    # Caches made by another decoder (the same files, other pixels) are rebuilt, not read.
    key = cache_key(backbone, [tmp_path / i for i in ids], ["plain", "flip"])
    assert key["decode_version"] == features_module.DECODE_VERSION
    extracted = count_extracted_rows(monkeypatch)
    cached_features(backbone, paths, ids, settings)
    cached_stage_maps(backbone, front, 2, paths, ids, settings)
    assert extracted == []
    monkeypatch.setattr(features_module, "DECODE_VERSION", features_module.DECODE_VERSION + 1)
    cached_features(backbone, paths, ids, settings)
    cached_stage_maps(backbone, front, 2, paths, ids, settings)
    assert extracted == [len(ids), len(ids)]


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
        features, readable = cached_features(backbone, paths, ids, ExtractionSettings(
            cache_dir=tmp_path / "cache", device=torch.device("cpu"), batch_size=4, workers=1))
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


def test_image_option_predicts_a_tagged_photo_upright_and_an_odd_file_from_its_caption(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = Path(shutil.copytree(weights, tmp_path / "weights"))
    upright = tagged_jpeg(tmp_path / "phone.jpg", halves(48, 32), 6)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    with Image.open(tmp_path / "phone.jpg") as stored:
        stored.save(tmp_path / "sideways.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    files = [tmp_path / name for name in ("phone.jpg", "upright.png", "sideways.png", "pipe.jpg", TOO_LONG)]
    with deadline(60):
        result = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"),
                                 "--val-fraction", "0.25", "--image", *map(str, files),
                                 "--caption", *["a photo of a dog"] * len(files), "--skip-bad-images"])
    phone, reference, sideways, pipe, long_name = result["predictions"]
    assert [r["image_readable"] for r in result["predictions"]] == [True, True, True, False, False]
    assert phone["branches"]["image"] == reference["branches"]["image"]
    assert phone["branches"]["image"] != sideways["branches"]["image"]
    assert all(p is None for p in pipe["branches"]["image"].values())
    assert pipe["labels"] and long_name["labels"]  # from the caption
