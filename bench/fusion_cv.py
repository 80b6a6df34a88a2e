"""Fused samples-F1 of trained branches from their saved validation probabilities, in seconds.

The figure to judge a change by is the cross-validated one: fusion tuned on 4/5 of the
validation split and scored on the held-out fifth, over 5 folds, the mean (and spread) over 8
fold seeds; the split-tuned figure (tuned and scored on the same rows) overstates by about 0.006.
Each branch's ``val_probs_<branch>.csv`` comes from ``--weights`` unless ``--from BRANCH=DIR``
takes it from another run's weights, so a new caption model or head is measured against the
same other branches without training them again:

    .venv/bin/python bench/fusion_cv.py --data ../shared/comp5329 --weights /tmp/real/base0/weights \\
        --from caption=/tmp/real/capm0

``--average image=DIR`` averages the image branch with another run's (an ensemble).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checkpoint import load_probabilities, probabilities_path
from pipeline.data.dataset import ID_COLUMN, LABELS_COLUMN, DatasetPaths, group_by_image, load_train_val
from pipeline.fusion import _cross_validated, tune_fusion
from pipeline.metrics import binarize, samples_f1, tune_global_threshold


def branch_probabilities(
    weights: Path,
    sources: dict[str, Path],
    branches: list[str],
    val_ids: list[str],
    label_ids: Sequence[int],
    averaged: dict[str, list[Path]] | None = None,
) -> dict[str, np.ndarray]:
    """Each branch's validation probabilities aligned on ``val_ids``; a branch in ``averaged``
    gets the mean of its own and those of the same branch in each listed folder (an ensemble
    of two runs, say a Lite1 and a Lite2 image branch)."""
    out = {}
    for branch in branches:
        members = []
        for folder in [sources.get(branch, weights), *(averaged or {}).get(branch, [])]:
            ids, _, probs = load_probabilities(probabilities_path(folder, branch), label_ids)
            index = {image_id: i for i, image_id in enumerate(ids)}
            members.append(probs[[index[i] for i in val_ids]])
        out[branch] = np.mean(members, axis=0)
    return out


def evaluate(y_true: np.ndarray, probs: dict[str, np.ndarray], label_ids: Sequence[int], fold_seeds: int) -> dict:
    """Every branch alone (at its best global threshold), fused split-tuned, fused cross-validated."""
    result: dict = {"branches": {}}
    for branch, p in probs.items():
        threshold, f1 = tune_global_threshold(y_true, p)
        result["branches"][branch] = {
            "f1": round(f1, 4),
            "threshold": round(threshold, 2),
            "f1_at_0.5": round(samples_f1(y_true, binarize(p, 0.5)), 4),
        }
    settings = tune_fusion(y_true, probs, label_ids, compare_stacker=False)
    result["fused_split_tuned"] = settings.val_samples_f1
    result["weights"] = settings.weights
    cv = [_cross_validated(y_true, probs, "weighted", 5, seed) for seed in range(fold_seeds)]
    result["fused_cv_mean"], result["fused_cv_std"] = round(float(np.mean(cv)), 5), round(float(np.std(cv)), 5)
    return result


def emit(result: dict, json_path: str | None) -> dict:
    """Print the result as JSON, and also write it to ``json_path`` when given."""
    print(json.dumps(result, indent=1))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def branch_folders(items: list[str], option: str) -> list[tuple[str, Path]]:
    """(branch, folder) of each ``BRANCH=DIR`` given to ``option``."""
    pairs = []
    for item in items:
        branch, equals, folder = item.partition("=")
        if not (branch and equals and folder):
            raise SystemExit(f"{option} {item!r}: expected BRANCH=DIR, e.g. {option} image=/tmp/real/run1")
        pairs.append((branch, Path(folder)))
    return pairs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the dataset folder the branches were trained on")
    parser.add_argument("--weights", required=True, help="the run's weights folder")
    parser.add_argument("--branches", default="image,decoder,caption", help="branches to fuse, comma-separated")
    parser.add_argument(
        "--from",
        dest="sources",
        action="append",
        default=[],
        metavar="BRANCH=DIR",
        help="take BRANCH's val_probs_BRANCH.csv from DIR (repeatable)",
    )
    parser.add_argument(
        "--average",
        action="append",
        default=[],
        metavar="BRANCH=DIR",
        help="average BRANCH's probabilities with DIR's val_probs_BRANCH.csv (repeatable: an ensemble)",
    )
    parser.add_argument("--val-fraction", type=float, default=0.15, help="as the branches were trained")
    parser.add_argument("--fold-seeds", type=int, default=8, help="fold seeds of the cross-validated figure")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)

    sources = dict(branch_folders(args.sources, "--from"))
    averaged: dict[str, list[Path]] = {}
    for branch, folder in branch_folders(args.average, "--average"):
        averaged.setdefault(branch, []).append(folder)
    label_set, _, val_df = load_train_val(DatasetPaths.resolve(args.data, None), args.val_fraction)
    images = group_by_image(val_df).images
    y_true = label_set.encode(images[LABELS_COLUMN])
    branches = [b for b in args.branches.split(",") if b]
    probs = branch_probabilities(
        Path(args.weights), sources, branches, images[ID_COLUMN].tolist(), label_set.ids, averaged
    )
    return emit(evaluate(y_true, probs, label_set.ids, args.fold_seeds), args.json)


if __name__ == "__main__":
    main()
