"""Measure a stacker learned on all training rows from out-of-fold predictions, from the caches.

Issue 32's second lever, measured before it is built into the pipeline: the fine-tuned image
branch has honest predictions only on the validation split (it trained on the rest), so the
stacker's inputs are two cheap models that can be K-folded over the training rows in seconds:
- image: logistic regression on the avg+max pooled maps of partial mode's frozen front (the
  stage-map cache the image trainer wrote; the same maps inference computes on the way);
- caption: logistic regression on the MiniLM sentence vectors (the text-encoder cache).
Every training row gets both models' predictions from folds that did not see it; an MLP stacker
learns on those (36 log-odds in, 18 labels out), and on the validation split, with the cheap
models refitted on all training rows, it becomes a fourth branch beside image, decoder and
caption. Fused samples-F1 with and without it, split-tuned and cross-validated (5 folds, 8 fold
seeds), as bench/fusion_cv.py computes them.

    .venv/bin/python bench/stacker_oof.py --data ../shared/comp5329 --weights /tmp/real/base0/weights
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from fusion_cv import branch_probabilities, emit, evaluate  # noqa: E402
from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, LABELS_COLUMN, DatasetPaths, group_by_image, load_train_val  # noqa: E402
from pipeline.shards import ShardedStore  # noqa: E402
from pipeline.text_features import sentence_vectors  # noqa: E402


def pooled_front_maps(cache_dir: Path, num_rows: int) -> np.ndarray:
    """avg+max pooled plain-view stage maps (N, 2C) of the image trainer's cache (rows: train then val)."""
    directory = next(d for d in sorted(cache_dir.glob("stagemaps-*")) if (d / "manifest.json").is_file())
    key = json.loads((directory / "manifest.json").read_text())["key"]
    store = ShardedStore.open_complete(directory, key, num_rows)
    if store is None:
        raise SystemExit(f"{directory}: no complete stage-map cache of {num_rows} images")
    pooled = []
    for start in range(0, num_rows, 1024):
        maps = store.read("plain", np.arange(start, min(num_rows, start + 1024))).astype(np.float32)
        pooled.append(np.concatenate([maps.mean(axis=(2, 3)), maps.max(axis=(2, 3))], axis=1))
    return np.nan_to_num(np.concatenate(pooled))


def logits(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(probs, 1e-4, 1 - 1e-4)
    return np.log(probs / (1 - probs))


def cheap_model(c: float) -> OneVsRestClassifier:
    return OneVsRestClassifier(LogisticRegression(C=c, max_iter=300), n_jobs=1)


def out_of_fold(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, c: float, folds: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(OOF probabilities on the training rows, probabilities on the validation rows of a model fitted on all)."""
    scaler = StandardScaler().fit(x)
    x, x_val = scaler.transform(x), scaler.transform(x_val)
    oof = np.zeros(y.shape)
    for fit, held in KFold(folds, shuffle=True, random_state=seed).split(x):
        oof[held] = cheap_model(c).fit(x[fit], y[fit]).predict_proba(x[held])
    return oof, cheap_model(c).fit(x, y).predict_proba(x_val)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True, help="the image run's weights (stage-map cache, val_probs)")
    parser.add_argument("--from", dest="sources", action="append", default=[], metavar="BRANCH=DIR")
    parser.add_argument("--text-cache", help="the text-encoder cache folder (default WEIGHTS/cache)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    weights = Path(args.weights)
    label_set, train_df, val_df = load_train_val(DatasetPaths.resolve(args.data, None), 0.15)
    train_images, val_images = group_by_image(train_df).images, group_by_image(val_df).images
    y_train, y_val = label_set.encode(train_images[LABELS_COLUMN]), label_set.encode(val_images[LABELS_COLUMN])
    n_train = len(train_images)

    front = pooled_front_maps(weights / "cache", n_train + len(val_images))
    img_oof, img_val = out_of_fold(front[:n_train], y_train, front[n_train:], 0.05, args.folds, args.seed)
    cache = Path(args.text_cache) if args.text_cache else weights / "cache"
    sentences = sentence_vectors(train_images[CAPTION_COLUMN].tolist(), "minilm", cache)
    sentences_val = sentence_vectors(val_images[CAPTION_COLUMN].tolist(), "minilm", cache)
    cap_oof, cap_val = out_of_fold(sentences, y_train, sentences_val, 0.5, args.folds, args.seed)

    stack_in = np.concatenate([logits(img_oof), logits(cap_oof)], axis=1)
    stack_val = np.concatenate([logits(img_val), logits(cap_val)], axis=1)
    stacker = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=200, early_stopping=True,
                            random_state=args.seed).fit(stack_in, y_train)
    stacked = stacker.predict_proba(stack_val)

    sources = {b: Path(d) for b, _, d in (s.partition("=") for s in args.sources)}
    branches = ["image", "decoder", "caption"]
    probs = branch_probabilities(weights, sources, branches, val_images[ID_COLUMN].tolist(), label_set.ids)
    result = {
        "cheap_image_alone": evaluate(y_val, {"cheap_image": img_val}, label_set.ids, 1)["branches"],
        "cheap_caption_alone": evaluate(y_val, {"cheap_caption": cap_val}, label_set.ids, 1)["branches"],
        "three_branches": evaluate(y_val, probs, label_set.ids, 8),
        "with_stacker": evaluate(y_val, {**probs, "stacker": stacked}, label_set.ids, 8),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
