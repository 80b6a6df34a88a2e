"""Predict labels for test.csv by fusing the trained branches, and evaluate them.

Loads the checkpoints found in --weights (image head, label decoder, caption RNN), tunes
or reads weights/fusion.json, and writes output/submission.csv with one row per test.csv
row. --evaluate scores every branch alone and fused on the validation split (or on a
labelled CSV given with --eval-csv) and writes output/metrics.json and plots.
"""

from __future__ import annotations

from pipeline.config import build_parser, config_from_args
from pipeline.inference import InferenceConfig, run_inference


def get_args_parser():
    return build_parser(InferenceConfig, __doc__)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    return run_inference(config_from_args(InferenceConfig, args))


if __name__ == "__main__":
    main()
