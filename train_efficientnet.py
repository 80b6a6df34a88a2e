"""Train the image branch (image head and CNN-RNN label decoder); ``--help`` lists every option.

    python train_efficientnet.py --data path/to/dataset

The program lives in ``pipeline.cli`` (installed as ``cml-train-image``).
"""

import sys

from pipeline.cli import train_image as main, train_image_command, train_image_parser as get_args_parser

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(train_image_command())
