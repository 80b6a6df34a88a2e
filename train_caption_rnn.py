"""Train the caption branch: an LSTM/GRU ensemble over each image's caption, one probability per label.

Writes WEIGHTS_DIR/caption.pt, WEIGHTS_DIR/val_probs_caption.csv (validation-split
probabilities for fusion tuning) and WEIGHTS_DIR/caption_config.json.

    python train_caption_rnn.py --data path/to/dataset
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import build_parser, parse_config, run_main
from pipeline.train.caption_config import CaptionTrainConfig
from pipeline.train.caption import train_caption_branch


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(CaptionTrainConfig, __doc__, debug=True)


def main(argv: list[str] | None = None) -> dict:
    return train_caption_branch(parse_config(CaptionTrainConfig, get_args_parser(), argv))


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser()))
