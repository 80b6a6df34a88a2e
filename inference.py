"""Predict labels by fusing the trained branches, and evaluate them.

Loads the checkpoints in --weights-dir (image head, label decoder, caption RNN), tunes or
reads WEIGHTS_DIR/fusion.json, and writes OUTPUT/submission.csv with one row per image of
test.csv. --evaluate scores every branch alone and fused on the validation split (or on a
labelled CSV given with --eval-csv) and writes OUTPUT/metrics.json and plots. --image
predicts given files instead, each with its --caption, and prints labels with their names.

    python inference.py --data path/to/dataset
    python inference.py --image photo.jpg --caption "a man riding a horse" --format json
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import build_parser, parse_config, run_main
from pipeline.inference import InferenceConfig, run_inference
from pipeline.predictor import predict_files


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(InferenceConfig, __doc__, debug=True)


def main(argv: list[str] | None = None) -> dict:
    config = parse_config(InferenceConfig, get_args_parser(), argv)
    return predict_files(config) if config.image is not None else run_inference(config)


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser()))
