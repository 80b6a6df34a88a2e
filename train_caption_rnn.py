"""Train the caption branch (an LSTM/GRU ensemble over the captions); ``--help`` lists every option.

    python train_caption_rnn.py --data path/to/dataset

The program lives in ``pipeline.cli`` (installed as ``cml-train-caption``).
"""

import sys

from pipeline.cli import train_caption as main, train_caption_command, train_caption_parser as get_args_parser

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(train_caption_command())
