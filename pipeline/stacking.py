"""A stacker learned on every training row from out-of-fold predictions (docs/recipe.md, "A stacker
learned out of fold").

Fusion tunes its weights on the validation split alone, because the fine-tuned image branch has
honest predictions only there. This stacker learns on the training rows instead, from two cheap
models that can be K-folded in seconds:

- image: standardised avg+max pooled maps of partial mode's frozen front, one logistic
  regression per label (one-vs-rest);
- caption: the same on each image's MiniLM sentence vector.

Every training row gets both models' log-odds from the fold that did not see it; an MLP
(scikit-learn's ``MLPClassifier``, one ReLU layer, sigmoid outputs) learns the labels from those
2L log-odds. The cheap models are then refitted on all training rows for new images.

:func:`fit` returns a flat dict of float64 tensors (loads with ``torch.load(weights_only=True)``)
and :func:`predict` computes from it with numpy alone, so no pickled scikit-learn object is ever
saved or read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

# The two cheap models, in the order their log-odds enter the stacker, and the L2 strength of
# each (bench/stacker_oof.py's measured settings): the 400-odd pooled map channels overfit
# faster than the 384 sentence dimensions.
CHEAP_MODELS = ("image", "caption")
INVERSE_REGULARISATION = {"image": 0.05, "caption": 0.5}
LOGISTIC_MAX_ITER = 300
# The stacker MLP: one hidden layer, L2 1e-3, Adam for at most 200 epochs, stopped early on a
# tenth of its rows.
HIDDEN_UNITS = 128
MLP_ALPHA = 1e-3
MLP_MAX_ITER = 200
# Log-odds enter the stacker clipped to those of probabilities 1e-4 .. 1 - 1e-4: a label the
# cheap model is sure of cannot dominate the MLP's inputs.
LOG_ODDS_LIMIT = float(np.log((1 - 1e-4) / 1e-4))
# Rows of stage maps pooled at once (a Lite2 front's 1,024 maps of 208 x 10 x 10 are 85 MB in float32).
POOL_BATCH_ROWS = 1024


def pool_maps(maps: np.ndarray) -> np.ndarray:
    """avg+max pooled maps (N, C, h, w) -> (N, 2C) float32: each channel's mean over the
    positions, then its maximum (NaN maps, an unreadable image's, stay NaN)."""
    maps = np.asarray(maps, dtype=np.float32)
    return np.concatenate([maps.mean(axis=(2, 3)), maps.max(axis=(2, 3))], axis=1)


def pool_stage_maps(
    read: Callable[[np.ndarray], np.ndarray], rows: Sequence[int] | np.ndarray, batch_rows: int = POOL_BATCH_ROWS
) -> np.ndarray:
    """:func:`pool_maps` of the stage maps of ``rows``, read ``batch_rows`` at a time with
    ``read(rows) -> (n, C, h, w)`` (the stage-map cache's ``read("plain", ...)``), so a whole
    cache is never in memory."""
    rows = np.asarray(rows, dtype=np.int64)
    pooled = [pool_maps(read(rows[start : start + batch_rows])) for start in range(0, len(rows), batch_rows)]
    return np.concatenate(pooled) if pooled else np.zeros((0, 0), np.float32)


def _per_label_logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """One logistic regression per label column of ``y`` on ``x``: coefficients (L, D) and
    intercepts (L,). A label that is constant in ``y`` (absent from a fold) gets no coefficients
    and the clip's log-odds, as one-vs-rest predicts a constant there."""
    coef, intercept = np.zeros((y.shape[1], x.shape[1])), np.zeros(y.shape[1])
    for label in range(y.shape[1]):
        column = y[:, label]
        if column.min() == column.max():
            intercept[label] = LOG_ODDS_LIMIT if column[0] else -LOG_ODDS_LIMIT
            continue
        model = LogisticRegression(C=c, max_iter=LOGISTIC_MAX_ITER).fit(x, column)
        coef[label], intercept[label] = model.coef_[0], model.intercept_[0]
    return coef, intercept


def out_of_fold_log_odds(
    x: np.ndarray, y: np.ndarray, c: float, folds: int, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(log-odds (N, L) of every row from the model of the fold that held it out, and the model
    refitted on all rows: its standardisation ``mean``/``scale`` and ``coef``/``intercept``).

    The standardisation is fitted on all rows once: it learns no labels, and new images are
    standardised the same way."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    scaler = StandardScaler().fit(x)
    scaled = scaler.transform(x)
    log_odds = np.zeros(y.shape)
    for fitted, held in KFold(folds, shuffle=True, random_state=seed).split(scaled):
        coef, intercept = _per_label_logistic(scaled[fitted], y[fitted], c)
        log_odds[held] = scaled[held] @ coef.T + intercept
    coef, intercept = _per_label_logistic(scaled, y, c)
    return log_odds, {"mean": scaler.mean_, "scale": scaler.scale_, "coef": coef, "intercept": intercept}


def mlp_state(model: MLPClassifier) -> dict[str, torch.Tensor]:
    """A fitted one-hidden-layer ``MLPClassifier`` (ReLU, multi-label) as tensors in ``nn.Linear``'s
    layout: ``{"0.weight": (H, in), "0.bias": (H,), "1.weight": (L, H), "1.bias": (L,)}``."""
    if model.activation != "relu" or len(model.coefs_) != 2 or model.out_activation_ != "logistic":
        raise ValueError(
            "the stacker reads one ReLU hidden layer with sigmoid outputs; got "
            f"{len(model.coefs_) - 1} layer(s) of {model.activation}, {model.out_activation_} outputs"
        )
    state = {}
    for layer, (weight, bias) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
        state[f"{layer}.weight"] = torch.from_numpy(np.ascontiguousarray(weight.T, dtype=np.float64))
        state[f"{layer}.bias"] = torch.from_numpy(np.asarray(bias, dtype=np.float64).copy())
    return state


def sigmoid(log_odds: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow at any log-odds."""
    return np.exp(-np.logaddexp(0.0, -log_odds))


def mlp_probabilities(state: dict[str, torch.Tensor], inputs: np.ndarray) -> np.ndarray:
    """The MLP of :func:`mlp_state` on ``inputs`` (N, in): sigmoid(W1 relu(W0 x + b0) + b1), (N, L)."""
    hidden = np.maximum(inputs @ state["0.weight"].numpy().T + state["0.bias"].numpy(), 0.0)
    return sigmoid(hidden @ state["1.weight"].numpy().T + state["1.bias"].numpy())


def _stacker_inputs(log_odds: Sequence[np.ndarray], limit: float) -> np.ndarray:
    return np.clip(np.concatenate(log_odds, axis=1), -limit, limit)


def fit(
    image_features: np.ndarray, sentence_vectors: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Fit the stacker on the training rows: image features (N, D_image) (:func:`pool_maps`),
    sentence vectors (N, D_caption) and multi-hot labels (N, L). Returns its state: a flat dict
    of float64 tensors, ``image.*`` and ``caption.*`` (each cheap model refitted on all rows),
    ``stacker.*`` (the MLP) and ``log_odds_limit``; the same data and seed give the same state."""
    labels = np.asarray(labels)
    rows = len(labels)
    if len(image_features) != rows or len(sentence_vectors) != rows:
        raise ValueError(
            f"the stacker needs one row each: {len(image_features)} image rows, "
            f"{len(sentence_vectors)} caption rows, {rows} label rows"
        )
    if not 2 <= folds <= rows:
        raise ValueError(f"{folds} folds for {rows} training rows; give 2 to {rows}")
    state: dict[str, torch.Tensor] = {"log_odds_limit": torch.tensor(LOG_ODDS_LIMIT, dtype=torch.float64)}
    inputs = []
    for name, x in zip(CHEAP_MODELS, (image_features, sentence_vectors), strict=True):
        log_odds, model = out_of_fold_log_odds(x, labels, INVERSE_REGULARISATION[name], folds, seed)
        inputs.append(log_odds)
        state.update(
            {f"{name}.{key}": torch.from_numpy(np.asarray(value, dtype=np.float64)) for key, value in model.items()}
        )
    mlp = MLPClassifier(
        hidden_layer_sizes=(HIDDEN_UNITS,),
        alpha=MLP_ALPHA,
        max_iter=MLP_MAX_ITER,
        early_stopping=True,
        random_state=seed,
    )
    mlp.fit(_stacker_inputs(inputs, LOG_ODDS_LIMIT), labels)
    state.update({f"stacker.{key}": value for key, value in mlp_state(mlp).items()})
    return state


def cheap_log_odds(
    state: dict[str, torch.Tensor], image_features: np.ndarray, sentence_vectors: np.ndarray
) -> dict[str, np.ndarray]:
    """Each cheap model's log-odds (N, L), unclipped, by name (``image``, ``caption``): the
    stacker's inputs, and each model alone as a branch of its own."""
    out = {}
    for name, x in zip(CHEAP_MODELS, (image_features, sentence_vectors), strict=True):
        mean = state[f"{name}.mean"].numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(mean):
            raise ValueError(f"the stacker's {name} model reads (N, {len(mean)}) features, got {x.shape}")
        out[name] = ((x - mean) / state[f"{name}.scale"].numpy()) @ state[f"{name}.coef"].numpy().T + state[
            f"{name}.intercept"
        ].numpy()
    return out


def predict(state: dict[str, torch.Tensor], image_features: np.ndarray, sentence_vectors: np.ndarray) -> np.ndarray:
    """The stacker's probabilities (N, L) for new rows, from :func:`fit`'s state alone."""
    log_odds = cheap_log_odds(state, image_features, sentence_vectors)
    inputs = _stacker_inputs([log_odds[name] for name in CHEAP_MODELS], float(state["log_odds_limit"]))
    return mlp_probabilities(
        {key.removeprefix("stacker."): value for key, value in state.items() if key.startswith("stacker.")}, inputs
    )
