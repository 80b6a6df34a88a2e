"""bench/fusion_cv.py: branches from other runs' folders, and an ensemble by averaging."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.checkpoint import probabilities_path, save_probabilities
from pipeline.data.dataset import ID_COLUMN, DatasetPaths, group_by_image, load_train_val
from tests.conftest import make_tiny_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import fusion_cv  # noqa: E402


def test_average_takes_the_mean_of_the_runs_probabilities(tmp_path):
    data = make_tiny_dataset(tmp_path / "tiny", n_train=40, n_test=0, images=False)
    label_set, _, val_df = load_train_val(DatasetPaths.resolve(data, None), 0.25)
    val_ids = group_by_image(val_df).images[ID_COLUMN].tolist()
    rng = np.random.default_rng(0)
    first, second = (rng.random((len(val_ids), len(label_set.ids))) for _ in range(2))
    for folder, probs in ((tmp_path / "one", first), (tmp_path / "two", second)):
        folder.mkdir()
        # Written in reverse order: rows are aligned on the image ids, not on their order.
        save_probabilities(probabilities_path(folder, "image"), val_ids[::-1], label_set.ids, probs[::-1])
    alone = fusion_cv.branch_probabilities(tmp_path / "one", {}, ["image"], val_ids, label_set.ids)
    both = fusion_cv.branch_probabilities(tmp_path / "one", {}, ["image"], val_ids, label_set.ids,
                                          {"image": [tmp_path / "two"]})
    np.testing.assert_allclose(alone["image"], first, atol=1e-6)
    np.testing.assert_allclose(both["image"], (first + second) / 2, atol=1e-6)
