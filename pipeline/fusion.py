"""Fusion of the branches' probabilities: weighted average or a learned stacker, with
tuned thresholds, saved as a readable, hand-editable ``fusion.json``.

Everything is tuned on the shared validation split, which no branch trained on.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeGuard

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold

from pipeline.checkpoint import BRANCHES
from pipeline.io import unique_keys_hook, write_json
from pipeline.metrics import THRESHOLD_GRID, binarize, samples_f1, tune_global_threshold

log = logging.getLogger(__name__)

FUSION_VERSION = 1
# Per-label thresholds move from the global one toward their own optimum in proportion to
# n_pos / (n_pos + SHRINK_POSITIVES): a label with few validation positives stays near global.
SHRINK_POSITIVES = 30.0


class FusionError(ValueError):
    """fusion.json (or a fusion option) that is unreadable, holds a value fusion cannot use, or does
    not fit the loaded branches; names the file and key, or the option."""


def _shown(value: object) -> str:
    """A value as the JSON file spells it (NaN, null, true), cut short."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_number(value: object) -> TypeGuard[float]:
    # JSON true/false load as bool, which Python counts as an int: a weight of true is a slip.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_weights(weights: object, branches: list[str], where: str, whose: str = "the") -> None:
    """Fusion weights by branch: an object of finite numbers >= 0, keys among ``branches``, not
    all 0. ``where`` names the file and key, or the option, and ``whose`` the branches, in the error."""
    if not isinstance(weights, dict):
        raise FusionError(f"{where}: must be an object of branch: weight, got {_shown(weights)}")
    for name, weight in weights.items():
        if name not in branches:
            raise FusionError(f"{where}: {name!r} is not one of {whose} branches {branches}")
        if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise FusionError(f"{where}: {name} = {_shown(weight)}; a weight is a finite number >= 0")
    if not any(weights.get(b, 0) > 0 for b in branches):
        raise FusionError(f"{where}: every weight is 0; give at least one of the branches {branches} a weight > 0")


