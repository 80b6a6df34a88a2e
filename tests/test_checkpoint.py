"""Checkpoints: plain-dict round trips, refusal of unsafe files, clear mismatch errors, atomic writes."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.checkpoint import load_checkpoint, load_probabilities, save_checkpoint, save_probabilities
from pipeline.io import CheckpointError


def saved(tmp_path, **overrides):
    args = dict(branch="image", state_dict=torch.nn.Linear(3, 2).state_dict(), config={"lr": 0.1},
                label_ids=[1, 3], preprocessing={"resolution": 224})
    args.update(overrides)
    path = tmp_path / "image.pt"
    save_checkpoint(path, **args)
    return path


def test_round_trip_is_a_plain_dict(tmp_path):
    path = saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == ckpt.FORMAT_VERSION and raw["branch"] == "image"
    loaded = load_checkpoint(path, branch="image", label_ids=[1, 3])
    assert loaded["config"] == {"lr": 0.1} and loaded["preprocessing"] == {"resolution": 224}
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(loaded["state_dict"])


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format_version": 1, "payload": _RunsCode()}, handle)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"branch": "caption"}, "holds the 'image' branch, expected 'caption'"),
    ({"label_ids": [1, 2]}, r"trained for labels \[1, 3\]"),
])
def test_mismatches_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved(tmp_path), **kwargs)


def test_other_format_version_and_foreign_files(tmp_path):
    path = saved(tmp_path)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(path)
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="image.pt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = saved(tmp_path)
    before = path.read_bytes()

    def crash(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        saved(tmp_path, config={"lr": 0.2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["image.pt"]  # no temporary file left behind


def test_probabilities_round_trip_keyed_by_image_id(tmp_path):
    probs = np.array([[0.1, 0.9], [0.5, 0.25]])
    save_probabilities(tmp_path / "p.csv", ["7.jpg", "01.jpg"], [1, 19], probs)
    ids, labels, loaded = load_probabilities(tmp_path / "p.csv", [1, 19])
    assert ids == ["7.jpg", "01.jpg"] and labels == [1, 19]
    np.testing.assert_allclose(loaded, probs)
    with pytest.raises(CheckpointError, match="expected"):
        load_probabilities(tmp_path / "p.csv", [1, 2])
