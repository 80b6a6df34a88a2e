"""Streaming inference: test images a chunk at a time, the submission written as they finish."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import inference
import pipeline.prediction as prediction_module
from tests.conftest import TRAINED_N_TEST, count_extracted_rows


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
    extracted = count_extracted_rows(monkeypatch)
    original_rows, written = prediction_module._write_rows, []

    def interrupted(handle, image_ids, *rest):
        if len(written) == 2:
            raise KeyboardInterrupt  # while writing the third chunk
        written.append(len(image_ids))
        original_rows(handle, image_ids, *rest)

    output = tmp_path / "cut"
    with monkeypatch.context() as patch:
        patch.setattr(prediction_module, "_write_rows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            predict(output, "--chunk-size", "5")
    assert extracted == [5, 5, 5]
    assert not (output / "submission.csv").exists() and list(output.glob("*submission*")) == []
    resumed = predict(output, "--chunk-size", "5")
    assert extracted == [5, 5, 5, 5, TRAINED_N_TEST - 20]  # only the two chunks never reached
    assert resumed.read_bytes() == predict(tmp_path / "whole").read_bytes()


def test_each_chunk_is_cached_on_its_own(run, tmp_path, monkeypatch):
    _, predict = run
    extracted = count_extracted_rows(monkeypatch)
    predict(tmp_path / "a", "--chunk-size", "10")
    assert extracted == [10, 10, TRAINED_N_TEST - 20]
    predict(tmp_path / "b", "--chunk-size", "10")
    assert extracted == [10, 10, TRAINED_N_TEST - 20]  # the second run read all three from the cache


def test_streamed_standardisation_matches_the_whole_set_at_once():
    import numpy as np
    import torch

    from pipeline.train.image_inputs import FeatureRows
    from pipeline.models.heads import FeatureNorm

    features = (torch.randn(1000, 24) * torch.linspace(0.1, 30, 24) + 5).half()
    rows = np.arange(3, 1000, 2)
    whole = features[rows].float()
    streamed = FeatureNorm(24).fit_chunks(features[rows[i:i + 64]] for i in range(0, len(rows), 64))
    torch.testing.assert_close(streamed.mean, whole.mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(streamed.std, whole.std(0), rtol=1e-4, atol=1e-5)
    targets = torch.arange(len(rows))[:, None].float()
    dataset = FeatureRows(features, rows, targets, streamed)
    x, y = dataset.batch([0, 5, 7])
    torch.testing.assert_close(x, streamed(features[rows[[0, 5, 7]]].float()))
    assert y[:, 0].tolist() == [0, 5, 7] and x.dtype == torch.float32
    assert torch.cat([chunk for chunk, _ in dataset.chunks(100)]).shape == (len(rows), 24)
    assert dataset.__getitems__([1, 2])[1][1].item() == 2