def check_threshold(threshold: object, where: str) -> None:
    """A threshold is a number strictly between 0 and 1 (0 would predict every label, 1 none)."""
    if not _is_number(threshold) or not 0.0 < threshold < 1.0:
        raise FusionError(f"{where}: {_shown(threshold)}; a threshold is a number between 0 and 1 (exclusive)")


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

    def check(self, source: str) -> None:
        """Every field has its JSON type and a value fusion can use; else an error naming
        ``source`` (the file), the key and the values allowed."""

        def fail(key: str, problem: str) -> FusionError:
            return FusionError(f"{source}: {key}: {problem}")

        if (
            not isinstance(self.branches, list)
            or not self.branches
            or not all(isinstance(b, str) and b in BRANCHES for b in self.branches)
        ):
            raise fail("branches", f"{_shown(self.branches)}; a non-empty list of branch names from {list(BRANCHES)}")
        if len(set(self.branches)) != len(self.branches):
            raise fail("branches", f"{self.branches} names a branch twice")
        if (
            not isinstance(self.label_ids, list)
            or not self.label_ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.label_ids)
        ):
            raise fail("label_ids", f"{_shown(self.label_ids)}; a non-empty list of integer label ids")
        if len(set(self.label_ids)) != len(self.label_ids):
            raise fail("label_ids", f"{self.label_ids} names a label twice")
        if self.method not in ("weighted", "stacker"):
            raise fail("method", f'{_shown(self.method)}; valid: "weighted", "stacker"')
        if self.stacker is not None:
            self._check_stacker(fail)
        elif self.method == "stacker":
            raise fail("stacker", 'method is "stacker" but no stacker coefficients are stored')
        check_weights(self.weights, self.branches, f"{source}: weights", "the file's")
        check_threshold(self.threshold, f"{source}: threshold")
        if not isinstance(self.per_label_thresholds, dict):
            raise fail("per_label_thresholds", f"{_shown(self.per_label_thresholds)}; an object of label id: threshold")
        valid = [str(i) for i in self.label_ids]
        for key, threshold in self.per_label_thresholds.items():
            if key not in valid:
                raise fail(
                    f"per_label_thresholds.{key}",
                    f"{key!r} is not one of the trained labels in label_ids {self.label_ids}",
                )
            check_threshold(threshold, f"{source}: per_label_thresholds.{key}")
        if self.val_samples_f1 is not None and not _is_number(self.val_samples_f1):
            raise fail("val_samples_f1", f"{_shown(self.val_samples_f1)}; a number or null")
        if not isinstance(self.cv_samples_f1, dict) or not all(_is_number(v) for v in self.cv_samples_f1.values()):
            raise fail("cv_samples_f1", f"{_shown(self.cv_samples_f1)}; an object of method: number")
        if not isinstance(self.tuned_on, dict):
            raise fail("tuned_on", f"{_shown(self.tuned_on)}; an object")

    def _check_stacker(self, fail: Callable[[str, str], FusionError]) -> None:
        """The stacker's coefficients: one row of B * L numbers and one intercept per label."""
        stacker, labels, width = self.stacker, len(self.label_ids), len(self.branches) * len(self.label_ids)
        if not isinstance(stacker, dict) or not {"coef", "intercept"} <= set(stacker) <= {"coef", "intercept", "C"}:
            raise fail("stacker", f"{_shown(stacker)}; null, or an object with keys coef, intercept and optionally C")

        def finite(value: object) -> bool:
            return _is_number(value) and math.isfinite(value)

        coef, intercept = stacker["coef"], stacker["intercept"]
        if (
            not isinstance(coef, list)
            or len(coef) != labels
            or not all(isinstance(row, list) and len(row) == width and all(map(finite, row)) for row in coef)
        ):
            raise fail(
                "stacker.coef",
                f"{labels} rows (one per label) of {width} finite numbers "
                f"({len(self.branches)} branches x {labels} labels)",
            )
        if not isinstance(intercept, list) or len(intercept) != labels or not all(map(finite, intercept)):
            raise fail("stacker.intercept", f"{labels} finite numbers, one per label")
        if "C" in stacker and not finite(stacker["C"]):
            raise fail("stacker.C", f"{_shown(stacker['C'])}; a finite number (the regularisation it was fitted with)")

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
            if self.stacker is None:
                raise FusionError("fusion method 'stacker' without stacker coefficients (the 'stacker' key)")
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
            grid.append({b: k / n for b, k in zip(branches, parts, strict=True)})
    return grid


def tune_weights(
    y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], step: float = 0.05
) -> tuple[dict[str, float], float, float]:
    """Simplex weights and global threshold maximising samples-F1: (weights, threshold, F1).

    The F1 is never below that of any branch alone (a corner of the simplex) at its own tuned
    threshold.
    """
    branches = list(probs_by_branch)
    coarse = THRESHOLD_GRID[::3]  # the weight search needs the threshold only roughly
    best: tuple[float, dict[str, float]] = (-1.0, {})
    for weights in simplex_grid(branches, step):
        _, f1 = tune_global_threshold(y_true, weighted_average(probs_by_branch, weights), coarse)
        if f1 > best[0] + 1e-12:
            best = (f1, weights)
    # On the coarse grid a blend can beat a branch alone that the full grid puts first, so the
    # final choice, on the full grid, is between the blend found and every branch alone (the
    # blend first, so it wins ties).
    alone = [{b: float(b == branch) for b in branches} for branch in branches]
    results = [
        (weights, *tune_global_threshold(y_true, weighted_average(probs_by_branch, weights)))
        for weights in [best[1], *(w for w in alone if w != best[1])]
    ]
    return max(results, key=lambda result: result[2])


def tune_per_label_thresholds(
    y_true: np.ndarray, probs: np.ndarray, global_threshold: float, rounds: int = 2
) -> np.ndarray:
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


def _cross_validated(
    y_true: np.ndarray, probs_by_branch: dict[str, np.ndarray], method: str, folds: int, seed: int
) -> float:
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


