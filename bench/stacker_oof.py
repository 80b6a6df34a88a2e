"""Measure a stacker learned on all training rows from out-of-fold predictions, from the caches.

Issue 32's second lever (``pipeline/stacking.py``, trained by ``train_efficientnet.py
--stacker-folds K``), measured from the caches alone: the fine-tuned image
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

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from fusion_cv import branch_probabilities, emit, evaluate  # noqa: E402
from pipeline import stacking  # noqa: E402
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
    return np.nan_to_num(stacking.pool_stage_maps(lambda rows: store.read("plain", rows), np.arange(num_rows)))


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
    cache = Path(args.text_cache) if args.text_cache else weights / "cache"
    sentences = sentence_vectors(train_images[CAPTION_COLUMN].tolist(), "minilm", cache)
    sentences_val = sentence_vectors(val_images[CAPTION_COLUMN].tolist(), "minilm", cache)
    state = stacking.fit(front[:n_train], sentences, y_train, args.folds, args.seed)
    cheap = stacking.cheap_log_odds(state, front[n_train:], sentences_val)
    stacked = stacking.predict(state, front[n_train:], sentences_val)

    sources = {b: Path(d) for b, _, d in (s.partition("=") for s in args.sources)}
    branches = ["image", "decoder", "caption"]
    probs = branch_probabilities(weights, sources, branches, val_images[ID_COLUMN].tolist(), label_set.ids)
    result = {
        **{
            f"cheap_{name}_alone": evaluate(y_val, {f"cheap_{name}": stacking.sigmoid(cheap[name])}, label_set.ids, 1)[
                "branches"
            ]
            for name in stacking.CHEAP_MODELS
        },
        "three_branches": evaluate(y_val, probs, label_set.ids, 8),
        "with_stacker": evaluate(y_val, {**probs, "stacker": stacked}, label_set.ids, 8),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return emit(result, args.json)


if __name__ == "__main__":
    main()
