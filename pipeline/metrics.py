"""Multi-label evaluation metrics.

All inputs are arrays of shape (N, L): N images, L labels. ``y_true`` and ``y_pred`` hold
0/1 (or bool) indicators, ``probs``/``scores`` hold per-label probabilities.

Conventions, chosen to match the competition's "mean F1" and sklearn's
``zero_division=0``:

* An image's F1 is ``2 * |T & P| / (|T| + |P|)``; it is 0 when the prediction is empty,
  and also 0 when the truth is empty -- including the degenerate case of empty truth
  *and* empty prediction (0/0), which sklearn scores as ``zero_division``. Images of
  the competition data are expected to carry at least one label, so this should only
  matter for synthetic or filtered data.
* Per-label precision/recall/F1 and the samples-averaged Jaccard likewise score 0/0
  as 0.
* Mean average precision skips labels without a positive example: their AP is
  undefined, and counting them as 0 would penalise a model for the data split.
* Every metric raises ValueError for non-2-D inputs, mismatched shapes, zero rows, fewer
  than 2 label columns, or non-0/1 indicators.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    jaccard_score,
    precision_recall_fscore_support,
)

__all__ = [
    "binarize",
    "evaluate_probs",
    "jaccard",
    "macro_f1",
    "mean_average_precision",
    "micro_f1",
    "per_image_f1",
    "per_label_average_precision",
    "per_label_prf",
    "samples_f1",
]


def _as_2d(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, L) array, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} has no rows; metrics over zero images are undefined")
    # sklearn reads a single column as a binary (not multilabel) target and refuses
    # sample-wise averaging, so a one-label problem would fail in confusing ways.
    if a.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 label columns, got shape {a.shape}")
    return a


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _as_indicator(name: str, a: np.ndarray) -> np.ndarray:
    """Validate a 0/1 indicator array and return it as bool."""
    if a.dtype == np.bool_:
        return a
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must contain only 0/1 values")
    return a.astype(bool)


def _indicator_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = _as_2d("y_true", y_true)
    p = _as_2d("y_pred", y_pred)
    _check_same_shape("y_true", t, "y_pred", p)
    return _as_indicator("y_true", t), _as_indicator("y_pred", p)


def binarize(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """Threshold probabilities into an (N, L) int8 0/1 prediction.

    A label is predicted when ``probs >= threshold``; ``thresholds`` is a scalar or a
    per-label (L,) array. A row with no label over threshold gets its top-scoring label
    (argmax, first on ties) instead, because mean F1 scores an empty prediction as 0.
    Rows that already have a label are left alone: with per-label thresholds the argmax
    may be a label its own threshold rejected, and forcing it in would undo the tuning.
    With a scalar threshold this is the same as always keeping the argmax.
    """
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be a 2-D (N, L) array, got shape {p.shape}")
    thr = np.asarray(thresholds, dtype=float)
    if thr.ndim != 0 and thr.shape != (p.shape[1],):
        raise ValueError(
            f"thresholds must be a scalar or shape ({p.shape[1]},) to match probs "
            f"of shape {p.shape}, got shape {thr.shape}"
        )
    out = (p >= thr).astype(np.int8)
    if p.shape[1]:
        empty = np.flatnonzero(~out.any(axis=1))
        out[empty, p[empty].argmax(axis=1)] = 1
    return out


def per_image_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 of each image, shape (N,); 0 when the prediction or the truth is empty."""
    t, p = _indicator_pair(y_true, y_pred)
    # Row sums as a matrix-vector product run several times faster than
    # count_nonzero/sum along axis 1 for a narrow (N, L) array.
    ones = np.ones(t.shape[1])
    tp = (t & p) @ ones
    denom = (t.view(np.uint8) + p.view(np.uint8)) @ ones
    # tp == 0 whenever denom == 0, so the max() only dodges the 0/0 and yields 0.
    return 2.0 * tp / np.maximum(denom, 1)