def tune_fusion(
    y_true: np.ndarray,
    probs_by_branch: dict[str, np.ndarray],
    label_ids: Sequence[int],
    folds: int = 5,
    seed: int = 0,
    compare_stacker: bool = True,
) -> FusionSettings:
    """Tune weights and thresholds (and a stacker) on validation probabilities; keep the better method.

    Images some branch has no probabilities for (NaN rows: an image it could not read) are left
    out: tuning compares the branches on the images every branch scored. Their count is kept in
    ``tuned_on["unscored_images"]``."""
    branches = list(probs_by_branch)
    scored = ~np.any([np.isnan(p).any(axis=1) for p in probs_by_branch.values()], axis=0)  # (N,)
    unscored = int((~scored).sum())
    if not scored.any():
        raise FusionError(
            f"fusion cannot be tuned: none of the {len(y_true)} validation images has probabilities "
            f"from every branch {branches}"
        )
    if unscored:
        log.info("tuning fusion on the %d of %d validation images every branch scored", int(scored.sum()), len(y_true))
        y_true, probs_by_branch = y_true[scored], {b: p[scored] for b, p in probs_by_branch.items()}
    weights, threshold, f1_global = tune_weights(y_true, probs_by_branch)
    fused = weighted_average(probs_by_branch, weights)
    per_label = tune_per_label_thresholds(y_true, fused, threshold)
    f1_weighted = samples_f1(y_true, binarize(fused, per_label))
    settings = FusionSettings(
        branches=branches,
        label_ids=[int(i) for i in label_ids],
        method="weighted",
        weights={b: round(w, 4) for b, w in weights.items()},
        threshold=round(threshold, 3),
        per_label_thresholds={str(i): float(t) for i, t in zip(label_ids, per_label, strict=True)},
        val_samples_f1=round(f1_weighted, 5),
        tuned_on={"n_images": len(y_true), "global_threshold_samples_f1": round(f1_global, 5)},
    )
    if unscored:
        settings.tuned_on["unscored_images"] = unscored
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


def fusion_file(weights_dir: Path, branches: list[str]) -> Path:
    """Where the fusion settings of a subset of the trained branches are kept: beside fusion.json
    (the full run's, which users edit), named by the branches, e.g. ``fusion-caption+image.json``."""
    return weights_dir / f"fusion-{'+'.join(sorted(branches))}.json"


def save_fusion(settings: FusionSettings, path: str | Path) -> None:
    """Write fusion.json atomically."""
    write_json(Path(path), asdict(settings))


def load_fusion(path: str | Path) -> FusionSettings:
    """Read fusion.json, with clear errors for hand edits that break it: each names the file,
    the key and the values allowed."""
    path = Path(path)

    unique_keys = unique_keys_hook(lambda keys: FusionError(f"{path}: key(s) {keys} given twice; give each once"))

    try:
        raw = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        raise FusionError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise FusionError(f"{path}: not UTF-8 text; fusion.json is plain JSON") from None
    except RecursionError:
        raise FusionError(
            f"{path}: JSON nested too deeply to read; fusion.json is an object nesting a few levels"
        ) from None
    known = list(FusionSettings.__dataclass_fields__)
    if not isinstance(raw, dict):
        raise FusionError(f"{path}: holds {_shown(raw)}; fusion.json is a JSON object with keys {known}")
    version = raw.get("version", FUSION_VERSION)
    if version != FUSION_VERSION or isinstance(version, bool):
        raise FusionError(f"{path}: version {_shown(version)}, this code reads {FUSION_VERSION}; re-tune with --tune")
    unknown = set(raw) - set(known)
    if unknown:
        raise FusionError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(known)}")
    missing = [key for key in ("branches", "label_ids") if key not in raw]
    if missing:
        raise FusionError(f"{path}: missing key(s) {missing}; valid keys: {sorted(known)}")
    settings = FusionSettings(**raw)
    settings.check(str(path))
    return settings
