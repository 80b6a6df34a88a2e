"""--resume: a run interrupted after an epoch and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_caption_rnn
import train_efficientnet
from pipeline.checkpoint import load_checkpoint
from pipeline.io import CheckpointError
from pipeline.engine.resume import ResumeState
from tests.conftest import TINY_IMAGE_ARGS

# Settings under which the best epochs come late (3 and 3), so a resumed run that drew
# other random numbers after the interruption would end with other weights.
CAPTION_ARGS = ["--ensemble", "2", "--epochs", "4", "--hidden-size", "8", "--batch-size", "8",
                "--lr", "0.03", "--val-fraction", "0.25"]
# The branch's own words, as small: a model that learns something new every epoch here.
WORD_CAPTION_ARGS = ["--text-encoder", "words", "--embed-dim", "8", "--min-freq", "1"]


class SimulatedCrash(RuntimeError):
    pass


def crash_after(monkeypatch, loop: str, epoch: int) -> None:
    """Make the run die right after ``loop`` saved ``epoch``, as a killed process would."""
    original = ResumeState.end_epoch

    def end_epoch(self, done: int, best, finished: bool = False) -> None:
        original(self, done, best, finished)
        if self.path is not None and self.path.stem == loop and done == epoch:
            raise SimulatedCrash(f"{loop} epoch {epoch}")

    monkeypatch.setattr(ResumeState, "end_epoch", end_epoch)


def assert_same_checkpoints(first: Path, second: Path, branches: tuple[str, ...]) -> None:
    for branch in branches:
        a = load_checkpoint(first / f"{branch}.pt", branch=branch)["state_dict"]
        b = load_checkpoint(second / f"{branch}.pt", branch=branch)["state_dict"]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{branch}.pt {name} differs"
        assert (first / f"val_probs_{branch}.csv").read_text() == (second / f"val_probs_{branch}.csv").read_text()


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
@pytest.mark.parametrize("loop, epoch", [("image_head", 2), ("decoder", 1)])
def test_resumed_image_training_equals_an_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch, loop, epoch):
    args = ["--data", str(tiny_dataset), *TINY_IMAGE_ARGS]
    train_efficientnet.main([*args, "--weights", str(tmp_path / "whole")])
    with monkeypatch.context() as patch:
        crash_after(patch, loop, epoch)
        with pytest.raises(SimulatedCrash):
            train_efficientnet.main([*args, "--weights", str(tmp_path / "cut")])
    assert (tmp_path / "cut" / "resume" / "image" / f"{loop}.pt").is_file()
    assert not (tmp_path / "cut" / "image.pt").exists()
    train_efficientnet.main([*args, "--weights", str(tmp_path / "cut"), "--resume"])
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "cut", ("image", "decoder"))
    assert not (tmp_path / "cut" / "resume" / "image").exists()  # cleared once the run finished


def test_resumed_caption_ensemble_equals_an_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch):
    args = ["--data", str(tiny_dataset), *CAPTION_ARGS]
    train_caption_rnn.main([*args, "--weights", str(tmp_path / "whole")])
    # The first model finished, the second died after one epoch.
    interrupted_caption_run(monkeypatch, [*args, "--weights", str(tmp_path / "cut")], "member1", 1)
    train_caption_rnn.main([*args, "--weights", str(tmp_path / "cut"), "--resume"])
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "cut", ("caption",))


def interrupted_caption_run(monkeypatch, args: list[str], loop: str, epoch: int) -> None:
    """Run train_caption_rnn.py until it dies after ``loop`` saved ``epoch``."""
    with monkeypatch.context() as patch:
        crash_after(patch, loop, epoch)
        with pytest.raises(SimulatedCrash):
            train_caption_rnn.main(args)


def test_resume_refuses_a_state_saved_with_other_settings(tiny_dataset, tmp_path, monkeypatch):
    args = ["--data", str(tiny_dataset), *CAPTION_ARGS, "--weights", str(tmp_path / "w")]
    interrupted_caption_run(monkeypatch, args, "member0", 1)
    with pytest.raises(CheckpointError, match=r"member0\.pt: saved by a run with other settings"):
        train_caption_rnn.main([*args, "--lr", "0.01", "--resume"])


def test_a_fresh_run_clears_states_an_earlier_run_left(tiny_dataset, tmp_path, monkeypatch):
    args = ["--data", str(tiny_dataset), *CAPTION_ARGS, "--weights", str(tmp_path / "w")]
    interrupted_caption_run(monkeypatch, args, "member0", 1)
    stale = tmp_path / "w" / "resume" / "caption" / "member0.pt"
    assert stale.is_file()
    train_caption_rnn.main([*args, "--lr", "0.01"])  # no --resume: starts over, other settings are fine
    assert not stale.exists()