def samples_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The competition's mean F1: per-image F1 averaged over images.

    Vectorised numpy, equal to ``f1_score(average="samples", zero_division=0)`` but fast
    enough for threshold tuning loops.
    """
    return float(per_image_f1(y_true, y_pred).mean())


def micro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 over all (image, label) decisions pooled together."""
    t, p = _indicator_pair(y_true, y_pred)
    return float(f1_score(t, p, average="micro", zero_division=0))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-label F1 (a label never true nor predicted counts as 0)."""
    t, p = _indicator_pair(y_true, y_pred)
    return float(f1_score(t, p, average="macro", zero_division=0))


def per_label_prf(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-label metrics: ``{"precision", "recall", "f1", "support"}``, each shape (L,).

    ``support`` is the number of true positives of the label (int); 0/0 scores as 0.
    """
    t, p = _indicator_pair(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(t, p, average=None, zero_division=0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def per_label_average_precision(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of each label, shape (L,); NaN for labels without positives."""
    t = _as_indicator("y_true", _as_2d("y_true", y_true))
    s = _as_2d("scores", scores)
    _check_same_shape("y_true", t, "scores", s)
    ap = np.full(t.shape[1], np.nan)
    for j in np.flatnonzero(t.any(axis=0)):
        ap[j] = average_precision_score(t[:, j], s[:, j])
    return ap


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean AP over labels with at least one positive; labels without positives are
    skipped. NaN if no label has a positive."""
    return _mean_ignoring_nan(per_label_average_precision(y_true, scores))


def _mean_ignoring_nan(x: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN input; the NaN result is what we want, silently.
    return float("nan") if np.isnan(x).all() else float(np.nanmean(x))


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Samples-averaged Jaccard index |T & P| / |T | P| (0/0 scores as 0)."""
    t, p = _indicator_pair(y_true, y_pred)
    return float(jaccard_score(t, p, average="samples", zero_division=0))


def _json_float(x: float) -> float | None:
    # NaN is not valid JSON; None serialises as null.
    x = float(x)
    return None if math.isnan(x) else x


def evaluate_probs(
    y_true: np.ndarray,
    probs: np.ndarray,
    thresholds: float | np.ndarray,
    label_ids: list[int] | None = None,
) -> dict[str, Any]:
    """All metrics for probabilities thresholded by :func:`binarize`, as a JSON-ready dict.

    Keys: ``n_images``, ``samples_f1``, ``micro_f1``, ``macro_f1``, ``jaccard``, ``mAP``
    (from the raw probabilities), ``thresholds`` (list of L floats) and ``per_label``,
    mapping the label id (or the column index when ``label_ids`` is None) as a string to
    ``{"precision", "recall", "f1", "support", "ap"}``. Undefined values (mAP / AP with
    no positives) are None.
    """
    t = _as_2d("y_true", y_true)
    p = _as_2d("probs", probs)
    _check_same_shape("y_true", t, "probs", p)
    n_labels = t.shape[1]
    if label_ids is not None and len(label_ids) != n_labels:
        raise ValueError(f"label_ids has {len(label_ids)} entries but there are {n_labels} labels")
    keys = [str(i) for i in (label_ids if label_ids is not None else range(n_labels))]

    y_pred = binarize(p, thresholds)
    prf = per_label_prf(t, y_pred)
    ap = per_label_average_precision(t, p)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=float), (n_labels,))
    return {
        "n_images": int(t.shape[0]),
        "samples_f1": samples_f1(t, y_pred),
        "micro_f1": micro_f1(t, y_pred),
        "macro_f1": macro_f1(t, y_pred),
        "jaccard": jaccard(t, y_pred),
        "mAP": _json_float(_mean_ignoring_nan(ap)),
        "thresholds": [float(x) for x in thr],
        "per_label": {
            key: {
                "precision": float(prf["precision"][j]),
                "recall": float(prf["recall"][j]),
                "f1": float(prf["f1"][j]),
                "support": int(prf["support"][j]),
                "ap": _json_float(ap[j]),
            }
            for j, key in enumerate(keys)
        },
    }


THRESHOLD_GRID = np.round(np.arange(0.02, 0.96, 0.01), 2)


def tune_global_threshold(
    y_true: np.ndarray, probs: np.ndarray, grid: np.ndarray = THRESHOLD_GRID
) -> tuple[float, float]:
    """The single threshold on ``grid`` that maximises samples-F1: (threshold, samples-F1).

    Ties go to the threshold closest to 0.5, so a flat optimum does not drift to an extreme.
    """
    scores = np.array([samples_f1(y_true, binarize(probs, t)) for t in grid])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    choice = best[np.argmin(np.abs(grid[best] - 0.5))]
    return float(grid[choice]), float(scores[choice])
