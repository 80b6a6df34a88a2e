"""Caption-only baseline: TF-IDF (word 1-2 grams) + one-vs-rest logistic regression.

Trains on the shared training split of ``train.csv`` and prints the validation
samples-F1 at a 0.5 threshold and at the best global threshold, with the seconds
taken; the caption RNN (``train_caption_rnn.py``) is measured against these figures.
Note the tuned figure picks its threshold on the validation split itself, so it is
slightly optimistic; the RNN's tuned figure is computed the same way.

    .venv/bin/python bench/caption_baseline.py --data /work/shared/comp5329
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.dataset import CAPTION_COLUMN, LABELS_COLUMN, DatasetPaths, load_train_val
from pipeline.data.text import tokenize
from pipeline.metrics import binarize, samples_f1, tune_global_threshold


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data", default=None, help="dataset folder holding train.csv (default: the demo dataset)")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="validation fraction of the shared split")
    parser.add_argument("--C", type=float, default=10.0, help="inverse L2 strength of the logistic regression")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    label_set, train, val = load_train_val(DatasetPaths.resolve(args.data), args.val_fraction)
    # The same tokeniser as the RNN, so the two branches see the same words.
    vectorizer = TfidfVectorizer(
        tokenizer=tokenize, lowercase=False, token_pattern=None, ngram_range=(1, 2), min_df=2, sublinear_tf=True
    )
    x_train = vectorizer.fit_transform(train[CAPTION_COLUMN].fillna(""))
    x_val = vectorizer.transform(val[CAPTION_COLUMN].fillna(""))
    y_train = label_set.encode(train[LABELS_COLUMN])
    y_val = label_set.encode(val[LABELS_COLUMN])
    # A label absent from the training split would make a one-class problem; predict 0 for it.
    present = y_train.any(axis=0)
    model = OneVsRestClassifier(LogisticRegression(C=args.C, max_iter=2000))
    model.fit(x_train, y_train[:, present])
    probs = np.zeros(y_val.shape)
    probs[:, present] = model.predict_proba(x_val)
    seconds = time.perf_counter() - start

    f1_half = samples_f1(y_val, binarize(probs, 0.5))
    threshold, f1_tuned = tune_global_threshold(y_val, probs)
    print(f"train {len(train)} / val {len(val)} captions, {len(label_set)} labels, {x_train.shape[1]} TF-IDF features")
    print(f"val samples-F1 @0.5: {f1_half:.4f}")
    print(f"val samples-F1 @{threshold:.2f} (tuned global threshold): {f1_tuned:.4f}")
    print(f"seconds: {seconds:.1f}")
    return {"f1_at_0.5": f1_half, "f1_tuned": f1_tuned, "threshold": threshold, "seconds": seconds}


if __name__ == "__main__":
    main()
