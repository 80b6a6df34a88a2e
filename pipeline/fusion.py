"""Fusion of the branches' probabilities: weighted average or a learned stacker, with
tuned thresholds, saved as a readable, hand-editable ``fusion.json``.

Everything is tuned on the shared validation split, which no branch trained on.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold

from pipeline.io import write_json
from pipeline.metrics import THRESHOLD_GRID, binarize, samples_f1, tune_global_threshold

log = logging.getLogger(__name__)

FUSION_VERSION = 1
# Per-label thresholds move from the global one toward their own optimum in proportion to
# n_pos / (n_pos + SHRINK_POSITIVES): a label with few validation positives stays near global.
SHRINK_POSITIVES = 30.0


class FusionError(ValueError):
    """fusion.json that is unreadable or does not fit the loaded branches; names the file."""


@dataclass
class FusionSettings:
    """What ``fusion.json`` holds."""

    branches: list[str]
    label_ids: list[int]
    method: str = "weighted"  # "weighted" or "stacker"
    weights: dict[str, float] = field(default_factory=dict)  # also the fallback of the stacker
    threshold: float = 0.5
    per_label_thresholds: dict[str, float] = field(default_factory=dict)  # label id (as str) -> threshold
    stacker: dict | None = None  # coefficients of the logistic-regression stacker, when used
    val_samples_f1: float | None = None
    cv_samples_f1: dict[str, float] = field(default_factory=dict)
    tuned_on: dict = field(default_factory=dict)
    version: int = FUSION_VERSION

    def thresholds(self) -> np.ndarray:
        """Per-label thresholds (L,), the global one where no per-label value is set."""
        return np.array([self.per_label_thresholds.get(str(i), self.threshold) for i in self.label_ids])

    def probabilities(self, probs_by_branch: dict[str, np.ndarray]) -> np.ndarray:
        """Fused probabilities (N, L) of the configured branches."""
        missing = [b for b in self.branches if b not in probs_by_branch]
        if missing:
            raise FusionError(f"fusion needs branch(es) {missing}, which were not loaded")
        used = {b: probs_by_branch[b] for b in self.branches}
        fused = weighted_average(used, self.weights)
        if self.method == "stacker":
            # Images missing a branch's input keep the weighted average; the stacker needs all inputs.
            complete = ~np.any([np.isnan(p).any(axis=1) for p in used.values()], axis=0)
            fused[complete] = _stacker_predict(self.stacker, [p[complete] for p in used.values()])
        return fused

    def predict(self, probs_by_branch: dict[str, np.ndarray]) -> np.ndarray:
        """0/1 predictions (N, L), at least one label per image."""
        return binarize(self.probabilities(probs_by_branch), self.thresholds())


def weighted_average(probs_by_branch: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted average of probabilities, renormalised per image over the branches it has.

    A branch without input for an image (an unreadable image) has NaN rows; that image is
    fused from the other branches alone. When every branch with a weight lacks input for an
    image (an unreadable image, and tuned weights that give the caption nothing), the image
    gets the plain average of the branches that have input, so it still gets a prediction.
    """
    if sum(weights.get(b, 0.0) for b in probs_by_branch) <= 0:
        raise FusionError(f"fusion weights {weights} give no weight to the branches {list(probs_by_branch)}")
    total = weight_sum = plain_total = plain_count = 0.0
    for branch, probs in probs_by_branch.items():
        available = ~np.isnan(probs).any(axis=1, keepdims=True)  # (N, 1)
        weight = weights.get(branch, 0.0) * available
        total = total + weight * np.nan_to_num(probs)
        weight_sum = weight_sum + weight
        plain_total = plain_total + available * np.nan_to_num(probs)
        plain_count = plain_count + available
    if np.any(plain_count == 0):
        raise FusionError(
            f"{int(np.sum(plain_count == 0))} image(s) have no input for any loaded branch (an unreadable image "
            "and no caption branch); load the caption branch too, or fix the images"
        )
    unweighted = weight_sum == 0  # (N, 1)
    return np.where(unweighted, plain_total / np.maximum(plain_count, 1), total / np.where(unweighted, 1, weight_sum))


