"""The clear errors that replaced a crash deep inside, where the type checker found a None (or
a missing length) that only a bug or a bad input could bring: each used to fail with a bare
TypeError, AttributeError or ZeroDivisionError far from its cause."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

from pipeline.engine.loop import validation_batches
from pipeline.engine.openvino_runtime import OpenVinoForward
from pipeline.fusion import FusionError, FusionSettings
from pipeline.models.heads import FeatureNorm
from pipeline.tools.convert import ConvertError, Record, convert_coco, write_dataset


def test_feature_norm_refuses_no_chunks():
    with pytest.raises(ValueError, match="no feature chunks"):
        FeatureNorm(3).fit_chunks([])


def test_a_stacker_without_coefficients_is_a_fusion_error():
    settings = FusionSettings(branches=["image"], label_ids=[1, 2], method="stacker", weights={"image": 1.0})
    with pytest.raises(FusionError, match="without stacker coefficients"):
        settings.probabilities({"image": np.full((4, 2), 0.5)})


def test_an_empty_openvino_batch_is_refused_by_name(monkeypatch):
    forward = OpenVinoForward(laid_out=None, hint="f32", streams=1)
    # run_many leaves an empty batch unrun, its outputs None (the real one needs a compiled model).
    monkeypatch.setattr(forward, "run_many", lambda batches: iter([(tag, None) for tag, _ in batches]))
    with pytest.raises(ValueError, match="empty batch"):
        forward(torch.zeros((0, 3, 8, 8), dtype=torch.uint8))


class _Stream(IterableDataset):
    def __iter__(self):
        yield from (torch.ones(2) for _ in range(3))


def test_validation_batches_need_a_dataset_with_a_length():
    with pytest.raises(TypeError, match="dataset with a length; _Stream has none"):
        validation_batches(_Stream(), 2, torch.device("cpu"))


def test_coco_conversion_with_both_paths_empty_is_refused(tmp_path):
    with pytest.raises(ConvertError, match="give --instances"):
        convert_coco(tmp_path / "out", instances="", captions="")


def test_records_with_and_without_captions_are_refused_by_name(tmp_path: Path):
    records = [Record("a.jpg", None, [1], ["a caption"]), Record("b.jpg", None, [1], None)]
    with pytest.raises(ConvertError, match=r"b\.jpg: no captions, while other images"):
        write_dataset(tmp_path, "train.csv", records, {1: "person"}, {})
