"""What inference.py tells a person at the end, and where it says the fusion settings came from."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import inference


def _infer(data: Path, weights: Path, output: Path, *extra: str) -> dict:
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


def test_inference_ends_with_one_readable_line_and_names_the_fusion_sources(trained_branches, tmp_path, caplog):
    data = Path(shutil.copytree(trained_branches[0], tmp_path / "data"))
    weights = Path(shutil.copytree(trained_branches[1], tmp_path / "weights"))
    out = tmp_path / "out"
    (out).mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    with caplog.at_level(logging.INFO):
        summary = _infer(data, weights, out, "--evaluate", "--no-report")
    last = caplog.records[-1].getMessage()
    assert last.startswith(f"inference: samples-F1 fused {summary['metrics']['fused']:.4f} (image ")
    assert last.endswith(f"wrote {out / 'submission.csv'}; every figure: {out / 'inference_summary.json'}")
    recorded = json.loads((out / "inference_summary.json").read_text())
    assert str(out / "metrics.json") in recorded["files"] and str(out / "stale.txt") not in recorded["files"]
    assert f"fusion weights from {weights / 'fusion.json'}, tuned now (method " in caplog.text

    # --fusion-weights replaces the file's weights: the log said "fusion settings from fusion.json".
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _infer(data, weights, tmp_path / "hand", "--fusion-weights", "image=1,caption=1,decoder=0",
               "--threshold", "0.4")
    assert ("fusion weights from --fusion-weights image=1,caption=1,decoder=0; thresholds from --threshold 0.4"
            in caplog.text)
    assert f"from {weights / 'fusion.json'}" not in caplog.text
