"""Training under torchrun: 2 CPU processes with gloo give the single-process result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import inference
import train_caption_rnn
import train_efficientnet
from pipeline import text_features
from pipeline.checkpoint import load_checkpoint
from pipeline.data.dataset import DatasetPaths, load_train_val
from pipeline.engine.distributed import DistContext, gather_shards
from pipeline.engine.history import read_history
from tests.conftest import TINY_IMAGE_ARGS, make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]
# Dropout draws differ between one process and two, so it is off for the comparison.
NO_DROPOUT_IMAGE = ["--head-dropout", "0", "--decoder-dropout", "0", "--head-batch-size", "16"]
CAPTION_ARGS = ["--device", "cpu", "--ensemble", "1", "--epochs", "3", "--hidden-size", "8", "--dropout", "0",
                "--embed-dropout", "0", "--batch-size", "8", "--val-fraction", "0.25"]


def test_shards_cover_every_row_once_in_order():
    shards = [DistContext(rank=r, world_size=3).shard(10) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    local = torch.arange(5.0)
    assert gather_shards(local, DistContext(), 5) is local


def test_global_batch_must_split_evenly_across_processes():
    assert DistContext(rank=1, world_size=4).local_batch_size(64) == 16
    with pytest.raises(ValueError, match="--batch-size 30 is the global batch.*4 processes"):
        DistContext(rank=0, world_size=4).local_batch_size(30)


def _torchrun(script: str, args: list[str], processes: int = 2, stand_in_encoder: bool = True
              ) -> subprocess.CompletedProcess:
    """``script`` under torchrun; with ``stand_in_encoder`` its text encoders are the tests' stand-in,
    as in this process (a run that reads no encoder can leave it: building it needs transformers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    wrapper = []
    if stand_in_encoder:
        env["STAND_IN_TEXT_ENCODER"] = str(text_features.TEXT_ENCODERS["minilm"]())
        wrapper = [str(ROOT / "tests" / "stand_in_encoder.py")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               *wrapper, str(ROOT / script), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def even_dataset(tmp_path_factory) -> Path:
    """A tiny dataset whose training split has an even number of rows (equal shares for 2 ranks)."""
    root = make_tiny_dataset(tmp_path_factory.mktemp("dist") / "tiny", n_train=48)
    _, train, _ = load_train_val(DatasetPaths.resolve(root), 0.25)
    assert len(train) % 2 == 0
    return root


def test_two_gloo_processes_train_the_image_heads_like_one(even_dataset, tmp_path):
    common = ["--data", str(even_dataset), *TINY_IMAGE_ARGS, *NO_DROPOUT_IMAGE, "--mode", "frozen"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning of the test backbone
        single = train_efficientnet.main([*common, "--weights", str(tmp_path / "one")])
    _torchrun("train_efficientnet.py", [*common, "--weights", str(tmp_path / "two")])

    for branch in ("image", "decoder"):
        one = load_checkpoint(tmp_path / "one" / f"{branch}.pt", branch=branch)
        two = load_checkpoint(tmp_path / "two" / f"{branch}.pt", branch=branch)
        assert one["state_dict"].keys() == two["state_dict"].keys()
        for name, value in one["state_dict"].items():
            torch.testing.assert_close(two["state_dict"][name], value, atol=2e-4, rtol=1e-3, msg=f"{branch} {name}")
    # Rank 0 alone wrote: one feature cache, one summary saying 2 processes.
    assert len(list((tmp_path / "two" / "cache").glob("features-*"))) == 1
    assert single["processes"] == 1
    assert '"processes": 2' in (tmp_path / "two" / "image_summary.json").read_text()


def test_two_gloo_processes_train_the_caption_branch_like_one(even_dataset, tmp_path):
    common = ["--data", str(even_dataset), *CAPTION_ARGS]
    train_caption_rnn.main([*common, "--weights", str(tmp_path / "one")])
    _torchrun("train_caption_rnn.py", [*common, "--weights", str(tmp_path / "two")])
    one = load_checkpoint(tmp_path / "one" / "caption.pt", branch="caption")
    two = load_checkpoint(tmp_path / "two" / "caption.pt", branch="caption")
    for name, value in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][name], value, atol=2e-4, rtol=1e-3, msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
def test_partial_fine_tuning_under_two_gloo_processes_writes_a_usable_branch(even_dataset, tmp_path):
    """Fine-tuning under torchrun: stage maps written by both ranks into one cache, DDP over the
    tail, validation shards gathered, rank 0 writing, and inference from the result."""
    weights = tmp_path / "two"
    _torchrun("train_efficientnet.py", ["--data", str(even_dataset), *TINY_IMAGE_ARGS, "--weights", str(weights),
                                        "--mode", "partial",
                                        "--train-from-stage", "3", "--finetune-epochs", "2"])
    summary = json.loads((weights / "image_summary.json").read_text())
    assert summary["processes"] == 2 and summary["mode"] == "partial"
    history = read_history(weights / "history_image.csv")  # rank 0 alone writes: one row per epoch
    assert list(zip(history["stage"], history["epoch"])) == [("joint", 1), ("joint", 2)]
    maps = list((weights / "cache").glob("stagemaps-*"))
    assert len(maps) == 1 and (maps[0] / "manifest.json").is_file() and not list(maps[0].glob(".*partial"))
    result = inference.main(["--data", str(even_dataset), "--weights", str(weights), "--output", str(tmp_path / "o"),
                             "--device", "cpu", "--workers", "0", "--val-fraction", "0.25", "--evaluate"])
    assert result["rows"] == 10 and result["metrics"]["image"] == pytest.approx(summary["image_val_samples_f1"])


def test_two_gloo_processes_write_the_submission_of_one(trained_branches, tmp_path):
    """Inference under torchrun: each rank predicts every other chunk, rank 0 joins them."""
    import shutil

    data, weights = trained_branches
    common = ["--data", str(data), "--device", "cpu", "--workers", "0", "--val-fraction", "0.25", "--chunk-size", "5"]
    # Each run on its own copy of the weights, so both extract their features (no shared cache).
    one_weights, two_weights = (shutil.copytree(weights, tmp_path / f"weights-{n}") for n in ("one", "two"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inference.main([*common, "--weights", str(one_weights), "--output", str(tmp_path / "one")])
    result = _torchrun("inference.py", [*common, "--weights", str(two_weights), "--output", str(tmp_path / "two")])
    cached = {name: len(list(Path(w, "cache").glob("features-*"))) for name, w in
              (("trained", weights), ("two", two_weights))}
    assert cached["two"] - cached["trained"] == 5  # the ranks extracted and cached all 5 chunks
    one, two = (tmp_path / name / "submission.csv" for name in ("one", "two"))
    assert two.read_bytes() == one.read_bytes(), result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["inference_summary.json", "submission.csv"]
