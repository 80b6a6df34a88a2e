"""What timm and Kaggle users expect of a trainer: TensorBoard logging, --resume PATH, the K best
epochs kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import train_caption_rnn
from pipeline.engine.history import start_history
from pipeline.io import CheckpointError, OptionError
from tests.test_resume import CAPTION_ARGS, WORD_CAPTION_ARGS, assert_same_checkpoints, interrupted_caption_run


def _train(data: Path, weights: Path, *extra: str) -> dict:
    return train_caption_rnn.main(["--data", str(data), "--weights", str(weights), *CAPTION_ARGS, *extra])


def test_tensorboard_gets_every_epoch_row_of_the_history(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    weights = tmp_path / "w"
    _train(tiny_dataset, weights, "--log", "tensorboard")
    history = pd.read_csv(weights / "history_caption.csv")
    events = EventAccumulator(str(weights / "tensorboard" / "caption"))
    events.Reload()
    for (stage, member), rows in history.groupby(["stage", "member"]):
        logged = events.Scalars(f"{stage}/member{member}/val_score")
        assert [event.step for event in logged] == rows["epoch"].tolist()
        assert [event.value for event in logged] == pytest.approx(rows["val_score"].tolist(), rel=1e-6)


def test_tensorboard_missing_is_one_error_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(OptionError, match=r"--log tensorboard needs the tensorboard package: pip install tensorbo"):
        start_history(tmp_path / "history_caption.csv", False, log="tensorboard")


def test_keep_best_keeps_the_k_best_epochs_of_each_loop(tiny_dataset, tmp_path):
    """On word models: the stand-in encoder's 16-wide random states give tied epochs here, where
    which of equal epochs is kept is not the point."""
    weights = tmp_path / "w"
    _train(tiny_dataset, weights, *WORD_CAPTION_ARGS, "--keep-best", "2")
    history = pd.read_csv(weights / "history_caption.csv")
    for (stage, member), rows in history.groupby(["stage", "member"]):
        kept = sorted((weights / "best").glob(f"caption-{stage}-member{member}-epoch*.pt"))
        saved = [torch.load(path, weights_only=True) for path in kept]
        best_two = rows.sort_values("val_score", ascending=False, kind="stable")["epoch"].head(2)
        assert sorted(state["epoch"] for state in saved) == sorted(best_two.tolist())
        assert all(state["state_dict"] and state["stage"] == stage for state in saved)
    # A fresh run starts the kept epochs over.
    _train(tiny_dataset, weights, *WORD_CAPTION_ARGS, "--keep-best", "1")
    assert len(list((weights / "best").glob("caption-*.pt"))) == history.groupby(["stage", "member"]).ngroups


def test_resume_path_continues_another_folders_interrupted_run(tiny_dataset, tmp_path, monkeypatch):
    whole, cut, elsewhere = tmp_path / "whole", tmp_path / "cut", tmp_path / "elsewhere"
    _train(tiny_dataset, whole)
    interrupted_caption_run(monkeypatch, ["--data", str(tiny_dataset), *CAPTION_ARGS, "--weights", str(cut)],
                            "member1", 1)
    _train(tiny_dataset, elsewhere, "--resume", str(cut))
    assert_same_checkpoints(whole, elsewhere, ("caption",))
    assert (cut / "resume" / "caption" / "member1.pt").is_file()  # PATH is left as it was
    assert pd.read_csv(elsewhere / "history_caption.csv").equals(pd.read_csv(whole / "history_caption.csv").assign(
        seconds=pd.read_csv(elsewhere / "history_caption.csv")["seconds"]))


def test_resume_path_without_states_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(CheckpointError, match=r"--resume .*nowhere: no resume states of caption training there"):
        _train(tiny_dataset, tmp_path / "w", "--resume", str(tmp_path / "nowhere"))


def test_resume_alone_still_means_this_folder():
    parser = train_caption_rnn.get_args_parser()
    assert parser.parse_args(["--resume"]).resume is True
    assert parser.parse_args([]).resume is False
    assert parser.parse_args(["--resume", "w/old"]).resume == "w/old"
