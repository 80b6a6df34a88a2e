"""Train the caption branch: an LSTM/GRU over each image's caption, one probability per label.

Writes WEIGHTS/caption.pt, WEIGHTS/val_probs_caption.csv (validation-split probabilities
for fusion tuning) and WEIGHTS/caption_config.json. Without --data it trains on the demo
dataset (generated in data/demo when missing).

    .venv/bin/python train_caption_rnn.py --data /work/shared/comp5329
"""

from __future__ import annotations

import argparse

from pipeline.config import build_parser, config_from_args
from pipeline.branches.caption import CaptionTrainConfig
from pipeline.train.caption import train_caption_branch


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of this script, one option per ``CaptionTrainConfig`` field."""
    return build_parser(CaptionTrainConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: ``sys.argv``), train, and return the run's summary."""
    args = get_args_parser().parse_args(argv)
    return train_caption_branch(config_from_args(CaptionTrainConfig, args))


if __name__ == "__main__":
    main()
