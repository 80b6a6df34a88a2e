"""Predict labels by fusing the trained branches, and evaluate them; ``--help`` lists every option.

    python inference.py --data path/to/dataset
    python inference.py --image photo.jpg --caption "a man riding a horse" --format json

The program lives in ``pipeline.cli`` (installed as ``cml-infer``).
"""

import sys

from pipeline.cli import infer as main, infer_command, infer_parser as get_args_parser

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(infer_command())
