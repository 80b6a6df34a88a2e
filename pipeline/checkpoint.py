"""Branch checkpoints and validation-probability files: what they hold, and clear mismatch errors.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so it loads with
``torch.load(..., weights_only=True)``, which refuses files crafted to run code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.choices import BRANCHES
from pipeline.io import CheckpointError, atomic_torch_save, atomic_write, safe_torch_load

FORMAT_VERSION = 1
# What every branch's checkpoint holds (save_checkpoint writes them all); the rest is per branch.
REQUIRED_KEYS = ("branch", "config", "label_ids", "state_dict")


def checkpoint_path(weights_dir: str | Path, branch: str) -> Path:
    """Where a branch's checkpoint lives: ``weights/<branch>.pt``."""
    return Path(weights_dir) / f"{branch}.pt"


def save_checkpoint(
    path: str | Path, *, branch: str, state_dict: dict, config: dict, label_ids: Sequence[int], **extras: object
) -> None:
    """Save one branch as a plain dict carrying everything needed to rebuild it."""
    if branch not in BRANCHES:
        raise ValueError(f"unknown branch {branch!r}; valid: {', '.join(BRANCHES)}")
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "branch": branch,
        "config": dict(config),
        "label_ids": [int(i) for i in label_ids],
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        **extras,
    }
    atomic_torch_save(checkpoint, Path(path))


def load_checkpoint(path: str | Path, *, branch: str | None = None, label_ids: Sequence[int] | None = None) -> dict:
    """Load a checkpoint safely and check it is the expected branch, label set and format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train the branch first")
    checkpoint = safe_torch_load(path)
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no format_version)")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {checkpoint['format_version']}, this code reads version "
            f"{FORMAT_VERSION}; retrain the branch"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, no {', '.join(missing)}; retrain the branch")
    if branch is not None and checkpoint.get("branch") != branch:
        raise CheckpointError(f"{path}: holds the {checkpoint.get('branch')!r} branch, expected {branch!r}")
    if label_ids is not None and list(checkpoint["label_ids"]) != [int(i) for i in label_ids]:
        raise CheckpointError(f"{path}: trained for labels {checkpoint['label_ids']}, this run has {list(label_ids)}")
    return checkpoint


def probabilities_path(weights_dir: str | Path, branch: str) -> Path:
    """Where a branch's validation-split probabilities live."""
    return Path(weights_dir) / f"val_probs_{branch}.csv"


def save_probabilities(path: str | Path, image_ids: Sequence[str], label_ids: Sequence[int], probs: np.ndarray) -> None:
    """Write probabilities (N, L) keyed by ImageID, one column per label id, atomically."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(image_ids), len(label_ids)):
        raise ValueError(f"probabilities of shape {probs.shape} for {len(image_ids)} images x {len(label_ids)} labels")
    frame = pd.DataFrame(probs, columns=[str(i) for i in label_ids])
    frame.insert(0, "ImageID", list(image_ids))
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6f"))


def load_probabilities(
    path: str | Path, label_ids: Sequence[int] | None = None
) -> tuple[list[str], list[int], np.ndarray]:
    """Read a probabilities file: (image ids, label ids, probabilities (N, L)).

    An empty cell (or ``nan``) is NaN: no probability, as ``save_probabilities`` writes the row
    of an image the branch could not score (``--skip-bad-images``); the reader decides what to
    do with such rows. Anything else that is not a probability in 0..1 (text, inf, 1.5), a
    header that is not ImageID and label ids, or a file that is not CSV is a ``CheckpointError``
    naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such probabilities file; train the branch first")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path}: not a probabilities file written by training "
            f"({str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__})"
        ) from None
    header = list(frame.columns)
    if (
        not header
        or header[0] != "ImageID"
        or len(header) < 2
        or not all(c.isascii() and c.isdigit() for c in header[1:])
    ):
        raise CheckpointError(
            f"{path}:1: header {','.join(header)!r}; a probabilities file has ImageID, then one column per label id"
        )
    file_labels = [int(c) for c in header[1:]]
    if label_ids is not None and file_labels != [int(i) for i in label_ids]:
        raise CheckpointError(f"{path}: probabilities for labels {file_labels}, expected {list(label_ids)}")
    cells = frame.iloc[:, 1:]
    unscored = cells.apply(lambda column: column.str.strip().str.lower().isin(["", "nan"]))
    values = cells.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~unscored.to_numpy() & ~((values >= 0) & (values <= 1))  # text, inf or outside 0..1
    if bad.any():
        row, column = (int(k) for k in np.argwhere(bad)[0])
        raise CheckpointError(
            f"{path}:{row + 2}: label {header[column + 1]} is {cells.iat[row, column]!r}, not a "
            "probability (a number 0..1, or empty where the branch could not score the image)"
        )
    return frame["ImageID"].tolist(), file_labels, np.where(unscored.to_numpy(), np.nan, values)
