"""Bad input, third round (issue 34): rows a branch could not score in the validation
probabilities, export into a folder holding other files, label names that are not text, and
one-line errors (exit 2) for OS errors, seeds, deep JSON, symlink loops and over-long names.
Each test is a row of docs/robustness.md."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import inference
import train_caption_rnn
import train_efficientnet
from pipeline.checkpoint import load_probabilities, probabilities_path, save_probabilities
from pipeline.config import OptionError, read_config_file, run_main
from pipeline.data.dataset import DataFormatError, dataset_info, read_csv
from pipeline.data.images import ImageReadError, to_rgb
from pipeline.fusion import FusionError, load_fusion, tune_fusion
from pipeline.inference import InferenceConfig
from pipeline.io import CheckpointError, atomic_torch_save
from pipeline.tools import export
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS, make_tiny_dataset

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

VAL_FRACTION = ["--val-fraction", "0.25"]


def _copy(trained_branches: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the shared dataset and weights, for a test to change."""
    data, weights = trained_branches
    return Path(shutil.copytree(data, tmp_path / "data")), Path(shutil.copytree(weights, tmp_path / "weights"))


def _run(script, argv: list[str], monkeypatch) -> int:
    """``script`` run as a program (``run_main``), without ``PIPELINE_DEBUG`` from the caller's shell."""
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    return run_main(script.main, script.get_args_parser(), argv)


