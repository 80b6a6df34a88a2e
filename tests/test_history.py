"""Training history: a row per epoch in history_<branch>.csv, kept whole across --resume, and its curves."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

import train_caption_rnn
import train_efficientnet
from pipeline.engine.distributed import DistContext
from pipeline.engine.history import COLUMNS, history_path, plot_histories, read_history, start_history
from pipeline.engine.loop import EpochScore, TrainStep, fit, train_one_epoch, warmup_cosine
from pipeline.engine.resume import ResumeState
from tests.conftest import TINY_IMAGE_ARGS
from tests.test_resume import CAPTION_ARGS, SimulatedCrash, crash_after


def test_rows_are_appended_and_a_resumed_loop_drops_its_own_rows_from_its_restart_epoch(tmp_path):
    path = tmp_path / "history_caption.csv"
    history = start_history(path, resume=False)
    for member in (0, 1):
        for epoch in (1, 2, 3):
            history.for_stage("caption", member).record(epoch, 0.5 / epoch, 0.25 * epoch, 1e-3, 1.5)
    history.for_stage("head").record(1, 0.75, None, None, 2.0)
    assert path.read_text().splitlines()[:2] == [",".join(COLUMNS), "caption,0,1,0.5,0.25,0.001,1.500"]

    resumed = start_history(path, resume=True)
    assert len(read_history(path)) == 7  # resuming keeps the file
    resumed.for_stage("caption", 1).begin(2)  # member 1 restarts at epoch 2
    frame = read_history(path)
    assert frame[frame["member"] == 1]["epoch"].tolist() == [1]
    assert frame[frame["member"] == 0]["epoch"].tolist() == [1, 2, 3]  # another member's rows stay
    head = frame[frame["stage"] == "head"].iloc[0]
    assert pd.isna(head["member"]) and math.isnan(head["val_score"]) and math.isnan(head["lr"])
    assert head["train_loss"] == 0.75 and frame["epoch"].dtype.kind == "i"

    start_history(path, resume=False)  # a fresh run starts over
    assert read_history(path).empty


def test_only_rank_0_writes(tmp_path):
    path = tmp_path / "history_image.csv"
    other = start_history(path, resume=False, context=DistContext(rank=1, world_size=2))
    other.for_stage("joint").record(1, 0.5, 0.5, 0.1, 1.0)
    assert not path.exists()


def test_a_file_that_is_not_a_history_is_refused_on_resume(tmp_path):
    path = tmp_path / "history_image.csv"
    path.write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(ValueError, match=r"history_image\.csv:1: not a training history"):
        start_history(path, resume=True)


def test_fit_records_each_epochs_loss_score_and_learning_rate(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = warmup_cosine(optimizer, total_steps=6, warmup_steps=2)
    step = TrainStep(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    losses = []

    def train_epoch(epoch: int) -> float:
        losses.append(train_one_epoch(step, batches, optimizer, torch.device("cpu"), epoch, scheduler=scheduler,
                                      progress=False))
        return losses[-1]

    history = start_history(tmp_path / "history_x.csv", resume=False)
    fit("x", 3, train_epoch, lambda epoch: EpochScore(1.0 / epoch), model, ResumeState.off(),
        {"model": model, "optimizer": optimizer}, history=history.for_stage("head"))
    frame = read_history(tmp_path / "history_x.csv")
    assert frame["epoch"].tolist() == [1, 2, 3] and frame["stage"].tolist() == ["head"] * 3
    assert frame["train_loss"].tolist() == losses
    assert frame["val_score"].tolist() == [1.0, 0.5, 1.0 / 3]
    # At each epoch's first update: warm-up's first step, then the peak, then the cosine half-way.
    assert frame["lr"].tolist() == pytest.approx([0.05, 0.1, 0.05])
    assert (frame["seconds"] >= 0).all()


def crash_before_saving(monkeypatch, loop: str, epoch: int) -> None:
    """Make the run die after ``loop`` recorded ``epoch`` in its history but before it saved
    the epoch for resuming: the resumed run trains that epoch again."""
    original = ResumeState.end_epoch

    def end_epoch(self, done: int, best, finished: bool = False) -> None:
        if self.path is not None and self.path.stem == loop and done == epoch:
            raise SimulatedCrash(f"{loop} epoch {epoch}")
        original(self, done, best, finished)

    monkeypatch.setattr(ResumeState, "end_epoch", end_epoch)


def without_seconds(path: Path) -> pd.DataFrame:
    return read_history(path).drop(columns="seconds")


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
def test_resumed_image_training_ends_with_the_uninterrupted_runs_history(tiny_dataset, tmp_path, monkeypatch):
    args = ["--data", str(tiny_dataset), *TINY_IMAGE_ARGS]
    train_efficientnet.main([*args, "--weights", str(tmp_path / "whole")])
    whole = without_seconds(history_path(tmp_path / "whole", "image"))
    assert list(zip(whole["stage"], whole["epoch"])) == [("head", 1), ("head", 2), ("head", 3),
                                                         ("decoder", 1), ("decoder", 2)]
    assert whole["member"].isna().all() and whole["val_score"].notna().all()
    assert (tmp_path / "whole" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with monkeypatch.context() as patch:
        crash_before_saving(patch, "image_head", 2)
        with pytest.raises(SimulatedCrash):
            train_efficientnet.main([*args, "--weights", str(tmp_path / "cut")])
    cut = history_path(tmp_path / "cut", "image")
    assert read_history(cut)["epoch"].tolist() == [1, 2]  # epoch 2 recorded, not saved
    train_efficientnet.main([*args, "--weights", str(tmp_path / "cut"), "--resume"])
    pd.testing.assert_frame_equal(without_seconds(cut), whole)


def test_resumed_caption_ensemble_ends_with_the_uninterrupted_runs_history(tiny_dataset, tmp_path, monkeypatch):
    args = ["--data", str(tiny_dataset), *CAPTION_ARGS]
    train_caption_rnn.main([*args, "--weights", str(tmp_path / "whole")])
    whole = without_seconds(history_path(tmp_path / "whole", "caption"))
    assert whole["member"].tolist() == [0] * 4 + [1] * 4 and whole["epoch"].tolist() == [1, 2, 3, 4] * 2

    with monkeypatch.context() as patch:
        crash_after(patch, "member1", 1)  # the first model finished, the second saved one epoch
        with pytest.raises(SimulatedCrash):
            train_caption_rnn.main([*args, "--weights", str(tmp_path / "cut")])
    train_caption_rnn.main([*args, "--weights", str(tmp_path / "cut"), "--resume"])
    pd.testing.assert_frame_equal(without_seconds(history_path(tmp_path / "cut", "caption")), whole)


def test_no_history_draws_no_curves(tmp_path):
    assert plot_histories(tmp_path) is None
    assert not (tmp_path / "training_curves.png").exists()
