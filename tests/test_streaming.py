"""Streaming inference: test images a chunk at a time, the submission written as they finish."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import inference
import pipeline.features as features_module
import pipeline.inference as inference_module
from tests.conftest import TRAINED_N_TEST


@pytest.fixture
def run(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = Path(shutil.copytree(weights, tmp_path / "weights"))

    def predict(output: Path, *argv: str) -> Path:
        inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output), "--workers", "0",
                        "--val-fraction", "0.25", *argv])
        return output / "submission.csv"

    return data, predict


def test_chunked_inference_writes_the_same_submission_as_one_chunk(run, tmp_path):
    data, predict = run
    whole = predict(tmp_path / "whole").read_bytes()
    chunked = predict(tmp_path / "chunked", "--chunk-size", "5").read_bytes()
    assert chunked == whole
    rows = pd.read_csv(tmp_path / "chunked" / "submission.csv", dtype=str)
    assert rows["ImageID"].tolist() == pd.read_csv(data / "test.csv", dtype=str)["ImageID"].tolist()


def test_an_interrupted_run_leaves_no_submission_and_resumes_at_its_chunk(run, tmp_path, monkeypatch):
    _, predict = run
    extracted = []
    original_extract = features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features",
                        lambda backbone, paths, ids, *a, **k: extracted.append(len(ids)) or original_extract(
                            backbone, paths, ids, *a, **k))
    original_rows, written = inference_module._write_rows, []

    def interrupted(handle, image_ids, predictions, labels):
        if len(written) == 2:
            raise KeyboardInterrupt  # while writing the third chunk
        written.append(len(image_ids))
        original_rows(handle, image_ids, predictions, labels)

    output = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(inference_module, "_write_rows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict(output, "--chunk-size", "5")
    assert extracted == [5, 5, 5]
    assert not (output / "submission.csv").exists() and list(output.glob("*submission*")) == []
    resumed = predict(output, "--chunk-size", "5")
    assert extracted == [5, 5, 5, 5, TRAINED_N_TEST - 20]  # only the two chunks never reached
    assert resumed.read_bytes() == predict(tmp_path / "whole").read_bytes()


def test_each_chunk_is_cached_on_its_own(run, tmp_path, monkeypatch):
    _, predict = run
    extracted = []
    original_extract = features_module.extract_features
    monkeypatch.setattr(features_module, "extract_features",
                        lambda backbone, paths, ids, *a, **k: extracted.append(len(ids)) or original_extract(
                            backbone, paths, ids, *a, **k))
    predict(tmp_path / "a", "--chunk-size", "10")
    assert extracted == [10, 10, TRAINED_N_TEST - 20]
    predict(tmp_path / "b", "--chunk-size", "10")
    assert extracted == [10, 10, TRAINED_N_TEST - 20]  # the second run read all three from the cache
