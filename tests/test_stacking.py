"""The out-of-fold stacker (``pipeline/stacking.py``): pooling, the cheap models and the MLP
against scikit-learn's own predictions, that out-of-fold means out of fold, a round trip through
``torch.load(weights_only=True)``, and seeded determinism; and ``train_efficientnet.py
--stacker-folds`` (``pipeline/train/stacker.py``): its files in partial mode, and the option
named wherever it cannot act. Tiny generated data, seconds."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

import train_efficientnet
from pipeline import stacking
from pipeline.branches.image import image_caption_vectors
from pipeline.checkpoint import load_checkpoint, load_probabilities, probabilities_path
from pipeline.config import parse_config, run_main
from pipeline.data.dataset import DatasetPaths, group_by_image, load_train_val
from pipeline.io import OptionError
from pipeline.metrics import tune_global_threshold
from pipeline.shards import ShardedStore
from pipeline.text_features import TextEncoder
from pipeline.train.image_config import TRAINING_MODES, ImageTrainConfig, idle_options
from pipeline.train.stacker import train_stacker
from tests.conftest import TINY_IMAGE_ARGS, make_tiny_dataset

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def problem(rows: int = 80, labels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image features (N, 8), sentence vectors (N, 5), labels (N, L)): each input carries the
    labels through its own random codes, plus noise."""
    rng = np.random.default_rng(seed)
    y = (rng.random((rows, labels)) < 0.4).astype(np.int64)
    image = y @ rng.standard_normal((labels, 8)) + rng.standard_normal((rows, 8))
    caption = y @ rng.standard_normal((labels, 5)) + rng.standard_normal((rows, 5))
    return image.astype(np.float32), caption.astype(np.float32), y


def test_pooling_is_the_mean_then_the_max_of_each_channel_read_a_batch_at_a_time():
    maps = np.arange(2 * 2 * 2 * 2, dtype=np.float16).reshape(2, 2, 2, 2)  # (N, C, h, w)
    np.testing.assert_array_equal(stacking.pool_maps(maps), [[1.5, 5.5, 3, 7], [9.5, 13.5, 11, 15]])
    many = np.random.default_rng(0).standard_normal((7, 3, 2, 2)).astype(np.float16)
    asked = []

    def read(rows):
        asked.append(rows.tolist())
        return many[rows]

    pooled = stacking.pool_stage_maps(read, [6, 0, 1, 2, 3], batch_rows=2)
    assert asked == [[6, 0], [1, 2], [3]]
    np.testing.assert_array_equal(pooled, stacking.pool_maps(many[[6, 0, 1, 2, 3]]))
    assert pooled.dtype == np.float32 and pooled.shape == (5, 6)


