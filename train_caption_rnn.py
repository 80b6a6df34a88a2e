"""Train the caption branch: an LSTM/GRU ensemble over each image's caption, one probability per label.

Writes WEIGHTS_DIR/caption.pt, WEIGHTS_DIR/val_probs_caption.csv (validation-split
probabilities for fusion tuning) and WEIGHTS_DIR/caption_config.json.

    python train_caption_rnn.py --data path/to/dataset
"""

from __future__ import annotations

import argparse

from pipeline.train.caption_config import CaptionTrainConfig
from pipeline.config import build_parser, config_from_args
from pipeline.train.caption import train_caption_branch


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(CaptionTrainConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    return train_caption_branch(config_from_args(CaptionTrainConfig, args))


if __name__ == "__main__":
    main()