def simplex_grid(branches: list[str], step: float = 0.05) -> list[dict[str, float]]:
    """All weightings of the branches on the simplex with the given step."""
    n = round(1 / step)
    grid = []
    for combo in itertools.product(range(n + 1), repeat=len(branches) - 1):
        if sum(combo) <= n:
            parts = [*combo, n - sum(combo)]
            grid.append({b: k / n for b, k in zip(branches, parts)})
    return grid


def tune_weights(y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], step: float = 0.05) -> tuple[dict[str, float], float, float]:
    """Simplex weights and global threshold maximising samples-F1: (weights, threshold, F1).

    The F1 is never below that of any branch alone (a corner of the simplex) at its own tuned
    threshold.
    """
    branches = list(probs_by_branch)
    coarse = THRESHOLD_GRID[::3]  # the weight search needs the threshold only roughly
    best = (-1.0, {})
    for weights in simplex_grid(branches, step):
        _, f1 = tune_global_threshold(y_true, weighted_average(probs_by_branch, weights), coarse)
        if f1 > best[0] + 1e-12:
            best = (f1, weights)
    # On the coarse grid a blend can beat a branch alone that the full grid puts first, so the
    # final choice, on the full grid, is between the blend found and every branch alone (the
    # blend first, so it wins ties).
    alone = [{b: float(b == branch) for b in branches} for branch in branches]
    results = [(weights, *tune_global_threshold(y_true, weighted_average(probs_by_branch, weights)))
               for weights in [best[1], *(w for w in alone if w != best[1])]]
    return max(results, key=lambda result: result[2])


def tune_per_label_thresholds(y_true: np.ndarray, probs: np.ndarray, global_threshold: float,
                              rounds: int = 2) -> np.ndarray:
    """Per-label thresholds by coordinate ascent on samples-F1 itself, shrunk toward the global one.

    Samples-F1 is never below that of the global threshold on ``y_true``.
    """
    thresholds = np.full(probs.shape[1], global_threshold)
    current = samples_f1(y_true, binarize(probs, thresholds))
    positives = y_true.sum(axis=0)
    for _ in range(rounds):
        for j in range(probs.shape[1]):
            scores = []
            for t in THRESHOLD_GRID:
                thresholds_j = thresholds.copy()
                thresholds_j[j] = t
                scores.append(samples_f1(y_true, binarize(probs, thresholds_j)))
            best_t = THRESHOLD_GRID[int(np.argmax(scores))]
            weight = positives[j] / (positives[j] + SHRINK_POSITIVES)
            candidate = thresholds.copy()
            candidate[j] = round(float(global_threshold + weight * (best_t - global_threshold)), 3)
            # Samples-F1 is not monotone between a label's threshold and its optimum, so the
            # shrunk threshold can score below the one it replaces: then the label keeps its own.
            f1 = samples_f1(y_true, binarize(probs, candidate))
            if f1 >= current:
                thresholds, current = candidate, f1
    return thresholds


def _stacker_features(probs_list: list[np.ndarray]) -> np.ndarray:
    """Log-odds of every branch's probabilities side by side (N, B * L).

    Log-odds make a confident branch count for more than a probability near 1 would
    in a linear model.
    """
    probs = np.clip(np.concatenate(probs_list, axis=1), 1e-4, 1 - 1e-4)
    return np.log(probs / (1 - probs))


def _fit_stacker(features: np.ndarray, y_true: np.ndarray, c: float = 1.0) -> dict:
    coefs, intercepts = [], []
    for j in range(y_true.shape[1]):
        if y_true[:, j].min() == y_true[:, j].max():
            # A label with one class only in this fold: a constant prediction.
            coefs.append([0.0] * features.shape[1])
            rate = float(np.clip(y_true[:, j].mean(), 1e-4, 1 - 1e-4))
            intercepts.append(float(np.log(rate / (1 - rate))))
            continue
        model = LogisticRegression(C=c, max_iter=1000).fit(features, y_true[:, j])
        coefs.append(model.coef_[0].round(6).tolist())
        intercepts.append(round(float(model.intercept_[0]), 6))
    return {"coef": coefs, "intercept": intercepts, "C": c}


def _stacker_predict(stacker: dict, probs_list: list[np.ndarray]) -> np.ndarray:
    logits = _stacker_features(probs_list) @ np.asarray(stacker["coef"]).T + np.asarray(stacker["intercept"])
    return 1.0 / (1.0 + np.exp(-logits))