def test_fit_gives_a_flat_tensor_state_and_predict_its_probabilities():
    image, caption, y = problem()
    state = stacking.fit(image, caption, y, folds=4, seed=0)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    assert shapes == {
        "log_odds_limit": (),
        "image.mean": (8,), "image.scale": (8,), "image.coef": (3, 8), "image.intercept": (3,),
        "caption.mean": (5,), "caption.scale": (5,), "caption.coef": (3, 5), "caption.intercept": (3,),
        "stacker.0.weight": (stacking.HIDDEN_UNITS, 6), "stacker.0.bias": (stacking.HIDDEN_UNITS,),
        "stacker.1.weight": (3, stacking.HIDDEN_UNITS), "stacker.1.bias": (3,),
    }
    assert all(value.dtype == torch.float64 for value in state.values())
    new_image, new_caption, _ = problem(rows=20, seed=1)
    probs = stacking.predict(state, new_image, new_caption)
    assert probs.shape == (20, 3) and ((probs >= 0) & (probs <= 1)).all()
    assert stacking.predict(state, new_image[:0], new_caption[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match=r"the stacker's caption model reads \(N, 5\) features, got \(20, 4\)"):
        stacking.predict(state, new_image, new_caption[:, :4])
    with pytest.raises(ValueError, match="9 folds for 8 training rows; give 2 to 8"):
        stacking.fit(image[:8], caption[:8], y[:8], folds=9)
    with pytest.raises(ValueError, match="80 image rows, 79 caption rows, 80 label rows"):
        stacking.fit(image, caption[:79], y)


def test_the_cheap_models_are_scikit_learns_one_vs_rest_logistic_regression():
    """The refitted model's log-odds are those of OneVsRestClassifier(LogisticRegression) on the
    standardised features, and each held-out fold's are those of the same fitted on the other folds."""
    image, _, y = problem()
    log_odds, model = stacking.out_of_fold_log_odds(image, y, 0.05, 4, 3)
    scaled = StandardScaler().fit_transform(image.astype(np.float64))

    def one_vs_rest(rows):
        return OneVsRestClassifier(LogisticRegression(C=0.05, max_iter=300)).fit(scaled[rows], y[rows])

    refitted = (scaled @ model["coef"].T) + model["intercept"]
    np.testing.assert_allclose(expit(refitted), one_vs_rest(np.arange(80)).predict_proba(scaled), rtol=0, atol=1e-12)
    for fitted, held in KFold(4, shuffle=True, random_state=3).split(scaled):
        np.testing.assert_allclose(expit(log_odds[held]), one_vs_rest(fitted).predict_proba(scaled[held]),
                                   rtol=0, atol=1e-12)


def test_a_label_absent_from_the_training_rows_gets_the_clips_log_odds():
    """As one-vs-rest predicts a constant for a label it never saw, the cheap models give it the
    lowest log-odds the stacker reads, and the stacker still trains and predicts."""
    image, caption, y = problem()
    y[:, 1] = 0
    state = stacking.fit(image, caption, y, folds=4)
    for name, log_odds in stacking.cheap_log_odds(state, image, caption).items():
        assert not state[f"{name}.coef"][1].any(), name
        np.testing.assert_array_equal(log_odds[:, 1], -stacking.LOG_ODDS_LIMIT)
    assert np.isfinite(stacking.predict(state, image, caption)).all()


def test_out_of_fold_log_odds_never_come_from_a_model_that_saw_the_row():
    """Flip one row's label: the log-odds of every row of its fold stay bit for bit the same (no
    model that predicted them saw the row), while the other folds' change (their models did see it),
    as would its own log-odds if they came from a model fitted on it (the refitted model)."""
    image, _, y = problem()
    row, label = 17, 0
    flipped = y.copy()
    flipped[row, label] = 1 - flipped[row, label]
    before, refit_before = stacking.out_of_fold_log_odds(image, y, 0.5, 4, 0)
    after, refit_after = stacking.out_of_fold_log_odds(image, flipped, 0.5, 4, 0)
    held = next(held for _, held in KFold(4, shuffle=True, random_state=0).split(image) if row in held)
    others = np.setdiff1d(np.arange(len(y)), held)
    np.testing.assert_array_equal(before[held], after[held])
    assert np.abs(before[others, label] - after[others, label]).min() > 0
    scaled = StandardScaler().fit_transform(image.astype(np.float64))[row]
    seen_before = scaled @ refit_before["coef"][label] + refit_before["intercept"][label]
    seen_after = scaled @ refit_after["coef"][label] + refit_after["intercept"][label]
    assert abs(seen_before - seen_after) > 1e-3


def test_the_mlp_state_computes_what_scikit_learn_computes():
    image, caption, y = problem()
    inputs = np.concatenate([image, caption], axis=1).astype(np.float64)
    model = MLPClassifier(hidden_layer_sizes=(7,), max_iter=50, random_state=0).fit(inputs, y)
    np.testing.assert_allclose(stacking.mlp_probabilities(stacking.mlp_state(model), inputs),
                               model.predict_proba(inputs), rtol=0, atol=1e-12)
    deeper = MLPClassifier(hidden_layer_sizes=(4, 4), max_iter=5, random_state=0).fit(inputs, y)
    with pytest.raises(ValueError, match="one ReLU hidden layer with sigmoid outputs; got 2 layer"):
        stacking.mlp_state(deeper)


def test_the_state_round_trips_through_a_weights_only_load(tmp_path):
    image, caption, y = problem()
    state = stacking.fit(image, caption, y, folds=4, seed=0)
    torch.save(state, tmp_path / "stacker.pt")
    loaded = torch.load(tmp_path / "stacker.pt", weights_only=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    new_image, new_caption, _ = problem(rows=20, seed=1)
    np.testing.assert_array_equal(stacking.predict(loaded, new_image, new_caption),
                                  stacking.predict(state, new_image, new_caption))


def test_a_seed_gives_the_same_stacker_and_another_seed_another():
    image, caption, y = problem()
    first, again = (stacking.fit(image, caption, y, folds=4, seed=5) for _ in range(2))
    assert all(torch.equal(first[key], again[key]) for key in first)
    other = stacking.fit(image, caption, y, folds=4, seed=6)
    assert not torch.equal(first["stacker.0.weight"], other["stacker.0.weight"])
    # The refitted cheap models see every row whatever the folds: the seed does not move them.
    assert torch.equal(first["image.coef"], other["image.coef"])


# ---------------------------------------------------------------- train_efficientnet.py --stacker-folds

PARTIAL = ["--mode", "partial", "--train-from-stage", "3", "--finetune-epochs", "2", "--warmup-epochs", "0.5"]


def _train(dataset: Path, weights: Path, *extra: str) -> dict:
    return train_efficientnet.main(["--data", str(dataset), "--weights", str(weights), *TINY_IMAGE_ARGS, *extra])


@pytest.fixture(scope="module")
def stacked_dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("stacked") / "tiny")


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
def test_partial_mode_writes_a_stacker_whose_state_reproduces_its_validation_probabilities(
        stacked_dataset, tiny_text_encoder, tmp_path):
    """stacker.pt loads with weights_only; its state, applied to the validation images' cached
    front maps and caption vectors, gives val_probs_stacker.csv; the other branches' files are
    those of the same run without the option."""
    weights, plain = tmp_path / "w", tmp_path / "plain"
    summary = _train(stacked_dataset, weights, *PARTIAL, "--stacker-folds", "3")
    checkpoint = load_checkpoint(weights / "stacker.pt", branch="stacker", label_ids=[1, 3, 18, 19])
    assert torch.load(weights / "stacker.pt", weights_only=True).keys() == checkpoint.keys()
    record = checkpoint["stacker"]
    assert (record["folds"], record["seed"], record["image_view"]) == (3, 0, "plain")
    assert record["front"]["pooling"] == "stage3" and record["caption_encoder"] == "minilm"
    assert record["caption_encoder_digest"] == TextEncoder("minilm").digest
    assert record["image_weights_digest"] == load_checkpoint(weights / "image.pt")["backbone"]["weights_digest"]

    paths = DatasetPaths.resolve(stacked_dataset)
    labels, train, val = load_train_val(paths, 0.25)
    train_images, val_images = group_by_image(train).images, group_by_image(val).images
    cache = next((weights / "cache").glob("stagemaps-*"))
    store = ShardedStore.open_complete(cache, json.loads((cache / "manifest.json").read_text())["key"],
                                       len(train_images) + len(val_images))
    val_rows = len(train_images) + np.arange(len(val_images))
    expected = stacking.predict(checkpoint["state_dict"], stacking.pool_maps(store.read("plain", val_rows)),
                                image_caption_vectors(val, "minilm", weights / "cache"))
    ids, _, saved = load_probabilities(probabilities_path(weights, "stacker"), [1, 3, 18, 19])
    assert ids == val_images["ImageID"].tolist()
    np.testing.assert_allclose(saved, expected, rtol=0, atol=5e-7)  # the CSV's six decimals
    y_val = labels.encode(val_images["Labels"])
    assert summary["stacker"]["val_samples_f1"] == tune_global_threshold(y_val, expected)[1]
    assert str(weights / "stacker.pt") in summary["files"] and summary["stacker"]["folds"] == 3
    assert json.loads((weights / "image_summary.json").read_text())["stacker"]["folds"] == 3

    without = _train(stacked_dataset, plain, *PARTIAL)
    assert "stacker" not in without and not (plain / "stacker.pt").exists()
    for branch in ("image", "decoder"):
        np.testing.assert_array_equal(load_probabilities(probabilities_path(weights, branch))[2],
                                      load_probabilities(probabilities_path(plain, branch))[2])


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_outside_partial_mode_the_option_is_named_as_having_no_effect(mode):
    config = parse_config(ImageTrainConfig, train_efficientnet.get_args_parser(),
                          ["--mode", mode, "--stacker-folds", "5"])
    assert idle_options(config, TRAINING_MODES[mode]) == [f"--stacker-folds 5 has no effect: it acts in partial mode only, and this "
                                          f"run trains in {mode} mode (--mode {mode})"]


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
def test_a_frozen_run_with_the_option_warns_and_writes_no_stacker(stacked_dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        summary = _train(stacked_dataset, tmp_path / "w", "--stacker-folds", "3")
    assert "--stacker-folds 3 has no effect: it acts in partial mode only" in caplog.text
    assert [message.split()[0] for message in summary["options_without_effect"]] == ["--stacker-folds"]
    assert "stacker" not in summary and not (tmp_path / "w" / "stacker.pt").exists()


def test_without_captions_or_with_one_fold_the_option_is_refused_naming_it(tmp_path, capsys):
    dataset = make_tiny_dataset(tmp_path / "tiny", n_train=12, n_test=0)
    pd.read_csv(dataset / "train.csv").drop(columns="Caption").to_csv(dataset / "train.csv", index=False)
    argv = ["--data", str(dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS, *PARTIAL]
    parser = train_efficientnet.get_args_parser()
    assert run_main(train_efficientnet.main, parser, [*argv, "--stacker-folds", "3"]) == 2
    assert capsys.readouterr().err == (f"error: --stacker-folds 3: {dataset / 'train.csv'} has no Caption column, so "
                                       "the stacker's caption model has nothing to read; use --stacker-folds 0\n")
    assert run_main(train_efficientnet.main, parser, [*argv, "--stacker-folds", "1"]) == 2
    assert capsys.readouterr().err == "error: --stacker-folds must be 0 (off) or >= 2, got 1\n"
    assert not (tmp_path / "w" / "image.pt").exists()
    config = parse_config(ImageTrainConfig, parser, ["--stacker-folds", "4", "--weights-dir", str(tmp_path / "w")])
    readable = np.array([True, False, True, True, False])
    with pytest.raises(OptionError, match=r"^--stacker-folds 4: only 3 readable training images to split; give at "
                                          r"most 3, or 0$"):
        train_stacker(config, None, None, (1, 3), (readable, None), (readable, None), [], "")
