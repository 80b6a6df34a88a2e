"""Tests for the synthetic demo dataset (pipeline/demo.py): layout, content, determinism, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.tools.demo import MARKER_NAME, generate_demo, get_args_parser, main
from pipeline.labels import COMP5329_LABEL_IDS

N, SIZE, TEST_FRACTION = 40, 64, 0.25


def _generate(out: Path, seed: int = 0, **kwargs) -> dict:
    return generate_demo(out, num_images=N, test_fraction=TEST_FRACTION, size=SIZE, seed=seed,
                         progress=False, **kwargs)


def _image_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").glob("*.jpg"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, _generate(out)


def test_layout_and_columns(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    train = pd.read_csv(out / "train.csv")
    test = pd.read_csv(out / "test.csv")
    truth = pd.read_csv(out / "test_labels.csv")
    assert list(train.columns) == ["ImageID", "Labels", "Caption"]
    assert list(test.columns) == ["ImageID", "Caption"]
    assert list(truth.columns) == ["ImageID", "Labels"]
    assert len(train) == 30 and len(test) == 10 and len(truth) == 10
    assert summary["num_train"] == 30 and summary["num_test"] == 10 and not summary["skipped"]
    ids = list(train.ImageID) + list(test.ImageID)
    assert ids == [f"{i}.jpg" for i in range(N)]  # test ids continue after the train ids
    assert list(truth.ImageID) == list(test.ImageID)
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(ids)
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["params"]["num_images"] == N and marker["params"]["seed"] == 0


def test_labels_and_captions(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    labels = list(pd.read_csv(out / "train.csv", dtype=str).Labels)
    labels += list(pd.read_csv(out / "test_labels.csv", dtype=str).Labels)
    for field in labels:
        ids = [int(token) for token in field.split()]
        assert ids, "every image has at least one label"
        assert ids == sorted(set(ids))
        assert all(i in COMP5329_LABEL_IDS for i in ids)
    captions = list(pd.read_csv(out / "train.csv").Caption) + list(pd.read_csv(out / "test.csv").Caption)
    assert all(isinstance(c, str) and c.strip() and "\n" not in c for c in captions)
    assert set(summary["label_frequencies"]) == set(COMP5329_LABEL_IDS)
    assert summary["label_frequencies"][1] > 0.3  # person dominates, as in COCO


def test_images_are_rgb_of_the_given_size(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    for path in (out / "data").glob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (SIZE, SIZE)


def test_same_seed_gives_identical_files(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = demo
    again = tmp_path / "again"
    _generate(again)
    for name in ("train.csv", "test.csv", "test_labels.csv"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert _image_bytes(again) == _image_bytes(out)


def test_worker_processes_do_not_change_the_output(tmp_path: Path) -> None:
    # 200 images is the smallest run that uses the pool.
    kwargs = dict(num_images=200, size=32, progress=False)
    generate_demo(tmp_path / "one", workers=1, **kwargs)
    generate_demo(tmp_path / "two", workers=2, **kwargs)
    assert (tmp_path / "one/train.csv").read_bytes() == (tmp_path / "two/train.csv").read_bytes()
    assert _image_bytes(tmp_path / "one") == _image_bytes(tmp_path / "two")


def test_different_seed_differs(demo: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = demo
    other = tmp_path / "other"
    _generate(other, seed=1)
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()
    assert (other / "data/0.jpg").read_bytes() != (out / "data/0.jpg").read_bytes()


def test_marker_skips_a_matching_rerun(tmp_path: Path) -> None:
    first = _generate(tmp_path)
    (tmp_path / "data/0.jpg").unlink()  # a skipped run does not touch the folder
    second = _generate(tmp_path)
    assert second["skipped"]
    assert second["label_frequencies"] == first["label_frequencies"]
    assert not (tmp_path / "data/0.jpg").exists()

    forced = _generate(tmp_path, force=True)
    assert not forced["skipped"] and (tmp_path / "data/0.jpg").exists()


def test_changed_parameters_regenerate_and_drop_stale_images(tmp_path: Path) -> None:
    _generate(tmp_path)
    smaller = generate_demo(tmp_path, num_images=20, test_fraction=0.2, size=SIZE, progress=False)
    assert not smaller["skipped"]
    assert len(list((tmp_path / "data").glob("*.jpg"))) == 20
    assert len(pd.read_csv(tmp_path / "train.csv")) == 16


def test_rejects_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="test_fraction must be between 0 and 1, got 1.5"):
        generate_demo(tmp_path, num_images=10, test_fraction=1.5)
    with pytest.raises(ValueError, match="num_images must be at least 2, got 1"):
        generate_demo(tmp_path, num_images=1)
    with pytest.raises(ValueError, match="size must be at least 32 pixels, got 16"):
        generate_demo(tmp_path, num_images=10, size=16)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_main_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    summary = main(["--out", str(out), "--num-images", "12", "--size", "48", "--seed", "3"])
    line = capsys.readouterr().out.strip()
    assert summary["num_images"] == 12 and len(line.splitlines()) == 1 and str(out) in line
    assert len(pd.read_csv(out / "train.csv")) + len(pd.read_csv(out / "test.csv")) == 12
    main(["--out", str(out), "--num-images", "12", "--size", "48", "--seed", "3"])
    assert "skipped" in capsys.readouterr().out


def test_help_documents_every_option() -> None:
    help_text = get_args_parser().format_help()
    for flag in ("--out", "--num-images", "--test-fraction", "--size", "--seed", "--force", "--workers"):
        assert flag in help_text