def _one_line_error(capsys) -> str:
    """The message of the single ``error:`` line on stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0][len("error: "):]


# --- Validation probabilities a branch could not fully score (item 0) ------------------------------

def _probabilities_file(path: Path, rows: list[str]) -> Path:
    path.write_text("ImageID,1,19\n" + "".join(f"{row}\n" for row in rows))
    return path


def test_probabilities_a_branch_could_not_score_read_as_nan(tmp_path):
    probs = np.array([[0.1, 0.9], [np.nan, np.nan], [0.5, 0.25]])
    save_probabilities(tmp_path / "p.csv", ["a.jpg", "b.jpg", "c.jpg"], [1, 19], probs)  # as training writes
    assert (tmp_path / "p.csv").read_text().splitlines()[2] == "b.jpg,,"
    ids, labels, loaded = load_probabilities(tmp_path / "p.csv", [1, 19])
    assert ids == ["a.jpg", "b.jpg", "c.jpg"] and labels == [1, 19]
    np.testing.assert_allclose(loaded, probs)  # NaN where NaN
    # One empty cell (or "nan"): the row has no probability for that label.
    _, _, partial = load_probabilities(_probabilities_file(tmp_path / "q.csv", ["a.jpg,0.2,", "b.jpg,nan,0.3"]))
    assert np.isnan(partial[0, 1]) and np.isnan(partial[1, 0]) and partial[0, 0] == 0.2 and partial[1, 1] == 0.3


@pytest.mark.parametrize("rows, error", [
    (["a.jpg,0.2,0.3", "b.jpg,0.2,high"], r"q\.csv:3: label 19 is 'high', not a probability"),
    (["a.jpg,1.5,0.3"], r"q\.csv:2: label 1 is '1\.5', not a probability"),
    (["a.jpg,0.5,inf"], r"q\.csv:2: label 19 is 'inf', not a probability"),
], ids=["text", "above 1", "infinite"])
def test_a_cell_that_is_no_probability_is_an_error_naming_file_and_line(tmp_path, rows, error):
    with pytest.raises(CheckpointError, match=error):
        load_probabilities(_probabilities_file(tmp_path / "q.csv", rows))


def test_a_probabilities_file_with_another_header_is_an_error(tmp_path):
    (tmp_path / "q.csv").write_text("Image,1,cat\na.jpg,0.1,0.2\n")
    with pytest.raises(CheckpointError, match=r"q\.csv:1: header 'Image,1,cat'"):
        load_probabilities(tmp_path / "q.csv")


def _two_branch_probabilities(n: int = 60) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    y = (rng.random((n, 4)) < 0.4).astype(int)
    y[np.arange(n), rng.integers(0, 4, n)] = 1
    probs = {b: np.clip(y * 0.6 + rng.random((n, 4)) * 0.5, 0, 1) for b in ("image", "caption")}
    return y, probs


def test_fusion_tuning_leaves_out_the_images_a_branch_could_not_score():
    y, probs = _two_branch_probabilities()
    with_gaps = {b: p.copy() for b, p in probs.items()}
    with_gaps["image"][[3, 7, 11]] = np.nan  # as --skip-bad-images leaves unreadable validation images
    with_gaps["caption"][20, 2] = np.nan  # one empty cell
    scored = np.setdiff1d(np.arange(len(y)), [3, 7, 11, 20])
    settings = tune_fusion(y, with_gaps, [1, 3, 18, 19], folds=3)  # the stacker is compared: 60 >= 5 * 3
    reference = tune_fusion(y[scored], {b: p[scored] for b, p in probs.items()}, [1, 3, 18, 19], folds=3)
    assert settings.tuned_on == {**reference.tuned_on, "unscored_images": 4}
    assert settings.tuned_on["n_images"] == 56
    assert (settings.weights, settings.threshold, settings.per_label_thresholds, settings.cv_samples_f1) == \
        (reference.weights, reference.threshold, reference.per_label_thresholds, reference.cv_samples_f1)


def test_fusion_tuning_with_no_image_every_branch_scored_is_an_error():
    y, probs = _two_branch_probabilities(10)
    probs["image"][:] = np.nan
    with pytest.raises(FusionError, match="none of the 10 validation images has probabilities from every branch"):
        tune_fusion(y, probs, [1, 3, 18, 19])


def _blank_rows(path: Path, rows: list[int], columns: slice = slice(None)) -> list[str]:
    """Blanks ``rows`` of a probabilities file (all cells, or ``columns``) as training or a hand
    edit leaves them; returns their ImageIDs."""
    ids, labels, probs = load_probabilities(path)
    probs[np.asarray(rows)[:, None], np.arange(len(labels))[columns]] = np.nan
    save_probabilities(path, ids, labels, probs)
    return [ids[k] for k in rows]


def test_tune_after_skip_bad_images_leaves_out_the_unscored_rows_and_says_so(trained_branches, tmp_path, monkeypatch,
                                                                             caplog):
    data, weights = _copy(trained_branches, tmp_path)
    image = _blank_rows(probabilities_path(weights, "image"), [1, 4])
    decoder = _blank_rows(probabilities_path(weights, "decoder"), [1, 4])
    caption = _blank_rows(probabilities_path(weights, "caption"), [6], slice(2, 3))  # one empty cell
    caplog.set_level(logging.INFO)
    argv = ["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"), "--workers", "0",
            *VAL_FRACTION, "--tune"]
    assert _run(inference, argv, monkeypatch) == 0
    val_images = len(load_probabilities(probabilities_path(weights, "image"))[0])
    tuned_on = json.loads((weights / "fusion.json").read_text())["tuned_on"]
    assert tuned_on["unscored_images"] == len(set(image + decoder + caption)) == 3
    assert tuned_on["n_images"] == val_images - 3
    assert f"{probabilities_path(weights, 'image')}: 2 of {val_images} rows hold no probabilities (line(s) 3, 6)" \
        in caplog.text
    assert f"{probabilities_path(weights, 'caption')}: 1 of {val_images} rows hold no probabilities (line(s) 8)" \
        in caplog.text


def test_tune_with_text_in_a_probabilities_cell_is_one_line_naming_file_and_line(trained_branches, tmp_path,
                                                                                monkeypatch, capsys):
    data, weights = _copy(trained_branches, tmp_path)
    path = probabilities_path(weights, "caption")
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    lines[3] = ",".join([*cells[:2], "oops", *cells[3:]])
    path.write_text("\n".join(lines) + "\n")
    label = lines[0].split(",")[2]
    argv = ["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"), "--workers", "0",
            *VAL_FRACTION, "--tune"]
    assert _run(inference, argv, monkeypatch) == 2
    assert _one_line_error(capsys) == (f"{path}:4: label {label} is 'oops', not a probability (a number 0..1, or "
                                       "empty where the branch could not score the image)")


# --- Export (item 3) ------------------------------------------------------------------------------

def test_export_refuses_an_empty_out(trained_branches, tmp_path, monkeypatch, capsys):
    _, weights = trained_branches
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("my project\n")
    with pytest.raises(OptionError, match=r"^--out is empty \(an unset shell variable\?\)"):
        export.main(["--weights-dir", str(weights), "--out", ""])
    assert _run(export, ["--weights-dir", str(weights), "--out", " "], monkeypatch) == 2
    assert _one_line_error(capsys).startswith("--out is empty")
    assert (tmp_path / "README.md").read_text() == "my project\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_export_never_replaces_files_it_did_not_write_without_force(trained_branches, tmp_path, monkeypatch,
                                                                    capsys):
    pytest.importorskip("onnx")
    _, weights = trained_branches
    out = tmp_path / "project"
    out.mkdir()
    (out / "README.md").write_text("my project\n")
    (out / "notes.txt").write_text("kept\n")
    argv = ["--weights-dir", str(weights), "--out", str(out), "--data", str(tmp_path / "absent")]
    assert _run(export, argv, monkeypatch) == 2
    assert _one_line_error(capsys) == (f"--out {out}: would replace README.md, which no export wrote; choose an "
                                       "empty or new folder, or give --force to replace them")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]  # nothing written
    assert (out / "README.md").read_text() == "my project\n"
    # --force replaces it; a second export into the folder replaces only its own files, unasked.
    export.main([*argv, "--force"])
    assert (out / "README.md").read_text().startswith("# The image branch, exported (onnx)")
    export.main(argv)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.json", "model.onnx", "notes.txt"]
    # A model file that no model.json of an export lists is the user's too.
    (out / "model.json").write_text('{"mine": true}\n')
    with pytest.raises(OptionError, match=r"would replace model\.onnx, model\.json, which no export wrote"):
        export.main(argv)


@pytest.mark.parametrize("opset", ["16", "99"])
def test_export_an_opset_out_of_range_is_one_line_with_the_range(tmp_path, monkeypatch, capsys, opset):
    argv = ["--weights-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--opset", opset]
    assert _run(export, argv, monkeypatch) == 2
    assert _one_line_error(capsys) == (f"--opset {opset}: valid opsets are 17..{export.max_opset()} (the model "
                                       "needs 17; torch's ONNX exporter writes up to the highest)")
    assert not (tmp_path / "out").exists()


# --- Label names (item 4) -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [5, None, ["person"]], ids=["number", "null", "list"])
def test_a_label_name_that_is_no_string_is_an_error_naming_file_and_entry(tmp_path, name):
    data = make_tiny_dataset(tmp_path / "tiny", n_train=8, n_test=2, images=False)
    (data / "dataset.json").write_text(json.dumps({"train.csv": {"labels": {"1": "person", "3": name}}}))
    error = rf"{data / 'dataset.json'}: \"labels\" of 'train.csv': label 3 is named {json.dumps(name)}; a label " \
            "name is a string"
    with pytest.raises(DataFormatError, match="^" + error.replace("[", r"\[").replace("]", r"\]")):
        read_csv(data / "train.csv")
    with pytest.raises(DataFormatError, match="label 3 is named"):
        dataset_info(data / "train.csv")  # every reader of the names, the report's included


# --- One-line errors (item 5) ---------------------------------------------------------------------

def test_a_config_file_in_a_symlink_loop_is_one_line(tmp_path, monkeypatch, capsys):
    os.symlink(tmp_path / "b.json", tmp_path / "a.json")
    os.symlink(tmp_path / "a.json", tmp_path / "b.json")
    assert _run(train_caption_rnn, ["--config", str(tmp_path / "a.json")], monkeypatch) == 2
    assert _one_line_error(capsys) == f"--config {tmp_path / 'a.json'}: Too many levels of symbolic links"


def _deep(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


def test_json_nested_too_deeply_is_one_line(tmp_path, monkeypatch, capsys):
    config = tmp_path / "deep.json"
    config.write_text(_deep(100_000))
    assert _run(inference, ["--config", str(config)], monkeypatch) == 2
    assert _one_line_error(capsys) == (f"--config {config}: JSON nested too deeply to read; a config file is one "
                                       "flat object of settings")
    (tmp_path / "fusion.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FusionError, match=r"fusion\.json: JSON nested too deeply to read"):
        load_fusion(tmp_path / "fusion.json")


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
@pytest.mark.parametrize("script", [train_efficientnet, train_caption_rnn, inference, export],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_a_seed_outside_32_bits_is_refused_as_it_is_parsed(script, seed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.get_args_parser().parse_args(["--seed", seed])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"error: argument --seed: {seed} is out of range; --seed takes 0..4294967295")
    assert script.get_args_parser().parse_args(["--seed", "4294967295"]).seed == 4294967295


def test_the_highest_seed_trains_the_caption_ensemble(tiny_dataset, tmp_path):
    # Its members take seeds --seed + 1, ..., past NumPy's 32 bits: they wrap around there.
    summary = train_caption_rnn.main(["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"), "--device", "cpu",
                                      *TINY_CAPTION_ARGS, "--seed", "4294967295"])
    assert (tmp_path / "w" / "caption.pt").is_file() and summary


def test_a_seed_outside_32_bits_in_a_config_file_names_the_key(tmp_path):
    (tmp_path / "c.json").write_text('{"seed": -1}')
    with pytest.raises(OptionError, match=r"key 'seed' \(--seed\) is -1; it takes an integer in 0\.\.4294967295"):
        read_config_file(InferenceConfig, tmp_path / "c.json")


def test_a_data_name_longer_than_the_file_system_allows_is_one_line(tmp_path, monkeypatch, capsys):
    name = str(tmp_path / ("x" * 300))
    assert _run(train_caption_rnn, ["--data", name], monkeypatch) == 2
    assert _one_line_error(capsys) == f"--data {name}: File name too long"


@pytest.mark.parametrize("mode, make", [
    ("CMYK", lambda rgb: rgb.convert("CMYK")),
    ("F", lambda rgb: rgb.convert("L").convert("F")),
    ("I", lambda rgb: Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257)),
])
def test_predictor_converts_pil_images_of_every_mode(trained_branches, tmp_path, mode, make):
    from pipeline import Predictor

    data, weights = _copy(trained_branches, tmp_path)
    predictor = Predictor.from_weights(weights, device="cpu", data=str(data), val_fraction=0.25, workers=0)
    rgb = Image.open(data / "data" / "50.jpg").convert("RGB")
    image = make(rgb)
    assert image.mode == mode
    record, = predictor.predict(image)
    assert record["image_readable"] and record["labels"]
    assert all(p is not None for p in record["branches"]["image"].values())
    # The prediction of the image as pipeline.data.images.to_rgb converts a file of its mode.
    assert record == predictor.predict(to_rgb(image))[0]


def _simulated(error: OSError):
    def fail(*args: object, **kwargs: object) -> None:
        raise error
    return fail


@pytest.mark.parametrize("error, reason", [
    (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system"),
    (PermissionError(errno.EPERM, "Operation not permitted"), "Operation not permitted"),  # chattr +i
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (OSError(errno.ENAMETOOLONG, "File name too long"), "File name too long"),
], ids=["permission denied", "read-only", "immutable", "disk full", "name too long"])
def test_an_os_error_writing_the_weights_is_one_line_naming_path_and_reason(tiny_dataset, tmp_path, monkeypatch,
                                                                            capsys, error, reason):
    # The first file written into --weights-dir fails as the OS would fail it (tests run as root,
    # whom chmod does not stop), naming the folder it could not create the file in.
    import pipeline.io

    weights = tmp_path / "w"
    error.filename = str(weights)
    real_create = pipeline.io._create_temporary
    monkeypatch.setattr(pipeline.io, "_create_temporary",
                        lambda path: _simulated(error)() if path.parent == weights else real_create(path))
    argv = ["--data", str(tiny_dataset), "--weights", str(weights), "--device", "cpu", *TINY_CAPTION_ARGS]
    assert _run(train_caption_rnn, argv, monkeypatch) == 2
    assert _one_line_error(capsys) == f"{weights}: {reason}"
    # --debug shows the traceback.
    with pytest.raises(OSError):
        _run(train_caption_rnn, [*argv, "--debug"], monkeypatch)


def test_a_file_where_the_weights_folder_belongs_is_one_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    (tmp_path / "w").write_text("a file")
    argv = ["--data", str(tiny_dataset), "--weights", str(tmp_path / "w" / "sub"), "--device", "cpu",
            *TINY_CAPTION_ARGS]
    assert _run(train_caption_rnn, argv, monkeypatch) == 2
    assert _one_line_error(capsys) == f"{tmp_path / 'w' / 'sub'}: Not a directory (a file stands where a folder belongs)"
    argv[3] = str(tmp_path / "w")
    assert _run(train_caption_rnn, argv, monkeypatch) == 2
    assert _one_line_error(capsys).startswith(f"{tmp_path / 'w'}: ")


def test_a_write_that_fails_for_want_of_space_names_the_file(tmp_path, monkeypatch):
    # write() and torch.save say a full disk without naming the file; the atomic writers name it.
    import pipeline.io

    with pytest.raises(OSError) as raised:
        pipeline.io.atomic_write(tmp_path / "a.txt", _simulated(OSError(errno.ENOSPC, "No space left on device")))
    assert (raised.value.errno, raised.value.filename) == (errno.ENOSPC, str(tmp_path / "a.txt"))
    monkeypatch.setattr(torch, "save", _simulated(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                               "unexpected pos 704 vs 598")))
    with pytest.raises(OSError) as raised:
        atomic_torch_save({"a": 1}, tmp_path / "b.pt")
    assert raised.value.filename == str(tmp_path / "b.pt") and "unexpected pos 704" in raised.value.strerror
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left


# --- Every training image unreadable (item 6) -----------------------------------------------------

def test_skip_bad_images_with_every_image_unreadable_says_nothing_is_left(tmp_path):
    data = make_tiny_dataset(tmp_path / "tiny", n_train=16, n_test=2)
    for image in (data / "data").glob("*.jpg"):
        image.write_bytes(b"not an image")
    argv = ["--data", str(data), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS]
    with pytest.raises(ImageReadError, match=r"^16 image file\(s\) missing or unreadable"):
        train_efficientnet.main(argv)
    with pytest.raises(ImageReadError) as raised:
        train_efficientnet.main([*argv, "--skip-bad-images"])
    assert str(raised.value) == (f"--skip-bad-images: all 16 images of train.csv in {data / 'data'} are missing or "
                                 f"unreadable (listed in {tmp_path / 'w' / 'skipped_images.txt'}); nothing to train on")
    assert len((tmp_path / "w" / "skipped_images.txt").read_text().splitlines()) == 16
