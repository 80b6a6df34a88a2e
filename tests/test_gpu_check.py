"""The prepared GPU check runs end to end on a CPU (--device cpu --tiny), so the script that
travels to a GPU machine is itself tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_pack  # noqa: E402


def test_the_packed_gpu_check_runs_every_stage_and_writes_its_report(tiny_dataset, tmp_path):
    pack = tmp_path / ".gpu"
    sizes = gpu_pack.main(["--data", str(tiny_dataset), "--out", str(pack), "--train-images", "40",
                           "--test-images", "8", "--no-wheels"])
    assert sizes["train_images"] == 40 and sizes["test_images"] == 8
    train = pd.read_csv(pack / "data" / "train.csv")
    test, truth = pd.read_csv(pack / "data" / "test.csv"), pd.read_csv(pack / "data" / "test_labels.csv")
    assert len(train) == 40 and list(test.columns) == ["ImageID", "Caption"] and len(truth) == 8
    assert not set(train.ImageID) & set(test.ImageID)
    assert len(list((pack / "data" / "data").glob("*.jpg"))) == 48

    env = {**os.environ, "REPO": str(ROOT), "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", str(pack / "check.sh"), "--device", "cpu", "--tiny", "--backbone",
                             "test_efficientnet", "--work", str(tmp_path / "work")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["errors"] == [], report["errors"]
    assert set(report["stages"]) == {"frozen", "finetune", "caption", "inference", "torchrun_nccl_1process", "bench"}
    assert all(stage["ok"] for stage in report["stages"].values())
    assert report["f1"]["finetune_image_val"] is not None and report["finetune"]["train_img_s"] > 0
    assert set(report["f1"]["test_split"]) == {"image", "decoder", "caption", "fused"}
    assert report["bench"]["train_finetune_img_s"] > 0