def _cross_validated(y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], method: str,
                     folds: int, seed: int) -> float:
    """Samples-F1 of out-of-fold predictions: each fold predicted by settings tuned on the others."""
    branches = list(probs_by_branch)
    predictions = np.zeros_like(y_true)
    for fit_idx, eval_idx in KFold(folds, shuffle=True, random_state=seed).split(y_true):
        fit = {b: p[fit_idx] for b, p in probs_by_branch.items()}
        held = {b: p[eval_idx] for b, p in probs_by_branch.items()}
        if method == "stacker":
            stacker = _fit_stacker(_stacker_features([fit[b] for b in branches]), y_true[fit_idx])
            threshold, _ = tune_global_threshold(y_true[fit_idx], _stacker_predict(stacker, [fit[b] for b in branches]))
            predictions[eval_idx] = binarize(_stacker_predict(stacker, [held[b] for b in branches]), threshold)
        else:
            weights, threshold, _ = tune_weights(y_true[fit_idx], fit, step=0.1)
            fused = weighted_average(fit, weights)
            thresholds = tune_per_label_thresholds(y_true[fit_idx], fused, threshold, rounds=1)
            predictions[eval_idx] = binarize(weighted_average(held, weights), thresholds)
    return samples_f1(y_true, predictions)


def tune_fusion(y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], label_ids: list[int],
                folds: int = 5, seed: int = 0, compare_stacker: bool = True) -> FusionSettings:
    """Tune weights and thresholds (and a stacker) on validation probabilities; keep the better method."""
    branches = list(probs_by_branch)
    weights, threshold, f1_global = tune_weights(y_true, probs_by_branch)
    fused = weighted_average(probs_by_branch, weights)
    per_label = tune_per_label_thresholds(y_true, fused, threshold)
    f1_weighted = samples_f1(y_true, binarize(fused, per_label))
    settings = FusionSettings(
        branches=branches, label_ids=[int(i) for i in label_ids], method="weighted",
        weights={b: round(w, 4) for b, w in weights.items()}, threshold=round(threshold, 3),
        per_label_thresholds={str(i): float(t) for i, t in zip(label_ids, per_label)},
        val_samples_f1=round(f1_weighted, 5),
        tuned_on={"n_images": int(len(y_true)), "global_threshold_samples_f1": round(f1_global, 5)},
    )
    if compare_stacker and len(y_true) >= 5 * folds:
        cv = {m: round(_cross_validated(y_true, probs_by_branch, m, folds, seed), 5) for m in ("weighted", "stacker")}
        settings.cv_samples_f1 = cv
        log.info("fusion cross-validated samples-F1: weighted %.4f, stacker %.4f", cv["weighted"], cv["stacker"])
        if cv["stacker"] > cv["weighted"]:
            features = _stacker_features([probs_by_branch[b] for b in branches])
            stacker = _fit_stacker(features, y_true)
            stacked = _stacker_predict(stacker, [probs_by_branch[b] for b in branches])
            threshold, f1 = tune_global_threshold(y_true, stacked)
            # The weights stay: they fuse images for which a branch has no input.
            settings.method, settings.stacker = "stacker", stacker
            settings.threshold, settings.per_label_thresholds = threshold, {}
            settings.val_samples_f1 = round(f1, 5)
    return settings


def save_fusion(settings: FusionSettings, path: str | Path) -> None:
    """Write fusion.json atomically."""
    write_json(Path(path), asdict(settings))


def load_fusion(path: str | Path) -> FusionSettings:
    """Read fusion.json, with clear errors for hand edits that break it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FusionError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    known = set(FusionSettings.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise FusionError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(known)}")
    try:
        settings = FusionSettings(**raw)
    except TypeError as err:
        raise FusionError(f"{path}: {err}") from None
    if settings.version != FUSION_VERSION:
        raise FusionError(f"{path}: version {settings.version}, this code reads {FUSION_VERSION}; re-tune with --tune")
    if settings.method not in ("weighted", "stacker"):
        raise FusionError(f"{path}: method {settings.method!r}; valid: weighted, stacker")
    if settings.method == "stacker" and not settings.stacker:
        raise FusionError(f"{path}: method is 'stacker' but no stacker coefficients are stored")
    return settings
